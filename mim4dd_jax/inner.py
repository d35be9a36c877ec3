"""Training a network on given data, as pure jit/vmap-able functions.

Two trainers:

- ``train``: for research code. Any optax optimiser, a fixed number of steps, from given
  variables or a fresh init; one ``lax.scan``, so it jits and vmaps over keys (seeds).
- ``train_classifier``: **the evaluation protocol** of the DD literature (DC, DSA, DM, MTT), and
  what ``evaluate`` and the experts use: minibatch SGD with momentum 0.9 and weight decay 5e-4,
  lr 0.01 (or MTT's learned lr), batch 256, 300 epochs (1000 with DSA), over shuffled epochs,
  written as a ``lax.scan`` over epochs and one over the batches of an epoch, so K models train
  as one ``jax.vmap``-ed program.

The schedule follows the reference evaluation (DatasetCondensation ``evaluate_synset``) exactly:
``epochs + 1`` passes over the data; after pass ``epochs // 2 + 1`` the learning rate is multiplied by
0.1 and, because the reference builds a new SGD optimiser at that point, the momentum buffer restarts
from zero. The last, smaller batch of an epoch is kept (the reference's DataLoader has
``drop_last=False``); we pad it to a static shape and mask the padding out of the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mim4dd_jax import models, sharding
from mim4dd_jax.errors import ConfigError, check_choice

PyTree = Any
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]  # (key, images [B,H,W,C]) -> images


class TrainConfig(NamedTuple):
    """Hyperparameters of :func:`train_classifier` (hashable, so it can be a static jit argument)."""

    epochs: int = 300
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_factor: float = 0.1


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> PyTree:
    """Fresh variables ({'params': ..., optionally 'batch_stats': ...}) for [H, W, C] images."""
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def apply_train(model: nn.Module, variables: PyTree, images: jax.Array) -> tuple[jax.Array, PyTree]:
    """Training-mode forward pass: returns (logits [B, K], updated variables). A model with a
    ``microbatch`` field > 0 (the ConvNet, ``config.microbatch``) runs in chunks of that many
    images (:func:`models.apply_in_chunks`; batch norm runs whole)."""
    if "batch_stats" in variables:
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, {**variables, **updates}
    chunk = int(getattr(model, "microbatch", 0) or 0)
    return models.apply_in_chunks(model, variables, images, chunk, train=True), variables


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy [B] for hard labels [B] int or soft labels [B, K] float."""
    logp = jax.nn.log_softmax(logits)
    if labels.ndim == 1:
        return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return -jnp.sum(labels * logp, axis=-1)


