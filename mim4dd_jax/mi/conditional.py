"""Layer 5 of ``mim4dd_jax.mi`` (beside ``loss``): CMIDD's class-conditional term, the positive
control of the MIM4DD studies (``mi.objective="cmidd"``).

CMIDD (Zhong et al., ICLR 2025) turns each synthetic image's features in a trained network into a
distribution over feature dimensions, p_i = softmax(z_i), and penalises how far each lies from its
class's mean distribution: CMI = mean_i KL(p_i || q_{y_i}), q_c = mean_{j: y_j = c} p_j, the
empirical conditional mutual information between the images and their features given the class.
Minimising it makes each class compact in the trained feature space. Unlike the contrastive
term it reads no real data and has no heads: it is a loss (>= 0, minimised), not a bound to
maximise. Here z is a layer's features reduced as the MI term reduces them (``reduce``), of the
views the MI term sees (the step's DSA views where the method augments); CMIDD feeds the
unaugmented synthetic images to a pretrained ResNet-18.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

from mim4dd_jax.mi.critics import reduce_features

Array = jax.Array


def class_conditional_mi(feats: Array, labels: Array, num_classes: int) -> Array:
    """CMI in nats (scalar >= 0) of one layer's reduced features.

    feats: [N, D] float; labels: [N] int in 0..num_classes-1 (a class without images adds
    nothing). The class centroids q_c carry gradient, as in CMIDD (both sides of the KL move).
    """
    chex.assert_rank(feats, 2)
    chex.assert_shape(labels, (feats.shape[0],))
    log_p = jax.nn.log_softmax(feats.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [N, C]
    counts = jnp.maximum(jnp.sum(onehot, axis=0), 1.0)  # [C]
    centroids = (onehot.T @ p) / counts[:, None]  # [C, D]
    log_q = jnp.log(centroids[labels] + 1e-30)  # [N, D]
    return jnp.mean(jnp.sum(p * (log_p - log_q), axis=-1))


def conditional_loss(
    syn: Sequence[Array],
    syn_labels: Array,
    *,
    num_classes: int,
    reduce: str = "gap",
    layer_weights: Sequence[float] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """(loss, aux): loss = sum_l w_l CMI_l over the layers' synthetic features (to minimise);
    aux["mi"]: [L] the per-layer CMI in nats, the quantity the MI term's "mi" metric logs.

    syn: per layer [N, h, w, c] (or [N, F]); syn_labels: [N] int class ids.
    """
    if not syn:
        raise ValueError("conditional_loss needs the features of at least one layer")
    weights = [1.0] * len(syn) if layer_weights is None else list(layer_weights)
    if len(weights) != len(syn):
        raise ValueError(f"{len(weights)} layer weights for {len(syn)} layers")
    values = jnp.stack(
        [class_conditional_mi(reduce_features(f, reduce), syn_labels, num_classes) for f in syn]
    )
    loss = jnp.sum(jnp.asarray(weights, jnp.float32) * values)
    return loss, {"mi": values}
