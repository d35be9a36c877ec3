"""Layer 1 of ``mim4dd_jax.mi``: the options of the MI term, one frozen ``MIConfig``.

The choices (estimators, critics, heads, masks, negatives) and their checks live here and nowhere
else; every other layer takes an ``MIConfig`` built once. ``resolve`` is the one place where
keyword options meet a config: options that agree pass, a conflicting one is a ConfigError that
names it.

Kept although retired by the evidence: ``negatives="other_class"`` (not an MI bound, see
``bounds``) stays because it is a choice of the CLI (``mi.negatives``) that earlier recorded runs
used, and issue 27 keeps the CLI unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from mim4dd_jax.errors import ConfigError, check_choice

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
# different-label ones (a same- vs other-label divergence, no MI bound). See ``bounds``.
NEGATIVES = ("marginal", "other_class")


@dataclasses.dataclass(frozen=True)
class MIConfig:
    """Options of the MI term, all static (hashable, and a pytree without leaves, so a config
    passes straight through ``jax.jit``). Build it once (``make_config`` or ``MIConfig(...)``) and
    pass it down: ``init_heads`` stores it in the heads it returns.

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
        check_positive("MI temperature", self.temperature)
        check_count("MI embed_dim", self.embed_dim)
        check_count("MI hidden_dim", self.hidden_dim)
        check_beta(self.beta)
        for what, value in (
            ("MI chunk_size", self.chunk_size),
            ("MI k_pos", self.k_pos),
            ("MI k_neg", self.k_neg),
        ):
            if value is not None:
                check_count(what, value)
        if self.n_data is not None:
            check_positive("MI n_data", self.n_data)
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
    return resolve(None, config)


def is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_positive(what: str, value: object) -> None:
    if not (is_number(value) and math.isfinite(value) and value > 0):
        raise ConfigError(f"bad {what} {value!r}; valid: a finite number > 0")


def check_count(what: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"bad {what} {value!r}; valid: an integer >= 1")


def check_beta(beta: object) -> None:
    if not (is_number(beta) and math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"bad MI hard-negative beta {beta!r}; valid: a finite number >= 0")


# A config is static data: as a pytree without leaves it can be an argument of a jitted function
# (jax.jit(mi.embedding_mi)(..., config=cfg)) without functools.partial.
jax.tree_util.register_static(MIConfig)

OPTION_NAMES = tuple(f.name for f in dataclasses.fields(MIConfig))


def resolve(config: MIConfig | None, options: dict[str, Any], owner: str = "") -> MIConfig:
    """The MIConfig of a call: ``config`` (or the defaults) with ``options`` applied.

    With an ``owner`` (e.g. "the heads"), ``config`` is fixed: an option that differs from it is
    a ConfigError naming the option, both values and where the config came from. Unknown option
    names are a ConfigError listing the valid ones.
    """
    for key in options:
        if key not in OPTION_NAMES:
            raise ConfigError(
                f"unknown MI option {key!r}; valid choices: {', '.join(OPTION_NAMES)}"
            )
    if config is None:
        return MIConfig(**options)
    if not isinstance(config, MIConfig):
        raise ConfigError(f"bad MI config {config!r}; valid: an mi.MIConfig (mi.make_config)")
    if not options:
        return config
    merged = dataclasses.replace(config, **options)
    if owner:
        for key in options:
            if getattr(merged, key) != getattr(config, key):
                raise ConfigError(
                    f"MI option {key}={options[key]!r} conflicts with {owner}' {key}="
                    f"{getattr(config, key)!r}; valid: leave {key} out, or build {owner} with it"
                )
    return merged
