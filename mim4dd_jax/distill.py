"""Distillation with DM, DC/DSA or MTT, optionally plus the MIM4DD mutual-information term.

The synthetic state is a plain dict pytree::

    {"images": [C * ipc, H, W, Ch] float32 (model space, class-major: image i has class i // ipc),
     "labels": [C * ipc] int32 (fixed), or [C * ipc, C] float32 logits (MTT, mtt.learn_labels),
     "syn_lr": [] float32, the student lr of MTT (learned with mtt.learn_lr; for the other
               methods it is eval.lr and fixed),
     "trainable": [C * ipc] bool, False for images that are kept as loaded (incremental growth),
     "heads": mi.init_heads params, one per MI layer (present, and untouched, when mi.weight = 0),
     "banks": per MI layer a mi.init_memory_bank (only with mi.weight > 0 and mi.bank_slots > 0),
     "opt_state": one optax state per learned part ("images", "heads", "syn_lr", "labels")}

One iteration is one jitted, pure :func:`make_step` function ``step(state, key, real_images,
class_index, experts) -> (state, metrics)`` with the state donated; the real train split (and,
for MTT, the expert trajectories) live on device, and per-class real batches and (expert, start
epoch) pairs are drawn inside the step.

- **DM** (Zhao & Bilen, 2023): a fresh, frozen random network per iteration; loss =
  ``objectives.dm_loss_and_features`` with siamese DSA; one image update per iteration.
- **DC / DSA** (Zhao et al., 2021; Zhao & Bilen, 2021): a fresh network per iteration, then
  ``outer_loop`` image updates by per-class gradient matching, each on a freshly drawn real batch;
  between two of them the network trains ``inner_loop`` epochs on the (updated, constant)
  synthetic set with plain SGD at ``distill.lr_net`` (the reference's 0.01, no momentum), with
  per-sample DSA for DSA. The loop over outer steps is a ``lax.scan`` inside the step.
- **MTT** (Cazenavette et al., 2022): ``mtt.num_trajectories`` (expert, start epoch t) pairs per
  iteration; the student starts at theta*_t, takes ``mtt.syn_steps`` SGD steps on synthetic
  minibatches with per-sample DSA (``objectives.student_unroll``, a ``lax.scan``, rematerialised
  per step unless ``mtt.remat`` is off), and the loss is ``objectives.mtt_loss`` against
  theta*_{t+expert_epochs}, averaged over the pairs (vmapped). The student lr ``syn_lr`` is
  learned as the reference learns it: SGD(mtt.lr_lr, momentum 0.5) on the lr itself. The
  reference does not keep it positive; here a step that would make it <= 0 is rejected by the
  numerical guard like a non-finite one.
- **MIM4DD add-on**: total = base + mi.weight * mi.mi_loss (= -sum_l w_l MI_l). Synthetic
  features come from the synthetic-side network and real features from the real-side network:
  DM uses the sampled network for both, DC the network at that outer step (on the batches and
  siamese DSA views that the base loss matched); MTT takes the synthetic features from the
  student after its unroll (on all synthetic images) and the real ones from the expert at
  t + expert_epochs (on a fresh class-balanced real batch, the same siamese views per class).
  ``mi.networks = "shared"`` sends the MTT real batch through the student instead. The heads
  have their own optax optimiser and descend the same total, i.e. they maximise the MI bound.
  ``mi.weight == 0`` skips the MI code at trace time and the MI term consumes no random
  numbers, so the base method is reproduced exactly.
- **Numerical guard**: a step whose loss, any gradient or any updated value is not finite,
  or whose learned MTT lr is not positive, leaves the state unchanged (metric "skipped" = 1);
  ``run`` stops after ``guard.max_consecutive`` in a row.

Randomness (part of the contract, tests rely on it): ``init_state`` uses ``fold_in(key, 0)`` for
the images and ``fold_in(key, 1)`` for the heads. In a DM step, ``fold_in(key, 0|1|2)`` draw the
real batch, the network and the DSA transforms. In a DC step, ``fold_in(key, 0)`` draws the
network, outer step ``o`` uses ``k = fold_in(fold_in(key, 1), o)`` (``fold_in(k, 0)``: real
batch, ``fold_in(k, 1)``: DSA) and the network training after it ``fold_in(fold_in(key, 2), o)``.
In an MTT step, ``fold_in(key, 0)`` draws the (expert, start) pairs, ``fold_in(key, 1)`` the
student minibatches and DSA (split per pair), ``fold_in(key, 2)`` the MI real batch and
``fold_in(key, 3)`` its DSA views. ``run`` uses ``fold_in(seed_key, 0)`` for ``init_state``,
``fold_in(seed_key, 1)`` for every evaluation and ``fold_in(fold_in(seed_key, 2), it)`` for
iteration ``it``, so a resumed run replays exactly the iterations it had not done.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import signal
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from mim4dd_jax import augment as augment_lib
from mim4dd_jax import checkpoint as checkpoint_lib
from mim4dd_jax import config as config_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax import evaluate as evaluate_lib
from mim4dd_jax import experts as experts_lib
from mim4dd_jax import inner, io, mi, models, objectives, sharding
from mim4dd_jax.errors import ConfigError, check_choice

State = dict[str, Any]
Metrics = dict[str, jax.Array]
StepFn = Callable[..., tuple[State, Metrics]]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lion", "lamb")
INITS = ("real", "noise")
BASES = ("dm", "dc", "dsa", "mtt")
REMAT = ("auto", "on", "off")
MI_NETWORKS = ("paired", "shared")

# config.mi fields passed to the mi module; those in _ZERO_IS_NONE use 0 for "off" (None there).
_MI_FIELDS = (
    "estimator",
    "temperature",
    "critic",
    "reduce",
    "head",
    "embed_dim",
    "hidden_dim",
    "layer_weights",
    "mask",
    "chunk_size",
    "beta",
    "k_pos",
    "k_neg",
    "n_data",
)
_ZERO_IS_NONE = ("chunk_size", "k_pos", "k_neg", "n_data", "layer_weights")
# The reference freezes BatchNorm statistics from this many real images per class (DC only).
_BN_REAL_PER_CLASS = 16
# Metrics key that carries the real embeddings from the loss to the memory-bank update.
_BANK_UPDATE = "_bank_update"


# ----------------------------------------------------------------------------------------------
# Config helpers.
# ----------------------------------------------------------------------------------------------


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


def make_optimizer(name: str, lr: float, momentum: float = 0.0) -> optax.GradientTransformation:
    """An optax optimiser by name; ``momentum`` is used by sgd and rmsprop (0 = none).

    sgd with momentum m is torch's SGD(momentum=m): buf = m * buf + g; p -= lr * buf.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if name in ("sgd", "rmsprop"):
        return getattr(optax, name)(lr, momentum=momentum or None)
    return getattr(optax, name)(lr)


