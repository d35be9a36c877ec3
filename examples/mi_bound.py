"""An MI bound between two feature batches, and its gradient (no config, no runner).

python examples/mi_bound.py
"""

import jax
import jax.numpy as jnp

from mim4dd_jax import mi, models


def main(n_real: int = 64, ipc: int = 2, classes: int = 10, width: int = 32) -> dict:
    key = jax.random.key(0)
    model = models.ConvNet(num_classes=classes, width=width, depth=3)
    x_real = jax.random.normal(jax.random.fold_in(key, 0), (n_real, 32, 32, 3))
    x_syn = jax.random.normal(jax.random.fold_in(key, 1), (classes * ipc, 32, 32, 3))
    y_real, y_syn = jnp.arange(n_real) % classes, jnp.repeat(jnp.arange(classes), ipc)
    v = model.init(key, x_syn[:1])

    # 1. A bound on a score matrix of your own: rows are synthetic anchors, columns real ones.
    scores = mi.critic_scores(real=x_real.reshape(n_real, -1), syn=x_syn.reshape(len(x_syn), -1))
    positive = mi.positive_mask(real_labels=y_real, syn_labels=y_syn)
    nats = mi.infonce(scores, positive)  # <= log(N / P) per anchor for any scores

    # 2. The MIM4DD term on per-block features: heads built once from models.block_shapes,
    # carrying their options, so the loss call repeats none of them.
    heads = mi.init_heads(key, models.block_shapes(model, (32, 32, 3)), estimator="nce")
    real = model.apply(v, x_real, features=True).blocks  # no gradient needed on this side

    def loss(x_syn, heads):
        syn = model.apply(v, x_syn, features=True).blocks
        return mi.mi_loss(heads, real=real, syn=syn, real_labels=y_real, syn_labels=y_syn)

    (neg_mi, aux), (g_syn, g_heads) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    )(x_syn, heads)
    # Descend on both: the images towards a higher MI, the heads (Adam 1e-3) towards a tighter bound.
    return {"infonce": nats, "mi": aux["mi"], "g_syn": g_syn, "g_heads": g_heads, "loss": neg_mi}


if __name__ == "__main__":
    out = main()
    print("infonce on raw pixels:", float(out["infonce"]), "nats")
    print("MI per block (nce):", out["mi"], "|grad images|:", float(mi.global_norm(out["g_syn"])))
