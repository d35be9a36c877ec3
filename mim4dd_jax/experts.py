"""An expert set for MTT trajectory matching (Cazenavette et al., 2022): its files, and how a
distillation reads them. Mode ``experts`` (:mod:`mim4dd_jax.experts_run`) writes the set.

Expert ``i`` is a fresh ``config.model`` trained on the whole train split (model space) with
plain SGD; its parameters are kept after every epoch. A folder::

    meta.json          what the trajectories depend on (dataset, image shape, classes, model,
                       data.zca / zca_reg / train_per_class, experts lr / momentum / weight_decay /
                       batch_size / dsa, the DSA strategy actually used, seed, num_params P)
    expert_{i:03d}.npz params [n + 1, P] float32: row 0 = init, row e = after epoch e, each the
                       ravel_pytree of the "params" collection; test_accuracy [n] float32 (after
                       epoch 1..n); state [S] float32: the other collections (batch-norm
                       statistics; S = 0 for the default instance norm) after epoch n, for resume
    metrics.jsonl      one row per (expert, epoch): expert, epoch, test_accuracy, s_per_epoch
    results.json       num, epochs, test accuracy after ``epochs`` epochs: mean, std, all

A distillation loads the trajectories with :func:`load` (meta.json must match its data, input
space and model) and draws single checkpoints with :func:`draw_checkpoint`.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from mim4dd_jax import artifacts, inner, models
from mim4dd_jax import augment as augment_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax.errors import ConfigError

PyTree = Any
Unravel = Callable[[jax.Array], PyTree]

META = "meta.json"


class Experts(NamedTuple):
    """Loaded expert trajectories.

    trajectories: [E, T + 1, P] float32; row 0 of each is its init, row t its parameters after
      epoch t (all experts truncated to the same T, the shortest among those loaded).
    unravel: flat [P] vector -> the model's "params" pytree.
    meta: the folder's meta.json.
    """

    trajectories: np.ndarray
    unravel: Unravel
    meta: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Meta.
# ----------------------------------------------------------------------------------------------


def dsa_strategy(config: Any, dataset_name: str) -> str:
    """The per-sample DSA strategy experts train with ("none" when ``experts.dsa`` is off)."""
    if not config.experts.dsa:
        return "none"
    return augment_lib.strategy_for_dataset(config.dsa.strategy, dataset_name)


def _abstract_variables(model: nn.Module, image_shape: Sequence[int]) -> PyTree:
    """The shapes of ``model``'s variables on [H, W, C] images; nothing is initialised."""
    return jax.eval_shape(
        lambda: inner.init_variables(model, jax.random.key(0), tuple(image_shape))
    )


def unravelers(model: nn.Module, image_shape: Sequence[int]) -> tuple[Unravel, Unravel]:
    """(unravel params, unravel the other collections) of ``model`` on [H, W, C] images, from
    ``jax.eval_shape`` (nothing is initialised)."""
    zeros = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype), _abstract_variables(model, image_shape)
    )
    _, unravel_params = ravel_pytree(zeros["params"])
    _, unravel_state = ravel_pytree(other_collections(zeros))
    return unravel_params, unravel_state


def num_params(model: nn.Module, image_shape: Sequence[int]) -> int:
    """P, the length of a flattened "params" collection."""
    leaves = jax.tree.leaves(_abstract_variables(model, image_shape)["params"])
    return int(sum(np.prod(s.shape) for s in leaves))


def make_meta(config: Any, dataset: data_lib.Dataset) -> dict[str, Any]:
    """What the trajectories depend on, as JSON-ready nested dicts (see the module docstring).

    Not included: conv_impl and group (the same math), test_per_class (only the reported
    accuracy), num and epochs (they may grow on resume).
    """
    ex, d = config.experts, config.data
    model = models.build_model(config, dataset.num_classes)
    zca = bool(d.zca)
    meta = {
        "dataset": dataset.name,
        "image_shape": list(dataset.image_shape),
        "num_classes": int(dataset.num_classes),
        "model": config.model.to_dict(),
        "data": {
            "zca": zca,
            # Without ZCA the regulariser changes nothing, so it must not block a resume.
            "zca_reg": float(d.zca_reg) if zca else None,
            "train_per_class": int(d.train_per_class),
        },
        "experts": {
            "lr": float(ex.lr),
            "momentum": float(ex.momentum),
            "weight_decay": float(ex.weight_decay),
            "batch_size": int(ex.batch_size),
            "dsa": bool(ex.dsa),
        },
        "dsa": {"strategy": dsa_strategy(config, dataset.name)},
        "seed": int(config.seed),
        "num_params": num_params(model, dataset.image_shape),
    }
    if zca:
        # The space the whitening is fitted in: experts from another one are another input space.
        meta["data"]["zca_space"] = data_lib.ZCA_SPACE
    return json.loads(json.dumps(meta))  # tuples -> lists, as they come back from the file


def check_meta(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    where: str,
    hint: str = "",
    fields: Callable[[str], bool] = lambda name: True,
) -> None:
    """Raises ConfigError naming every dotted field (among ``fields``) whose values differ."""
    old, new = artifacts.flatten_dotted(stored), artifacts.flatten_dotted(current)
    missing = "<missing>"
    diffs = [
        f"{name}: stored {old.get(name, missing)!r}, current {new.get(name, missing)!r}"
        for name in sorted(set(old) | set(new))
        if fields(name) and old.get(name, missing) != new.get(name, missing)
    ]
    if diffs:
        raise ConfigError(f"{where} were trained with another config: {'; '.join(diffs)}{hint}")