def matching_strategy(config: Any, dataset_name: str) -> str | None:
    """The DSA strategy used while distilling (siamese for DM/DC, per-sample in the MTT
    student), or None (``distill.dsa`` off)."""
    if not config.distill.dsa:
        return None
    strategy = augment_lib.strategy_for_dataset(config.dsa.strategy, dataset_name)
    return None if strategy == "none" else strategy


def mi_layers(config: Any, model: nn.Module, image_shape: Sequence[int]) -> tuple[int, ...]:
    """Indices of the model blocks that get an MI head (``mi.layers``; () = all blocks)."""
    n_blocks = len(models.block_shapes(model, image_shape))
    layers = tuple(int(layer) for layer in config.mi.layers) or tuple(range(n_blocks))
    for layer in layers:
        check_choice("mi.layers entry", layer, range(n_blocks))
    return layers


def resolve_remat(value: str, backend: str | None = None) -> bool:
    """``mtt.remat``: "on", "off", or "auto" = on except on GPU/TPU. On CPU, rematerialising
    each student step is both smaller and faster (BENCHMARKS.md); accelerators have the memory."""
    check_choice("mtt.remat", value, REMAT)
    if value == "auto":
        return (backend or jax.default_backend()) not in ("gpu", "tpu")
    return value == "on"


def learned_parts(config: Any) -> tuple[str, ...]:
    """The state entries the outer loop optimises, each with its own optax optimiser."""
    parts = ["images"]
    if config.mi.weight:
        parts.append("heads")
    if config.method == "mtt":
        parts += ["syn_lr"] if config.mtt.learn_lr else []
        parts += ["labels"] if config.mtt.learn_labels else []
    return tuple(parts)


def _optimizers(config: Any) -> dict[str, optax.GradientTransformation]:
    d, m = config.distill, config.mtt
    # syn_lr: the reference's torch SGD([syn_lr], lr=lr_lr, momentum=0.5) on the lr itself
    # (optax's trace is torch's buffer: buf = 0.5 * buf + g, lr -= lr_lr * buf).
    return {
        "images": make_optimizer(d.optimizer, d.lr, d.momentum),
        "heads": make_optimizer(config.mi.optimizer, config.mi.lr),
        "syn_lr": make_optimizer("sgd", m.lr_lr, 0.5),
        "labels": make_optimizer("sgd", m.lr_labels, 0.5),
    }


def _outer_inner(config: Any) -> tuple[int, int]:
    d = config.distill
    if d.outer_loop and d.inner_loop:
        return int(d.outer_loop), int(d.inner_loop)
    return objectives.dc_loops(config.ipc)


def _real_batch(config: Any, counts: np.ndarray) -> int:
    # The reference takes the first n of a class permutation, i.e. the whole class when smaller.
    return int(min(config.distill.batch_real, int(np.min(counts))))


def min_expert_epochs(config: Any) -> int:
    """Epochs an expert needs: start epochs t < max_start_epoch, targets t + expert_epochs."""
    return int(config.mtt.max_start_epoch) - 1 + int(config.mtt.expert_epochs)


# ----------------------------------------------------------------------------------------------
# Initialisation (real / noise / an existing distilled.npz, incremental growth).
# ----------------------------------------------------------------------------------------------


class InitSet(dict):
    """A loaded ``distilled.npz`` sorted class-major: "pixels" [C, k, H, W, Ch], "model" (the
    stored model-space images when their normalisation matches this run, else absent),
    "soft" [C, k, C] label probabilities (absent for hard labels) and "k"."""


