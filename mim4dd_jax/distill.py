"""Distillation with DM or DC/DSA, optionally plus the MIM4DD mutual-information term.

The synthetic state is a plain dict pytree::

    {"images": [C * ipc, H, W, Ch] float32 (model space, class-major: image i has class i // ipc),
     "labels": [C * ipc] int32 (fixed),
     "heads": mi.init_heads params, one per MI layer (present, and untouched, when mi.weight = 0),
     "opt_state": {"images": optax state, "heads": optax state}}

One iteration is one jitted, pure :func:`make_step` function ``step(state, key, real_images,
class_index) -> (state, metrics)`` with the state donated; the real train split lives on device
and per-class real batches are drawn inside the step (``data.sample_per_class``).

- **DM** (Zhao & Bilen, 2023): a fresh, frozen random network per iteration; loss =
  ``objectives.dm_loss_and_features`` with siamese DSA; one image update per iteration.
- **DC / DSA** (Zhao et al., 2021; Zhao & Bilen, 2021): a fresh network per iteration, then
  ``outer_loop`` image updates by per-class gradient matching, each on a freshly drawn real batch;
  between two of them the network trains ``inner_loop`` epochs on the (updated, constant)
  synthetic set with plain SGD at ``distill.lr_net`` (the reference's 0.01, no momentum), with
  per-sample DSA for DSA. The loop over outer steps is a ``lax.scan`` inside the step.
  DSA = DC with siamese augmentation (``distill.dsa``).
- **MIM4DD add-on**: total = base + mi.weight * mi.mi_loss (= -sum_l w_l MI_l). Both the real and
  the synthetic features are the per-block feature maps of the SAME network that the base loss
  uses at that moment (DM: the sampled network; DC: the network at that outer step), on the same
  (siamese-augmented) batches. The projection heads have their own optax optimiser and descend the
  same total, i.e. they maximise the MI bound. ``mi.weight == 0`` skips the MI code at trace time
  and the MI term consumes no random numbers, so the base method is reproduced exactly.

Randomness (part of the contract, tests rely on it): ``init_state`` uses ``fold_in(key, 0)`` for
the images and ``fold_in(key, 1)`` for the heads. In a DM step, ``fold_in(key, 0|1|2)`` draw the
real batch, the network and the DSA transforms. In a DC step, ``fold_in(key, 0)`` draws the
network, outer step ``o`` uses ``k = fold_in(fold_in(key, 1), o)`` (``fold_in(k, 0)``: real
batch, ``fold_in(k, 1)``: DSA) and the network training after it ``fold_in(fold_in(key, 2), o)``.
``run`` uses ``fold_in(seed_key, 0)`` for ``init_state``, ``fold_in(seed_key, 1)`` for every
evaluation and ``fold_in(fold_in(seed_key, 2), it)`` for iteration ``it``.

Not in this slice: MTT and experts, learnable soft labels or lr, init from a ``distilled.npz``,
incremental IPC growth, memory banks, checkpoints and resume (a restarted run starts over),
TensorBoard and ``accuracy.png``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mim4dd_jax import augment as augment_lib
from mim4dd_jax import config as config_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax import evaluate as evaluate_lib
from mim4dd_jax import inner, io, mi, models, objectives
from mim4dd_jax.errors import check_choice

State = dict[str, Any]
Metrics = dict[str, jax.Array]
StepFn = Callable[[State, jax.Array, jax.Array, data_lib.ClassIndex], tuple[State, Metrics]]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lion", "lamb")
INITS = ("real", "noise")
BASES = ("dm", "dc", "dsa")

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
    """The siamese DSA strategy used while matching, or None (DC, or ``distill.dsa`` off)."""
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


def _outer_inner(config: Any) -> tuple[int, int]:
    d = config.distill
    if d.outer_loop and d.inner_loop:
        return int(d.outer_loop), int(d.inner_loop)
    return objectives.dc_loops(config.ipc)


def _real_batch(config: Any, counts: np.ndarray) -> int:
    # The reference takes the first n of a class permutation, i.e. the whole class when smaller.
    return int(min(config.distill.batch_real, int(np.min(counts))))


# ----------------------------------------------------------------------------------------------
# State.
# ----------------------------------------------------------------------------------------------


def init_state(key: jax.Array, dataset: data_lib.Dataset, config: Any) -> State:
    """The initial synthetic state (see the module docstring for its layout).

    ``distill.init`` "real": ``ipc`` distinct random train images per class (class-balanced);
    "noise": standard normal pixels in model space. The heads are ``mi.init_heads`` for the
    blocks in ``mi.layers`` of ``config.model``.
    """
    check_choice("distill.init", config.distill.init, INITS)
    num_classes, ipc, shape = dataset.num_classes, config.ipc, dataset.image_shape
    image_key, heads_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    if config.distill.init == "real":
        index = data_lib.class_index(dataset.train_labels, num_classes)
        chosen = np.asarray(data_lib.sample_per_class(image_key, index, ipc)).reshape(-1)
        images = jnp.asarray(dataset.train_images[chosen], jnp.float32)
    else:
        images = jax.random.normal(image_key, (num_classes * ipc, *shape), jnp.float32)
    model = evaluate_lib.build_model(config, num_classes)
    blocks = models.block_shapes(model, shape)
    layers = mi_layers(config, model, shape)
    heads = mi.init_heads(
        heads_key, [(1, *blocks[layer]) for layer in layers], **mi_options(config.mi)
    )
    tx_images, tx_heads = _optimizers(config)
    return {
        "images": images,
        "labels": objectives.class_labels(num_classes, ipc),
        "heads": heads,
        "opt_state": {"images": tx_images.init(images), "heads": tx_heads.init(heads)},
    }


def _optimizers(config: Any) -> tuple[optax.GradientTransformation, ...]:
    d = config.distill
    return (
        make_optimizer(d.optimizer, d.lr, d.momentum),
        make_optimizer(config.mi.optimizer, config.mi.lr),
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


def make_step(config: Any, dataset: data_lib.Dataset) -> StepFn:
    """The jitted ``step(state, key, real_images, class_index) -> (state, metrics)``.

    real_images: [N, H, W, Ch] float32, the train split in model space (on device);
    class_index: ``data.class_index`` of its labels. The state is donated. metrics: "loss" (the
    total) and "base_loss" (DC: means over the outer steps), plus "mi" [L] (nats per MI layer)
    when ``mi.weight > 0``; DC/DSA add "base_loss_outer" [outer_loop], the base loss at each outer
    step. Only ``dataset``'s metadata and label counts are read here.
    """
    method = config.method
    check_choice("distillation method", method, BASES)
    num_classes, ipc, shape = dataset.num_classes, config.ipc, dataset.image_shape
    model = evaluate_lib.build_model(config, num_classes)
    strategy = matching_strategy(config, dataset.name)
    n_real = _real_batch(config, np.bincount(dataset.train_labels, minlength=num_classes))
    weight = float(config.mi.weight)
    layers = mi_layers(config, model, shape)
    opts = mi_options(config.mi)
    tx_images, tx_heads = _optimizers(config)
    real_labels = objectives.class_labels(num_classes, n_real)

    def with_mi(
        base: jax.Array,
        heads: Any,
        real_blocks: Sequence[jax.Array],
        syn_blocks: Sequence[jax.Array],
        syn_labels: jax.Array,
    ) -> tuple[jax.Array, Metrics]:
        if not weight:
            return base, {"base_loss": base}
        mi_value, aux = mi.mi_loss(
            heads,
            [lax.stop_gradient(real_blocks[layer]) for layer in layers],
            [syn_blocks[layer] for layer in layers],
            real_labels,
            syn_labels,
            **opts,
        )
        return base + weight * mi_value, {"base_loss": base, "mi": aux["mi"]}

    def grad_and_update(loss_fn: Callable[..., Any], st: State, *args: Any) -> tuple[State, Any]:
        """value_and_grad of loss_fn(images, heads, *args) and the optax updates."""
        if weight:
            (total, aux), (g_img, g_heads) = jax.value_and_grad(
                loss_fn, argnums=(0, 1), has_aux=True
            )(st["images"], st["heads"], *args)
        else:
            (total, aux), g_img = jax.value_and_grad(loss_fn, has_aux=True)(
                st["images"], st["heads"], *args
            )
        opt = dict(st["opt_state"])
        updates, opt["images"] = tx_images.update(g_img, opt["images"], st["images"])
        new = {**st, "images": optax.apply_updates(st["images"], updates)}
        if weight:
            updates, opt["heads"] = tx_heads.update(g_heads, opt["heads"], st["heads"])
            new["heads"] = optax.apply_updates(st["heads"], updates)
        new["opt_state"] = opt
        return new, {"loss": total, **aux}

    def dm_loss(images, heads, labels, variables, real_x, aug_key):
        syn_x = images.reshape(num_classes, ipc, *shape)
        base, feats = objectives.dm_loss_and_features(
            variables, real_x, syn_x, aug_key, model=model, dsa_strategy=strategy
        )
        return with_mi(base, heads, feats.real.blocks, feats.syn.blocks, labels)

    def dm_step(state: State, key: jax.Array, real_images: jax.Array, index: Any):
        real_key, net_key, aug_key = (jax.random.fold_in(key, i) for i in range(3))
        real_x = real_images[data_lib.sample_per_class(real_key, index, n_real)]
        variables = inner.init_variables(model, net_key, shape)
        return grad_and_update(dm_loss, state, state["labels"], variables, real_x, aug_key)

    def dc_loss(images, heads, labels, variables, real_x, aug_key):
        syn_x = images.reshape(num_classes, ipc, *shape)
        state = {k: v for k, v in variables.items() if k != "params"}
        base = objectives.dc_loss(
            variables["params"],
            real_x,
            syn_x,
            aug_key,
            model=model,
            dsa_strategy=strategy,
            state=state,
        )
        if not weight:
            return with_mi(base, heads, (), (), labels)
        # The same views dc_loss matched: class c augmented with split(aug_key, C)[c].
        keys = jax.random.split(aug_key, num_classes)
        real_a = _augment_classes(keys, lax.stop_gradient(real_x), strategy)
        syn_a = _augment_classes(keys, syn_x, strategy)
        real_out = model.apply(variables, _flat(real_a), train=False, features=True)
        syn_out = model.apply(variables, _flat(syn_a), train=False, features=True)
        return with_mi(base, heads, real_out.blocks, syn_out.blocks, labels)

    def dc_step(state: State, key: jax.Array, real_images: jax.Array, index: Any):
        outer, inner_epochs = _outer_inner(config)
        variables = inner.init_variables(model, jax.random.fold_in(key, 0), shape)
        outer_key, train_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

        def body(carry, o):
            st, variables = carry
            k = jax.random.fold_in(outer_key, o)
            real_x = real_images[data_lib.sample_per_class(jax.random.fold_in(k, 0), index, n_real)]
            variables = objectives.refresh_batch_stats(
                variables, _flat(real_x[:, :_BN_REAL_PER_CLASS]), model=model
            )
            st, metrics = grad_and_update(
                dc_loss, st, st["labels"], variables, real_x, jax.random.fold_in(k, 1)
            )
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
        return state, {**metrics, "base_loss_outer": per_outer["base_loss"]}

    base_step = dm_step if method == "dm" else dc_step

    def step(state: State, key: jax.Array, real_images: jax.Array, index: Any):
        chex.assert_shape(state["images"], (num_classes * ipc, *shape))
        chex.assert_shape(real_images, (None, *shape))
        chex.assert_type(real_images, jnp.float32)
        return base_step(state, key, real_images, index)

    return jax.jit(step, donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# The outer loop.
# ----------------------------------------------------------------------------------------------


def _peak_memory() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _save_artifacts(
    workdir: str, state: State, dataset: data_lib.Dataset, config: Any, iteration: int
) -> None:
    pixels = dataset.to_pixels(np.asarray(state["images"]))
    labels = np.asarray(state["labels"])
    io.save_synthetic_set(
        workdir,
        pixels,
        labels,
        dataset.num_classes,
        lr=config.eval.lr,
        config=config.to_dict(),
        iteration=np.int64(iteration),
    )


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Distils ``config.data`` with ``config.method`` (+ MI) and writes the workdir artifacts.

    Writes ``metrics.jsonl`` (loss, base loss, per-layer MI, s/iter, peak memory when the
    backend reports it, and accuracy rows), ``distilled.npz`` (pixel space) and ``grid.png`` at
    every evaluation (each ``distill.eval_every`` iterations, counting 0 = the initial set, and at
    the end), and ``results.json``. No checkpoints: an interrupted run starts over.
    """
    from tqdm import tqdm

    # Data-dependent checks come before the workdir is created; the ZCA fit is then cached in it.
    dataset = data_lib.load_from_config(config.data, whitened=False)
    config_lib.check_ipc(config.ipc, data_lib.smallest_class(dataset))
    workdir = io.prepare_workdir(workdir)
    dataset = data_lib.whiten_from_config(dataset, config.data, cache_dir=workdir)
    index = data_lib.class_index(dataset.train_labels, dataset.num_classes)
    d = config.distill
    key = jax.random.key(config.seed)
    state = init_state(jax.random.fold_in(key, 0), dataset, config)
    step = make_step(config, dataset)
    writer = io.MetricWriter(workdir)
    real_images = jax.device_put(jnp.asarray(dataset.train_images, jnp.float32))
    eval_key, step_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    summary: dict[str, Any] = {"method": config.method, "ipc": config.ipc, "dataset": dataset.name}

    def evaluate(iteration: int) -> None:
        _save_artifacts(workdir, state, dataset, config, iteration)
        results = evaluate_lib.evaluate_from_config(
            eval_key, np.asarray(state["images"]), np.asarray(state["labels"]), dataset, config
        )
        summary["accuracy"] = {
            r.model: {"mean": r.mean, "std": r.std, "all": r.accuracies.tolist()} for r in results
        }
        summary["iteration"] = iteration
        writer.write(iteration, accuracy=summary["accuracy"])
        for r in results:
            tqdm.write(f"{config.method} ipc{config.ipc} it {iteration}: {r}")

    logging.info("distilling %s ipc %d for %d iterations", config.method, config.ipc, d.iterations)
    bar = tqdm(range(d.iterations), desc=f"{config.method} ipc{config.ipc}", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    for it in bar:
        if d.eval_every and it % d.eval_every == 0:
            evaluate(it)
            window_start, window_steps = time.perf_counter(), 0
        state, metrics = step(state, jax.random.fold_in(step_key, it), real_images, index)
        window_steps += 1
        if (it + 1) % d.log_every == 0 or it + 1 == d.iterations:
            metrics = jax.device_get(metrics)  # the only host sync, once per log window
            now = time.perf_counter()
            row = {k: np.asarray(v).tolist() for k, v in metrics.items()}
            # The first window includes compilation.
            row["s_per_iter"] = (now - window_start) / window_steps
            row["peak_memory_bytes"] = _peak_memory()
            writer.write(it + 1, **row)
            postfix = {"loss": f"{row['loss']:.4g}"}
            if "mi" in row:
                postfix["mi"] = f"{float(np.sum(row['mi'])):.3g}"
            bar.set_postfix(postfix)
            window_start, window_steps = now, 0
    evaluate(d.iterations)
    with io.atomic_write(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
