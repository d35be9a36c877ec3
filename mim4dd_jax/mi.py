"""Contrastive estimates of the mutual information between synthetic and real data.

This is the MI term of MIM4DD. Conventions used throughout:

- **Anchors are synthetic samples (rows), candidates are real samples (columns).** A score matrix
  ``scores`` is [Ns, Nr] float32: ``scores[i, j]`` is the critic value of (syn i, real j).
- **Pair weights.** ``positive[i, j]`` in [0, 1] is how much pair (i, j) counts as a positive
  (a draw from the joint: same label) and ``negative[i, j] >= 0`` how much it counts as a negative
  (a draw from the product of marginals). A pair with both weights 0 is not a candidate at all.
- **Units.** Every estimator returns the mean, over anchors that have at least one positive (and,
  where the bound needs them, one negative), of a per-anchor estimate of the mutual information in
  **nats**. The loss to minimise is its negative. Anchors without a usable pair are skipped.
- Everything is a pure function of arrays; string/shape options are static Python values, so bind
  them with ``functools.partial`` before ``jax.jit``.

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
  kept only for comparison with earlier runs).
- Hard negatives (``beta``, ``k_neg``) reshape the negatives: at fixed scores beta only lowers an
  estimate and the top-k negatives give no more than a random subset of the same size.

The critic is a projection head per layer plus a score function. Trained heads ("linear",
"mlp") realise the "max over critics" of the variational bound; "none" (standardised features)
and "lda" (a Fisher discriminant fitted on the real batch) are refitted on the current features
every step, for base methods whose network changes every step (DM draws a fresh one). For scale,
``embedding_mi`` streams the scores over chunks of real candidates with online log-sum-exp
accumulators (memory O(Ns x chunk), same result as one shot), and ``update_memory_bank`` keeps a
per-class, momentum-updated bank of real embeddings that adds candidates without large real
batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mim4dd_jax.errors import ConfigError, check_choice

Array = jax.Array
HeadParams = dict[str, Any]
MemoryBank = dict[str, Array]

ESTIMATORS = ("infonce", "nce", "nwj", "js")
CRITICS = ("cosine", "bilinear")
REDUCTIONS = ("flatten", "gap")
# linear / mlp: trained projection heads. none / lda: refitted on the current features every step
# (nothing to train but the critic's scalar offset), for networks that change every step.
HEADS = ("linear", "mlp", "none", "lda")
FITTED_HEADS = ("none", "lda")
# One trained head per layer for both sides, or one per side (real network, synthetic network)
# into one contrastive space, as contrastive distillation embeds two networks' features.
HEAD_SHARING = ("shared", "per_side")
MASKS = ("hard", "soft")
# Negatives of nce/nwj/js: every candidate (product of marginals: an MI bound) or only the
# different-label ones (a same- vs other-label divergence, no MI bound). See the module docstring.
NEGATIVES = ("marginal", "other_class")

# nwj/js exponentiate the critic. Above this value it is capped smoothly (f = cap - softplus(cap -
# s)); that only changes the critic, and both bounds hold for every critic, so they stay bounds
# while exp(f) stays finite in float32 even for scores of 1e4.
SCORE_CAP = 50.0
# Stands for log(0) where -inf would poison gradients (logaddexp, differences of two log-sums).
_NEG = -1e30


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MIConfig:
    """Options of the MI term, all static. Pass them as keyword arguments to the functions below.

    estimator: "infonce" | "nce" | "nwj" | "js".
    temperature: tau > 0; scores are divided by it.
    critic: "cosine" (<z_s, z_r>/tau on unit vectors) | "bilinear" (z_s^T W z_r / tau, W learned).
    reduce: per-layer feature reduction before the head, "flatten" | "gap" (global average pool).
    head: "linear" (Dense -> l2-normalise) | "mlp" (Dense -> ReLU -> Dense -> l2-normalise), both
      trained | "none" (features standardised with the real batch's statistics) | "lda" (Fisher
      LDA refitted on the real batch every step); "none" and "lda" need critic "cosine".
    embed_dim, hidden_dim: head output width and MLP hidden width (trained heads only).
    heads: "shared" (one trained head per layer embeds both sides) | "per_side" (the real and the
      synthetic features each get their own head per layer, into one space: the paper's two
      networks, expert and student in MTT; trained heads only).
    layer_weights: one weight >= 0 per layer for the weighted sum; None means 1 for every layer.
    mask: "hard" (same argmax label = positive) | "soft" (positive weight = p_syn . p_real).
    negatives: negatives of nce/nwj/js: "marginal" (every candidate, same label included: an MI
      lower bound) | "other_class" (different labels only: a divergence, not an MI bound).
      infonce ignores it (its denominator holds every candidate either way).
    chunk_size: None for one-shot scores, else the number of real candidates per streamed chunk.
    beta: hard-negative concentration >= 0; 0 is the plain estimator.
    k_pos, k_neg: keep only the k hardest positives / negatives per anchor (None keeps all).
      With marginal negatives k_neg / beta pick / tilt among all candidates, same label
      included (the hardest draws of the marginal); for infonce among the other labels.
    n_data: M in NCE's h = e^s / (e^s + N/M); None means M = 1 (optimal critic = log ratio).
    bank_slots: memory-bank slots per class the caller keeps (0 = none); only checked here,
      because the fitted heads cannot use a bank (see ``layer_mi``).
    """

    estimator: str = "infonce"
    temperature: float = 0.07
    critic: str = "cosine"
    reduce: str = "gap"
    head: str = "linear"
    heads: str = "shared"
    embed_dim: int = 128
    hidden_dim: int = 512
    layer_weights: tuple[float, ...] | None = None
    mask: str = "hard"
    chunk_size: int | None = None
    beta: float = 0.0
    k_pos: int | None = None
    k_neg: int | None = None
    n_data: float | None = None
    negatives: str = "marginal"
    bank_slots: int = 0

    def __post_init__(self) -> None:
        check_choice("MI estimator", self.estimator, ESTIMATORS)
        check_choice("MI critic", self.critic, CRITICS)
        check_choice("MI feature reduction", self.reduce, REDUCTIONS)
        check_choice("MI head", self.head, HEADS)
        check_choice("MI heads", self.heads, HEAD_SHARING)
        check_choice("MI positive mask", self.mask, MASKS)
        check_choice("MI negatives", self.negatives, NEGATIVES)
        _check_positive("MI temperature", self.temperature)
        _check_count("MI embed_dim", self.embed_dim)
        _check_count("MI hidden_dim", self.hidden_dim)
        _check_beta(self.beta)
        for what, value in (
            ("MI chunk_size", self.chunk_size),
            ("MI k_pos", self.k_pos),
            ("MI k_neg", self.k_neg),
        ):
            if value is not None:
                _check_count(what, value)
        if self.n_data is not None:
            _check_positive("MI n_data", self.n_data)
        if self.layer_weights is not None:
            weights = tuple(float(w) for w in self.layer_weights)
            for w in weights:
                if not (math.isfinite(w) and w >= 0):
                    raise ConfigError(
                        f"bad MI layer weight {w!r}; valid: finite numbers >= 0, one per layer"
                    )
            object.__setattr__(self, "layer_weights", weights)
        if self.mask == "soft" and (self.k_pos is not None or self.k_neg is not None):
            raise ConfigError(
                "MI top-k selection (k_pos/k_neg) needs mask 'hard'; valid: mask='hard' or "
                "k_pos=k_neg=None"
            )
        slots = self.bank_slots
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ConfigError(f"bad MI bank_slots {self.bank_slots!r}; valid: an integer >= 0")
        if self.head in FITTED_HEADS and self.critic != "cosine":
            raise ConfigError(
                f"MI head {self.head!r} has no weights for critic {self.critic!r}; valid: "
                "critic='cosine', or head 'linear' / 'mlp'"
            )
        if self.head in FITTED_HEADS and self.heads == "per_side":
            raise ConfigError(
                f"MI head {self.head!r} is refitted on the real batch and has no weights to keep "
                "per side; valid: heads='shared', or head 'linear' / 'mlp'"
            )
        if self.head in FITTED_HEADS and self.bank_slots:
            raise ConfigError(
                f"MI head {self.head!r} is refitted every step, so memory-bank entries of earlier "
                "steps live in another space; valid: bank_slots=0, or head 'linear' / 'mlp'"
            )


def make_config(**config: Any) -> MIConfig:
    """Builds and validates an MIConfig from keyword arguments; unknown keys -> ConfigError."""
    names = [f.name for f in dataclasses.fields(MIConfig)]
    for key in config:
        if key not in names:
            raise ConfigError(f"unknown MI option {key!r}; valid choices: {', '.join(names)}")
    return MIConfig(**config)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_positive(what: str, value: object) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ConfigError(f"bad {what} {value!r}; valid: a finite number > 0")


def _check_count(what: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"bad {what} {value!r}; valid: an integer >= 1")


def _check_beta(beta: object) -> None:
    if not (_is_number(beta) and math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"bad MI hard-negative beta {beta!r}; valid: a finite number >= 0")


# ------------------------------------------------------------------------------------------------
# Scores and masks
# ------------------------------------------------------------------------------------------------


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / ||x|| along the last axis; finite (value and gradient) at x = 0. x: [..., D]."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def critic_scores(
    z_syn: Array,
    z_real: Array,
    *,
    critic: str = "cosine",
    temperature: float = 0.07,
    weight: Array | None = None,
    bias: Array | float = 0.0,
) -> Array:
    """Critic score matrix between two embedding sets.

    z_syn: [Ns, D], z_real: [Nr, D] float32. Returns scores [Ns, Nr] float32 (dimensionless,
    the critic's log-density-ratio guess up to a constant):
      cosine:   <z_syn_i/|z_syn_i|, z_real_j/|z_real_j|> / temperature + bias
      bilinear: z_syn_i^T W z_real_j / temperature + bias, W = ``weight`` [D, D] (identity if None).
    """
    check_choice("MI critic", critic, CRITICS)
    _check_positive("MI temperature", temperature)
    chex.assert_rank([z_syn, z_real], 2)
    chex.assert_equal_shape_suffix([z_syn, z_real], 1)
    queries, keys = _queries_keys(z_syn, z_real, critic, weight)
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


def positive_mask(syn_labels: Array, real_labels: Array, *, mode: str = "hard") -> Array:
    """Positive-pair weights from two label sets.

    syn_labels: [Ns] int or [Ns, K] float (soft labels, rows of probabilities); real_labels likewise
    with Nr rows. Returns [Ns, Nr] float32 in [0, 1]:
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


# Jitted so that eager callers compile one program per shape instead of every primitive.
@functools.partial(jax.jit, static_argnums=(0, 4))
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
        _check_positive("MI n_data", n_data)
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
    if _is_number(beta):
        _check_beta(beta)
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
            _check_count(what, k)
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


# ------------------------------------------------------------------------------------------------
# MI from embeddings: one-shot or streamed over chunks of real candidates
# ------------------------------------------------------------------------------------------------


def embedding_mi(
    z_syn: Array,
    z_real: Array,
    syn_labels: Array,
    real_labels: Array,
    *,
    critic_params: dict[str, Array] | None = None,
    real_valid: Array | None = None,
    **config: Any,
) -> Array:
    """MI estimate between synthetic and real embeddings, in nats (scalar).

    z_syn: [Ns, D], z_real: [Nr, D] float32; syn_labels: [Ns] int or [Ns, K]; real_labels: [Nr] int
    or [Nr, K]; critic_params: optional {"bias": [], "w": [D, D]} (see ``critic_scores``);
    real_valid: optional [Nr] mask, 0 drops a candidate (empty memory-bank slots).
    config: MIConfig options (estimator, critic, temperature, mask, negatives, chunk_size, beta,
    k_pos, k_neg, n_data). The labels only weigh pairs: no gradient reaches them. With
    ``chunk_size`` the scores are never materialised beyond [Ns, chunk_size]
    (forward and backward: each chunk is recomputed in the backward pass); the result equals the
    one-shot one up to float rounding.
    """
    cfg = make_config(**config)
    chex.assert_rank([z_syn, z_real], 2)
    chex.assert_equal_shape_suffix([z_syn, z_real], 1)
    chex.assert_equal_shape_prefix([z_syn, syn_labels], 1)
    chex.assert_equal_shape_prefix([z_real, real_labels], 1)
    critic_params = critic_params or {}
    valid = (
        jnp.ones((z_real.shape[0],), jnp.float32)
        if real_valid is None
        else jax.lax.stop_gradient(real_valid.astype(jnp.float32))
    )
    bias, weight = critic_params.get("bias", 0.0), critic_params.get("w")
    return _embedding_mi(z_syn, z_real, syn_labels, real_labels, bias, weight, valid, cfg)


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


def standardize(x_real: Array, x_syn: Array) -> tuple[Array, Array]:
    """Standardises both sets per feature with the REAL set's mean and std.

    x_real: [Nr, D], x_syn: [Ns, D]. Returns ([Nr, D], [Ns, D]) float32. The real batch is the
    reference distribution (large; the synthetic set is small and is what moves), and removing
    its mean cancels the component that every image shares. The statistics are constants: no
    gradient flows through them, only through x_real and x_syn themselves.
    """
    chex.assert_rank([x_real, x_syn], 2)
    chex.assert_equal_shape_suffix([x_real, x_syn], 1)
    ref = jax.lax.stop_gradient(x_real.astype(jnp.float32))
    mean, var = ref.mean(0), ref.var(0)
    inv_std = jax.lax.rsqrt(var + _VAR_FLOOR * jnp.mean(var) + 1e-12)
    x_real, x_syn = x_real.astype(jnp.float32), x_syn.astype(jnp.float32)
    return (x_real - mean) * inv_std, (x_syn - mean) * inv_std


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
    _check_positive("LDA shrinkage", shrinkage)
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
        reduce_features(real_feat.astype(jnp.float32), cfg.reduce),
        reduce_features(syn_feat.astype(jnp.float32), cfg.reduce),
    )
    if cfg.head == "lda":
        proj = lda_projection(x_real, real_labels)
        x_real, x_syn = x_real @ proj, x_syn @ proj
    return l2_normalize(x_real), l2_normalize(x_syn)