def read_init(path: str, dataset: data_lib.Dataset, config: Any) -> InitSet:
    """Reads and checks ``distill.init_from``; ConfigError names the file and what is wrong."""
    what = f"distill.init_from {path!r}"
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no such file; expected a distilled.npz written by run.py")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{what} is not a readable distilled.npz ({e})") from None
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
    out = InitSet(k=k, pixels=images[order].reshape(num_classes, k, *shape))
    if labels.ndim == 2:
        out["soft"] = labels[order].reshape(num_classes, k, num_classes).astype(np.float32)
    same_space = (
        "model_images" in arrays
        and np.array_equal(arrays.get("mean"), dataset.mean)
        and np.array_equal(arrays.get("std"), dataset.std)
        and bool(arrays.get("zca", False)) == bool(config.data.zca)
        and not config.data.zca  # a ZCA refit on other data would differ; go through pixels
    )
    if same_space:
        out["model"] = arrays["model_images"][order].reshape(num_classes, k, *shape)
    return out


def _init_images(
    key: jax.Array, dataset: data_lib.Dataset, config: Any, loaded: InitSet | None
) -> tuple[jax.Array, jax.Array]:
    """Initial images [C*ipc, H, W, Ch] and the ``trainable`` mask [C*ipc] bool."""
    check_choice("distill.init", config.distill.init, INITS)
    num_classes, ipc, shape = dataset.num_classes, config.ipc, dataset.image_shape
    if config.distill.init == "real":
        index = data_lib.class_index(dataset.train_labels, num_classes)
        chosen = np.asarray(data_lib.sample_per_class(key, index, ipc)).reshape(-1)
        images = jnp.asarray(dataset.train_images[chosen], jnp.float32)
    else:
        images = jax.random.normal(key, (num_classes * ipc, *shape), jnp.float32)
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
    if not (config.method == "mtt" and config.mtt.learn_labels):
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
    model = evaluate_lib.build_model(config, num_classes)
    blocks = models.block_shapes(model, shape)
    layers = mi_layers(config, model, shape)
    heads = mi.init_heads(
        jax.random.fold_in(key, 1),
        [(1, *blocks[layer]) for layer in layers],
        **mi_options(config.mi),
    )
    lr = config.mtt.lr_teacher if config.method == "mtt" else config.eval.lr
    state = {
        "images": images,
        "labels": _init_labels(dataset, config, loaded),
        "syn_lr": jnp.asarray(lr, jnp.float32),
        "trainable": trainable,
        "heads": heads,
    }
    if config.mi.weight and config.mi.bank_slots:
        # One per-class bank of real embeddings per MI layer: extra negatives (and positives)
        # beyond the real batch, refreshed with momentum every step (mi.update_memory_bank).
        state["banks"] = tuple(
            mi.init_memory_bank(num_classes, config.mi.bank_slots, config.mi.embed_dim)
            for _ in layers
        )
    txs = _optimizers(config)
    state["opt_state"] = {name: txs[name].init(state[name]) for name in learned_parts(config)}
    return state


def student_lr(state: State, config: Any) -> float:
    """The lr models are evaluated with: the learned MTT lr, else ``eval.lr``."""
    if config.method == "mtt" and config.mtt.learn_lr:
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


def _warn_uneven(what: str, count: int, mesh: Mesh, consequence: str) -> None:
    d = sharding.size(mesh)
    if d > 1 and count % d:
        logging.warning(
            "%s=%d does not divide over the %d devices: %s (same results); a multiple of %d "
            "splits evenly",
            what,
            count,
            d,
            consequence,
            d,
        )


# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------


def _augment_classes(keys: jax.Array, x: jax.Array, strategy: str | None) -> jax.Array:
    """Siamese DSA of x [C, n, H, W, Ch], class c with keys[c] (as objectives.dc_loss does)."""
    if strategy is None:
        return x
    one = lambda k, xc: augment_lib.augment(k, xc, strategy=strategy, siamese=True)
    return jax.vmap(one)(keys, x)


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, *x.shape[2:])


def _siamese_blocks(
    model: nn.Module,
    real_variables: Any,
    syn_variables: Any,
    real_x: jax.Array,
    syn_x: jax.Array,
    aug_key: jax.Array,
    strategy: str | None,
    real_chunk: int,
) -> tuple[Sequence[jax.Array], Sequence[jax.Array]]:
    """Per-block features of real [C, n, ...] and synthetic [C, ipc, ...] batches (flattened
    class-major) for the MI term: class c of both under the siamese DSA view of
    ``split(aug_key, C)[c]``, the real batch through ``real_variables`` (no gradient, in slices
    of ~real_chunk images, see :func:`real_chunk`), the synthetic one through
    ``syn_variables``."""
    keys = jax.random.split(aug_key, real_x.shape[0])
    real_a = _augment_classes(keys, lax.stop_gradient(real_x), strategy)
    syn_a = _augment_classes(keys, syn_x, strategy)
    real_out = objectives.features_in_slices(model, real_variables, real_a, real_chunk)
    syn_out = model.apply(syn_variables, _flat(syn_a), train=False, features=True)
    return real_out.blocks, syn_out.blocks


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train_on_synthetic(
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    epochs: int,
    batch_size: int,
    lr: float,
    strategy: str | None,
) -> Any:
    """The DC inner loop: ``epochs`` shuffled epochs of plain SGD (no momentum) on a constant set.

    variables: the network's variables; images: [N, H, W, Ch]; labels: [N] int32. Batches of
    ``batch_size`` (the last one padded and masked), per-sample DSA when ``strategy`` is set,
    training-mode norms. Returns the updated variables.
    """
    augment = None
    if strategy is not None:
        augment = functools.partial(augment_lib.augment, strategy=strategy, siamese=False)
    return inner.sgd_epochs(
        key,
        variables,
        lax.stop_gradient(images),
        lax.stop_gradient(labels),
        lr,
        model=model,
        passes=epochs,
        batch_size=batch_size,
        augment=augment,
    )


