"""Workdir artifacts: ``distilled.npz``, image grids, metrics. Every write is atomic (tmp + rename)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np

from mim4dd_jax.errors import ConfigError


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Writes ``path`` through a temporary file in the same folder, renamed on success only."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
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


def check_workdir(workdir: str) -> str:
    """The absolute ``workdir``, checked without creating anything: ConfigError if it is a file
    or if it (or the folder it would be created in) is not writable."""
    if not workdir:
        raise ConfigError("--workdir is required (a folder for checkpoints, results and logs)")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} is a file, not a folder")
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"workdir {workdir!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir!r} is not writable")
    return workdir


def prepare_workdir(workdir: str) -> str:
    """Creates ``workdir`` (after :func:`check_workdir`) and returns its absolute path."""
    workdir = check_workdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} cannot be created: {e.strerror}") from None
    return workdir


def save_distilled(
    path: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    lr: float,
    config: Mapping[str, Any],
    **extra: np.ndarray,
) -> None:
    """Writes ``distilled.npz``: images [N,H,W,C] in [0,1] pixel space, labels, lr, config JSON."""
    with atomic_write(path) as f:
        np.savez(
            f,
            images=np.asarray(images, np.float32),
            labels=np.asarray(labels),
            lr=np.float32(lr),
            config=np.asarray(json.dumps(dict(config), sort_keys=True, default=str)),
            **{k: np.asarray(v) for k, v in extra.items()},
        )


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
    """Appends one JSON object per call to ``metrics.jsonl`` (flushed, so a crash loses nothing)."""

    def __init__(self, workdir: str, name: str = "metrics.jsonl"):
        self.path = os.path.join(workdir, name)

    def write(self, step: int, **values: Any) -> None:
        row = {"step": int(step), "time": time.time()}
        row.update({k: _jsonable(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v
