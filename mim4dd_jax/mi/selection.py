"""Layer 4 of ``mim4dd_jax.mi``: which pairs count, and how much. Hard-negative weights
(``beta``), top-k selection (``k_pos``, ``k_neg``, one shot and the running top-k of the streamed
path) and per-class memory banks of real embeddings (extra candidates without large real
batches).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from mim4dd_jax.errors import ConfigError
from mim4dd_jax.mi.bounds import _log_weight, _ls_add, _ls_init, _ls_log
from mim4dd_jax.mi.critics import l2_normalize
from mim4dd_jax.mi.options import check_beta, check_count, is_number

Array = jax.Array
MemoryBank = dict[str, Array]


# ------------------------------------------------------------------------------------------------
# Pair selection
# ------------------------------------------------------------------------------------------------


def hard_negative_weights(scores: Array, negative: Array, beta: float | Array) -> Array:
    """Re-weights negatives towards high critic scores (Robinson et al. 2021 style).

    scores, negative: [Ns, Nr]. Returns [Ns, Nr] float32 weights
      q~_ij = q_ij * N_i * e^{beta s_ij} / sum_j q_ij e^{beta s_ij},  N_i = sum_j q_ij,
    so each anchor's total negative weight is unchanged and beta = 0 returns ``negative``. The
    weights carry no gradient. Feed them as the ``negative`` argument of an estimator.
    """
    chex.assert_equal_shape([scores, negative])
    if is_number(beta):
        check_beta(beta)
        if beta == 0:
            return negative
    negative = negative.astype(jnp.float32)
    x = _log_weight(negative) + jax.lax.stop_gradient(beta * scores)
    log_norm = _ls_log(_ls_add(_ls_init(scores.shape[0]), x))
    weights = jnp.exp(x - log_norm[:, None]) * negative.sum(-1, keepdims=True)
    return jax.lax.stop_gradient(weights)


def _topk(s: Array, w: Array, key: Array, k: int) -> tuple[Array, Array, Array]:
    """The k largest keys among candidates with w > 0: (s, w, key), each [A, k]."""
    key = jnp.where(w > 0, jax.lax.stop_gradient(key), -jnp.inf)
    top, idx = jax.lax.top_k(key, k)
    w_k = jnp.where(jnp.isfinite(top), jnp.take_along_axis(w, idx, axis=1), 0.0)
    return jnp.take_along_axis(s, idx, axis=1), w_k, top


def select_topk(
    scores: Array,
    positive: Array,
    negative: Array | None = None,
    *,
    k_pos: int | None = None,
    k_neg: int | None = None,
) -> tuple[Array, Array, Array]:
    """Keeps, per anchor, the k_pos hardest positives (lowest scores) and the k_neg hardest
    negatives (highest scores); None keeps all of that kind.

    scores, positive, negative: [Ns, Nr] (negative defaults to 1 - positive, InfoNCE's; pass
    ``negative_weights(positive, name)`` for the others). Returns compacted (scores, positive,
    negative), each [Ns, W] with W = (k_pos or Nr) + (k_neg or Nr), to pass straight to an
    estimator; unused slots have weight 0. Ties go to the lower candidate index.
    """
    for what, k in (("MI k_pos", k_pos), ("MI k_neg", k_neg)):
        if k is not None:
            check_count(what, k)
    if negative is None:
        negative = 1.0 - positive
    chex.assert_equal_shape([scores, positive, negative])
    if k_pos is None and k_neg is None:
        return scores, positive, negative
    n = scores.shape[1]
    zeros = jnp.zeros_like(scores)
    if k_pos is None:
        pos = (scores, positive, zeros)
    else:
        s_k, w_k, _ = _topk(scores, positive, -scores, min(k_pos, n))
        pos = (s_k, w_k, jnp.zeros_like(w_k))
    if k_neg is None:
        neg = (scores, zeros, negative)
    else:
        s_k, w_k, _ = _topk(scores, negative, scores, min(k_neg, n))
        neg = (s_k, jnp.zeros_like(w_k), w_k)
    s, p, q = (jnp.concatenate([a, b], axis=1) for a, b in zip(pos, neg, strict=True))
    return s, p, q


class _TopK(NamedTuple):
    s: Array  # [A, k] scores of the kept candidates
    w: Array  # [A, k] their weights (0 = empty slot)
    key: Array  # [A, k] ranking keys, -inf for empty slots


def _topk_init(rows: int, k: int) -> _TopK:
    z = jnp.zeros((rows, k), jnp.float32)
    return _TopK(z, z, jnp.full((rows, k), -jnp.inf, jnp.float32))


def _topk_merge(tk: _TopK, s: Array, w: Array, key: Array) -> _TopK:
    k = tk.s.shape[1]
    # Kept candidates come first, so ties resolve to the earlier candidate as in one shot.
    cat = [jnp.concatenate(pair, axis=1) for pair in ((tk.s, s), (tk.w, w), (tk.key, key))]
    return _TopK(*_topk(cat[0], cat[1], cat[2], k))


# ------------------------------------------------------------------------------------------------
# Memory bank
# ------------------------------------------------------------------------------------------------


def init_memory_bank(num_classes: int, slots: int, dim: int) -> MemoryBank:
    """An empty per-class bank: {"emb": [K, S, D], "ptr": [K] int32 next slot, "filled": [K]}."""
    check_count("memory bank num_classes", num_classes)
    check_count("memory bank slots", slots)
    check_count("memory bank dim", dim)
    return {
        "emb": jnp.zeros((num_classes, slots, dim), jnp.float32),
        "ptr": jnp.zeros((num_classes,), jnp.int32),
        "filled": jnp.zeros((num_classes,), jnp.int32),
    }


def update_memory_bank(
    bank: MemoryBank, z_real: Array, labels: Array, *, momentum: float | Array = 0.5
) -> MemoryBank:
    """Writes a batch of real embeddings into the bank and returns the new bank (pure).

    z_real: [N, D]; labels: [N] int or [N, K] (argmax). Class c's samples go, in batch order, to
    its next slots (a ring of S slots; only the batch's last S samples of a class are kept). A slot
    written before becomes l2_normalize(momentum * old + (1 - momentum) * z); an empty slot becomes
    l2_normalize(z). momentum in [0, 1): 0 is a plain FIFO queue. No gradient flows into the bank.
    """
    if is_number(momentum) and not 0 <= momentum < 1:
        raise ConfigError(f"bad memory bank momentum {momentum!r}; valid: a number in [0, 1)")
    return _update_memory_bank(bank, z_real, labels, momentum)


@jax.jit
def _update_memory_bank(
    bank: MemoryBank, z_real: Array, labels: Array, momentum: float | Array
) -> MemoryBank:
    emb = bank["emb"]
    num_classes, slots, dim = emb.shape
    chex.assert_shape(z_real, (None, dim))
    ids = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
    chex.assert_equal_shape_prefix([z_real, ids], 1)
    onehot = jax.nn.one_hot(ids, num_classes, dtype=jnp.int32)
    count = onehot.sum(0)  # [K]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, 0) - 1, ids[:, None], axis=1)[:, 0]
    skipped = jnp.maximum(count - slots, 0)[ids]
    keep = rank >= skipped
    slot = (bank["ptr"][ids] + rank - skipped) % slots
    z = jax.lax.stop_gradient(z_real.astype(jnp.float32))
    was_filled = slot < bank["filled"][ids]
    new = jnp.where(
        was_filled[:, None],
        l2_normalize(momentum * emb[ids, slot] + (1.0 - momentum) * z),
        l2_normalize(z),
    )
    row = jnp.where(keep, ids, num_classes)  # out of range -> dropped, so writes never collide
    return {
        "emb": emb.at[row, slot].set(new, mode="drop"),
        "ptr": (bank["ptr"] + jnp.minimum(count, slots)) % slots,
        "filled": jnp.minimum(bank["filled"] + count, slots),
    }


def bank_candidates(bank: MemoryBank) -> tuple[Array, Array, Array]:
    """Bank entries as extra real candidates: (emb [K*S, D], labels [K*S] int32, valid [K*S])."""
    num_classes, slots, dim = bank["emb"].shape
    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), slots)
    valid = (jnp.arange(slots)[None, :] < bank["filled"][:, None]).reshape(-1)
    return bank["emb"].reshape(-1, dim), labels, valid.astype(jnp.float32)
