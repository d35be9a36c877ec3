"""Mode ``evaluate``: the standard protocol on an existing synthetic set, without distilling.

    python run.py --config=configs/<dataset>.py:evaluate \\
        --config.eval.set=<path/to/distilled.npz> --workdir=<new folder>

The set is a ``.npz`` holding ``images`` and ``labels`` (see README, "Evaluating a distilled
set"): ours (``artifacts.save_synthetic_set``: pixels, labels, ``lr``, and the model-space copy
``model_images`` with the ``mean``/``std``/``zca`` it was made with) or another repo's raw
arrays. The protocol comes from ``config.eval`` (models, num_models, epochs, dsa, ...); the lr
is the set's stored ``lr`` when it has one (MTT's learned lr), unless the caller gives one (the
CLI does when ``--config.eval.lr`` is on the command line), else ``eval.lr``.

The images' range is decided, not guessed (``data.decide_pixel_range``): uint8 is 0..255 pixels;
a float set is what ``eval.pixel_range`` or its own ``pixel_range`` array says (ours: "0_1"),
and an undeclared float set outside [0, 1] is refused.

Every check on the set runs before the workdir is created; a bad set is a :class:`ConfigError`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from mim4dd_jax import artifacts, runner
from mim4dd_jax import data as data_lib
from mim4dd_jax import evaluate as evaluate_lib
from mim4dd_jax.errors import ConfigError

TABLE = "results.md"


class SyntheticSet(NamedTuple):
    """A checked set: pixels [N, H, W, C] float32 in [0, 1] pixel space (None for a
    "normalised" set: its model images are given); labels [N] int32 or [N, K] float32
    probabilities; the stored lr (or None); the model-space images: a "normalised" set's own,
    or the stored copy when its normalisation matches the dataset's (or None); the stored
    config (or {}); the decided pixel range (``data.PIXEL_RANGES``)."""

    pixels: np.ndarray | None
    labels: np.ndarray
    lr: float | None
    model_images: np.ndarray | None
    stored_config: dict[str, Any]
    pixel_range: str


SET_HINT = (
    "expected an .npz with 'images' [N, H, W, C] and 'labels' [N] or [N, K], e.g. "
    "np.savez(path, images=images, labels=labels)"
)


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of ``eval.set``; ConfigError for a missing, unreadable or non-.npz file or a
    folder."""
    if not path:
        raise ConfigError(
            "evaluate needs a set: --config.eval.set=<path/to/distilled.npz> (an .npz with "
            "'images' and 'labels')"
        )
    what = f"eval.set {path!r}"
    arrays = artifacts.read_npz(path, what, SET_HINT)
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise ConfigError(
            f"{what} has no {' or '.join(repr(k) for k in missing)} array (it holds "
            f"{sorted(arrays)}); expected 'images' [N, H, W, C] and 'labels' [N] or [N, K]"
        )
    return arrays