def embed(
    head_params: HeadParams,
    real_feat: Array,
    syn_feat: Array,
    real_labels: Array,
    **config: Any,
) -> tuple[Array, Array]:
    """One layer's real and synthetic features -> critic embeddings (z_real, z_syn).

    real_feat: [Nr, h, w, c], syn_feat: [Ns, h, w, c] (or [N, F]); real_labels: [Nr] int or
    [Nr, K] (used by "lda" only). Returns ([Nr, D'], [Ns, D']) float32 unit vectors, D' =
    embed_dim for the trained heads, the reduced width for "none", min(width, Nr) for "lda".

    - "linear" / "mlp": the trained ``ProjectionHead`` in ``head_params["proj"]`` (with
      ``heads="per_side"`` the synthetic side uses ``head_params["proj_syn"]``).
    - "none": reduce, standardise with the real batch's statistics, l2-normalise; the cosine
      critic then compares deviations from the real mean, not the component all images share.
    - "lda": as "none", then project onto the real batch's Fisher discriminant directions
      (``lda_projection``). Among linear critics it is the one that best separates the classes
      of the current network, and it is refitted each step, so it never chases a moving network.
    """
    cfg = make_config(**config)
    if cfg.head in FITTED_HEADS:
        return _fitted_embeddings(cfg, real_feat, syn_feat, real_labels)
    head = _head(cfg)
    syn_proj = head_params["proj_syn" if cfg.heads == "per_side" else "proj"]
    return head.apply(head_params["proj"], real_feat), head.apply(syn_proj, syn_feat)