def _epoch_batches(key: jax.Array, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """A shuffled epoch as [num_batches, batch_size] indices and a {0,1} mask of real entries."""
    num_batches = -(-n // batch_size)
    perm = jax.random.permutation(key, n)
    pad = num_batches * batch_size - n
    # Padding repeats real indices (masked out of the loss) so batch norm never sees zeros.
    idx = jnp.concatenate([perm, perm[:pad]]) if pad else perm
    mask = (jnp.arange(num_batches * batch_size) < n).astype(jnp.float32)
    return idx.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


def sgd_epochs(
    key: jax.Array,
    variables: PyTree,
    images: jax.Array,
    labels: jax.Array,
    lr: jax.Array | float,
    *,
    model: nn.Module,
    passes: int,
    batch_size: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    decay_after: int | None = None,
    decay_factor: float = 0.1,
    augment: AugmentFn | None = None,
) -> PyTree:
    """``passes`` shuffled epochs of torch-style SGD on (images, labels); returns the variables.

    torch.optim.SGD semantics: g += weight_decay * p; buf = momentum * buf + g; p -= lr * buf.
    With ``decay_after`` set, the lr is multiplied by ``decay_factor`` after that (0-based) pass and
    the momentum buffer restarts from zero, as when the reference re-creates its optimiser. The
    last, smaller batch of a pass is padded to a static shape and masked out of the loss (with
    batch norm it runs at its own shape instead, so the padding stays out of the statistics).

    Args:
      key: PRNG key for the shuffling and the augmentation.
      variables: {'params': ..., optionally 'batch_stats': ...}.
      images: [N, H, W, C] float32; labels: [N] int32 or soft [N, K] float32.
      lr: scalar learning rate (may be traced).
      augment: optional ``(key, images) -> images`` applied to every batch.
    """
    chex.assert_rank(images, 4)
    chex.assert_equal(images.shape[0], labels.shape[0])
    epoch = _sgd_epoch(
        key,
        images,
        labels,
        lr,
        model=model,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        boundary=passes if decay_after is None else decay_after,
        decay_factor=decay_factor,
        augment=augment,
    )
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    buf = jax.tree.map(jnp.zeros_like, params)
    (params, state, _), _ = jax.lax.scan(epoch, (params, state, buf), jnp.arange(passes))
    return {**state, "params": params}


def _sgd_epoch(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    lr: jax.Array | float,
    *,
    model: nn.Module,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    boundary: int,
    decay_factor: float,
    augment: AugmentFn | None,
) -> Callable[[tuple, jax.Array], tuple[tuple, jax.Array]]:
    """The body of :func:`sgd_epochs`: ``epoch((params, state, buf), e) -> (carry, loss)`` runs
    pass ``e`` (0-based, absolute: it decides the shuffling, the lr and the momentum reset), and
    ``loss`` is the pass's mean training loss over its batches. Shared by the one-program
    training and the chunked one (:func:`train_and_test_chunked`), so both run the same ops."""
    n = images.shape[0]
    batch_size = min(batch_size, n)
    lr = jnp.asarray(lr, jnp.float32)

    def loss_fn(params, state, x, y, mask):
        logits, new_vars = apply_train(model, {**state, "params": params}, x)
        loss = jnp.sum(cross_entropy(logits, y) * mask) / jnp.sum(mask)
        return loss, ({k: v for k, v in new_vars.items() if k != "params"}, loss)

    def step(carry, batch):
        params, state, buf, lr_now, bkey = carry
        idx, mask, b = batch
        x, y = images[idx], labels[idx]
        if augment is not None:
            x = augment(jax.random.fold_in(bkey, b), x)
        grads, (state, loss) = jax.grad(loss_fn, has_aux=True)(params, state, x, y, mask)
        grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        buf = jax.tree.map(lambda m, g: momentum * m + g, buf, grads)
        params = jax.tree.map(lambda p, m: p - lr_now * m, params, buf)
        return (params, state, buf, lr_now, bkey), loss

    def epoch(carry, e):
        params, state, buf = carry
        ekey = jax.random.fold_in(key, e)
        idx, mask = _epoch_batches(jax.random.fold_in(ekey, 0), n, batch_size)
        lr_now = jnp.where(e > boundary, lr * decay_factor, lr)
        buf = jax.tree.map(lambda m: jnp.where(e == boundary + 1, jnp.zeros_like(m), m), buf)
        carry = (params, state, buf, lr_now, jax.random.fold_in(ekey, 1))
        full, rest = divmod(n, batch_size)
        if not (state and rest):
            batches = (idx, mask, jnp.arange(idx.shape[0]))
            (params, state, buf, _, _), losses = jax.lax.scan(step, carry, batches)
            return (params, state, buf), jnp.mean(losses)
        # Batch norm: masking the padding out of the loss does not keep it out of the batch
        # statistics, so the last, shorter batch runs at its own shape, as the reference's
        # DataLoader (drop_last=False) gives it.
        batches = (idx[:full], mask[:full], jnp.arange(full))
        carry, losses = jax.lax.scan(step, carry, batches)
        last = (idx[full, :rest], jnp.ones((rest,), jnp.float32), jnp.asarray(full))
        (params, state, buf, _, _), loss = step(carry, last)
        return (params, state, buf), jnp.mean(jnp.append(losses, loss))

    return epoch


def train(
    variables_or_key: PyTree,
    images: jax.Array,
    labels: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    steps: int,
    batch_size: int,
    key: jax.Array,
    augment: AugmentFn | None = None,
) -> PyTree:
    """``steps`` optax steps of cross-entropy training of ``model`` on (images, labels); returns
    the trained variables.

    Args:
      variables_or_key: the starting variables ({"params", optionally "batch_stats"}), or a PRNG
        key for a fresh ``init_variables``.
      images: [N, H, W, C] float32; labels: [N] int32, or soft [N, K] float32.
      model: a Flax classifier called as ``model.apply(v, x, train=...)``.
      tx: any optax optimiser (e.g. ``optax.sgd(0.01, momentum=0.9)``); its schedule, if any,
        counts these steps.
      steps: number of updates; batch_size: images per update (at most N), drawn without
        replacement per step with ``fold_in(key, step)``.
      key: PRNG key of the batches and of ``augment``.
      augment: optional ``(key, images) -> images`` applied to every batch (e.g. DSA).

    One ``lax.scan`` over steps: ``jax.jit`` it (model, tx, steps, batch_size and augment are
    static, e.g. via a lambda) and ``jax.vmap`` it over keys to train several seeds as one
    program. Not the evaluation protocol: that is :func:`train_classifier`.
    """
    chex.assert_rank(images, 4)
    chex.assert_equal(images.shape[0], labels.shape[0])
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"bad train steps {steps!r}; valid: an integer >= 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"bad train batch_size {batch_size!r}; valid: an integer >= 1")
    if isinstance(variables_or_key, Mapping):
        variables = dict(variables_or_key)
    else:
        variables = init_variables(model, variables_or_key, images.shape[1:])
    n = images.shape[0]
    batch_size = min(batch_size, n)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params, state, x, y):
        logits, new_vars = apply_train(model, {**state, "params": params}, x)
        return jnp.mean(cross_entropy(logits, y)), {
            k: v for k, v in new_vars.items() if k != "params"
        }

    def step(carry, t):
        params, state, opt_state = carry
        step_key = jax.random.fold_in(key, t)
        idx = jax.random.permutation(jax.random.fold_in(step_key, 0), n)[:batch_size]
        x, y = images[idx], labels[idx]
        if augment is not None:
            x = augment(jax.random.fold_in(step_key, 1), x)
        grads, state = jax.grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), None

    carry = (params, state, tx.init(params))
    (params, state, _), _ = jax.lax.scan(step, carry, jnp.arange(steps))
    return {**state, "params": params}


