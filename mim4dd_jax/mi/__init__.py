"""Contrastive estimates of the mutual information between synthetic and real data: the MI term
of MIM4DD, as a package whose layers import one way only::

    options (MIConfig) -> bounds (estimators on score matrices) -> critics (trained and fitted
    heads) -> selection (beta, top-k, memory banks) -> loss (embedding_mi, layer_mi, mi_loss,
    relative_weight)

and beside ``loss``, on ``critics`` only, ``conditional``: CMIDD's class-conditional term
(``conditional_loss``), the positive control of the MIM4DD studies.

Five lines put the term into any JAX loss (``examples/mi_bound.py``)::

    heads = mi.init_heads(key, models.block_shapes(model, (28, 28, 1)), estimator="infonce")
    real = model.apply(v, x_real, features=True).blocks   # tuple of [Nr, h, w, c]
    syn = model.apply(v, x_syn, features=True).blocks     # tuple of [Ns, h, w, c]
    neg_mi, aux = mi.mi_loss(heads, real=real, syn=syn, real_labels=y_real, syn_labels=y_syn)
    lam = mi.relative_weight(g_base, g_mi, rho)           # |lam * g_mi| = rho * |g_base|

Conventions: score matrices are [Ns, Nr] (rows: synthetic anchors); every function that takes
both sides takes them keyword-only (``real=``, ``syn=``, ``real_labels=``, ``syn_labels=``) and
returns real first; estimates are in nats and the loss is their negative. The heads carry their
options (``Heads.config``); the runner trains them with Adam at lr 1e-3 (``mi.optimizer``,
``mi.lr``). See each module's docstring for the details and for which numbers are MI bounds.
"""

from mim4dd_jax.mi.bounds import (
    SCORE_CAP,
    estimate,
    infonce,
    js,
    nce,
    negative_weights,
    nwj,
    positive_mask,
)
from mim4dd_jax.mi.conditional import class_conditional_mi, conditional_loss
from mim4dd_jax.mi.critics import (
    LDA_SHRINKAGE,
    HeadParams,
    Heads,
    ProjectionHead,
    critic_scores,
    embed,
    example_shape,
    init_heads,
    l2_normalize,
    lda_projection,
    reduce_features,
    standardize,
)
from mim4dd_jax.mi.loss import embedding_mi, global_norm, layer_mi, mi_loss, relative_weight
from mim4dd_jax.mi.options import (
    CRITICS,
    ESTIMATORS,
    FITTED_HEADS,
    HEAD_SHARING,
    HEADS,
    MASKS,
    NEGATIVES,
    REDUCTIONS,
    MIConfig,
    make_config,
)
from mim4dd_jax.mi.selection import (
    MemoryBank,
    bank_candidates,
    hard_negative_weights,
    init_memory_bank,
    select_topk,
    update_memory_bank,
)

__all__ = [
    "CRITICS",
    "ESTIMATORS",
    "FITTED_HEADS",
    "HEADS",
    "HEAD_SHARING",
    "LDA_SHRINKAGE",
    "MASKS",
    "NEGATIVES",
    "REDUCTIONS",
    "SCORE_CAP",
    "HeadParams",
    "Heads",
    "MIConfig",
    "MemoryBank",
    "ProjectionHead",
    "bank_candidates",
    "class_conditional_mi",
    "conditional_loss",
    "critic_scores",
    "embed",
    "embedding_mi",
    "estimate",
    "example_shape",
    "global_norm",
    "hard_negative_weights",
    "infonce",
    "init_heads",
    "init_memory_bank",
    "js",
    "l2_normalize",
    "layer_mi",
    "lda_projection",
    "make_config",
    "mi_loss",
    "nce",
    "negative_weights",
    "nwj",
    "positive_mask",
    "reduce_features",
    "relative_weight",
    "select_topk",
    "standardize",
    "update_memory_bank",
]