def step_model(config: Any, num_classes: int) -> nn.Module:
    """The network the step differentiates through: ``config.model``, except that DM on CPU with
    ``conv_impl="auto"`` uses the "hybrid" conv (XLA's forward, GEMM weight gradient). DM's step
    has no loop, where XLA:CPU's conv is fast, and it measured 2.3x faster than im2col with half
    the memory (BENCHMARKS.md); loops (DC's inner training, the MTT student) keep im2col."""
    model = evaluate_lib.build_model(config, num_classes)
    if config.method == "dm" and config.conv_impl == "auto" and jax.default_backend() == "cpu":
        model = model.clone(conv_impl="hybrid")
    return model


def real_chunk(config: Any) -> int:
    """``distill.real_chunk`` resolved: -1 is 64 on CPU (measured best of 20-320 for the DM step,
    BENCHMARKS.md) and 0 (one pass) on accelerators, where big batches are the fast case."""
    chunk = int(config.distill.real_chunk)
    if chunk == -1:
        return 64 if jax.default_backend() == "cpu" else 0
    return chunk


def make_step(config: Any, dataset: data_lib.Dataset, mesh: Mesh | None = None) -> StepFn:
    """The jitted ``step(state, key, real_images, class_index, experts=None) -> (state, metrics)``.

    real_images: [N, H, W, Ch] float32, the train split in model space (on device);
    class_index: ``data.class_index`` of its labels; experts (MTT only): [E, T+1, P] float32
    flattened expert trajectories (``experts.load``). The state is donated. metrics: "loss"
    (the total), "base_loss" (DC: means over the outer steps), "skipped" (1 if the numerical
    guard rejected the update), plus "mi" [L] (nats per MI layer) when ``mi.weight > 0``;
    DC/DSA add "base_loss_outer" [outer_loop]; MTT adds "syn_lr". Only ``dataset``'s metadata
    and label counts are read here.

    Sharding (``mesh``, default ``sharding.mesh_from_config(config)``): DM and DC split their
    real [C, n, ...] and synthetic [C, ipc, ...] batches by class, MTT its (expert, start)
    pairs, over all mesh devices. A count the devices do not divide gives the same results
    without the split's benefit: XLA pads MTT's pairs (devices idle) and, for C, gathers the
    real batch and runs DM/DC replicated (BENCHMARKS.md). The state leaves the step
    with :func:`state_shardings` (replicated by default), the metrics replicated; XLA inserts
    the collectives (the image gradient gathered from the class shards, the gradient summed
    over pairs). Place the inputs with :func:`place_state` (and the real images / trajectories
    replicated) as :func:`run` does. One device: no constraint at all.
    """
    method = config.method
    check_choice("distillation method", method, BASES)
    num_classes, ipc, shape = dataset.num_classes, config.ipc, dataset.image_shape
    model = step_model(config, num_classes)
    strategy = matching_strategy(config, dataset.name)
    n_real = _real_batch(config, np.bincount(dataset.train_labels, minlength=num_classes))
    weight = float(config.mi.weight)
    layers = mi_layers(config, model, shape)
    opts = mi_options(config.mi)
    txs = _optimizers(config)
    parts = learned_parts(config)
    chunk = real_chunk(config)
    real_labels = objectives.class_labels(num_classes, n_real)
    syn_classes = objectives.class_labels(num_classes, ipc)
    mesh = sharding.mesh_from_config(config) if mesh is None else mesh
    check_plan(config, num_classes, mesh)
    # DC's real gradients class by class on CPU (BENCHMARKS.md), one group per device.
    dc_groups = 0
    if jax.default_backend() == "cpu":
        dc_groups = mesh.size if num_classes % mesh.size == 0 else 1
    if method != "mtt":
        # Measured (BENCHMARKS.md): XLA then gathers the real batch and runs DM/DC replicated.
        _warn_uneven("classes", num_classes, mesh, "the step runs replicated, no speed-up")
    # DM and DC work class by class, so the class axis is the one to split: real [C, n, ...]
    # and synthetic [C, ipc, ...] batches alike, each device whole classes. (Splitting n
    # instead would leave the synthetic side replicated, and the networks see the batches
    # flattened class-major, so XLA would first gather the real batch to every device.)
    by_class = functools.partial(sharding.constrain, mesh=mesh, axis=0)

    def with_mi(
        base: jax.Array,
        learned: State | None,
        st: State | None,
        real_blocks: Sequence[jax.Array],
        syn_blocks: Sequence[jax.Array],
    ) -> tuple[jax.Array, Metrics]:
        """base + weight * MI loss of the heads (and memory banks) in ``learned``/``st``."""
        if not weight:
            return base, {"base_loss": base}
        banks = st.get("banks")
        mi_value, aux = mi.mi_loss(
            learned.get("heads", st["heads"]),
            [lax.stop_gradient(real_blocks[layer]) for layer in layers],
            [syn_blocks[layer] for layer in layers],
            real_labels,
            syn_classes,
            banks=banks,
            **opts,
        )
        metrics = {"base_loss": base, "mi": aux["mi"]}
        if banks is not None:
            metrics[_BANK_UPDATE] = aux["real_embeddings"]
        return base + weight * mi_value, metrics

    def grad_and_update(loss_fn: Callable[..., Any], st: State, *args: Any) -> tuple[State, Any]:
        """value_and_grad of ``loss_fn(learned, st, *args)`` over the learned parts, their optax
        updates, the growth mask, and the numerical guard."""
        learned = {name: st[name] for name in parts}
        (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(learned, st, *args)
        new, opt = dict(st), dict(st["opt_state"])
        if _BANK_UPDATE in aux:
            aux = dict(aux)
            new["banks"] = tuple(
                mi.update_memory_bank(bank, z, real_labels, momentum=config.mi.bank_momentum)
                for bank, z in zip(st["banks"], aux.pop(_BANK_UPDATE), strict=True)
            )
        for name in parts:
            updates, opt[name] = txs[name].update(grads[name], opt[name], st[name])
            new[name] = optax.apply_updates(st[name], updates)
        keep = st["trainable"].reshape(-1, *([1] * len(shape)))
        new["images"] = jnp.where(keep, new["images"], st["images"])
        new["opt_state"] = opt
        # A finite gradient can still overflow into a non-finite update (a huge lr): reject it too.
        ok = jnp.isfinite(total) & _all_finite(grads) & _all_finite([new[n] for n in parts])
        if "syn_lr" in parts:
            # The reference lets a learned lr cross zero; a student that ascends its loss is
            # never what is meant, so such a step is rejected like a non-finite one.
            ok &= new["syn_lr"] > 0
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, st)
        return new, {"loss": total, **aux, "skipped": (~ok).astype(jnp.int32)}

    def dm_loss(learned, st, variables, real_x, aug_key):
        syn_x = by_class(learned["images"].reshape(num_classes, ipc, *shape))
        base, feats = objectives.dm_loss_and_features(
            variables, real_x, syn_x, aug_key, model=model, dsa_strategy=strategy, real_chunk=chunk
        )
        return with_mi(base, learned, st, feats.real.blocks, feats.syn.blocks)

    def dm_step(state: State, key: jax.Array, real_images: jax.Array, index: Any, _experts):
        real_key, net_key, aug_key = (jax.random.fold_in(key, i) for i in range(3))
        real_x = by_class(real_images[data_lib.sample_per_class(real_key, index, n_real)])
        variables = inner.init_variables(model, net_key, shape)
        return grad_and_update(dm_loss, state, variables, real_x, aug_key)

    def dc_loss(learned, st, variables, real_x, aug_key):
        syn_x = by_class(learned["images"].reshape(num_classes, ipc, *shape))
        state = {k: v for k, v in variables.items() if k != "params"}
        base = objectives.dc_loss(
            variables["params"],
            real_x,
            syn_x,
            aug_key,
            model=model,
            dsa_strategy=strategy,
            state=state,
            real_groups=dc_groups,
        )
        if not weight:
            return with_mi(base, None, None, (), ())
        # The same views dc_loss matched: class c augmented with split(aug_key, C)[c].
        real_blocks, syn_blocks = _siamese_blocks(
            model, variables, variables, real_x, syn_x, aug_key, strategy, chunk
        )
        return with_mi(base, learned, st, real_blocks, syn_blocks)

    def dc_step(state: State, key: jax.Array, real_images: jax.Array, index: Any, _experts):
        outer, inner_epochs = _outer_inner(config)
        variables = inner.init_variables(model, jax.random.fold_in(key, 0), shape)
        outer_key, train_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

        def body(carry, o):
            st, variables = carry
            k = jax.random.fold_in(outer_key, o)
            real_x = real_images[data_lib.sample_per_class(jax.random.fold_in(k, 0), index, n_real)]
            real_x = by_class(real_x)
            variables = objectives.refresh_batch_stats(
                variables, _flat(real_x[:, :_BN_REAL_PER_CLASS]), model=model
            )
            st, metrics = grad_and_update(dc_loss, st, variables, real_x, jax.random.fold_in(k, 1))
            if outer > 1:
                train = functools.partial(
                    train_on_synthetic,
                    images=st["images"],
                    labels=st["labels"],
                    key=jax.random.fold_in(train_key, o),
                    model=model,
                    epochs=inner_epochs,
                    batch_size=config.distill.batch_train,
                    lr=config.distill.lr_net,
                    strategy=strategy,
                )
                # The reference stops after the last image update without training the net.
                variables = lax.cond(o < outer - 1, train, lambda v: v, variables)
            return (st, variables), metrics

        (state, _), per_outer = lax.scan(body, (state, variables), jnp.arange(outer))
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), per_outer)
        metrics["skipped"] = jnp.sum(per_outer["skipped"])
        return state, {**metrics, "base_loss_outer": per_outer["base_loss"]}

    base_step = {"dm": dm_step, "dc": dc_step, "dsa": dc_step}.get(method)
    if method == "mtt":
        base_step = _mtt_step(
            config, dataset, model, strategy, n_real, with_mi, grad_and_update, mesh
        )

    def step(
        state: State,
        key: jax.Array,
        real_images: jax.Array,
        index: Any,
        experts: jax.Array | None = None,
    ):
        chex.assert_shape(state["images"], (num_classes * ipc, *shape))
        chex.assert_shape(real_images, (None, *shape))
        chex.assert_type(real_images, jnp.float32)
        new, metrics = base_step(state, key, real_images, index, experts)
        # Fixed output layouts: the next call sees the input shardings it was compiled for, and
        # every process can read the metrics.
        new = sharding.constrain_like(new, state_shardings(new, mesh, config))
        return new, sharding.constrain(metrics, mesh, None)

    return jax.jit(step, donate_argnums=(0,))