def train_classifier(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    lr: jax.Array | float,
    *,
    model: nn.Module,
    config: TrainConfig = TrainConfig(),
    augment: AugmentFn | None = None,
) -> PyTree:
    """The evaluation protocol: trains a fresh ``model`` from scratch on (images, labels) with
    the reference evaluation schedule and returns its variables.

    The schedule (DatasetCondensation's ``evaluate_synset``, which DC, DSA, DM and MTT report
    with): torch-style SGD, momentum 0.9, weight decay 5e-4, batch 256, lr 0.01 for DC/DSA/DM
    or MTT's learned lr; ``config.epochs + 1`` passes over shuffled data (300 epochs without
    augmentation, 1000 with DSA); after pass ``epochs // 2 + 1`` the lr is multiplied by 0.1 and
    the momentum restarts from zero. For training of your own (any optax optimiser, a number of
    steps, given starting variables) use :func:`train`.

    Args:
      key: PRNG key; it decides the initialisation, the shuffling and the augmentation.
      images: [N, H, W, C] float32.
      labels: [N] int32 hard labels, or [N, K] float32 soft labels.
      lr: initial learning rate (a scalar; may be a traced, learned value).
      model: a Flax classifier called as ``model.apply(v, x, train=...)``.
      config: epochs, batch size, momentum, weight decay, decay factor.
      augment: optional ``(key, images) -> images`` applied to every batch (e.g. DSA).
    """
    init_key, data_key = jax.random.split(key)
    return sgd_epochs(
        data_key,
        init_variables(model, init_key, images.shape[1:]),
        images,
        labels,
        lr,
        model=model,
        passes=config.epochs + 1,
        batch_size=config.batch_size,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        decay_after=config.epochs // 2 + 1,
        decay_factor=config.decay_factor,
        augment=augment,
    )


def predict(
    model: nn.Module, variables: PyTree, images: jax.Array, *, batch_size: int = 500
) -> jax.Array:
    """Eval-mode logits [N, K] for images [N, H, W, C], computed in batches with ``lax.map``."""
    n = images.shape[0]
    batch_size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    padded = jnp.concatenate([images, images[:pad]]) if pad else images
    batches = padded.reshape(num_batches, batch_size, *images.shape[1:])
    logits = jax.lax.map(lambda x: model.apply(variables, x, train=False), batches)
    return logits.reshape(num_batches * batch_size, -1)[:n]


def accuracy(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    labels: jax.Array,
    *,
    batch_size: int = 500,
) -> jax.Array:
    """Top-1 accuracy in [0, 1] of ``model`` on images [N,H,W,C] with int labels [N]."""
    logits = predict(model, variables, images, batch_size=batch_size)
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