def check_set(
    arrays: dict[str, np.ndarray],
    dataset: data_lib.Dataset,
    path: str = "",
    pixel_range: str = "",
) -> SyntheticSet:
    """Checks ``images``/``labels`` (and ``lr``) against ``dataset``; ConfigError names what is
    wrong. The images' range is decided by ``data.decide_pixel_range`` from their dtype,
    ``pixel_range`` (``eval.pixel_range``; "" = undeclared) and the file's own declaration."""
    what = f"eval.set {path!r}" if path else "eval.set"
    shape, k = tuple(dataset.image_shape), dataset.num_classes
    images, labels = np.asarray(arrays["images"]), np.asarray(arrays["labels"])
    if images.ndim == 3 and shape[-1] == 1:
        images = images[..., None]  # [N, H, W] grey images
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        hint = ""
        if images.ndim == 4 and (images.shape[1], *images.shape[2:]) == (shape[2], *shape[:2]):
            hint = " (channels first? transpose to [N, H, W, C])"
        raise ConfigError(
            f"{what} holds images of shape {images.shape}; {dataset.name} needs "
            f"[N, {', '.join(map(str, shape))}]{hint}"
        )
    if len(images) == 0:
        raise ConfigError(f"{what} holds no images")
    decided = data_lib.decide_pixel_range(
        images, pixel_range, data_lib.stored_pixel_range(arrays), what, "eval.pixel_range"
    )
    labels = _check_labels(labels, len(images), k, what, dataset.name)
    lr = None
    if "lr" in arrays:
        lr_array = np.asarray(arrays["lr"])
        if lr_array.size != 1 or not np.isfinite(lr_array).all() or not float(lr_array) > 0:
            raise ConfigError(f"{what} stores lr={lr_array.tolist()!r}; expected a number > 0")
        lr = float(lr_array)
    stored = {}
    if "config" in arrays:
        try:
            stored = json.loads(str(arrays["config"]))
        except (json.JSONDecodeError, TypeError):
            stored = {}
    if decided == "normalised":
        # Already the network's input: used as is; the pixels (for the grid) come from the
        # dataset's inverse normalisation once it is known (after any ZCA fit).
        pixels, model_images = None, images.astype(np.float32)
    else:
        pixels, model_images = data_lib.pixels_of(images, decided), None
    if (
        model_images is None
        and "model_images" in arrays
        and np.shape(arrays["model_images"]) == images.shape
        and np.array_equal(arrays.get("mean"), dataset.mean)
        and np.array_equal(arrays.get("std"), dataset.std)
        and not bool(arrays.get("zca", False))
        and dataset.zca is None
        and np.all(np.isfinite(arrays["model_images"]))
    ):
        model_images = np.asarray(arrays["model_images"], np.float32)
    return SyntheticSet(
        pixels,
        labels,
        lr,
        model_images,
        stored if isinstance(stored, dict) else {},
        decided,
    )


def _check_labels(labels: np.ndarray, n: int, k: int, what: str, name: str) -> np.ndarray:
    if labels.ndim not in (1, 2) or len(labels) != n:
        raise ConfigError(
            f"{what} has labels of shape {labels.shape} for {n} images; expected [{n}] class "
            f"indices or [{n}, {k}] probabilities"
        )
    if labels.ndim == 2:
        if labels.shape[1] != k or not np.issubdtype(labels.dtype, np.floating):
            raise ConfigError(
                f"{what} has soft labels of shape {labels.shape} ({labels.dtype}); {name} needs "
                f"[{n}, {k}] float probabilities"
            )
        probs = labels.astype(np.float32)
        if (
            not np.all(np.isfinite(probs))
            or probs.min() < 0
            or not np.allclose(probs.sum(-1), 1.0, atol=1e-3)
        ):
            raise ConfigError(
                f"{what} has soft labels that are not probabilities (each row >= 0, summing to "
                "1); apply a softmax to logits first"
            )
        return probs
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ConfigError(f"{what} has non-integer labels; expected class indices")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{what} holds {labels.dtype} labels; expected class indices")
    if labels.min() < 0 or labels.max() >= k:
        raise ConfigError(
            f"{what} has labels in {int(labels.min())}..{int(labels.max())}; {name} has "
            f"classes 0..{k - 1}"
        )
    return labels.astype(np.int32)


def _protocol(config: Any) -> dict[str, Any]:
    ev = config.eval
    protocol = {
        "models": list(ev.models),
        "num_models": int(ev.num_models),
        "epochs": int(ev.epochs),
        "dsa": bool(ev.dsa),
        "batch_size": int(ev.batch_size),
        "momentum": float(ev.momentum),
        "weight_decay": float(ev.weight_decay),
    }
    if ev.dsa:
        protocol["dsa_strategy"] = config.dsa.strategy
    return protocol


