"""Building and checking ml_collections configs.

Config files in ``configs/`` are thin: they name a dataset, hold its per-method/IPC hyperparameters as
data, and call :func:`build`. The argument string of ``get_config(arg)`` is a comma-separated list such
as ``"random,ipc10"`` or ``"herding,ipc1,local"``: a method, ``ipc<k>``, and optional flags (``local``
= a small variant that runs in minutes on a laptop CPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from mim4dd_jax.errors import ConfigError, check_choice

# Method -> the run mode that executes it.
METHODS = {"random": "coreset", "herding": "coreset"}
ARG_FLAGS = ("local",)
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def parse_arg(arg: str) -> tuple[str, int, set[str]]:
    """Parses ``"method,ipc<k>[,flag...]"`` into (method, ipc, flags)."""
    method, ipc, flags = None, None, set()
    for token in (t.strip() for t in (arg or "").split(",") if t.strip()):
        if token.startswith("ipc") and token[3:].lstrip("-").isdigit():
            ipc = int(token[3:])
        elif token in ARG_FLAGS:
            flags.add(token)
        elif method is None:
            method = token
        else:
            raise ConfigError(
                f"config argument token {token!r} not understood; expected a method "
                f"({', '.join(METHODS)}), ipc<k> and optional flags ({', '.join(ARG_FLAGS)})"
            )
    method = method or "random"
    check_choice("method", method, METHODS)
    return method, (10 if ipc is None else ipc), flags


def build(
    dataset: Mapping[str, Any],
    arg: str,
    *,
    hparams: Mapping[tuple[str, int], Mapping[str, Any]] | None = None,
    local: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The full config for ``dataset`` (the ``config.data`` fields) and ``arg``.

    ``hparams[(method, ipc)]`` and then ``local`` (with the ``local`` flag) are merged over the
    defaults with dotted keys, e.g. ``{"eval.epochs": 1000}``.
    """
    method, ipc, flags = parse_arg(arg)
    check_ipc(ipc)
    c = ml_collections.ConfigDict()
    c.method = method
    c.mode = METHODS[method]
    c.ipc = ipc
    c.seed = 0

    c.data = ml_collections.ConfigDict(
        dict(
            name="",
            source="auto",
            path="",
            tfds_data_dir="",
            train_per_class=0,
            test_per_class=0,
            zca=False,
            zca_reg=0.1,
        )
    )
    c.data.update(dict(dataset))

    c.model = ml_collections.ConfigDict(
        dict(name="convnet", width=128, depth=3, norm="instance", act="relu", pool="avg")
    )
    c.conv_impl = "auto"

    c.dsa = ml_collections.ConfigDict(dict(strategy=DSA_STRATEGY))

    c.eval = ml_collections.ConfigDict(
        dict(
            models=("convnet",),
            num_models=5,
            epochs=300,
            batch_size=256,
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            dsa=False,
            test_batch_size=500,
            parallel="auto",
        )
    )

    c.coreset = ml_collections.ConfigDict(dict(features="trained_net", feature_epochs=1))

    for overrides in (hparams or {}).get((method, ipc), {}), (local if "local" in flags else {}):
        for dotted, value in (overrides or {}).items():
            set_dotted(c, dotted, value)
    return c


def set_dotted(c: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Sets ``c.a.b = value`` for ``dotted == "a.b"``."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        c = c[p]
    c[leaf] = value


def check_ipc(ipc: int, smallest_class: int | None = None) -> None:
    """IPC must be positive and, once the data is known, at most the smallest class size."""
    if ipc <= 0:
        raise ConfigError(f"ipc must be a positive integer, got {ipc}")
    if smallest_class is not None and ipc > smallest_class:
        raise ConfigError(
            f"ipc {ipc} is larger than the smallest class ({smallest_class} examples); "
            f"choose ipc <= {smallest_class}"
        )


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks every name and range that can be checked without data; raises ConfigError."""
    from mim4dd_jax import augment, coreset, data, evaluate, inner  # late: config files import this

    check_choice("method", c.method, METHODS)
    check_ipc(c.ipc)
    check_choice("data.source", c.data.source, data.SOURCES)
    check_choice("coreset.features", c.coreset.features, coreset.FEATURE_SPACES)
    for name in (None, *c.eval.models):
        evaluate.build_model(c, 10, name)
    augment.parse_strategy(c.dsa.strategy)
    check_choice("eval.parallel", c.eval.parallel, inner.PARALLEL)
    for field, minimum in (
        ("eval.lr", 0.0),
        ("eval.num_models", 0),
        ("eval.batch_size", 0),
        ("eval.test_batch_size", 0),
    ):
        value = c[field.split(".")[0]][field.split(".")[1]]
        if not value > minimum:
            raise ConfigError(f"{field} must be > {minimum}, got {value}")
    if c.eval.epochs < 0:
        raise ConfigError(f"eval.epochs must be >= 0, got {c.eval.epochs}")
