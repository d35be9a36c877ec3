"""Base dataset-distillation objectives as pure, jit-able functions of (params, batches, key).

Three families, each the loss the synthetic images are optimised on (lower is better):

- **Gradient matching** (DC, and DSA = DC with siamese augmentation): :func:`gradient_distance`,
  :func:`dc_loss`, :func:`dc_loops`, :func:`refresh_batch_stats`.
- **Distribution matching** (DM): :func:`dm_loss`, :func:`dm_loss_and_features`.
- **Trajectory matching** (MTT): :func:`student_unroll`, :func:`mtt_loss`,
  :func:`minibatch_schedule`.

Conventions:

- Class-structured batches are [C, n, H, W, Ch] float: axis 0 is the class, so labels are implied
  (class c has label c). Flattened batches are class-major ([C * n, ...], label ``i // n``; see
  :func:`class_labels`).
- The real side is a constant: it goes through ``lax.stop_gradient``, so gradients reach only the
  synthetic images (and, for MTT, the learnable lr).
- Strings, ints, models and :class:`~mim4dd_jax.augment.DSAParams` are keyword-only arguments meant
  to be bound with ``functools.partial`` (or listed in ``static_argnames``) before ``jax.jit``.
- Model parameters are handled as pytrees, not raveled: flax gives us the tree already, tree_map
  keeps the per-layer structure that the gradient distance needs, and nothing here needs one
  flat vector (the MTT loss is a sum over leaves).
- ``dsa_strategy=None`` (or "none") means no augmentation.

Randomness: ``dc_loss`` and ``dm_loss`` give class c the key ``jax.random.split(key, C)[c]``, the
same for its real and its synthetic batch (siamese DSA, as the reference seeds both with one
seed). ``student_unroll`` splits ``key`` into (schedule_key, augment_key); step s augments with
``fold_in(augment_key, s)``.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mim4dd_jax.augment import DSAParams, augment, parse_strategy
from mim4dd_jax.errors import ConfigError, check_choice
from mim4dd_jax.inner import apply_train, cross_entropy
from mim4dd_jax.models import ModelOutput

PyTree = Any

# The reference's stabiliser in the cosine denominator (DatasetCondensation distance_wb).
COSINE_EPS = 1e-6

_DEFAULT_DSA = DSAParams()


# ----------------------------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------------------------


def _uses_dsa(strategy: str | None) -> bool:
    """True when ``strategy`` names at least one DSA op; raises ConfigError for unknown ops."""
    return strategy is not None and len(parse_strategy(strategy)) > 0


def _check_class_batches(real_x: jax.Array, syn_x: jax.Array) -> None:
    chex.assert_rank([real_x, syn_x], 5)
    chex.assert_type([real_x, syn_x], jnp.floating)
    chex.assert_equal(real_x.shape[0], syn_x.shape[0])
    chex.assert_equal(real_x.shape[2:], syn_x.shape[2:])


def class_labels(num_classes: int, per_class: int) -> jax.Array:
    """Labels [num_classes * per_class] int32 of a class-major flattened batch: 0,0,..,1,1,.."""
    return jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)


def _siamese_per_class(
    keys: jax.Array, x: jax.Array, strategy: str | None, params: DSAParams
) -> jax.Array:
    """DSA on each class slice of x [C, n, H, W, Ch] with that class's key (keys: [C] keys).

    One transform per class for the whole slice, so calling it with the same keys on the real and
    the synthetic batch gives the siamese pair the reference builds with a shared seed.
    """
    if not _uses_dsa(strategy):
        return x
    one = lambda k, xc: augment(k, xc, strategy=strategy, params=params, siamese=True)
    return jax.vmap(one)(keys, x)


# ----------------------------------------------------------------------------------------------
# Gradient matching (DC / DSA).
# ----------------------------------------------------------------------------------------------


def _safe_norm(rows: jax.Array) -> jax.Array:
    """Row norms [R] of rows [R, D] whose gradient at a zero row is 0 (as torch's), not NaN."""
    sq = jnp.sum(rows * rows, axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _output_rows(leaf: jax.Array) -> jax.Array:
    """[rows = output channels, D]: the last axis of our layouts is the output channel.

    HWIO conv kernel [kh, kw, Cin, Cout] -> [Cout, kh*kw*Cin]; Dense [in, out] -> [out, in];
    LayerNorm scale [H, W, C] -> [C, H*W] (the reference keeps 3-D leaves with C rows too).
    The order inside a row differs from torch's, which the cosine does not see.
    """
    return leaf.reshape(-1, leaf.shape[-1]).T


def _leaf_distance(g_real: jax.Array, g_syn: jax.Array, eps: float) -> jax.Array:
    if g_real.ndim < 2:
        # Biases and norm parameters are skipped, as in the reference.
        return jnp.zeros((), jnp.float32)
    r, s = _output_rows(g_real), _output_rows(g_syn)
    cos = jnp.sum(r * s, axis=-1) / (_safe_norm(r) * _safe_norm(s) + eps)
    return jnp.sum(1.0 - cos)


def gradient_distance(g_real: PyTree, g_syn: PyTree, *, eps: float = COSINE_EPS) -> jax.Array:
    """Layer-wise gradient distance of DC: sum over leaves and output channels of (1 - cosine).

    g_real, g_syn: pytrees of the same structure and shapes (gradients w.r.t. model params).
    Leaves with ndim >= 2 are split into one row per output channel (the last axis); leaves with
    ndim < 2 (biases, norm scales) contribute 0. A zero row has cosine 0, i.e. distance 1, as in
    the reference. Returns a float32 scalar.
    """
    chex.assert_trees_all_equal_shapes(g_real, g_syn)
    leaves_r = jax.tree.leaves(g_real)
    leaves_s = jax.tree.leaves(g_syn)
    total = jnp.zeros((), jnp.float32)
    for r, s in zip(leaves_r, leaves_s, strict=True):
        total = total + _leaf_distance(r, s, eps)
    return total


def _mean_ce(
    params: PyTree, state: PyTree, x: jax.Array, label: jax.Array, model: nn.Module
) -> jax.Array:
    """Mean cross-entropy of x [n, H, W, Ch] all labelled ``label``; eval-mode norms."""
    logits = model.apply({**state, "params": params}, x, train=False)
    labels = jnp.full((x.shape[0],), label, jnp.int32)
    return jnp.mean(cross_entropy(logits, labels))


def dc_loss(
    params: PyTree,
    real_x: jax.Array,
    syn_x: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    dsa_strategy: str | None = None,
    dsa_params: DSAParams = _DEFAULT_DSA,
    state: PyTree | None = None,
    real_groups: int = 0,
) -> jax.Array:
    """Per-class gradient matching (DC; DSA when ``dsa_strategy`` is given), summed over classes.

    Published outer optimiser (DC, DSA): the images by SGD lr 0.1 with momentum 0.5, outer/inner
    loops (1, 1), (10, 50), (50, 10) for IPC 1 / 10 / 50 (:func:`dc_loops`); the network's
    inner steps by SGD lr 0.01.

    For class c: g_real = d CE(net(real_c), c) / d params (a constant), g_syn likewise on syn_c,
    loss_c = :func:`gradient_distance` (g_real, g_syn). Classes are vmapped, not looped, except
    for the real gradients when ``real_groups`` = g > 0 divides C: then g vmapped groups each
    loop (``lax.map``) over their C / g classes. On CPU that is the fast and small case (one
    class's real images at a time instead of all C of them: a tenth of the memory); g = the
    device count keeps a class-sharded batch sharded.

    Args:
      params: the network's "params" pytree.
      real_x: [C, n_real, H, W, Ch] float32 real images, class c in slice c.
      syn_x: [C, ipc, H, W, Ch] float32 synthetic images.
      key: PRNG key for the DSA transforms (class c uses ``split(key, C)[c]`` on both sides).
      model: a classifier from :func:`mim4dd_jax.models.get_model`.
      dsa_strategy: DSA op string (e.g. "color_crop_cutout_flip_scale_rotate") or None.
      dsa_params: DSA magnitudes.
      state: the non-param collections, e.g. {"batch_stats": ...}. Norm layers run in eval mode,
        so a BatchNorm net uses these frozen statistics, as the reference freezes them from a
        real batch before matching (see :func:`refresh_batch_stats`). The default DC network
        (instance norm) needs none.
      real_groups: static; see above (0 = all classes vmapped). The same loss either way, up to
        float rounding.

    Returns a float32 scalar, differentiable w.r.t. syn_x.
    """
    _check_class_batches(real_x, syn_x)
    state = {} if state is None else state
    num_classes = real_x.shape[0]
    keys = jax.random.split(key, num_classes)
    real_x = lax.stop_gradient(real_x)
    real_x = _siamese_per_class(keys, real_x, dsa_strategy, dsa_params)
    syn_x = _siamese_per_class(keys, syn_x, dsa_strategy, dsa_params)
    grad_fn = jax.grad(lambda p, x, label: _mean_ce(p, state, x, label, model))

    def class_grads(labels: jax.Array, xs: jax.Array) -> PyTree:  # one class per leading slot
        return jax.vmap(lambda label, x: grad_fn(params, x, label))(labels, xs)

    labels = jnp.arange(num_classes, dtype=jnp.int32)
    if real_groups <= 0 or num_classes % real_groups:
        g_real = class_grads(labels, real_x)
    else:

        def grouped(a: jax.Array) -> jax.Array:  # [C, ...] -> [g, C / g, ...]
            return a.reshape(real_groups, num_classes // real_groups, *a.shape[1:])

        def group_grads(group_labels: jax.Array, xs: jax.Array) -> PyTree:
            return lax.map(lambda lx: grad_fn(params, lx[1], lx[0]), (group_labels, xs))

        g_real = jax.vmap(group_grads)(grouped(labels), grouped(real_x))
        g_real = jax.tree.map(lambda g: g.reshape(-1, *g.shape[2:]), g_real)
    g_real = lax.stop_gradient(g_real)
    return jnp.sum(jax.vmap(gradient_distance)(g_real, class_grads(labels, syn_x)))


# The reference's (outer_loop, inner_loop) per IPC (DatasetCondensation get_loops): per sampled
# network, outer_loop image updates, with inner_loop epochs of network training on the synthetic
# set between consecutive ones.
DC_LOOPS: dict[int, tuple[int, int]] = {
    1: (1, 1),
    10: (10, 50),
    20: (20, 25),
    30: (30, 20),
    40: (40, 15),
    50: (50, 10),
}


def dc_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) of DC/DSA for ``ipc``; ConfigError for an IPC without values."""
    check_choice("DC images per class", ipc, DC_LOOPS)
    return DC_LOOPS[ipc]


def refresh_batch_stats(variables: PyTree, x: jax.Array, *, model: nn.Module) -> PyTree:
    """One training-mode forward pass on x [N, H, W, Ch] to update BatchNorm running statistics.

    Mirrors the reference DC step that runs a real batch (16 per class) through the net in train
    mode and then freezes the norms. Returns variables with the updated "batch_stats"; variables
    without batch statistics come back unchanged.
    """
    chex.assert_rank(x, 4)
    if "batch_stats" not in variables:
        return variables
    _, new_vars = apply_train(model, variables, lax.stop_gradient(x))
    return new_vars


# ----------------------------------------------------------------------------------------------
# Distribution matching (DM).
# ----------------------------------------------------------------------------------------------


class MatchedFeatures(NamedTuple):
    """The network outputs of both sides of a DM loss, flattened class-major.

    real, syn: :class:`~mim4dd_jax.models.ModelOutput` of the augmented batches, with leading axis
    C * n_real and C * ipc respectively (labels from :func:`class_labels`). ``real`` is a constant.
    """

    real: ModelOutput
    syn: ModelOutput


def _features(model: nn.Module, variables: PyTree, x: jax.Array) -> ModelOutput:
    if "batch_stats" in variables:
        # The reference's DM net is in train mode: BatchNorm normalises with the batch's own
        # statistics (here one side's whole batch, as its BN branch concatenates all classes).
        out, _ = model.apply(variables, x, train=True, features=True, mutable=["batch_stats"])
        return out
    return model.apply(variables, x, train=False, features=True)


def features_in_slices(
    model: nn.Module, variables: PyTree, x: jax.Array, chunk: int = 0
) -> ModelOutput:
    """The network's outputs on x [C, n, H, W, Ch], flattened class-major ([C * n, ...] leaves),
    computed without a gradient path in slices of m = max(1, chunk // C) images per class.

    Why: on CPU one pass over thousands of images streams every [N, H, W, 128] activation through
    main memory several times (conv, norm statistics, normalise, pool); a ``lax.map`` over slices
    of ~64 images keeps them in cache, 1.4x faster for DM's real side (BENCHMARKS.md). The slices
    are cut inside each class, so a class-sharded batch stays sharded. chunk <= 0, or a model
    with BatchNorm (train-mode statistics are over the whole batch), gives one pass. n is padded
    up to a multiple of m; the padded rows are dropped.
    """
    num_classes, n = x.shape[:2]
    m = max(1, chunk // num_classes)
    if chunk <= 0 or "batch_stats" in variables or m >= n:
        return _features(model, variables, x.reshape(-1, *x.shape[2:]))
    steps = -(-n // m)
    x = jnp.pad(x, ((0, 0), (0, steps * m - n)) + ((0, 0),) * (x.ndim - 2))
    slices = jnp.moveaxis(x.reshape(num_classes, steps, m, *x.shape[2:]), 1, 0)
    out = lax.map(
        lambda xs: _features(model, variables, xs.reshape(-1, *xs.shape[2:])),
        lax.stop_gradient(slices),
    )

    def unslice(leaf: jax.Array) -> jax.Array:  # [steps, C * m, ...] -> [C * n, ...]
        leaf = leaf.reshape(steps, num_classes, m, *leaf.shape[2:])
        leaf = jnp.moveaxis(leaf, 0, 1).reshape(num_classes, steps * m, *leaf.shape[3:])
        return leaf[:, :n].reshape(num_classes * n, *leaf.shape[2:])

    return jax.tree.map(unslice, out)


def default_real_chunk() -> int:
    """The real side's slice size when a caller leaves it out: 64 images on CPU (measured best
    of 20-320 for the DM step, BENCHMARKS.md), one pass (0) on accelerators."""
    return 64 if jax.default_backend() == "cpu" else 0


def dm_model(model: nn.Module) -> nn.Module:
    """``model`` with the "hybrid" conv when its ``conv_impl`` is "auto" and the backend is CPU:
    XLA's forward with a GEMM weight gradient measured 2.3x faster than im2col for DM's step,
    which has no loop (BENCHMARKS.md). Any other model or choice is returned unchanged."""
    if getattr(model, "conv_impl", None) == "auto" and jax.default_backend() == "cpu":
        return model.clone(conv_impl="hybrid")
    return model


def dm_loss_and_features(
    variables: PyTree,
    real_x: jax.Array,
    syn_x: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    dsa_strategy: str | None = None,
    dsa_params: DSAParams = _DEFAULT_DSA,
    real_chunk: int | None = None,
) -> tuple[jax.Array, MatchedFeatures]:
    """DM loss sum_c ||mean embed(real_c) - mean embed(syn_c)||^2, and both sides' features.

    Published outer optimiser (DM): the images by SGD lr 1.0 with momentum 0.5, 256 real images
    per class, 20k iterations, real initialisation (``state.init_images``).

    Each side is ONE forward pass over all its classes ([C * n, H, W, Ch]); class c of both
    sides is augmented with the same key (siamese DSA). embed = the model's penultimate
    ``embedding`` [N, D]. The network is meant to be a freshly sampled, frozen one.

    Args:
      variables: the network's variables ({"params": ...}).
      real_x: [C, n_real, H, W, Ch] float32; syn_x: [C, ipc, H, W, Ch] float32.
      key: PRNG key for DSA (class c uses ``split(key, C)[c]``).
      model, dsa_strategy, dsa_params: static; see :func:`dc_loss`.
      real_chunk: static; the real side in slices of ~real_chunk images
        (:func:`features_in_slices`); 0 = one pass; None (default) = the backend's fast path
        (:func:`default_real_chunk`). The results agree up to float rounding.

    A ConvNet-style ``model`` with ``conv_impl="auto"`` runs with the "hybrid" conv on CPU
    (:func:`dm_model`), the measured fast path for this loop-free step.

    Returns (loss float32 scalar, :class:`MatchedFeatures`); the loss is differentiable w.r.t.
    syn_x only.
    """
    _check_class_batches(real_x, syn_x)
    model = dm_model(model)
    real_chunk = default_real_chunk() if real_chunk is None else real_chunk
    num_classes, n_real = real_x.shape[:2]
    ipc = syn_x.shape[1]
    keys = jax.random.split(key, num_classes)
    real_x = _siamese_per_class(keys, lax.stop_gradient(real_x), dsa_strategy, dsa_params)
    real_out = features_in_slices(model, variables, real_x, real_chunk)
    real_out = jax.tree.map(lax.stop_gradient, real_out)
    syn_out = dm_syn_features(
        variables, syn_x, key, model=model, dsa_strategy=dsa_strategy, dsa_params=dsa_params
    )
    mean_real = jnp.mean(real_out.embedding.reshape(num_classes, n_real, -1), axis=1)
    mean_syn = jnp.mean(syn_out.embedding.reshape(num_classes, ipc, -1), axis=1)
    loss = jnp.sum((mean_real - mean_syn) ** 2)
    return loss, MatchedFeatures(real_out, syn_out)


def dm_syn_features(
    variables: PyTree,
    syn_x: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    dsa_strategy: str | None = None,
    dsa_params: DSAParams = _DEFAULT_DSA,
) -> ModelOutput:
    """The synthetic side of :func:`dm_loss_and_features`: syn_x [C, ipc, H, W, Ch] under the
    siamese DSA view of class c (``split(key, C)[c]``) through the network, flattened
    class-major ([C * ipc, ...] features), differentiable w.r.t. syn_x."""
    keys = jax.random.split(key, syn_x.shape[0])
    syn_x = _siamese_per_class(keys, syn_x, dsa_strategy, dsa_params)
    return _features(dm_model(model), variables, syn_x.reshape(-1, *syn_x.shape[2:]))


def dm_loss(
    variables: PyTree,
    real_x: jax.Array,
    syn_x: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    dsa_strategy: str | None = None,
    dsa_params: DSAParams = _DEFAULT_DSA,
    real_chunk: int | None = None,
) -> jax.Array:
    """The DM loss alone (float32 scalar); see :func:`dm_loss_and_features` for the shapes."""
    loss, _ = dm_loss_and_features(
        variables,
        real_x,
        syn_x,
        key,
        model=model,
        dsa_strategy=dsa_strategy,
        dsa_params=dsa_params,
        real_chunk=real_chunk,
    )
    return loss


# ----------------------------------------------------------------------------------------------
# Trajectory matching (MTT).
# ----------------------------------------------------------------------------------------------


def _check_count(what: str, value: object) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what}={value!r} is invalid; valid: an int >= 1")


def minibatch_schedule(
    key: jax.Array, n: int, *, syn_steps: int, batch_syn: int
) -> tuple[jax.Array, jax.Array]:
    """Which synthetic images each student step sees: indices [S, B] int32 and mask [S, B].

    As the reference: draw a permutation of the n images, cut it into chunks of batch_syn, use
    one chunk per step, and draw a fresh permutation (``fold_in(key, cycle)``) once all chunks are
    used. A last chunk shorter than batch_syn is padded to B = batch_syn with repeated indices and
    mask 0 (the reference's chunk is simply smaller; the masked mean is the same number).
    We walk the chunks first to last, where the reference pops them last to first; with a random
    permutation the two are the same distribution.
    """
    _check_count("syn_steps", syn_steps)
    _check_count("batch_syn", batch_syn)
    batch = min(batch_syn, n)
    per_cycle = -(-n // batch)
    cycles = -(-syn_steps // per_cycle)
    perms = jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), n))(
        jnp.arange(cycles)
    )
    pad = per_cycle * batch - n
    if pad:
        perms = jnp.concatenate([perms, perms[:, :pad]], axis=1)
    mask = jnp.tile((jnp.arange(per_cycle * batch) < n).astype(jnp.float32), cycles)
    idx = perms.reshape(cycles * per_cycle, batch)[:syn_steps].astype(jnp.int32)
    return idx, mask.reshape(cycles * per_cycle, batch)[:syn_steps]


def student_unroll(
    start_params: PyTree,
    syn_x: jax.Array,
    syn_y: jax.Array,
    lr: jax.Array | float,
    key: jax.Array,
    *,
    model: nn.Module,
    syn_steps: int,
    batch_syn: int | None = None,
    dsa_strategy: str | None = None,
    dsa_params: DSAParams = _DEFAULT_DSA,
    remat: bool = False,
    state: PyTree | None = None,
) -> PyTree:
    """The MTT student: ``syn_steps`` plain SGD steps (no momentum, no weight decay) from
    ``start_params`` on synthetic minibatches, as one ``lax.scan``; returns the final params.

    Published outer optimisers (MTT): the images by SGD at ``lr_img`` (per dataset and IPC,
    ``configs/``) with momentum 0.5; ``syn_lr`` (this function's ``lr``) is learned too, by SGD
    at ``lr_lr`` with momentum 0.5, initialised to the experts' lr.

    Step s: take minibatch s of :func:`minibatch_schedule`, apply DSA to it with per-sample
    parameters (``siamese=False``: the reference MTT calls DiffAugment without a seed, so every
    image gets its own transform; one op group is drawn per step), then
    theta <- theta - lr * grad mean CE(theta; batch). The whole unroll is differentiable w.r.t.
    syn_x, soft syn_y and lr.

    Args:
      start_params: the expert's "params" pytree at the start epoch.
      syn_x: [N, H, W, Ch] float32 synthetic images; syn_y: [N] int32 or [N, K] float32 labels.
      lr: the student lr, a positive scalar (MTT learns it as the reference does, on the lr itself).
      key: PRNG key; split into (schedule key, augment key).
      model: the classifier; forward in training mode (as the reference student).
      syn_steps: number of student steps S >= 1. batch_syn: minibatch size (None: all N).
      dsa_strategy, dsa_params: DSA per step, or None for none.
      remat: wrap the step in ``jax.checkpoint``: activations are recomputed in the backward pass
        instead of stored for all S steps; same values and gradients.
      state: non-param collections (BatchNorm statistics) carried through the steps; the loss
        uses batch statistics, as a torch student in train mode. The default ConvNet has none.
    """
    chex.assert_rank(syn_x, 4)
    chex.assert_type(syn_x, jnp.floating)
    chex.assert_equal(syn_x.shape[0], syn_y.shape[0])
    lr = jnp.asarray(lr, jnp.float32)
    chex.assert_rank(lr, 0)
    n = syn_x.shape[0]
    batch_syn = n if batch_syn is None else batch_syn
    sched_key, aug_key = jax.random.split(key)
    idx, mask = minibatch_schedule(sched_key, n, syn_steps=syn_steps, batch_syn=batch_syn)
    use_dsa = _uses_dsa(dsa_strategy)

    def loss_fn(params, st, x, y, m):
        logits, new_vars = apply_train(model, {**st, "params": params}, x)
        loss = jnp.sum(cross_entropy(logits, y) * m) / jnp.sum(m)
        return loss, {k: v for k, v in new_vars.items() if k != "params"}

    def step(carry, inputs):
        params, st = carry
        s, ix, m = inputs
        x, y = syn_x[ix], syn_y[ix]
        if use_dsa:
            x = augment(
                jax.random.fold_in(aug_key, s),
                x,
                strategy=dsa_strategy,
                params=dsa_params,
                siamese=False,
            )
        grads, st = jax.grad(loss_fn, has_aux=True)(params, st, x, y, m)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return (params, st), None

    body = jax.checkpoint(step) if remat else step
    init = (start_params, {} if state is None else state)
    (params, _), _ = lax.scan(body, init, (jnp.arange(syn_steps), idx, mask))
    return params


def _sq_dist(a: PyTree, b: PyTree) -> jax.Array:
    chex.assert_trees_all_equal_shapes(a, b)
    parts = jax.tree.map(lambda x, y: jnp.sum((x - y) ** 2), a, b)
    return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


def mtt_loss(student_final: PyTree, expert_start: PyTree, expert_target: PyTree) -> jax.Array:
    """||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2, sums over all leaves.

    All three are params pytrees of the same structure. 0 when the student lands on the target,
    1 when it stays at the start. (The reference divides both terms by the parameter count,
    which cancels.) Returns a float32 scalar.
    """
    return _sq_dist(student_final, expert_target) / _sq_dist(expert_start, expert_target)
