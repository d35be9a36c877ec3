"""The synthetic state: its layout, initialisation (real / noise / a distilled.npz, incremental
growth), its optimisers and its placement on the device mesh.

The state is a plain dict pytree::

    {"images": [C * ipc, H, W, Ch] float32 (model space, class-major: image i has class i // ipc),
     "labels": [C * ipc] int32 (fixed), or [C * ipc, C] float32 logits (MTT, mtt.learn_labels),
     "syn_lr": [] float32, the student lr of MTT (learned with mtt.learn_lr; for the other
               methods it is eval.lr and fixed),
     "trainable": [C * ipc] bool, False for images that are kept as loaded (incremental growth),
     "heads": mi.init_heads(...).params, one dict per MI layer (present, and untouched, when
               mi.weight = 0; the options live in the step context's mi.MIConfig),
     "banks": per MI layer a mi.init_memory_bank (only with mi.weight > 0 and mi.bank_slots > 0),
     "opt_state": one optax state per learned part ("images", "heads", "syn_lr", "labels")}

Nothing here knows which method runs: its extra learned parts and initial lr come from its
``methods.Method`` record.
Randomness (part of the contract, tests rely on it): ``init_state`` uses ``fold_in(key, 0)`` for
the images and ``fold_in(key, 1)`` for the heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mim4dd_jax import artifacts, methods, mi, models, objectives, sharding
from mim4dd_jax import data as data_lib
from mim4dd_jax.choices import INITS, OPTIMIZERS
from mim4dd_jax.errors import ConfigError, check_choice

State = dict[str, Any]

# config.mi fields passed to the mi module; those in _ZERO_IS_NONE use 0 for "off" (None there).
_MI_FIELDS = (
    "estimator",
    "temperature",
    "critic",
    "reduce",
    "head",
    "heads",
    "embed_dim",
    "hidden_dim",
    "layer_weights",
    "mask",
    "chunk_size",
    "beta",
    "k_pos",
    "k_neg",
    "n_data",
    "negatives",
    "bank_slots",
)
_ZERO_IS_NONE = ("chunk_size", "k_pos", "k_neg", "n_data", "layer_weights")


# ----------------------------------------------------------------------------------------------
# Config helpers.
# ----------------------------------------------------------------------------------------------


def mi_weight(config: Any) -> float:
    """The MI term's weight (``mi.weight``, lambda or, with ``mi.weight_mode="relative"``, rho;
    0 = no MI term): the one reader of the field. ConfigError unless it is a number >= 0."""
    value = config.mi.weight
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"mi.weight must be a number >= 0, got {value!r}")
    return float(value)


def mi_features_from_experts(config: Any) -> bool:
    """Whether the MI term takes its features from expert checkpoints (``mi.weight`` > 0 and
    ``mi.feature_nets="experts"``); the run then reads expert trajectories."""
    return bool(mi_weight(config)) and config.mi.feature_nets == "experts"


def mi_options(mi_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``mi.MIConfig`` keyword arguments of a ``config.mi`` block (0 / () -> None)."""
    opts = {}
    for name in _MI_FIELDS:
        value = mi_cfg[name]
        if name == "layer_weights":
            value = tuple(float(w) for w in value)
        if name in _ZERO_IS_NONE and not value:
            value = None
        opts[name] = value
    return opts


def mi_config(mi_cfg: Mapping[str, Any]) -> mi.MIConfig:
    """The one ``mi.MIConfig`` of a ``config.mi`` block (built once per run by the step context
    and by ``init_state``, then passed down; ConfigError for a bad option)."""
    return mi.make_config(**mi_options(mi_cfg))


