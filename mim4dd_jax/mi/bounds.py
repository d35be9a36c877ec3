"""Layer 2 of ``mim4dd_jax.mi``: the MI estimators on score matrices, and the pair weights.

Conventions used throughout the package:

- **Anchors are synthetic samples (rows), candidates are real samples (columns).** A score matrix
  ``scores`` is [Ns, Nr] float32: ``scores[i, j]`` is the critic value of (syn i, real j).
- **Pair weights.** ``positive[i, j]`` in [0, 1] is how much pair (i, j) counts as a positive
  (a draw from the joint: same label) and ``negative[i, j] >= 0`` how much it counts as a negative
  (a draw from the product of marginals). A pair with both weights 0 is not a candidate at all.
- **Units.** Every estimator returns the mean, over anchors that have at least one positive (and,
  where the bound needs them, one negative), of a per-anchor estimate of the mutual information in
  **nats**. The loss to minimise is its negative. Anchors without a usable pair are skipped.
- Everything is a pure function of arrays. String/number options are static: the estimators are
  jitted with ``static_argnames``, so call them with Python values (inside your own ``jax.jit``
  too); no ``functools.partial`` is needed.

**Which numbers are MI lower bounds.** The MI is that of a pair (syn, real) drawn with equal
labels (the joint) against independent draws (the product of marginals); it is at most
H(label) <= log K for K classes.

- ``infonce``: a lower bound as is. Its denominator holds every candidate (negative = 1 -
  positive, so positive + negative = 1 per candidate), and for any scores an anchor with N
  candidates and P positives gets at most log(N / P).
- ``nce``, ``nwj``, ``js``: lower bounds **only with negatives drawn from the product of
  marginals**, i.e. every candidate, same class included, carries negative weight 1
  (``negatives="marginal"``, the default; ``negative_weights``). With beta = 0 and no top-k they
  then also stay below log(N / P) per anchor for any scores. With ``negatives="other_class"``
  (only different-label candidates) they estimate a divergence between same-label and
  different-label pairs instead: not an MI bound, and unbounded as the classes separate (it is
  kept because ``mi.negatives`` offers it on the CLI, for comparison with earlier runs).
- Hard negatives (``beta``, ``k_neg``) reshape the negatives: at fixed scores beta only lowers an
  estimate and the top-k negatives give no more than a random subset of the same size.

Names with a leading underscore are the package's building blocks (the streamed path in ``loss``
and the hard-negative weights in ``selection`` reuse the log-sum-exp accumulators), not API.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from mim4dd_jax.errors import check_choice
from mim4dd_jax.mi.options import ESTIMATORS, MASKS, NEGATIVES, check_positive

Array = jax.Array

# nwj/js exponentiate the critic. Above this value it is capped smoothly (f = cap - softplus(cap -
# s)); that only changes the critic, and both bounds hold for every critic, so they stay bounds
# while exp(f) stays finite in float32 even for scores of 1e4.
SCORE_CAP = 50.0
# Stands for log(0) where -inf would poison gradients (logaddexp, differences of two log-sums).
_NEG = -1e30


# ------------------------------------------------------------------------------------------------
# Pair weights
# ------------------------------------------------------------------------------------------------


def _label_pair(syn_labels: Array, real_labels: Array, mode: str) -> tuple[Array, Array]:
    """Both label sets as int ids [N] (hard) or both as probability rows [N, K] (soft)."""
    chex.assert_rank(syn_labels, {1, 2})
    chex.assert_rank(real_labels, {1, 2})
    if mode == "hard":
        ids = [y if y.ndim == 1 else jnp.argmax(y, axis=-1) for y in (syn_labels, real_labels)]
        return ids[0], ids[1]
    if syn_labels.ndim == 1 and real_labels.ndim == 1:
        return syn_labels, real_labels
    num_classes = (syn_labels if syn_labels.ndim == 2 else real_labels).shape[-1]
    probs = [
        y.astype(jnp.float32) if y.ndim == 2 else jax.nn.one_hot(y, num_classes)
        for y in (syn_labels, real_labels)
    ]
    return probs[0], probs[1]


def _pair_weights(a: Array, b: Array) -> Array:
    """Positive weight of every pair, [Na, Nb] float32, from labels prepared by _label_pair."""
    if a.ndim == 1:
        return (a[:, None] == b[None, :]).astype(jnp.float32)
    return jnp.clip(a @ b.T, 0.0, 1.0)


def positive_mask(*, real_labels: Array, syn_labels: Array, mode: str = "hard") -> Array:
    """Positive-pair weights from two label sets (keyword-only: a swap would transpose them).

    real_labels: [Nr] int or [Nr, K] float (soft labels, rows of probabilities); syn_labels
    likewise with Ns rows. Returns [Ns, Nr] float32 in [0, 1] (rows: synthetic anchors):
      hard: 1 where the (argmax) labels agree, else 0;
      soft: p_syn_i . p_real_j, the probability that the two labels agree when drawn independently
            (equals ``hard`` for one-hot labels).
    The matching negative weights are ``negative_weights(positive_mask(...), estimator)``.
    """
    check_choice("MI positive mask", mode, MASKS)
    a, b = _label_pair(syn_labels, real_labels, mode)
    return _pair_weights(a, b)


def negative_weights(positive: Array, estimator: str, *, negatives: str = "marginal") -> Array:
    """The negative weights an estimator uses by default. positive: [Ns, Nr]; returns [Ns, Nr].

    infonce: 1 - positive, so that its denominator holds every candidate exactly once.
    nce / nwj / js: "marginal" -> 1 for every candidate, same label included (draws from the
    product of marginals: an MI lower bound); "other_class" -> 1 - positive (a divergence between
    same- and different-label pairs, not an MI bound).
    """
    check_choice("MI estimator", estimator, ESTIMATORS)
    check_choice("MI negatives", negatives, NEGATIVES)
    positive = positive.astype(jnp.float32)
    if estimator == "infonce" or negatives == "other_class":
        return 1.0 - positive
    return jnp.ones_like(positive)


# ------------------------------------------------------------------------------------------------
# Streaming log-sum-exp accumulators (shared by the one-shot and the chunked paths)
# ------------------------------------------------------------------------------------------------


class _LogSum(NamedTuple):
    """Running sum of exp(x) (and of exp(x) * v) per anchor, kept relative to the running max."""

    m: Array  # [A] running max of x; no gradient (it cancels out)
    a: Array  # [A] sum exp(x - m)
    b: Array  # [A] sum exp(x - m) * v


def _ls_init(rows: int) -> _LogSum:
    z = jnp.zeros((rows,), jnp.float32)
    return _LogSum(jnp.full((rows,), -jnp.inf, jnp.float32), z, z)


def _ls_add(acc: _LogSum, x: Array, v: Array | None = None) -> _LogSum:
    """Adds columns x [A, C] (log-weights, -inf = absent) with optional values v [A, C]."""
    m = jnp.maximum(acc.m, jax.lax.stop_gradient(jnp.max(x, axis=-1)))
    ref = jnp.where(jnp.isfinite(m), m, 0.0)
    rescale = jnp.exp(acc.m - ref)
    e = jnp.exp(x - ref[:, None])
    a = acc.a * rescale + jnp.sum(e, axis=-1)
    b = acc.b if v is None else acc.b * rescale + jnp.sum(e * v, axis=-1)
    return _LogSum(m, a, b)


def _ls_log(acc: _LogSum) -> Array:
    """log sum exp(x) [A]; _NEG for an empty sum."""
    ok = acc.a > 0
    ref = jnp.where(jnp.isfinite(acc.m), acc.m, 0.0)
    return jnp.where(ok, ref + jnp.log(jnp.where(ok, acc.a, 1.0)), _NEG)


def _ls_mean(acc: _LogSum) -> Array:
    """sum exp(x) v / sum exp(x) [A]; 0 for an empty sum."""
    ok = acc.a > 0
    return jnp.where(ok, acc.b / jnp.where(ok, acc.a, 1.0), 0.0)


def _log_weight(w: Array) -> Array:
    """log w with log 0 = -inf, and no NaN gradient at w = 0."""
    pos = w > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, w, 1.0)), -jnp.inf)


# ------------------------------------------------------------------------------------------------
# Estimators
# ------------------------------------------------------------------------------------------------


def _soft_cap(s: Array) -> Array:
    """Identity below SCORE_CAP - 20, smoothly saturating at SCORE_CAP above."""
    return jnp.where(s < SCORE_CAP - 20.0, s, SCORE_CAP - jax.nn.softplus(SCORE_CAP - s))


def _pos_term(name: str, s: Array, c: Array) -> Array:
    """Per-pair quantity averaged over positives. c: [A, 1] NCE offset log(N/M)."""
    if name == "infonce":
        return s
    if name == "nce":
        return jax.nn.log_sigmoid(s - c)  # log h
    if name == "nwj":
        return _soft_cap(s)
    # js: the value is NWJ's at critic f + 1, the gradient the Jensen-Shannon (f-GAN) one.
    grad = -jax.nn.softplus(-s)
    return grad + jax.lax.stop_gradient(_soft_cap(s) + 1.0 - grad)


def _neg_mean_term(name: str, s: Array, c: Array) -> Array:
    """Per-pair quantity averaged over (weighted) negatives by nce and js."""
    if name == "nce":
        return jax.nn.log_sigmoid(c - s)  # log(1 - h)
    grad = jax.nn.softplus(s)
    return grad + jax.lax.stop_gradient(jnp.exp(_soft_cap(s)) - grad)


class _Stats(NamedTuple):
    pos_sum: Array  # [A] sum_j p_ij g+(s_ij)
    pos_lse: _LogSum  # infonce: log sum_j p_ij e^s_ij
    neg: _LogSum  # weights q e^t (t = stop_grad(beta s)); values g-(s) for nce/js
    neg_tilt: _LogSum  # infonce/nwj: weights q e^t e^u(s)


def _stats_init(rows: int) -> _Stats:
    return _Stats(jnp.zeros((rows,), jnp.float32), _ls_init(rows), _ls_init(rows), _ls_init(rows))


def _stats_add(
    st: _Stats, s: Array, p: Array, q: Array, *, name: str, beta: float, c: Array
) -> _Stats:
    """Accumulates candidates s, p, q [A, C]. beta tilts the negatives (hard-negative weighting)."""
    pos_sum = st.pos_sum + jnp.sum(p * _pos_term(name, s, c), axis=-1)
    pos_lse = _ls_add(st.pos_lse, _log_weight(p) + s) if name == "infonce" else st.pos_lse
    log_q = _log_weight(q)
    if beta:
        # The importance weights are constants of the objective, not paths for the gradient.
        log_q = log_q + jax.lax.stop_gradient(beta * s)
    if name in ("nce", "js"):
        return _Stats(pos_sum, pos_lse, _ls_add(st.neg, log_q, _neg_mean_term(name, s, c)), st.neg)
    tilt = s if name == "infonce" else _soft_cap(s) - 1.0
    return _Stats(pos_sum, pos_lse, _ls_add(st.neg, log_q), _ls_add(st.neg_tilt, log_q + tilt))


def _nce_offset(q_total: Array, n_data: float | None) -> Array:
    """log(N/M) per anchor [A, 1], N = negative weight of the anchor."""
    n = jnp.where(q_total > 0, q_total, 1.0)
    return (jnp.log(n) - math.log(n_data or 1.0))[:, None]


def _finalize(name: str, st: _Stats, p_total: Array, q_total: Array) -> Array:
    """Mean over usable anchors of the per-anchor estimate, in nats (scalar)."""
    has_p, has_q = p_total > 0, q_total > 0
    p_safe = jnp.where(has_p, p_total, 1.0)
    q_safe = jnp.where(has_q, q_total, 1.0)
    pos_mean = st.pos_sum / p_safe
    if name == "infonce":
        neg = jnp.where(has_q, jnp.log(q_safe) + _ls_log(st.neg_tilt) - _ls_log(st.neg), _NEG)
        log_denominator = jnp.logaddexp(_ls_log(st.pos_lse), neg)
        per_anchor = pos_mean - log_denominator + jnp.log(p_safe + q_total)
        valid = has_p
    else:
        valid = has_p & has_q
        if name == "nce":
            per_anchor = jnp.log(q_safe) + pos_mean + q_total * _ls_mean(st.neg)
        elif name == "nwj":
            per_anchor = pos_mean - jnp.exp(_ls_log(st.neg_tilt) - _ls_log(st.neg))
        else:
            per_anchor = pos_mean - _ls_mean(st.neg)
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, per_anchor, 0.0)) / jnp.maximum(count, 1)


# Jitted (options static) so that eager callers compile one program per shape instead of every
# primitive, and jax.jit(...) of a caller needs no functools.partial.
@functools.partial(jax.jit, static_argnames=("name", "n_data"))
def _dense_estimate(
    name: str, scores: Array, positive: Array, negative: Array | None, n_data: float | None
) -> Array:
    chex.assert_rank(scores, 2)
    if negative is None:
        negative = negative_weights(positive, name)
    chex.assert_equal_shape([scores, positive, negative])
    scores = scores.astype(jnp.float32)
    positive = jax.lax.stop_gradient(positive.astype(jnp.float32))
    negative = jax.lax.stop_gradient(negative.astype(jnp.float32))
    p_total, q_total = positive.sum(-1), negative.sum(-1)
    c = _nce_offset(q_total, n_data)
    st = _stats_add(
        _stats_init(scores.shape[0]), scores, positive, negative, name=name, beta=0.0, c=c
    )
    return _finalize(name, st, p_total, q_total)


def infonce(scores: Array, positive: Array, negative: Array | None = None) -> Array:
    """Multi-positive (supervised) InfoNCE estimate of the MI, in nats.

    scores: [Ns, Nr] critic values; positive: [Ns, Nr] weights in [0, 1]; negative: [Ns, Nr]
    weights >= 0 (default 1 - positive). Per anchor i with candidate weights w = p + q:
      I_i = log(sum_j w_ij) + sum_j p_ij s_ij / sum_j p_ij - log sum_j w_ij e^{s_ij}.
    Every positive is among the candidates, so with 0/1 weights I_i <= log N_i (N_i = number of
    candidates of anchor i) for any scores. Returns a scalar (mean over anchors with a positive).
    The loss is -infonce; the log N constant does not affect gradients. With more than one
    positive the bound is log(N_i / P_i), P_i = sum_j p_ij.
    """
    return _dense_estimate("infonce", scores, positive, negative, None)


def nce(
    scores: Array, positive: Array, negative: Array | None = None, *, n_data: float | None = None
) -> Array:
    """Binary NCE estimate of the MI (CRD / CMIM form), in nats.

    With h = e^s / (e^s + N/M), N = the anchor's negative weight and M = ``n_data`` (None: 1),
      I_i = log N + E_pos log h + N E_neg log(1 - h),
    a lower bound on the MI for every critic (it is log N plus the NCE objective, which the true
    posterior h* maximises). The CRD loss is -E_pos log h - N E_neg log(1 - h) = log N - I_i.
    scores, positive: [Ns, Nr] as in ``infonce``; negative: [Ns, Nr] weights >= 0, default 1 for
    every candidate (the product of marginals, see ``negative_weights``). Returns a scalar.
    """
    if n_data is not None:
        check_positive("MI n_data", n_data)
    return _dense_estimate("nce", scores, positive, negative, n_data)


def nwj(scores: Array, positive: Array, negative: Array | None = None) -> Array:
    """NWJ (f-divergence dual) estimate of the MI, in nats.

      I_i = E_pos f - E_neg e^{f - 1},  f = scores (softly capped at SCORE_CAP).
    A lower bound for every critic f; tight at f = 1 + log density ratio. Low bias, but its variance
    grows like e^{MI}. scores, positive, negative: [Ns, Nr] as in ``nce`` (default negatives:
    every candidate). Returns a scalar.
    """
    return _dense_estimate("nwj", scores, positive, negative, None)


def js(scores: Array, positive: Array, negative: Array | None = None) -> Array:
    """Jensen-Shannon (Deep InfoMax) estimator, in nats.

    The gradient is that of the JS (f-GAN) objective E_pos[-softplus(-s)] - E_neg[softplus(s)],
    which is stable and low-variance; the value is the NWJ bound at critic f + 1,
      I_i = E_pos (f + 1) - E_neg e^f,
    a lower bound for every critic, tight at f = log density ratio (which is also the optimum of
    the JS objective). scores, positive, negative: [Ns, Nr] as in ``nce`` (default negatives:
    every candidate). Returns a scalar. Gradient with respect to s_ij (beta = 0), per usable
    anchor and divided by their number: p_ij sigmoid(-s_ij) / P_i - q_ij sigmoid(s_ij) / N_i.
    """
    return _dense_estimate("js", scores, positive, negative, None)


def estimate(
    name: str,
    scores: Array,
    positive: Array,
    negative: Array | None = None,
    *,
    n_data: float | None = None,
) -> Array:
    """Dispatches to ``infonce`` | ``nce`` | ``nwj`` | ``js`` by name. Returns a scalar, nats."""
    check_choice("MI estimator", name, ESTIMATORS)
    if name == "nce":
        return nce(scores, positive, negative, n_data=n_data)
    return {"infonce": infonce, "nwj": nwj, "js": js}[name](scores, positive, negative)
