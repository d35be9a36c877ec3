"""Workdir artifacts: ``distilled.npz``, image grids, metrics and the progress bars on stderr.
Every write is atomic (tmp + rename)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from io import BytesIO as _BytesIO
from typing import IO, Any

import numpy as np

from mim4dd_jax.errors import ConfigError


def flatten_dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} for every leaf of nested mappings (e.g. ``config.to_dict()``): how configs
    and metadata are compared and fingerprinted."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Writes ``path`` through a temporary file in the same folder, renamed on success only."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results private
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_GLOB_CHARS = "*?[]"


def lock_folder(path: str) -> int | None:
    """Opens the existing folder ``path`` and takes an exclusive, non-blocking ``flock`` on it:
    the descriptor (the lock lives while it is open, and the OS drops it when the process ends,
    even by SIGKILL), or None when another process holds it. On a filesystem without ``flock``
    the descriptor comes back unlocked."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass
    return fd


def check_workdir(workdir: str) -> str:
    """The absolute ``workdir``, checked without creating anything: ConfigError if it is a file
    or if it (or the folder it would be created in) is not writable."""
    if not workdir:
        raise ConfigError("--workdir is required (a folder for checkpoints, results and logs)")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    bad = sorted(set(workdir) & set(_GLOB_CHARS))
    if bad:
        # orbax finds a checkpoint's per-process parts with glob: under such a path it writes
        # checkpoints it cannot read back, and a resumed run would silently start over.
        raise ConfigError(
            f"workdir {workdir!r} contains {' '.join(bad)}; checkpoints cannot be read back "
            f"from a path with any of {' '.join(_GLOB_CHARS)}: choose another --workdir"
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} is a file, not a folder")
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"workdir {workdir!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"workdir {workdir!r} is not writable; choose a --workdir in a folder you can write to"
        )
    return workdir


def prepare_workdir(workdir: str) -> str:
    """Creates ``workdir`` (after :func:`check_workdir`) and returns its absolute path."""
    workdir = check_workdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} cannot be created: {e.strerror}") from None
    return workdir