def make_optimizer(name: str, lr: float, momentum: float = 0.0) -> optax.GradientTransformation:
    """An optax optimiser by name; ``momentum`` is used by sgd and rmsprop (0 = none).

    sgd with momentum m is torch's SGD(momentum=m): buf = m * buf + g; p -= lr * buf.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if name in ("sgd", "rmsprop"):
        return getattr(optax, name)(lr, momentum=momentum or None)
    return getattr(optax, name)(lr)


def mi_layers(config: Any, model: nn.Module, image_shape: Sequence[int]) -> tuple[int, ...]:
    """Indices of the model blocks that get an MI head (``mi.layers``; () = all blocks)."""
    n_blocks = len(models.block_shapes(model, image_shape))
    layers = tuple(int(layer) for layer in config.mi.layers) or tuple(range(n_blocks))
    for layer in layers:
        check_choice("mi.layers entry", layer, range(n_blocks))
    return layers


def learned_parts(config: Any) -> tuple[str, ...]:
    """The state entries the outer loop optimises, each with its own optax optimiser."""
    heads = ("heads",) if mi_weight(config) else ()
    return ("images", *heads, *methods.get(config.method).learned(config))


def optimizers(config: Any) -> dict[str, optax.GradientTransformation]:
    """One optax optimiser per possibly learned part (see :func:`learned_parts`)."""
    d, m = config.distill, config.mtt
    # syn_lr: the reference's torch SGD([syn_lr], lr=lr_lr, momentum=0.5) on the lr itself
    # (optax's trace is torch's buffer: buf = 0.5 * buf + g, lr -= lr_lr * buf).
    return {
        "images": make_optimizer(d.optimizer, d.lr, d.momentum),
        "heads": make_optimizer(config.mi.optimizer, config.mi.lr),
        "syn_lr": make_optimizer("sgd", m.lr_lr, 0.5),
        "labels": make_optimizer("sgd", m.lr_labels, 0.5),
    }


# ----------------------------------------------------------------------------------------------
# Initialisation (real / noise / an existing distilled.npz, incremental growth).
# ----------------------------------------------------------------------------------------------


class InitSet(dict):
    """A loaded ``distilled.npz`` sorted class-major: "pixels" [C, k, H, W, Ch] in [0, 1] (absent
    for a "normalised" set), "model" (the set itself when it is "normalised", or the stored
    model-space images when their normalisation matches this run, else absent),
    "soft" [C, k, C] label probabilities (absent for hard labels) and "k"."""


def read_init(path: str, dataset: data_lib.Dataset, config: Any) -> InitSet:
    """Reads and checks ``distill.init_from``; ConfigError names the file and what is wrong."""
    what = f"distill.init_from {path!r}"
    arrays = artifacts.read_npz(path, what, "expected a distilled.npz written by run.py")
    if "images" not in arrays or "labels" not in arrays:
        raise ConfigError(f"{what} has no 'images' and 'labels'; expected a distilled.npz")
    images, labels = arrays["images"], arrays["labels"]
    shape, num_classes = tuple(dataset.image_shape), dataset.num_classes
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise ConfigError(
            f"{what} holds images of shape {tuple(images.shape[1:])}; {dataset.name} needs {shape}"
        )
    if labels.ndim == 2 and labels.shape[1] != num_classes:
        raise ConfigError(
            f"{what} has soft labels over {labels.shape[1]} classes; "
            f"{dataset.name} has {num_classes}"
        )
    hard = labels.argmax(-1) if labels.ndim == 2 else labels.astype(np.int64)
    if len(hard) != len(images) or hard.min() < 0 or hard.max() >= num_classes:
        raise ConfigError(
            f"{what} has labels outside 0..{num_classes - 1} or not one per image; "
            f"{dataset.name} has {num_classes} classes"
        )
    counts = np.bincount(hard, minlength=num_classes)
    k = int(counts[0])
    if np.any(counts != k) or k == 0:
        raise ConfigError(
            f"{what} has per-class counts {counts.tolist()}; valid: the same number of images "
            f"for each of the {num_classes} classes"
        )
    if k > config.ipc:
        raise ConfigError(
            f"{what} has {k} images per class, more than ipc={config.ipc}; valid: ipc >= {k}"
        )
    order = np.argsort(hard, kind="stable")  # class-major, keeping the order within a class
    space = data_lib.decide_pixel_range(
        images,
        config.distill.get("init_from_range", ""),
        data_lib.stored_pixel_range(arrays),
        what,
        "distill.init_from_range",
    )
    if space == "normalised":  # the network's input already: used as is
        model = np.asarray(images, np.float32)[order].reshape(num_classes, k, *shape)
        out = InitSet(k=k, model=model)
    else:
        pixels = data_lib.pixels_of(images, space)
        out = InitSet(k=k, pixels=pixels[order].reshape(num_classes, k, *shape))
    if labels.ndim == 2:
        out["soft"] = labels[order].reshape(num_classes, k, num_classes).astype(np.float32)
    same_space = (
        "model_images" in arrays
        and space != "normalised"
        and np.array_equal(arrays.get("mean"), dataset.mean)
        and np.array_equal(arrays.get("std"), dataset.std)
        and bool(arrays.get("zca", False)) == bool(config.data.zca)
        and not config.data.zca  # a ZCA refit on other data would differ; go through pixels
    )
    if same_space:
        out["model"] = arrays["model_images"][order].reshape(num_classes, k, *shape)
    return out


def init_images(
    key: jax.Array, dataset: data_lib.Dataset, ipc: int, init: str = "real"
) -> dict[str, jax.Array]:
    """A synthetic set without a config: {"images": [C * ipc, H, W, Ch] float32 (model space,
    class-major: image i has class i // ipc), "labels": [C * ipc] int32}.

    init "real": ``ipc`` distinct random train images per class (``data.sample_per_class``; the
    initialisation DM, DC/DSA and MTT publish); "noise": standard normal pixels in model space.
    Only ``dataset``'s train split and metadata are read. ``init_state`` builds its images
    with this, so the same key gives the same images as ``run.py``'s ``fold_in(key, 0)``.
    """
    check_choice("init", init, INITS)
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"bad ipc {ipc!r}; valid: an integer >= 1 (images per class)")
    num_classes, shape = dataset.num_classes, dataset.image_shape
    if init == "real":
        fewest = int(np.min(np.bincount(dataset.train_labels, minlength=num_classes)))
        if fewest < ipc:
            raise ConfigError(
                f"init='real' draws ipc={ipc} distinct images per class, but a class of "
                f"{dataset.name} has only {fewest}; valid: ipc <= {fewest}, or init='noise'"
            )
        index = data_lib.class_index(dataset.train_labels, num_classes)
        chosen = np.asarray(data_lib.sample_per_class(key, index, ipc)).reshape(-1)
        images = jnp.asarray(dataset.train_images[chosen], jnp.float32)
    else:
        images = jax.random.normal(key, (num_classes * ipc, *shape), jnp.float32)
    return {"images": images, "labels": objectives.class_labels(num_classes, ipc)}


def _init_images(
    key: jax.Array, dataset: data_lib.Dataset, config: Any, loaded: InitSet | None
) -> tuple[jax.Array, jax.Array]:
    """Initial images [C*ipc, H, W, Ch] and the ``trainable`` mask [C*ipc] bool."""
    check_choice("distill.init", config.distill.init, INITS)
    num_classes, ipc, shape = dataset.num_classes, config.ipc, dataset.image_shape
    images = init_images(key, dataset, ipc, config.distill.init)["images"]
    trainable = jnp.ones((num_classes * ipc,), bool)
    if loaded is None:
        return images, trainable
    k = loaded["k"]
    old = loaded.get("model")
    if old is None:
        old = dataset.from_pixels(loaded["pixels"].reshape(-1, *shape)).reshape(
            loaded["pixels"].shape
        )
    images = images.reshape(num_classes, ipc, *shape).at[:, :k].set(jnp.asarray(old))
    if config.distill.freeze_loaded and k < ipc:
        trainable = jnp.tile(jnp.arange(ipc) >= k, num_classes)
    return images.reshape(-1, *shape), trainable


def _init_labels(dataset: data_lib.Dataset, config: Any, loaded: InitSet | None) -> jax.Array:
    num_classes, ipc = dataset.num_classes, config.ipc
    labels = objectives.class_labels(num_classes, ipc)
    if "labels" not in learned_parts(config):
        return labels
    logits = config.mtt.label_logit * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if loaded is not None and "soft" in loaded:
        k = loaded["k"]
        old = jnp.log(jnp.maximum(jnp.asarray(loaded["soft"]), 1e-8))
        logits = logits.reshape(num_classes, ipc, num_classes).at[:, :k].set(old)
        logits = logits.reshape(-1, num_classes)
    return logits


def init_state(key: jax.Array, dataset: data_lib.Dataset, config: Any) -> State:
    """The initial synthetic state (see the module docstring for its layout).

    ``distill.init`` "real": ``ipc`` distinct random train images per class (class-balanced);
    "noise": standard normal pixels in model space. With ``distill.init_from`` (a distilled.npz
    with k <= ipc images per class) the first k images of each class are the loaded ones; with
    k < ipc and ``distill.freeze_loaded`` they stay bit-identical and only the new ones learn
    (incremental growth). The heads are ``mi.init_heads`` for the blocks in ``mi.layers``.
    """
    num_classes, shape = dataset.num_classes, dataset.image_shape
    init_from = config.distill.init_from
    loaded = read_init(init_from, dataset, config) if init_from else None
    images, trainable = _init_images(jax.random.fold_in(key, 0), dataset, config, loaded)
    model = models.build_model(config, num_classes)
    blocks = models.block_shapes(model, shape)
    layers = mi_layers(config, model, shape)
    # The state keeps the heads' params only (the checkpoint layout); the options live in the
    # step context's MIConfig, which wraps them back into mi.Heads.
    heads = mi.init_heads(
        jax.random.fold_in(key, 1), [blocks[layer] for layer in layers], config=mi_config(config.mi)
    ).params
    lr = methods.get(config.method).lr(config)
    state = {
        "images": images,
        "labels": _init_labels(dataset, config, loaded),
        "syn_lr": jnp.asarray(lr, jnp.float32),
        "trainable": trainable,
        "heads": heads,
    }
    if mi_weight(config) and config.mi.bank_slots:
        # One per-class bank of real embeddings per MI layer: extra negatives (and positives)
        # beyond the real batch, refreshed with momentum every step (mi.update_memory_bank).
        state["banks"] = tuple(
            mi.init_memory_bank(num_classes, config.mi.bank_slots, config.mi.embed_dim)
            for _ in layers
        )
    txs = optimizers(config)
    state["opt_state"] = {name: txs[name].init(state[name]) for name in learned_parts(config)}
    return state


def student_lr(state: State, config: Any) -> float:
    """The lr models are evaluated with: the learned one (MTT's), else ``eval.lr``."""
    if "syn_lr" in learned_parts(config):
        return float(sharding.to_host(state["syn_lr"]))
    return float(config.eval.lr)


def eval_labels(state: State) -> np.ndarray:
    """Labels to train evaluation models on: ints, or softmax of learned logits [N, C]."""
    labels = sharding.to_host(state["labels"])
    return np.asarray(jax.nn.softmax(labels, axis=-1)) if labels.ndim == 2 else labels


# ----------------------------------------------------------------------------------------------
# Placement on the device mesh.
# ----------------------------------------------------------------------------------------------

# State entries with one row per synthetic image; mesh.shard_synthetic splits them by class.
_PER_IMAGE = ("images", "labels", "trainable")


def state_shardings(state: State, mesh: Mesh, config: Any) -> Any:
    """A NamedSharding per state leaf: all replicated, or with ``mesh.shard_synthetic`` the
    per-image entries (images, labels, trainable mask and their optimiser state, leading axis
    [C * ipc]) split along that axis. The axis is class-major, so each device holds whole
    classes when the device count divides C."""
    n = state["images"].shape[0]
    split = sharding.options(config)["shard_synthetic"] and sharding.size(mesh) > 1

    def one(path: Any, leaf: Any) -> Any:
        names = [getattr(p, "key", None) for p in path]
        owner = names[1] if names[0] == "opt_state" and len(names) > 1 else names[0]
        if split and owner in _PER_IMAGE and jnp.ndim(leaf) and jnp.shape(leaf)[0] == n:
            return sharding.split_along(mesh, jnp.ndim(leaf), 0)
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, state)


def place_state(state: State, mesh: Mesh, config: Any) -> State:
    """The state on the mesh as :func:`state_shardings` says (unchanged on one device)."""
    return sharding.put(state, state_shardings(state, mesh, config))


def check_plan(config: Any, num_classes: int, mesh: Mesh) -> None:
    """ConfigError when ``mesh.shard_synthetic`` cannot split the C * ipc images evenly (stored
    arrays need equal shards; work inside the step may be uneven, XLA pads it)."""
    d, n = sharding.size(mesh), num_classes * config.ipc
    if sharding.options(config)["shard_synthetic"] and d > 1 and n % d:
        raise ConfigError(
            f"mesh.shard_synthetic=True splits the {n} synthetic images ({num_classes} classes x "
            f"ipc {config.ipc}) over {d} devices, which does not divide them; valid: a C * ipc "
            f"that is a multiple of {d}, or mesh.shard_synthetic=False"
        )