def read_meta(path: str) -> dict[str, Any]:
    """A folder's meta.json; ConfigError (one line) when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read expert meta {path!r}: {e}") from None


def other_collections(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Every variable collection but "params" (batch-norm statistics; none for instance norm)."""
    return {k: v for k, v in variables.items() if k != "params"}


# ----------------------------------------------------------------------------------------------
# Expert files.
# ----------------------------------------------------------------------------------------------


def expert_path(folder: str, i: int) -> str:
    """The file of expert ``i``."""
    return os.path.join(folder, f"expert_{i:03d}.npz")


def read_expert(path: str, keys: Sequence[str] = ("params", "test_accuracy", "state")) -> dict:
    """The arrays ``keys`` of one expert file (npz members are read lazily, one by one)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"corrupt expert file {path!r}: {e}") from None


def epochs_done(path: str) -> int:
    """The epochs the expert file at ``path`` holds."""
    return len(read_expert(path, ("test_accuracy",))["test_accuracy"])


# ----------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------


def draw_checkpoint(key: jax.Array, trajectories: jax.Array, *, min_epoch: int = 1) -> jax.Array:
    """One expert checkpoint, drawn uniformly: expert e in [0, E), epoch in [min_epoch, T].

    trajectories: [E, T + 1, P] (``load``). Returns the flat parameters [P] (``Experts.unravel``
    makes them a pytree). ``fold_in(key, 0)`` draws the expert, ``fold_in(key, 1)`` the epoch;
    min_epoch 1 skips the untrained init, so every draw is a network trained on real data.
    """
    chex.assert_rank(trajectories, 3)
    num, last = trajectories.shape[0], trajectories.shape[1] - 1
    if not 0 <= min_epoch <= last:
        raise ConfigError(f"expert checkpoint epoch {min_epoch} is not in 0..{last}")
    e = jax.random.randint(jax.random.fold_in(key, 0), (), 0, num)
    t = jax.random.randint(jax.random.fold_in(key, 1), (), min_epoch, last + 1)
    return trajectories[e, t]


def _same_input_space(name: str, zca: bool) -> bool:
    """The meta fields that must match for trajectories to be usable by a distillation run: the
    data, the input space and the parameter layout, not how the experts were trained."""
    if name in ("dataset", "image_shape", "num_classes", "num_params", "data.zca", "data.zca_reg"):
        return True
    # ZCA is fitted on the train split, so with ZCA the train subset defines the input space.
    return name.startswith("model.") or (zca and name == "data.train_per_class")


def load(folder: str, *, dataset: data_lib.Dataset, config: Any, min_epochs: int) -> Experts:
    """The trajectories in ``folder`` of every expert with at least ``min_epochs`` epochs.

    dataset, config: the distillation's; the folder's meta.json must match them in dataset, image
    shape, classes, ``config.model`` and ``data.zca``/``zca_reg`` (and ``train_per_class`` with
    ZCA). Returns :class:`Experts` with trajectories [E, T + 1, P] float32, T the fewest epochs
    among those experts. Raises ConfigError (one line) when the folder or its meta is missing, the
    meta differs, or no expert is long enough.
    """
    folder = os.path.abspath(os.path.expanduser(folder))
    train = f"python run.py --config=configs/{dataset.name}.py:experts --workdir={folder}"
    if not os.path.isdir(folder):
        raise ConfigError(f"expert folder {folder!r} does not exist; train them first: {train}")
    meta_path = os.path.join(folder, META)
    if not os.path.exists(meta_path):
        raise ConfigError(f"{folder!r} has no {META}, so no experts; train them first: {train}")
    stored = read_meta(meta_path)
    zca = bool(config.data.zca)
    check_meta(
        stored,
        make_meta(config, dataset),
        where=f"the experts in {folder!r}",
        fields=functools.partial(_same_input_space, zca=zca),
    )
    paths = sorted(glob.glob(os.path.join(folder, "expert_[0-9][0-9][0-9]*.npz")))
    counts = {p: epochs_done(p) for p in paths}
    chosen = [p for p in paths if counts[p] >= min_epochs]
    if not chosen:
        most = max(counts.values(), default=0)
        raise ConfigError(
            f"no expert in {folder!r} has {min_epochs} epochs ({len(paths)} experts, the longest "
            f"has {most}); train longer: {train} --config.experts.epochs={min_epochs}"
        )
    model = models.build_model(config, dataset.num_classes)
    unravel, _ = unravelers(model, dataset.image_shape)
    p = int(stored["num_params"])
    t = min(counts[path] for path in chosen)
    trajectories = np.empty((len(chosen), t + 1, p), np.float32)
    for k, path in enumerate(chosen):
        params = read_expert(path, ("params",))["params"]
        if params.shape != (counts[path] + 1, p):
            raise ConfigError(
                f"corrupt expert file {path!r}: params {params.shape}, expected "
                f"({counts[path] + 1}, {p})"
            )
        trajectories[k] = params[: t + 1]
    return Experts(trajectories, unravel, stored)