def read_npz(path: str, what: str, hint: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``; ConfigError, naming ``what`` and ending with
    ``hint`` (how to make a good one), for a folder, a missing file, a single ``.npy`` array, a
    text file or anything else that is not an ``.npz``."""
    if os.path.isdir(path):
        inside = os.path.join(path, "distilled.npz")
        where = f"; did you mean {inside!r}?" if os.path.isfile(inside) else ""
        raise ConfigError(f"{what} is a folder, not an .npz file{where}")
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no such file; {hint}")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise ConfigError(f"{what} cannot be read ({e.strerror})") from None
    if head.startswith(b"\x93NUMPY"):
        raise ConfigError(f"{what} is a single .npy array, not an .npz; {hint}")
    if not head:
        raise ConfigError(f"{what} is an empty file, not an .npz; {hint}")
    if not head.startswith(b"PK"):  # every .npz is a zip archive
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:  # (or a multi-byte character cut at byte 512)
            text = head[:-4].decode("utf-8", errors="replace")
        is_text = all(c.isprintable() or c.isspace() for c in text) and "\ufffd" not in text
        kind = "a text file" if is_text else "not a zip archive"
        raise ConfigError(f"{what} is {kind}, not an .npz; {hint}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"{what} is not a readable .npz ({e}); {hint}") from None


def save_distilled(
    path: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    lr: float,
    config: Mapping[str, Any],
    **extra: np.ndarray,
) -> None:
    """Writes ``distilled.npz``: images [N,H,W,C] in [0,1] pixel space, labels, lr, config JSON.

    The file is a function of its contents only (see :func:`save_npz`): a resumed run writes
    the same bytes as an uninterrupted one.
    """
    save_npz(
        path,
        images=np.asarray(images, np.float32),
        labels=np.asarray(labels),
        lr=np.float32(lr),
        config=np.asarray(json.dumps(dict(config), sort_keys=True, default=str)),
        # What the images' numbers are (data.PIXEL_RANGES): evaluate mode and init_from read it
        # instead of guessing (distilled pixels may leave [0, 1]: they are not clipped).
        pixel_range=np.asarray("0_1"),
        **{k: np.asarray(v) for k, v in extra.items()},
    )


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    """``json.dump(obj)`` into ``path`` atomically (indent 2 unless given)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, **{"indent": 2, **dump_kwargs})


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """What a result was computed on, for results.json: the CPU model and the cores this process
    may run on (fewer than the machine's when pinned, e.g. by ``study.py --jobs``), and the JAX
    backend with its devices (e.g. ``"1x NVIDIA H200"``). Speeds are only comparable within one
    machine, and a study's seeds may come from several."""
    import platform

    import jax

    devices = jax.devices()
    return {
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "cores": usable_cores(),
        "backend": jax.default_backend(),
        "devices": f"{len(devices)}x {devices[0].device_kind}",
    }


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """``np.savez`` (readable by ``np.load``), atomically, with fixed zip timestamps so that the
    bytes depend on the arrays only."""
    with atomic_write(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def save_synthetic_set(
    workdir: str,
    pixels: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    lr: float,
    config: Mapping[str, Any],
    **extra: np.ndarray,
) -> None:
    """Writes a set's ``distilled.npz`` and ``grid.png``; pixels [N, H, W, C] in pixel space."""
    save_distilled(
        os.path.join(workdir, "distilled.npz"), pixels, labels, lr=lr, config=config, **extra
    )
    save_grid(os.path.join(workdir, "grid.png"), pixels, labels, num_classes)


def image_grid(
    images: np.ndarray, labels: np.ndarray, num_classes: int, pad: int = 1
) -> np.ndarray:
    """Tiles [N,H,W,C] images in [0,1] into one uint8 picture, one row per class."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(-1)
    rows = [np.flatnonzero(labels == c) for c in range(num_classes)]
    cols = max(1, max(len(r) for r in rows))
    _, h, w, ch = images.shape
    grid = np.ones((num_classes * (h + pad) + pad, cols * (w + pad) + pad, ch), np.float32)
    for r, idx in enumerate(rows):
        for c, i in enumerate(idx):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = images[i]
    grid = (np.clip(grid, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return grid[..., 0] if ch == 1 else grid


def save_grid(path: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """Writes the :func:`image_grid` of the images as a PNG (upscaled for small images)."""
    from PIL import Image

    picture = Image.fromarray(image_grid(np.asarray(images), labels, num_classes))
    if max(picture.size) < 512:
        scale = max(1, 512 // max(picture.size))
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    with atomic_write(path) as f:
        picture.save(f, format="PNG")


class MetricWriter:
    """Appends one JSON object per call to ``metrics.jsonl`` (flushed, so a crash loses nothing)
    and, with ``tensorboard=True``, every number in it as a TensorBoard scalar under
    ``workdir/tensorboard`` (nested keys and list entries joined with "/").

    TensorBoard needs the ``tensorboard`` package (installed with this one); where it is missing
    (e.g. a bare accelerator image) a warning says so once and only the JSON lines are written.
    """

    def __init__(self, workdir: str, name: str = "metrics.jsonl", *, tensorboard: bool = False):
        self.path = os.path.join(workdir, name)
        self._events = None
        if tensorboard:
            self._events = _event_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, **values: Any) -> None:
        row = {"step": int(step), "time": time.time()}
        row.update({k: _jsonable(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._events is not None:
            self._events.scalars(int(step), row["time"], dict(_scalars("", row)))

    def resume_at(self, step: int, keep: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Before a resumed run appends: cuts ``metrics.jsonl`` back to the rows of steps <=
        ``step`` (those with ``keep(row)`` False go too), atomically, so that the steps a killed
        run logged after its last checkpoint, which the resumed run redoes, appear once. In
        TensorBoard, a SessionLog.START at ``step + 1`` makes it drop the older events of later
        steps (its purge of orphaned data; the events files are append-only)."""
        cut_metrics(self.path, step, keep)
        if self._events is not None:
            self._events.start(int(step) + 1, time.time())

    def write_image(self, step: int, tag: str, image: bytes | np.ndarray) -> None:
        """A TensorBoard image summary (e.g. the synthetic set's grid) at ``step``, shown in
        TensorBoard's Images tab next to the scalars. ``image``: encoded PNG bytes, or an
        [H, W] / [H, W, C] (C in 1, 3, 4) uint8 array. Without ``tensorboard=True`` (or without
        the tensorboard package) it does nothing."""
        if self._events is not None:
            self._events.image(int(step), time.time(), tag, png_bytes(image))


def cut_metrics(path: str, step: int, keep: Callable[[dict[str, Any]], bool] | None = None) -> int:
    """Keeps the rows of the ``metrics.jsonl`` at ``path`` whose step is <= ``step`` (and, with
    ``keep``, for which it is True), byte for byte, and drops a torn last line; the file is
    replaced atomically (unchanged when nothing goes). Returns how many rows were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a kill mid-write
        if int(row["step"]) <= step and (keep is None or keep(row)):
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    if len(kept) != len(lines) or (lines and not lines[-1].endswith(b"\n")):
        with atomic_write(path) as f:
            f.write(b"".join(kept))
    return len(lines) - len(kept)


def _scalars(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    """(tag, number) pairs of a nested JSON-like value; step/time and non-numbers skipped."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not prefix and k in ("step", "time"):
                continue
            yield from _scalars(f"{prefix}/{k}" if prefix else str(k), v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _scalars(f"{prefix}/{i}", v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix, float(value)


def _event_writer(folder: str) -> _EventWriter | None:
    """A TensorBoard event writer for ``folder``, or None without the tensorboard package."""
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        logging.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
        return None
    return _EventWriter(EventFileWriter(folder))


class _EventWriter:
    """Scalar and image summaries through tensorboard's protos (no TensorFlow import)."""

    def __init__(self, writer: Any):
        self._writer = writer

    def _add(self, step: int, wall_time: float, values: list[Any]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=values)
        self._writer.add_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))
        self._writer.flush()

    def start(self, step: int, wall_time: float) -> None:
        """A SessionLog.START at ``step``: TensorBoard discards earlier-read events of steps >=
        ``step`` (a restarted run's orphaned data)."""
        from tensorboard.compat.proto import event_pb2

        log = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.add_event(event_pb2.Event(wall_time=wall_time, step=step, session_log=log))
        self._writer.flush()

    def scalars(self, step: int, wall_time: float, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        self._add(step, wall_time, values)

    def image(self, step: int, wall_time: float, tag: str, png: bytes) -> None:
        from PIL import Image
        from tensorboard.compat.proto import summary_pb2

        with Image.open(_BytesIO(png)) as picture:
            width, height = picture.size
            channels = len(picture.getbands())
        image = summary_pb2.Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=png
        )
        self._add(step, wall_time, [summary_pb2.Summary.Value(tag=tag, image=image)])


def png_bytes(image: bytes | np.ndarray) -> bytes:
    """``image`` as PNG bytes: PNG bytes pass through; an [H, W] or [H, W, C] uint8 array
    (C in 1, 3, 4) is encoded."""
    if isinstance(image, (bytes, bytearray)):
        if not bytes(image[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ValueError("image bytes are not a PNG")
        return bytes(image)
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected [H, W(, C)] uint8, got {array.shape} {array.dtype}")
    if array.ndim == 3:
        if array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"expected 1, 3 or 4 channels, got {array.shape[-1]}")
        array = array[..., 0] if array.shape[-1] == 1 else array
    buffer = _BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a torn last line (a crash mid-write) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def accuracy_history(workdir: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{model: {iteration: {"mean", "std", "all"}}} from the "accuracy" rows of
    ``workdir/metrics.jsonl``; the last row per iteration wins, so a resumed run that evaluated
    an iteration twice counts it once."""
    curves: dict[str, dict[int, dict[str, Any]]] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    for row in read_metrics(path) if os.path.isfile(path) else []:
        for model, acc in (row.get("accuracy") or {}).items():
            curves.setdefault(model, {})[int(row["step"])] = dict(acc)
    return curves


def final_and_best(curves: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """The two accuracies papers report, per model, from :func:`accuracy_history`:
    ``final`` (the last evaluation) and ``best`` (the evaluation with the highest mean over
    models, as DC/DSA/DM/MTT's code reports), each ``{"mean", "std", "all", "iteration"}``."""
    final, best = {}, {}
    for model, points in curves.items():
        if not points:
            continue
        last = max(points)
        top = max(sorted(points), key=lambda it: points[it]["mean"])  # earliest of ties
        final[model] = {**points[last], "iteration": last}
        best[model] = {**points[top], "iteration": top}
    return {"final": final, "best": best}


def save_accuracy_plot(workdir: str) -> None:
    """Writes ``accuracy.png``: test accuracy (mean ± std over the evaluation models) against
    the iteration, one line per architecture, from the "accuracy" rows of metrics.jsonl (the
    last row per iteration wins, so a resumed run plots each point once)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib import pyplot as plt

    curves = accuracy_history(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, points in sorted(curves.items()):
        steps = sorted(points)
        mean = np.array([points[s]["mean"] for s in steps]) * 100
        std = np.array([points[s]["std"] for s in steps]) * 100
        ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=model)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    with atomic_write(os.path.join(workdir, "accuracy.png")) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def progress_iter(
    iterable: Any,
    desc: str,
    total: int,
    *,
    unit: str,
    initial: int = 0,
    enabled: bool | None = None,
) -> Any:
    """``iterable`` with a progress bar on stderr (``enabled=None``: only when stderr is a
    terminal, see :func:`progress_bar`); ``initial``: the count it resumes at."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None if enabled is None else not enabled,
    )


def progress_write(message: str) -> None:
    """One line on stdout (a run's results) that does not break an open progress bar."""
    from tqdm import tqdm

    tqdm.write(message)


def progress_bar(desc: str, total: int, *, enabled: bool | None = None, unit: str = "epoch"):
    """A tqdm bar on stderr; ``enabled=None``: only when stderr is a terminal (CI logs stay
    short). Shows the ETA; callers add the loss or the accuracy as a postfix."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None if enabled is None else not enabled,
    )