def _head(cfg: MIConfig) -> ProjectionHead:
    return ProjectionHead(
        kind=cfg.head, reduce=cfg.reduce, dim=cfg.embed_dim, hidden=cfg.hidden_dim
    )


@functools.partial(jax.jit, static_argnums=(0,))
def _init_head(head: ProjectionHead, key: Array, dummy: Array) -> dict[str, Any]:
    return head.init(key, dummy)


def init_heads(
    key: Array, feature_shapes: Sequence[Sequence[int] | Array], **config: Any
) -> tuple[HeadParams, ...]:
    """One head per layer, built from the layers' feature shapes.

    key: PRNG key; feature_shapes: per layer a shape (N, h, w, c) (N ignored), an array or a
    jax.ShapeDtypeStruct (e.g. from ``jax.eval_shape`` of the model's features). config: MIConfig
    options (head, heads, reduce, embed_dim, hidden_dim, critic). Returns a tuple of per-layer
    params {"proj": ProjectionHead variables, "proj_syn": the synthetic side's own head
    (heads="per_side" only), "bias": [] (critic offset), "w": [D, D] (bilinear only,
    initialised to the identity)}; all of them are trained to maximise the bound. The fitted
    heads ("none", "lda") get {"bias": []} only: their embedding is refitted every step.
    """
    cfg = make_config(**config)
    # nwj / js exponentiate the critic, and with marginal negatives the (high-scoring) positives
    # are among the negatives: an offset of -1/temperature starts every cosine score at <= 0, so
    # e^f starts <= 1 instead of e^(1/tau); the offset is learned from there.
    offset = -1.0 / cfg.temperature if cfg.estimator in ("nwj", "js") else 0.0

    def bias() -> Array:  # a fresh buffer per layer: the step donates every leaf separately
        return jnp.full((), offset, jnp.float32)

    if cfg.head in FITTED_HEADS:
        return tuple({"bias": bias()} for _ in feature_shapes)
    head = _head(cfg)
    params = []
    for layer, shape in enumerate(feature_shapes):
        shape = tuple(getattr(shape, "shape", shape))
        dummy = jnp.zeros((1,) + shape[1:], jnp.float32)
        layer_params: HeadParams = {
            "proj": _init_head(head, jax.random.fold_in(key, layer), dummy),
            "bias": bias(),
        }
        if cfg.heads == "per_side":
            # Keys apart from every layer's shared-head key, so "proj" is the same either way.
            syn_key = jax.random.fold_in(jax.random.fold_in(key, layer), 1)
            layer_params["proj_syn"] = _init_head(head, syn_key, dummy)
        if cfg.critic == "bilinear":
            layer_params["w"] = jnp.eye(cfg.embed_dim, dtype=jnp.float32)
        params.append(layer_params)
    return tuple(params)


