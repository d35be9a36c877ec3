"""Training a network on given data, as pure jit/vmap-able functions.

``train_classifier`` is the plain training used by evaluation (and, later, experts): minibatch SGD
with momentum and weight decay over shuffled epochs, written as a ``lax.scan`` over epochs and one over
the batches of an epoch, so K models train as one ``jax.vmap``-ed program.

The schedule follows the reference evaluation (DatasetCondensation ``evaluate_synset``) exactly:
``epochs + 1`` passes over the data; after pass ``epochs // 2 + 1`` the learning rate is multiplied by
0.1 and, because the reference builds a new SGD optimiser at that point, the momentum buffer restarts
from zero. The last, smaller batch of an epoch is kept (the reference's DataLoader has
``drop_last=False``); we pad it to a static shape and mask the padding out of the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mim4dd_jax import sharding
from mim4dd_jax.errors import check_choice

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
    """Training-mode forward pass: returns (logits [B, K], updated variables)."""
    if "batch_stats" in variables:
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, {**variables, **updates}
    return model.apply(variables, images, train=True), variables


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
    last, smaller batch of a pass is padded to a static shape and masked out of the loss.

    Args:
      key: PRNG key for the shuffling and the augmentation.
      variables: {'params': ..., optionally 'batch_stats': ...}.
      images: [N, H, W, C] float32; labels: [N] int32 or soft [N, K] float32.
      lr: scalar learning rate (may be traced).
      augment: optional ``(key, images) -> images`` applied to every batch.
    """
    chex.assert_rank(images, 4)
    chex.assert_equal(images.shape[0], labels.shape[0])
    n = images.shape[0]
    batch_size = min(batch_size, n)
    lr = jnp.asarray(lr, jnp.float32)
    boundary = passes if decay_after is None else decay_after

    def loss_fn(params, state, x, y, mask):
        logits, new_vars = apply_train(model, {**state, "params": params}, x)
        loss = jnp.sum(cross_entropy(logits, y) * mask) / jnp.sum(mask)
        return loss, {k: v for k, v in new_vars.items() if k != "params"}

    def step(carry, batch):
        params, state, buf, lr_now, bkey = carry
        idx, mask, b = batch
        x, y = images[idx], labels[idx]
        if augment is not None:
            x = augment(jax.random.fold_in(bkey, b), x)
        grads, state = jax.grad(loss_fn, has_aux=True)(params, state, x, y, mask)
        grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        buf = jax.tree.map(lambda m, g: momentum * m + g, buf, grads)
        params = jax.tree.map(lambda p, m: p - lr_now * m, params, buf)
        return (params, state, buf, lr_now, bkey), None

    def epoch(carry, e):
        params, state, buf = carry
        ekey = jax.random.fold_in(key, e)
        idx, mask = _epoch_batches(jax.random.fold_in(ekey, 0), n, batch_size)
        lr_now = jnp.where(e > boundary, lr * decay_factor, lr)
        buf = jax.tree.map(lambda m: jnp.where(e == boundary + 1, jnp.zeros_like(m), m), buf)
        batches = (idx, mask, jnp.arange(idx.shape[0]))
        (params, state, buf, _, _), _ = jax.lax.scan(
            step, (params, state, buf, lr_now, jax.random.fold_in(ekey, 1)), batches
        )
        return (params, state, buf), None

    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    buf = jax.tree.map(jnp.zeros_like, params)
    (params, state, _), _ = jax.lax.scan(epoch, (params, state, buf), jnp.arange(passes))
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
    """Trains a fresh ``model`` from scratch on (images, labels) with the reference evaluation
    schedule (``config.epochs + 1`` passes, decay after pass ``epochs // 2 + 1``); returns its
    variables.

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