PARALLEL = ("auto", "vmap", "map")


def resolve_parallel(parallel: str) -> str:
    """``auto`` = ``vmap`` on accelerators and ``map`` (sequential, inside the same program) on
    CPU, where a vmapped im2col convolution becomes a batched GEMM that ran slower than K plain
    ones here (see BENCHMARKS.md)."""
    check_choice("eval.parallel", parallel, PARALLEL)
    if parallel == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return parallel


@functools.partial(
    jax.jit, static_argnames=("model", "config", "augment", "test_batch_size", "parallel", "mesh")
)
def train_and_test_many(
    keys: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    lr: jax.Array | float,
    test_images: jax.Array,
    test_labels: jax.Array,
    *,
    model: nn.Module,
    config: TrainConfig,
    augment: AugmentFn | None = None,
    test_batch_size: int = 500,
    parallel: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """Trains one model per key (keys: [K] typed keys) as one jitted program; returns test
    accuracies [K]. ``parallel``: ``vmap`` the K models, or ``map`` them one after another.

    With a ``mesh`` of d > 1 devices the keys are padded to a multiple of d (the extra models
    are trained and dropped: each model depends on its key only) and laid out [d, K'/d], the
    first axis split over the devices; each device then vmaps or maps its share. The
    accuracies come back replicated."""

    def one(k):
        variables = train_classifier(
            k, images, labels, lr, model=model, config=config, augment=augment
        )
        return accuracy(model, variables, test_images, test_labels, batch_size=test_batch_size)

    per_device = jax.vmap(one) if resolve_parallel(parallel) == "vmap" else None
    if per_device is None:
        per_device = lambda ks: jax.lax.map(one, ks)
    if mesh is None or sharding.size(mesh) == 1:
        return per_device(keys)
    d, k = sharding.size(mesh), keys.shape[0]
    grid = sharding.pad_to_multiple(keys, d).reshape(d, -1)
    accs = jax.vmap(per_device)(sharding.constrain(grid, mesh, 0))
    return sharding.constrain(accs, mesh, None).reshape(-1)[:k]


# ----------------------------------------------------------------------------------------------
# The same K-model training in chunks of epochs, for progress reports.
# ----------------------------------------------------------------------------------------------


class ManyModels(NamedTuple):
    """The carry of :func:`train_and_test_chunked` between chunks: per model (leading axis K,
    or [d, K'/d] over a mesh of d devices) its variables, momentum buffer and data key."""

    variables: PyTree
    momentum: PyTree
    data_keys: jax.Array


def _over_models(fn: Callable[[Any], Any], xs: PyTree, parallel: str, mesh: Any) -> PyTree:
    """``fn`` on every model of ``xs`` (leading axis K; [d, K'/d] with a mesh of d > 1 devices,
    the first axis split over them): vmapped or mapped as ``parallel`` says."""
    per_device = jax.vmap(fn) if resolve_parallel(parallel) == "vmap" else None
    if per_device is None:
        per_device = lambda t: jax.lax.map(fn, t)
    if mesh is None or sharding.size(mesh) == 1:
        return per_device(xs)
    return sharding.constrain(jax.vmap(per_device)(sharding.constrain(xs, mesh, 0)), mesh, 0)


def _per_model_rows(x: jax.Array, k: int, mesh: Any) -> jax.Array:
    """[K] (or [d, K'/d] over a mesh) -> [K], replicated."""
    if mesh is None or sharding.size(mesh) == 1:
        return x
    return sharding.constrain(x, mesh, None).reshape(-1)[:k]


@functools.partial(jax.jit, static_argnames=("model", "image_shape", "parallel", "mesh"))
def _init_many(
    keys: jax.Array, *, model: nn.Module, image_shape: tuple[int, ...], parallel: str, mesh: Any
) -> ManyModels:
    """Fresh models as :func:`train_classifier` makes them, one per key."""
    if mesh is not None and sharding.size(mesh) > 1:
        d = sharding.size(mesh)
        keys = sharding.pad_to_multiple(keys, d).reshape(d, -1)

    def one(k):
        init_key, data_key = jax.random.split(k)
        variables = init_variables(model, init_key, image_shape)
        return ManyModels(variables, jax.tree.map(jnp.zeros_like, variables["params"]), data_key)

    return _over_models(one, keys, parallel, mesh)


@functools.partial(jax.jit, static_argnames=("model", "config", "augment", "parallel", "mesh"))
def _train_many(
    carry: ManyModels,
    images: jax.Array,
    labels: jax.Array,
    lr: jax.Array | float,
    start: jax.Array,
    stop: jax.Array,
    *,
    model: nn.Module,
    config: TrainConfig,
    augment: AugmentFn | None,
    parallel: str,
    mesh: Any,
) -> tuple[ManyModels, jax.Array]:
    """Passes ``start <= e < stop`` of every model (one program for any chunk: the bounds are
    traced); returns the new carry and each model's mean training loss in pass ``stop - 1``."""

    def one(m: ManyModels) -> tuple[ManyModels, jax.Array]:
        epoch = _sgd_epoch(
            m.data_keys,
            images,
            labels,
            lr,
            model=model,
            batch_size=config.batch_size,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            boundary=config.epochs // 2 + 1,
            decay_factor=config.decay_factor,
            augment=augment,
        )
        params = m.variables["params"]
        state = {k: v for k, v in m.variables.items() if k != "params"}

        def body(e, c):
            (params, state, buf), loss = epoch(c[0], e)
            return (params, state, buf), loss

        (params, state, buf), loss = jax.lax.fori_loop(
            start, stop, body, ((params, state, m.momentum), jnp.float32(jnp.nan))
        )
        return ManyModels({**state, "params": params}, buf, m.data_keys), loss

    carry, loss = _over_models(one, carry, parallel, mesh)
    return carry, loss


@functools.partial(jax.jit, static_argnames=("model", "test_batch_size", "parallel", "mesh", "k"))
def _test_many(
    carry: ManyModels,
    test_images: jax.Array,
    test_labels: jax.Array,
    *,
    model: nn.Module,
    test_batch_size: int,
    parallel: str,
    mesh: Any,
    k: int,
) -> jax.Array:
    def one(m: ManyModels) -> jax.Array:
        return accuracy(model, m.variables, test_images, test_labels, batch_size=test_batch_size)

    return _per_model_rows(_over_models(one, carry, parallel, mesh), k, mesh)


def train_and_test_chunked(
    keys: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    lr: jax.Array | float,
    test_images: jax.Array,
    test_labels: jax.Array,
    *,
    model: nn.Module,
    config: TrainConfig,
    augment: AugmentFn | None = None,
    test_batch_size: int = 500,
    parallel: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    chunk_epochs: int = 0,
    on_chunk: Callable[[int, int, jax.Array], None] | None = None,
    return_variables: bool = False,
) -> jax.Array | tuple[jax.Array, PyTree]:
    """:func:`train_and_test_many` as a host loop over chunks of ``chunk_epochs`` passes (0: one
    chunk), each chunk one jitted program for all K models. The result is the same, bit for
    bit: every pass runs the same ops with the same keys, lr and momentum reset.

    ``on_chunk(passes_done, passes, loss)`` is called after each chunk with ``loss`` [K], each
    model's mean training loss in its last pass (a device array: reading it waits for the
    chunk). ``return_variables``: also return the trained variables, stacked per model (for
    tests)."""
    passes = config.epochs + 1
    chunk = passes if chunk_epochs <= 0 else int(chunk_epochs)
    k = keys.shape[0]
    carry = _init_many(
        keys, model=model, image_shape=tuple(images.shape[1:]), parallel=parallel, mesh=mesh
    )
    lr = jnp.asarray(lr, jnp.float32)
    for start in range(0, passes, chunk):
        stop = min(passes, start + chunk)
        carry, loss = _train_many(
            carry,
            images,
            labels,
            lr,
            jnp.int32(start),
            jnp.int32(stop),
            model=model,
            config=config,
            augment=augment,
            parallel=parallel,
            mesh=mesh,
        )
        if on_chunk is not None:
            on_chunk(stop, passes, loss if mesh is None else _rows(loss, k, mesh))
    accs = _test_many(
        carry,
        test_images,
        test_labels,
        model=model,
        test_batch_size=test_batch_size,
        parallel=parallel,
        mesh=mesh,
        k=k,
    )
    return (accs, carry.variables) if return_variables else accs


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def _rows(x: jax.Array, k: int, mesh: Any) -> jax.Array:
    return _per_model_rows(x, k, mesh)