# ------------------------------------------------------------------------------------------------
# Memory bank
# ------------------------------------------------------------------------------------------------


def init_memory_bank(num_classes: int, slots: int, dim: int) -> MemoryBank:
    """An empty per-class bank: {"emb": [K, S, D], "ptr": [K] int32 next slot, "filled": [K]}."""
    _check_count("memory bank num_classes", num_classes)
    _check_count("memory bank slots", slots)
    _check_count("memory bank dim", dim)
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
    if _is_number(momentum) and not 0 <= momentum < 1:
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


# ------------------------------------------------------------------------------------------------
# Per-layer and total MI term
# ------------------------------------------------------------------------------------------------


def layer_mi(
    head_params: HeadParams,
    real_feat: Array,
    syn_feat: Array,
    real_labels: Array,
    syn_labels: Array,
    *,
    bank: MemoryBank | None = None,
    **config: Any,
) -> tuple[Array, Array]:
    """MI estimate (nats, scalar) for one layer, and the real embeddings [Nr, D] (no gradient).

    real_feat: [Nr, h, w, c], syn_feat: [Ns, h, w, c]; labels as in ``embedding_mi`` (the real
    ones also fit head "lda"); bank: an optional memory bank whose filled slots join the real
    candidates (constants: no gradient). The fitted heads refuse a bank (ConfigError): its
    entries were embedded by earlier steps' fits, in another space. Embeddings: see ``embed``.
    """
    cfg = make_config(**config)
    if bank is not None and cfg.head in FITTED_HEADS:
        raise ConfigError(
            f"MI head {cfg.head!r} is refitted every step and cannot use a memory bank; valid: "
            "bank=None, or head 'linear' / 'mlp'"
        )
    z_real, z_syn = embed(head_params, real_feat, syn_feat, real_labels, **config)
    candidates, labels, valid = z_real, real_labels, None
    if bank is not None:
        bank_z, bank_labels, bank_valid = bank_candidates(bank)
        if real_labels.ndim == 2:
            bank_labels = jax.nn.one_hot(bank_labels, real_labels.shape[-1])
        candidates = jnp.concatenate([z_real, jax.lax.stop_gradient(bank_z)])
        labels = jnp.concatenate([real_labels, bank_labels.astype(real_labels.dtype)])
        valid = jnp.concatenate([jnp.ones((z_real.shape[0],), jnp.float32), bank_valid])
    critic = {k: head_params[k] for k in ("bias", "w") if k in head_params}
    mi = embedding_mi(
        z_syn, candidates, syn_labels, labels, critic_params=critic, real_valid=valid, **config
    )
    return mi, jax.lax.stop_gradient(z_real)