def _mtt_step(
    config: Any,
    dataset: data_lib.Dataset,
    model: nn.Module,
    strategy: str | None,
    n_real: int,
    with_mi: Callable[..., Any],
    grad_and_update: Callable[..., Any],
    mesh: Mesh,
) -> Callable[..., Any]:
    """The MTT step body (see the module docstring); shares make_step's MI and update code.

    The k (expert, start) pairs are vmapped; on a mesh that vmapped axis is split over the
    devices, so k = device count runs k unrolls in the wall time of one."""
    num_classes, ipc, shape = dataset.num_classes, config.ipc, dataset.image_shape
    m = config.mtt
    collections = jax.eval_shape(lambda: inner.init_variables(model, jax.random.key(0), shape))
    if set(collections) != {"params"}:
        raise ConfigError(
            f"mtt needs a model without batch statistics; model.norm={config.model.norm!r} has "
            f"{sorted(set(collections) - {'params'})}; valid: instance, layer, group or none"
        )
    unravel, _ = experts_lib.unravelers(model, shape)
    remat = resolve_remat(m.remat)
    batch_syn = int(m.batch_syn) or num_classes * ipc
    k_pairs = int(m.num_trajectories)
    shared = config.mi.networks == "shared"
    _warn_uneven("mtt.num_trajectories", k_pairs, mesh, "XLA pads it, some devices idle")

    def loss_fn(learned, st, starts, targets, unroll_keys, real_x, aug_key):
        images = learned["images"]
        lr = learned.get("syn_lr", st["syn_lr"])
        labels = learned.get("labels", st["labels"])
        syn_y = jax.nn.softmax(labels, axis=-1) if labels.ndim == 2 else labels

        def one(start, target, key):
            start_params = unravel(start)
            final = objectives.student_unroll(
                start_params,
                images,
                syn_y,
                lr,
                key,
                model=model,
                syn_steps=int(m.syn_steps),
                batch_syn=batch_syn,
                dsa_strategy=strategy,
                remat=remat,
            )
            return objectives.mtt_loss(final, start_params, unravel(target)), final

        losses, finals = jax.vmap(one)(starts, targets, unroll_keys)
        base = jnp.mean(losses)
        if real_x is None:
            total, metrics = with_mi(base, None, None, (), ())
            return total, {**metrics, "syn_lr": lr}
        student = jax.tree.map(lambda a: a[0], finals)
        real_net = student if shared else unravel(targets[0])
        real_blocks, syn_blocks = _siamese_blocks(
            model,
            {"params": lax.stop_gradient(real_net)},
            {"params": student},
            real_x,
            images.reshape(num_classes, ipc, *shape),
            aug_key,
            strategy,
            real_chunk(config),
        )
        total, metrics = with_mi(base, learned, st, real_blocks, syn_blocks)
        return total, {**metrics, "syn_lr": lr}

    def mtt_step(state: State, key: jax.Array, real_images: jax.Array, index: Any, experts):
        chex.assert_rank(experts, 3)
        pair_key, unroll_key, real_key, aug_key = (jax.random.fold_in(key, i) for i in range(4))
        e = jax.random.randint(jax.random.fold_in(pair_key, 0), (k_pairs,), 0, experts.shape[0])
        t = jax.random.randint(jax.random.fold_in(pair_key, 1), (k_pairs,), 0, m.max_start_epoch)
        starts, targets = experts[e, t], experts[e, t + m.expert_epochs]
        unroll_keys = jax.random.split(unroll_key, k_pairs)
        starts, targets, unroll_keys = sharding.constrain((starts, targets, unroll_keys), mesh, 0)
        real_x = None
        if config.mi.weight:
            real_x = real_images[data_lib.sample_per_class(real_key, index, n_real)]
            real_x = sharding.constrain(real_x, mesh, 0)
        return grad_and_update(loss_fn, state, starts, targets, unroll_keys, real_x, aug_key)

    return mtt_step


