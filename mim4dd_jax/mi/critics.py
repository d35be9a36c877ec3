"""Layer 3 of ``mim4dd_jax.mi``: the critics, i.e. per-layer embeddings and score functions.

- **Trained heads** ("linear", "mlp"): a ``ProjectionHead`` per layer (per side with
  ``heads="per_side"``), trained to maximise the bound: the "max over critics" of the
  variational bound. Heads adam lr 1e-3 is the default the runner uses (``mi.optimizer``,
  ``mi.lr``), as in contrastive representation distillation.
- **Fitted heads** ("none", "lda"): refitted on the current features every step (nothing to
  train but the critic's scalar offset), for base methods whose network changes every step
  (DM draws a fresh one).

``init_heads`` returns a ``Heads`` pytree: the trainable params (its leaves) and the
``MIConfig`` they were built for (static), so the loss needs no repeated options.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mim4dd_jax.errors import ConfigError, check_choice
from mim4dd_jax.mi.options import (
    CRITICS,
    FITTED_HEADS,
    REDUCTIONS,
    MIConfig,
    check_positive,
    resolve,
)

Array = jax.Array
HeadParams = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / ||x|| along the last axis; finite (value and gradient) at x = 0. x: [..., D]."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def critic_scores(
    *,
    real: Array,
    syn: Array,
    critic: str = "cosine",
    temperature: float = 0.07,
    weight: Array | None = None,
    bias: Array | float = 0.0,
) -> Array:
    """Critic score matrix between two embedding sets (keyword-only sides).

    real: [Nr, D], syn: [Ns, D] float32. Returns scores [Ns, Nr] float32 (rows: synthetic
    anchors; dimensionless,
    the critic's log-density-ratio guess up to a constant):
      cosine:   <z_syn_i/|z_syn_i|, z_real_j/|z_real_j|> / temperature + bias
      bilinear: z_syn_i^T W z_real_j / temperature + bias, W = ``weight`` [D, D] (identity if None).
    """
    check_choice("MI critic", critic, CRITICS)
    check_positive("MI temperature", temperature)
    chex.assert_rank([syn, real], 2)
    chex.assert_equal_shape_suffix([syn, real], 1)
    queries, keys = _queries_keys(syn, real, critic, weight)
    return queries @ keys.T / temperature + bias


def _queries_keys(
    z_syn: Array, z_real: Array, critic: str, weight: Array | None
) -> tuple[Array, Array]:
    """Rewrites either critic as queries @ keys.T, so chunks of keys can be scored alone."""
    if critic == "cosine":
        return l2_normalize(z_syn), l2_normalize(z_real)
    if weight is not None:
        chex.assert_shape(weight, (z_syn.shape[-1], z_real.shape[-1]))
        z_syn = z_syn @ weight
    return z_syn, z_real


# ------------------------------------------------------------------------------------------------
# Projection heads and per-layer reduction
# ------------------------------------------------------------------------------------------------


def reduce_features(feats: Array, mode: str = "gap") -> Array:
    """One layer's features -> vectors. feats: [N, h, w, c] (any rank >= 2).

    flatten: [N, h*w*c]; gap: global average over the spatial axes, [N, c]. Rank-2 input is
    returned unchanged.
    """
    check_choice("MI feature reduction", mode, REDUCTIONS)
    chex.assert_rank(feats, {2, 3, 4, 5})
    if feats.ndim == 2:
        return feats
    if mode == "flatten":
        return feats.reshape(feats.shape[0], -1)
    return jnp.mean(feats, axis=tuple(range(1, feats.ndim - 1)))


class ProjectionHead(nn.Module):
    """Embeds one layer's features for the critic: reduce -> linear | 2-layer MLP -> l2-normalise.

    Input [N, h, w, c] (or [N, F]); output [N, dim] float32 unit vectors.
    """

    kind: str = "linear"
    reduce: str = "gap"
    dim: int = 128
    hidden: int = 512

    @nn.compact
    def __call__(self, feats: Array) -> Array:
        x = reduce_features(feats.astype(jnp.float32), self.reduce)
        if self.kind == "mlp":
            x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        return l2_normalize(nn.Dense(self.dim, name="out")(x))


# ------------------------------------------------------------------------------------------------
# Fitted heads: refitted on the current features every step, nothing to train
# ------------------------------------------------------------------------------------------------

# A feature's variance is floored at this fraction of the mean variance over features, so that a
# feature constant on the real batch (a dead ReLU channel) does not blow up synthetic deviations.
_VAR_FLOOR = 1e-4
# Shrinkage of the within-class covariance towards (trace / D) I (the Ledoit-Wolf target), fixed:
# it keeps the scatter invertible when D > samples and damps directions seen in few samples.
LDA_SHRINKAGE = 0.1
# Gram eigenvalues below this fraction of the largest are rank deficiency (float32 round-off).
_RANK_RTOL = 1e-6


def standardize(*, real: Array, syn: Array) -> tuple[Array, Array]:
    """Standardises both sets per feature with the REAL set's mean and std.

    real: [Nr, D], syn: [Ns, D]. Returns (real [Nr, D], syn [Ns, D]) float32. The real batch is the
    reference distribution (large; the synthetic set is small and is what moves), and removing
    its mean cancels the component that every image shares. The statistics are constants: no
    gradient flows through them, only through x_real and x_syn themselves.
    """
    chex.assert_rank([real, syn], 2)
    chex.assert_equal_shape_suffix([real, syn], 1)
    ref = jax.lax.stop_gradient(real.astype(jnp.float32))
    mean, var = ref.mean(0), ref.var(0)
    inv_std = jax.lax.rsqrt(var + _VAR_FLOOR * jnp.mean(var) + 1e-12)
    real, syn = real.astype(jnp.float32), syn.astype(jnp.float32)
    return (real - mean) * inv_std, (syn - mean) * inv_std


def lda_projection(x: Array, labels: Array, *, shrinkage: float = LDA_SHRINKAGE) -> Array:
    """Fisher LDA fitted on one labelled set: a projection [D, r], r = min(D, N), no gradient.

    x: [N, D] (standardised) features; labels: [N] int or [N, K] (argmax). With S_w the
    within-class covariance shrunk by ``shrinkage`` towards (tr S_w / D) I and S_b the
    between-class covariance, the columns are the generalised eigenvectors of (S_b, S_w)
    (S_w-whitened discriminant directions), each scaled by lambda / (1 + lambda), its share of
    between-class variance. At most K - 1 lambdas are nonzero, so the other directions drop out
    without K being known statically. When D > N everything lies in the span of the N centred
    samples, so the fit runs in that span (an N x N Gram matrix): O(N^2 D + N^3), never D^3.
    """
    chex.assert_rank(x, 2)
    chex.assert_rank(labels, {1, 2})
    chex.assert_equal_shape_prefix([x, labels], 1)
    check_positive("LDA shrinkage", shrinkage)
    return _lda_projection(
        jax.lax.stop_gradient(x.astype(jnp.float32)),
        jax.lax.stop_gradient(labels),
        shrinkage,
        x.shape[1] > x.shape[0],
    )


def _lda_projection(x: Array, labels: Array, shrinkage: float, dual: bool) -> Array:
    n, d = x.shape
    ids = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
    same = (ids[:, None] == ids[None, :]).astype(jnp.float32)  # [N, N]; no static K needed
    xc = x - x.mean(0)
    if dual:
        # Orthonormal basis of the samples' span from the Gram matrix: basis = xc^T u / sigma.
        sig2, u = jnp.linalg.eigh(xc @ xc.T)
        keep = sig2 > _RANK_RTOL * sig2[-1]
        sig = jnp.sqrt(jnp.where(keep, sig2, 0.0))
        basis = xc.T @ (u * jnp.where(keep, 1.0 / jnp.where(keep, sig, 1.0), 0.0))  # [D, N]
        coords = u * sig  # = xc @ basis, [N, N]
    else:
        basis, coords = None, xc
    means = (same @ coords) / same.sum(1, keepdims=True)  # each sample's class mean
    within = coords - means
    s_w = within.T @ within / n
    s_b = means.T @ means / n  # coords are centred, so the class means are too (weighted)
    # The target uses the full D: outside the span S_w is 0 and S_b is 0, so those directions get
    # lambda = 0 and the span-only fit equals the full one.
    target = jnp.trace(s_w) / d
    s_w = (1.0 - shrinkage) * s_w + shrinkage * target * jnp.eye(s_w.shape[0])
    evals, evecs = jnp.linalg.eigh(s_w)
    whiten = evecs * jax.lax.rsqrt(jnp.maximum(evals, 1e-12 * evals[-1] + 1e-30))
    lam, rot = jnp.linalg.eigh(whiten.T @ s_b @ whiten)
    lam = jnp.maximum(lam, 0.0)
    mix = whiten @ (rot * (lam / (1.0 + lam)))
    return mix if basis is None else basis @ mix


def _fitted_embeddings(
    cfg: MIConfig, real_feat: Array, syn_feat: Array, real_labels: Array
) -> tuple[Array, Array]:
    """Embeddings of heads "none" / "lda": ([Nr, D'], [Ns, D']) unit vectors."""
    x_real, x_syn = standardize(
        real=reduce_features(real_feat.astype(jnp.float32), cfg.reduce),
        syn=reduce_features(syn_feat.astype(jnp.float32), cfg.reduce),
    )
    if cfg.head == "lda":
        proj = lda_projection(x_real, real_labels)
        x_real, x_syn = x_real @ proj, x_syn @ proj
    return l2_normalize(x_real), l2_normalize(x_syn)


# ------------------------------------------------------------------------------------------------
# Heads that carry their options
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Heads:
    """The MI critics of every layer: ``params`` (the pytree leaves: what the heads' optimiser
    trains) and the static ``config`` they were built for.

    params: per layer {"proj": ProjectionHead variables, "proj_syn": the synthetic side's head
    (``heads="per_side"`` only), "bias": [] critic offset, "w": [D, D] (bilinear only)}; the
    fitted heads ("none", "lda") hold {"bias": []} only. Gradients and optax states of a Heads
    are Heads again; wrap bare params (e.g. a checkpoint's) as ``Heads(params, config)``.
    """

    params: tuple[HeadParams, ...]
    config: MIConfig = flax.struct.field(pytree_node=False)

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, layer: int) -> HeadParams:
        return self.params[layer]


def check_heads(heads: Any, options: dict[str, Any]) -> MIConfig:
    """The heads' MIConfig; ConfigError for something that is not a Heads, or for an option in
    ``options`` that conflicts with the heads' own."""
    if not isinstance(heads, Heads):
        raise ConfigError(
            f"MI heads must be the mi.Heads that mi.init_heads returns, got {type(heads).__name__}; "
            "valid: mi.init_heads(key, shapes, ...) or mi.Heads(params, config)"
        )
    return resolve(heads.config, options, owner="the heads")


def _head(cfg: MIConfig) -> ProjectionHead:
    return ProjectionHead(
        kind=cfg.head, reduce=cfg.reduce, dim=cfg.embed_dim, hidden=cfg.hidden_dim
    )


def _head_inputs(feat_shape: Sequence[int], reduce: str) -> int:
    """The width a head sees for per-example features of shape (h, w, c) or (F,)."""
    if len(feat_shape) == 1 or reduce == "gap":
        return int(feat_shape[-1])
    return math.prod(feat_shape)


def _check_layer_input(heads: Heads, layer: int, feats: Array, side: str) -> None:
    """ConfigError when one layer's features do not fit the trained head built for it."""
    cfg = heads.config
    if cfg.head in FITTED_HEADS:
        return
    key = "proj_syn" if side == "synthetic" and cfg.heads == "per_side" else "proj"
    first = "hidden" if cfg.head == "mlp" else "out"
    want = heads.params[layer][key]["params"][first]["kernel"].shape[0]
    got = _head_inputs(feats.shape[1:], cfg.reduce)
    if got != want:
        raise ConfigError(
            f"MI layer {layer}: {side} features of shape {tuple(feats.shape)} give {got} inputs "
            f"under reduce={cfg.reduce!r}, but its head was built for {want}; valid: features "
            "of the shapes given to mi.init_heads"
        )


def embed(
    heads: Heads,
    layer: int,
    *,
    real: Array,
    syn: Array,
    real_labels: Array | None = None,
) -> tuple[Array, Array]:
    """One layer's real and synthetic features -> critic embeddings (z_real, z_syn).

    real: [Nr, h, w, c], syn: [Ns, h, w, c] (or [N, F]); real_labels: [Nr] int or [Nr, K]
    (needed by "lda" only). Returns ([Nr, D'], [Ns, D']) float32 unit vectors, D' = embed_dim
    for the trained heads, the reduced width for "none", min(width, Nr) for "lda".

    - "linear" / "mlp": the trained ``ProjectionHead`` in ``params[layer]["proj"]`` (with
      ``heads="per_side"`` the synthetic side uses ``params[layer]["proj_syn"]``).
    - "none": reduce, standardise with the real batch's statistics, l2-normalise; the cosine
      critic then compares deviations from the real mean, not the component all images share.
    - "lda": as "none", then project onto the real batch's Fisher discriminant directions
      (``lda_projection``). Among linear critics it is the one that best separates the classes
      of the current network, and it is refitted each step, so it never chases a moving network.
    """
    cfg = check_heads(heads, {})
    if cfg.head in FITTED_HEADS:
        if cfg.head == "lda" and real_labels is None:
            raise ConfigError(
                "MI head 'lda' is fitted on labelled real features; pass real_labels="
            )
        return _fitted_embeddings(cfg, real, syn, real_labels)
    _check_layer_input(heads, layer, real, "real")
    _check_layer_input(heads, layer, syn, "synthetic")
    head, params = _head(cfg), heads.params[layer]
    syn_proj = params["proj_syn" if cfg.heads == "per_side" else "proj"]
    return head.apply(params["proj"], real), head.apply(syn_proj, syn)


@functools.partial(jax.jit, static_argnums=(0,))
def _init_head(head: ProjectionHead, key: Array, dummy: Array) -> dict[str, Any]:
    return head.init(key, dummy)


def example_shape(layer: int, shape: Any) -> tuple[int, ...]:
    """One layer's per-example feature shape, (h, w, c) or (F,), from what ``init_heads`` takes:
    an array or jax.ShapeDtypeStruct [N, ...] (N dropped), a tuple (h, w, c) or (F,) as
    ``models.block_shapes`` gives, or a tuple with the batch axis (N, h, w, c) / (N, F)."""
    batched = hasattr(shape, "shape")
    dims = tuple(getattr(shape, "shape", shape))
    if batched or len(dims) in (2, 4):
        dims = dims[1:]
    if len(dims) not in (1, 3) or not all(isinstance(d, int) and d >= 1 for d in dims):
        raise ConfigError(
            f"bad MI feature shape {tuple(getattr(shape, 'shape', shape))!r} for layer {layer}; "
            "valid: (h, w, c) or (F,) per example (models.block_shapes), or (N, h, w, c) / "
            "(N, F) with the batch axis, or an array of features"
        )
    return dims


def init_heads(
    key: Array,
    feature_shapes: Sequence[Sequence[int] | Array],
    *,
    config: MIConfig | None = None,
    **options: Any,
) -> Heads:
    """One critic per layer, built from the layers' feature shapes; returns a :class:`Heads`.

    key: PRNG key (layer l uses ``fold_in(key, l)``); feature_shapes: per layer what
    :func:`example_shape` accepts, e.g. ``models.block_shapes(model, image_shape)`` directly;
    config / options: the MIConfig (head, heads, reduce, embed_dim, hidden_dim, critic,
    estimator, ...), stored in the result, so ``mi_loss(heads, ...)`` needs no options again.
    A trained head's input width is fixed here (h*w*c under reduce="flatten", c under "gap"),
    and the loss names the layer when features of another shape arrive. The trained heads get
    {"proj", ("proj_syn",) "bias": [], ("w": [D, D], bilinear, initialised to the identity)},
    all trained to maximise the bound (the runner: Adam lr 1e-3); the fitted heads ("none",
    "lda") get {"bias": []} only: their embedding is refitted every step.
    """
    cfg = resolve(config, options)
    shapes = [example_shape(layer, s) for layer, s in enumerate(feature_shapes)]
    # nwj / js exponentiate the critic, and with marginal negatives the (high-scoring) positives
    # are among the negatives: an offset of -1/temperature starts every cosine score at <= 0, so
    # e^f starts <= 1 instead of e^(1/tau); the offset is learned from there.
    offset = -1.0 / cfg.temperature if cfg.estimator in ("nwj", "js") else 0.0

    def bias() -> Array:  # a fresh buffer per layer: the step donates every leaf separately
        return jnp.full((), offset, jnp.float32)

    if cfg.head in FITTED_HEADS:
        return Heads(tuple({"bias": bias()} for _ in shapes), cfg)
    head = _head(cfg)
    params = []
    for layer, shape in enumerate(shapes):
        dummy = jnp.zeros((1,) + shape, jnp.float32)
        layer_params: HeadParams = {
            "proj": _init_head(head, jax.random.fold_in(key, layer), dummy),
            "bias": bias(),
        }
        if cfg.heads == "per_side":
            # The synthetic side's head starts as a copy of the real side's (its own buffers),
            # then trains apart. Two networks of one lineage (MTT's expert and the student
            # started from it) share a feature basis, and equal heads keep it: the bound starts
            # where a shared head's does. Independently drawn heads start it at ~0, and at
            # Adam lr 1e-3 two heads never align (MTT IPC 1, gap: <= 0.3 nats in 1000 updates
            # vs 2.3 for a shared head; benchmarks/probe_mi_heads.py, BENCHMARKS.md).
            layer_params["proj_syn"] = jax.tree.map(jnp.copy, layer_params["proj"])
        if cfg.critic == "bilinear":
            layer_params["w"] = jnp.eye(cfg.embed_dim, dtype=jnp.float32)
        params.append(layer_params)
    return Heads(tuple(params), cfg)