def mi_loss(
    head_params: Sequence[HeadParams],
    real_feats: Sequence[Array],
    syn_feats: Sequence[Array],
    real_labels: Array,
    syn_labels: Array,
    *,
    banks: Sequence[MemoryBank] | None = None,
    **config: Any,
) -> tuple[Array, dict[str, Any]]:
    """Total MI loss over layers: -sum_l layer_weights[l] * MI_l.

    head_params: from ``init_heads``, one per layer; real_feats / syn_feats: per-layer feature maps
    [Nr, h_l, w_l, c_l] / [Ns, h_l, w_l, c_l] (e.g. ``model.apply(v, x, features=True).blocks``);
    real_labels: [Nr] int or [Nr, K]; syn_labels: [Ns] int or [Ns, K]; banks: optional memory bank
    per layer; config: MIConfig options. Returns (loss scalar, aux) with aux = {"mi": [L] per-layer
    estimates in nats, "real_embeddings": per-layer [Nr, D] (no gradient), for
    ``update_memory_bank``}. Use with ``jax.value_and_grad(..., has_aux=True)``: the distiller
    minimises the loss over the images, the heads minimise it over their own params (for the
    fitted heads "none" / "lda" that is the critic offset only).
    """
    cfg = make_config(**config)
    n_layers = len(head_params)
    if not (len(real_feats) == len(syn_feats) == n_layers):
        raise ConfigError(
            f"MI got {n_layers} heads, {len(real_feats)} real and {len(syn_feats)} synthetic "
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
            head_params[layer],
            real_feats[layer],
            syn_feats[layer],
            real_labels,
            syn_labels,
            bank=None if banks is None else banks[layer],
            **config,
        )
        mis.append(mi)
        embeddings.append(z_real)
    mi_per_layer = jnp.stack(mis)
    loss = -jnp.sum(jnp.asarray(weights, jnp.float32) * mi_per_layer)
    return loss, {"mi": mi_per_layer, "real_embeddings": tuple(embeddings)}