def _warn_protocol(stored: dict[str, Any], config: Any) -> None:
    """A warning when the set was made with another evaluation protocol or ZCA setting."""
    old_eval, old_data = stored.get("eval") or {}, stored.get("data") or {}
    differ = [
        f"{field}={old_eval[name]!r}"
        for name, field in (("epochs", "eval.epochs"), ("dsa", "eval.dsa"))
        if name in old_eval and old_eval[name] != config.eval[name]
    ]
    if "zca" in old_data and bool(old_data["zca"]) != bool(config.data.zca):
        differ.append(f"data.zca={old_data['zca']!r}")
    if differ:
        logging.warning(
            "the set's own run used %s; this evaluation uses the config's values (pass "
            "--config.<field>=... to match)",
            " ".join(differ),
        )


def results_table(summary: dict[str, Any]) -> str:
    """The markdown table of results.md: one row per architecture."""
    p = summary["protocol"]
    lines = [
        f"Set: `{summary['set']}` ({summary['images']} images, {summary['dataset']}, "
        f"{summary['labels']} labels)",
        "",
        "| model | accuracy (%) | models | epochs | dsa | lr |",
        "|---|---|---|---|---|---|",
    ]
    for model, acc in summary["accuracy"].items():
        lines.append(
            f"| {model} | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | {len(acc['all'])} "
            f"| {p['epochs']} | {'yes' if p['dsa'] else 'no'} | {summary['lr']:.6g} "
            f"({summary['lr_source']}) |"
        )
    return "\n".join(lines) + "\n"


@runner.holds_workdir
def run(config: Any, workdir: str, *, lr: float | None = None) -> dict[str, Any]:
    """Evaluates ``config.eval.set``; writes results.json, results.md, metrics.jsonl and
    grid.png into ``workdir``. ``lr``: overrides the set's stored lr (default: the stored lr,
    else ``config.eval.lr``)."""
    given = config.eval.get("set", "")
    path = os.path.abspath(os.path.expanduser(given)) if given else ""
    arrays = read_arrays(path)

    def checks(dataset: data_lib.Dataset, _: str) -> SyntheticSet:
        syn = check_set(arrays, dataset, path, config.eval.get("pixel_range", ""))
        _warn_protocol(syn.stored_config, config)
        return syn

    workdir, dataset, syn = runner.start(config, workdir, "evaluate", checks)
    images = syn.model_images if syn.model_images is not None else dataset.from_pixels(syn.pixels)
    pixels = syn.pixels if syn.pixels is not None else dataset.to_pixels(images)
    if lr is not None:
        eval_lr, lr_source = float(lr), "config"
    elif syn.lr is not None:
        eval_lr, lr_source = syn.lr, "set"
    else:
        eval_lr, lr_source = float(config.eval.lr), "config"
    hard = syn.labels.argmax(-1) if syn.labels.ndim == 2 else syn.labels
    artifacts.save_grid(os.path.join(workdir, "grid.png"), pixels, hard, dataset.num_classes)
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    results = evaluate_lib.evaluate_from_config(
        key, images, syn.labels, dataset, config, lr=eval_lr
    )
    summary = {
        "mode": "evaluate",
        "set": path,
        "dataset": dataset.name,
        "images": int(len(images)),
        "per_class": np.bincount(hard, minlength=dataset.num_classes).tolist(),
        "labels": "soft" if syn.labels.ndim == 2 else "hard",
        "input": "model_images" if syn.model_images is not None else "pixels",
        "pixel_range": syn.pixel_range,
        "lr": eval_lr,
        "lr_source": lr_source,
        "seed": int(config.seed),
        "protocol": _protocol(config),
        "accuracy": {r.model: r.as_dict() for r in results},
    }
    runner.finish(workdir, summary)
    with artifacts.atomic_write(os.path.join(workdir, TABLE), "w") as f:
        f.write(results_table(summary))
    for r in results:
        print(f"evaluate {os.path.basename(path)}: {r}")
    return summary