# ----------------------------------------------------------------------------------------------
# The outer loop.
# ----------------------------------------------------------------------------------------------


def _memory_stats() -> dict[str, int | None]:
    """Peak device memory where the backend reports it, and the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_bytes": stats.get("peak_bytes_in_use"), "peak_rss_bytes": rss_kib * 1024}


def _save_artifacts(
    workdir: str, state: State, dataset: data_lib.Dataset, config: Any, iteration: int
) -> None:
    model_images = sharding.to_host(state["images"])
    pixels = dataset.to_pixels(model_images)
    labels = eval_labels(state)
    io.save_synthetic_set(
        workdir,
        pixels,
        labels,
        dataset.num_classes,
        lr=student_lr(state, config),
        config=config.to_dict(),
        iteration=np.int64(iteration),
        # Model-space copy: growing or continuing from this file is then exact (no round trip
        # through pixel space) when the normalisation matches.
        model_images=model_images,
        mean=dataset.mean,
        std=dataset.std,
        zca=np.bool_(dataset.zca is not None),
    )
    # The same picture as grid.png: copy its bytes rather than render it again.
    with open(os.path.join(workdir, "grid.png"), "rb") as src:
        png = src.read()
    with io.atomic_write(os.path.join(workdir, f"grid_{iteration:06d}.png")) as dst:
        dst.write(png)


# Fields that never change the images or the results: they may differ on any rerun.
_RUN_FIELDS = (
    "distill.log_every",
    "distill.checkpoint_every",
    "distill.keep_checkpoints",
    "distill.real_chunk",  # slicing the real forward pass changes only float rounding
    "guard",
    "mesh",  # the same run on other devices gives the same images up to float rounding
)
# While a run is unfinished its length and evaluation settings may change too. Once it has
# finished (results.json exists) only distill.iterations may grow: other evaluation settings
# would silently overwrite its results.
_RESUMABLE_FIELDS = (*_RUN_FIELDS, "distill.iterations", "distill.eval_every", "eval")


# Fields added after runs were already made, with the value that reproduces what those runs did:
# a workdir whose config.json lacks such a field is the same run when the new value is this one.
_ADDED_FIELDS = {"precision": "float32"}


def _config_fingerprint(config: Any) -> dict[str, Any]:
    """Every config field, flattened to dotted names and JSON scalars."""
    flat = config_lib.flatten_dotted(config.to_dict())
    scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
    return json.loads(json.dumps(scalars))


def _matches(name: str, fields: Sequence[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


def check_same_run(workdir: str, config: Any) -> None:
    """ConfigError if ``workdir`` holds a distillation with a different config (names the first
    differing field). ``_RESUMABLE_FIELDS`` may differ while the run is unfinished; a finished
    run only accepts ``_RUN_FIELDS`` and more iterations."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = _config_fingerprint(config)
    finished = os.path.isfile(os.path.join(workdir, "results.json"))
    allowed = (*_RUN_FIELDS, "distill.iterations") if finished else _RESUMABLE_FIELDS
    hint = "resume it with the same config or choose a new --workdir"
    if finished:
        hint = (
            "it has finished; to evaluate its set differently use a new --workdir with "
            f"--config.distill.init_from={os.path.join(workdir, 'distilled.npz')} "
            "--config.distill.iterations=0"
        )
    for name, value in _ADDED_FIELDS.items():
        if name not in old and new.get(name) == value:
            old[name] = value
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name) and not _matches(name, allowed):
            raise ConfigError(
                f"workdir {workdir!r} holds a run with {name}={old.get(name)!r}, not "
                f"{new.get(name)!r}; {hint}"
            )
    done, wanted = old.get("distill.iterations", 0), new.get("distill.iterations", 0)
    if finished and wanted < done:
        raise ConfigError(
            f"workdir {workdir!r} holds a finished run of distill.iterations={done}; it cannot "
            f"be shortened to {wanted}; choose a new --workdir"
        )


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it checkpoints)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handlers, stop only by the end
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _load_experts(config: Any, dataset: data_lib.Dataset) -> Any:
    folder = config.mtt.experts_dir
    if not folder:
        raise ConfigError(
            "mtt needs expert trajectories: set --config.mtt.experts_dir to the workdir of "
            "an experts run (python run.py --config=<dataset config>:experts --workdir=...)"
        )
    return experts_lib.load(
        folder, dataset=dataset, config=config, min_epochs=min_expert_epochs(config)
    )


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Distils ``config.data`` with ``config.method`` (+ MI) and writes the workdir artifacts.

    Resumes from the newest checkpoint in ``workdir/checkpoints`` (same config required; see
    :func:`check_same_run`). Writes ``metrics.jsonl`` and TensorBoard events (loss, base loss,
    per-layer MI, MTT lr, skipped steps, s/iter, peak memory, compile count, accuracy rows),
    ``distilled.npz`` (pixel space, plus a model-space copy), ``grid.png`` and
    ``grid_<iteration>.png`` at every evaluation (each ``distill.eval_every`` iterations,
    counting 0 = the initial set, and at the end), ``accuracy.png`` and ``results.json``.
    SIGTERM/SIGINT save a checkpoint and stop.

    Devices: the step runs on ``config.mesh`` (see :func:`make_step`), evaluation spreads its
    models over it. In a multi-process launch (``mesh.distributed``) every process runs this
    loop and saves the orbax checkpoints together; only process 0 writes the other artifacts.
    """
    from tqdm import tqdm

    sharding.initialize_distributed(sharding.options(config)["distributed"])
    mesh = sharding.mesh_from_config(config)
    main = sharding.is_main_process()
    # Data-dependent checks come before the workdir is created; the ZCA fit is then cached in it.
    dataset = data_lib.load_from_config(config.data, whitened=False)
    config_lib.check_ipc(config.ipc, data_lib.smallest_class(dataset))
    check_plan(config, dataset.num_classes, mesh)
    if config.distill.init_from:
        read_init(config.distill.init_from, dataset, config)
    experts = _load_experts(config, dataset) if config.method == "mtt" else None
    check_same_run(io.check_workdir(workdir), config)
    workdir = io.prepare_workdir(workdir)
    dataset = data_lib.whiten_from_config(dataset, config.data, cache_dir=workdir)
    if main:
        io.write_json(
            os.path.join(workdir, "config.json"), _config_fingerprint(config), sort_keys=True
        )

    index = data_lib.class_index(dataset.train_labels, dataset.num_classes)
    d = config.distill
    key = jax.random.key(config.seed)
    # Placed before the restore: orbax restores into the template's shardings.
    state = place_state(init_state(jax.random.fold_in(key, 0), dataset, config), mesh, config)
    checkpoints = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=d.keep_checkpoints
    )
    start = 0
    restored = checkpoints.restore(state)
    if restored is not None:
        start, state = restored
        logging.warning("resuming %s from iteration %d", workdir, start)
    step = make_step(config, dataset)
    writer = io.MetricWriter(workdir, tensorboard=True) if main else None
    everywhere = sharding.replicated(mesh)
    real_images = sharding.put(np.asarray(dataset.train_images, np.float32), everywhere)
    trajectories = None if experts is None else sharding.put(experts.trajectories, everywhere)
    eval_key, step_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    summary: dict[str, Any] = {"method": config.method, "ipc": config.ipc, "dataset": dataset.name}

    def evaluate(iteration: int) -> None:
        if main:
            _save_artifacts(workdir, state, dataset, config, iteration)
        if (
            iteration != d.iterations
            and jax.process_count() == 1
            and all(iteration in points for points in io.accuracy_history(workdir).values() or [{}])
        ):
            return  # a resumed run already evaluated this iteration before it stopped
        # Every process evaluates: the models are spread over the whole mesh.
        results = evaluate_lib.evaluate_from_config(
            eval_key,
            sharding.to_host(state["images"]),
            eval_labels(state),
            dataset,
            config,
            lr=student_lr(state, config),
            mesh=mesh,
        )
        summary["accuracy"] = {r.model: r.as_dict() for r in results}
        summary["iteration"] = iteration
        if not main:
            return
        writer.write(iteration, accuracy=summary["accuracy"])
        io.save_accuracy_plot(workdir)
        for r in results:
            tqdm.write(f"{config.method} ipc{config.ipc} it {iteration}: {r}")

    logging.info("distilling %s ipc %d for %d iterations", config.method, config.ipc, d.iterations)
    bar = tqdm(
        range(start, d.iterations),
        initial=start,
        total=d.iterations,
        desc=f"{config.method} ipc{config.ipc}",
        dynamic_ncols=True,
        disable=not main,
    )
    window_start, window, consecutive_skips = time.perf_counter(), [], 0
    with _StopRequest() as stop:
        for it in bar:
            if d.eval_every and it % d.eval_every == 0:
                evaluate(it)
                window_start, window = time.perf_counter(), []
            state, metrics = step(
                state, jax.random.fold_in(step_key, it), real_images, index, trajectories
            )
            window.append(metrics)
            done = it + 1
            if done % d.log_every == 0 or done == d.iterations or stop.signum is not None:
                rows = jax.device_get(window)  # the only host sync, once per log window
                now = time.perf_counter()
                for m in rows:
                    consecutive_skips = consecutive_skips + 1 if m["skipped"] else 0
                row = {k: np.asarray(v).tolist() for k, v in rows[-1].items()}
                row["skipped"] = int(sum(int(m["skipped"]) for m in rows))
                # The first window includes compilation.
                row["s_per_iter"] = (now - window_start) / len(rows)
                row["compiles"] = step._cache_size()
                row.update(_memory_stats())
                if writer is not None:
                    writer.write(done, **row)
                postfix = {"loss": f"{row['loss']:.4g}"}
                if "mi" in row:
                    postfix["mi"] = f"{float(np.sum(row['mi'])):.3g}"
                bar.set_postfix(postfix)
                window_start, window = now, []
                if consecutive_skips >= config.guard.max_consecutive:
                    checkpoints.close()
                    raise ConfigError(
                        f"{consecutive_skips} consecutive steps had a non-finite loss or "
                        "gradient or (MTT) a learned lr <= 0 "
                        f"(guard.max_consecutive={config.guard.max_consecutive}); lower "
                        "distill.lr or mtt.lr_lr. The last good checkpoint and distilled.npz "
                        "are kept"
                    )
            if stop.signum is not None or (d.checkpoint_every and done % d.checkpoint_every == 0):
                checkpoints.save(done, state)
            if stop.signum is not None:
                checkpoints.close()
                bar.close()
                logging.warning("stopped by signal %d after iteration %d", stop.signum, done)
                raise SystemExit(128 + stop.signum)
    checkpoints.save(d.iterations, state)
    checkpoints.close()
    evaluate(d.iterations)
    if main:
        # "accuracy" (= "final") is the last evaluation, which DC/DSA/DM's code reports; MTT's
        # code reports the best over its evaluations. Both are recorded, labelled.
        summary.update(io.final_and_best(io.accuracy_history(workdir)))
        summary["num_models"] = int(config.eval.num_models)
        if experts is not None:
            # The count this run matched against (the reference trains 100), not experts.num.
            shape = experts.trajectories.shape
            summary["experts"] = {
                "num": int(shape[0]),
                "epochs": int(shape[1]) - 1,
                "dir": config.mtt.experts_dir,
            }
        io.write_json(os.path.join(workdir, "results.json"), summary)
    return summary
