"""Layer 5 of ``mim4dd_jax.mi``: the MI term from embeddings and from per-layer features, and
the relative weight that scales it against a base loss.

Every function here that takes both sides takes them keyword-only (``real=``, ``syn=``,
``real_labels=``, ``syn_labels=``) and returns real before synthetic. The options come from the
heads (``mi_loss``, ``layer_mi``) or from one ``MIConfig`` (``embedding_mi``): nothing here
rebuilds them per layer.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from mim4dd_jax.errors import ConfigError
from mim4dd_jax.mi.bounds import (
    _finalize,
    _label_pair,
    _nce_offset,
    _pair_weights,
    _Stats,
    _stats_add,
    _stats_init,
    estimate,
    negative_weights,
)
from mim4dd_jax.mi.critics import Heads, _queries_keys, check_heads, embed
from mim4dd_jax.mi.options import FITTED_HEADS, MIConfig, resolve
from mim4dd_jax.mi.selection import (
    MemoryBank,
    _TopK,
    _topk_init,
    _topk_merge,
    bank_candidates,
    hard_negative_weights,
    select_topk,
)

Array = jax.Array
PyTree = Any


# ------------------------------------------------------------------------------------------------
# MI from embeddings: one-shot or streamed over chunks of real candidates
# ------------------------------------------------------------------------------------------------


def embedding_mi(
    *,
    real: Array,
    syn: Array,
    real_labels: Array,
    syn_labels: Array,
    critic_params: dict[str, Array] | None = None,
    real_valid: Array | None = None,
    config: MIConfig | None = None,
    **options: Any,
) -> Array:
    """MI estimate between real and synthetic embeddings, in nats (scalar).

    real: [Nr, D], syn: [Ns, D] float32; real_labels: [Nr] int or [Nr, K]; syn_labels: [Ns] int
    or [Ns, K]; critic_params: optional {"bias": [], "w": [D, D]} (see ``critic_scores``);
    real_valid: optional [Nr] mask, 0 drops a candidate (empty memory-bank slots).
    config / options: an MIConfig and/or its options (estimator, critic, temperature, mask,
    negatives, chunk_size, beta, k_pos, k_neg, n_data). A config is static data:
    ``jax.jit(mi.embedding_mi)(real=..., ..., config=cfg)`` works without functools.partial.
    The labels only weigh pairs: no gradient reaches them. With ``chunk_size`` the scores are
    never materialised beyond [Ns, chunk_size] (forward and backward: each chunk is recomputed
    in the backward pass); the result equals the one-shot one up to float rounding.
    """
    cfg = resolve(config, options)
    chex.assert_rank([syn, real], 2)
    chex.assert_equal_shape_suffix([syn, real], 1)
    chex.assert_equal_shape_prefix([syn, syn_labels], 1)
    chex.assert_equal_shape_prefix([real, real_labels], 1)
    critic_params = critic_params or {}
    valid = (
        jnp.ones((real.shape[0],), jnp.float32)
        if real_valid is None
        else jax.lax.stop_gradient(real_valid.astype(jnp.float32))
    )
    bias, weight = critic_params.get("bias", 0.0), critic_params.get("w")
    return _embedding_mi(syn, real, syn_labels, real_labels, bias, weight, valid, cfg)


# Jitted so that eager callers compile one program per shape instead of every primitive.
@functools.partial(jax.jit, static_argnums=(7,))
def _embedding_mi(
    z_syn: Array,
    z_real: Array,
    syn_labels: Array,
    real_labels: Array,
    bias: Array | float,
    weight: Array | None,
    valid: Array,
    cfg: MIConfig,
) -> Array:
    queries, keys = _queries_keys(z_syn, z_real, cfg.critic, weight)
    # Pair weights are constants of the objective: soft (learned) labels get no gradient through
    # them, in the one-shot and in the streamed path alike.
    a, b = jax.lax.stop_gradient(_label_pair(syn_labels, real_labels, cfg.mask))
    if cfg.chunk_size is None:
        scores = queries @ keys.T / cfg.temperature + bias
        pair = _pair_weights(a, b)
        neg = negative_weights(pair, cfg.estimator, negatives=cfg.negatives)
        s, p, q = select_topk(scores, pair * valid, neg * valid, k_pos=cfg.k_pos, k_neg=cfg.k_neg)
        q = hard_negative_weights(s, q, cfg.beta)
        return estimate(cfg.estimator, s, p, q, n_data=cfg.n_data)
    return _streamed_mi(queries, keys, a, b, valid, bias, cfg)


def _streamed_mi(
    queries: Array,
    keys: Array,
    syn_lab: Array,
    real_lab: Array,
    valid: Array,
    bias: Array | float,
    cfg: MIConfig,
) -> Array:
    rows, n = queries.shape[0], keys.shape[0]
    chunk = min(cfg.chunk_size, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n

    def chunked(x: Array) -> Array:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    xs = (chunked(keys), chunked(real_lab), chunked(valid))

    def weights(lab: Array, val: Array) -> tuple[Array, Array]:
        # Constants, as in the one-shot path (which stops them in _dense_estimate).
        pair = jax.lax.stop_gradient(_pair_weights(syn_lab, lab))
        neg = negative_weights(pair, cfg.estimator, negatives=cfg.negatives)
        return pair * val, neg * val

    def totals(carry: tuple[Array, Array], x: tuple[Array, Array, Array]):
        p, q = weights(*x[1:])
        return (carry[0] + p.sum(-1), carry[1] + q.sum(-1)), None

    zero = jnp.zeros((rows,), jnp.float32)
    (p_total, q_total), _ = jax.lax.scan(totals, (zero, zero), xs)
    # Top-k selection is only allowed with 0/1 weights, so the kept totals are known up front
    # (NCE needs N before it sees the scores).
    if cfg.k_pos is not None:
        p_total = jnp.minimum(p_total, cfg.k_pos)
    if cfg.k_neg is not None:
        q_total = jnp.minimum(q_total, cfg.k_neg)
    c = _nce_offset(q_total, cfg.n_data)
    add = dict(name=cfg.estimator, beta=cfg.beta, c=c)

    def body(carry: tuple[_Stats, _TopK, _TopK], x: tuple[Array, Array, Array]):
        st, top_pos, top_neg = carry
        key_chunk, lab, val = x
        s = queries @ key_chunk.T / cfg.temperature + bias
        p, q = weights(lab, val)
        if cfg.k_pos is not None:
            top_pos = _topk_merge(top_pos, s, p, -s)
            p = jnp.zeros_like(p)
        if cfg.k_neg is not None:
            top_neg = _topk_merge(top_neg, s, q, s)
            q = jnp.zeros_like(q)
        return (_stats_add(st, s, p, q, **add), top_pos, top_neg), None

    init = (
        _stats_init(rows),
        _topk_init(rows, cfg.k_pos or 1),
        _topk_init(rows, cfg.k_neg or 1),
    )
    # checkpoint: the backward pass recomputes each chunk instead of storing all the scores.
    (st, top_pos, top_neg), _ = jax.lax.scan(jax.checkpoint(body), init, xs)
    if cfg.k_pos is not None or cfg.k_neg is not None:
        s = jnp.concatenate([top_pos.s, top_neg.s], axis=1)
        p = jnp.concatenate([top_pos.w, jnp.zeros_like(top_neg.w)], axis=1)
        q = jnp.concatenate([jnp.zeros_like(top_pos.w), top_neg.w], axis=1)
        st = _stats_add(st, s, p, q, **add)
    return _finalize(cfg.estimator, st, p_total, q_total)


# ------------------------------------------------------------------------------------------------
# Per-layer and total MI term
# ------------------------------------------------------------------------------------------------


def layer_mi(
    heads: Heads,
    layer: int,
    *,
    real: Array,
    syn: Array,
    real_labels: Array,
    syn_labels: Array,
    bank: MemoryBank | None = None,
) -> tuple[Array, Array]:
    """MI estimate (nats, scalar) for one layer, and the real embeddings [Nr, D] (no gradient).

    heads: from ``init_heads``; layer: its index there; real: [Nr, h, w, c], syn: [Ns, h, w, c];
    labels as in ``embedding_mi`` (the real ones also fit head "lda"); bank: an optional memory
    bank whose filled slots join the real candidates (constants: no gradient). The fitted heads
    refuse a bank (ConfigError): its entries were embedded by earlier steps' fits, in another
    space. Embeddings: see ``embed``.
    """
    cfg = check_heads(heads, {})
    if bank is not None and cfg.head in FITTED_HEADS:
        raise ConfigError(
            f"MI head {cfg.head!r} is refitted every step and cannot use a memory bank; valid: "
            "bank=None, or head 'linear' / 'mlp'"
        )
    z_real, z_syn = embed(heads, layer, real=real, syn=syn, real_labels=real_labels)
    candidates, labels, valid = z_real, real_labels, None
    if bank is not None:
        bank_z, bank_labels, bank_valid = bank_candidates(bank)
        if real_labels.ndim == 2:
            bank_labels = jax.nn.one_hot(bank_labels, real_labels.shape[-1])
        candidates = jnp.concatenate([z_real, jax.lax.stop_gradient(bank_z)])
        labels = jnp.concatenate([real_labels, bank_labels.astype(real_labels.dtype)])
        valid = jnp.concatenate([jnp.ones((z_real.shape[0],), jnp.float32), bank_valid])
    params = heads.params[layer]
    critic = {k: params[k] for k in ("bias", "w") if k in params}
    mi = embedding_mi(
        real=candidates,
        syn=z_syn,
        real_labels=labels,
        syn_labels=syn_labels,
        critic_params=critic,
        real_valid=valid,
        config=cfg,
    )
    return mi, jax.lax.stop_gradient(z_real)


def mi_loss(
    heads: Heads,
    *,
    real: Sequence[Array],
    syn: Sequence[Array],
    real_labels: Array,
    syn_labels: Array,
    banks: Sequence[MemoryBank] | None = None,
    **options: Any,
) -> tuple[Array, dict[str, Any]]:
    """Total MI loss over layers: -sum_l layer_weights[l] * MI_l.

    heads: from ``init_heads`` (it carries the options; an option passed here must agree with
    them, else ConfigError naming it); real / syn: per-layer feature maps [Nr, h_l, w_l, c_l] /
    [Ns, h_l, w_l, c_l] (e.g. ``model.apply(v, x, features=True).blocks``); real_labels: [Nr]
    int or [Nr, K]; syn_labels: [Ns] int or [Ns, K]; banks: optional memory bank per layer.
    Returns (loss scalar, aux) with aux = {"mi": [L] per-layer estimates in nats,
    "real_embeddings": per-layer [Nr, D] (no gradient), for ``update_memory_bank``}. Use with
    ``jax.value_and_grad(..., has_aux=True)``: the distiller minimises the loss over the
    images, the heads minimise it over their own params (the fitted heads "none" / "lda": the
    critic offset only). ``jax.jit(mi.mi_loss)`` works as is: the options are static in heads.
    """
    cfg = check_heads(heads, options)
    n_layers = len(heads.params)
    if not (len(real) == len(syn) == n_layers):
        raise ConfigError(
            f"MI got {n_layers} heads, {len(real)} real and {len(syn)} synthetic "
            "feature maps; valid: one of each per layer"
        )
    weights = cfg.layer_weights or (1.0,) * n_layers
    if len(weights) != n_layers:
        raise ConfigError(
            f"bad MI layer_weights {weights!r}; valid: {n_layers} numbers, one per layer"
        )
    if banks is not None and len(banks) != n_layers:
        raise ConfigError(f"MI got {len(banks)} memory banks; valid: {n_layers}, one per layer")
    mis, embeddings = [], []
    for layer in range(n_layers):
        mi, z_real = layer_mi(
            heads,
            layer,
            real=real[layer],
            syn=syn[layer],
            real_labels=real_labels,
            syn_labels=syn_labels,
            bank=None if banks is None else banks[layer],
        )
        mis.append(mi)
        embeddings.append(z_real)
    mi_per_layer = jnp.stack(mis)
    loss = -jnp.sum(jnp.asarray(weights, jnp.float32) * mi_per_layer)
    return loss, {"mi": mi_per_layer, "real_embeddings": tuple(embeddings)}


# ------------------------------------------------------------------------------------------------
# Weighting against a base loss
# ------------------------------------------------------------------------------------------------


def global_norm(tree: PyTree) -> Array:
    """sqrt of the sum of squares of every leaf of ``tree`` (float32 scalar)."""
    sums = [jnp.sum(x * x) for x in jax.tree.leaves(tree)]
    if not sums:
        return jnp.float32(0.0)
    return jnp.sqrt(functools.reduce(operator.add, sums))


def relative_weight(g_base: PyTree, g_mi: PyTree, rho: float | Array) -> Array:
    """lambda such that |lambda * g_mi| = rho * |g_base| (global norms over the pytrees).

    g_base, g_mi: gradients of the base loss and of the MI loss with respect to the same things
    (e.g. the synthetic images [N, H, W, C]); rho >= 0: the wanted ratio of the two pulls. Safe
    at 0: lambda = 0 when g_mi is zero. lambda is a constant (no gradient flows through it).
    Why: the MI term's gradient is ~1e-4 of DM's per unit weight, so a weight is best stated
    as the share of the pull it gives (``mi.weight_mode="relative"`` in the runner).
    """
    norm_base, norm_mi = global_norm(g_base), global_norm(g_mi)
    safe = jnp.where(norm_mi > 0, norm_mi, 1.0)
    return jax.lax.stop_gradient(jnp.where(norm_mi > 0, rho * norm_base / safe, 0.0))
