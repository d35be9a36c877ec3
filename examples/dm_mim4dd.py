"""A custom DM + MIM4DD outer loop with optax and mi.relative_weight (no config, no runner).

python examples/dm_mim4dd.py
"""

import jax
import optax

from mim4dd_jax import data, inner, mi, models, objectives, state


def distill(key, ds, model, *, ipc=10, iterations=100, n_real=256, rho=0.1, strategy=None, **opts):
    """Each iteration: a fresh random network, DM's loss, the MI term on its features (real side
    held fixed), lambda = rho |g_dm| / |g_mi|. Keys as run.py's: fold_in(key, 0 | 1) for the
    images and the heads, fold_in(key, 100 + it) for iteration it."""
    syn = state.init_images(jax.random.fold_in(key, 0), ds, ipc)  # DM: real init
    heads = mi.init_heads(
        jax.random.fold_in(key, 1), models.block_shapes(model, ds.image_shape), **opts
    )
    tx_img, tx_heads = optax.sgd(1.0, momentum=0.5), optax.adam(1e-3)  # DM's images; the heads
    index, shape = data.class_index(ds.train_labels, ds.num_classes), (ds.num_classes, ipc)
    train_images = jax.numpy.asarray(ds.train_images)  # on device once
    labels = {
        "real_labels": objectives.class_labels(ds.num_classes, n_real),
        "syn_labels": syn["labels"],
    }

    @jax.jit
    def step(images, heads, opt, key):
        real_key, net_key, aug_key = (jax.random.fold_in(key, i) for i in range(3))
        real_x = train_images[data.sample_per_class(real_key, index, n_real)]  # [C, n, H, W, Ch]
        net = inner.init_variables(model, net_key, ds.image_shape)
        kw = {"model": model, "dsa_strategy": strategy}
        dm = lambda x: objectives.dm_loss_and_features(
            net, real_x, x.reshape(*shape, *x.shape[1:]), aug_key, **kw
        )
        (base, feats), g_dm = jax.value_and_grad(dm, has_aux=True)(images)
        real = [jax.lax.stop_gradient(b) for b in feats.real.blocks]

        def mi_term(x, heads):
            syn = objectives.dm_syn_features(net, x.reshape(*shape, *x.shape[1:]), aug_key, **kw)
            return mi.mi_loss(heads, real=real, syn=syn.blocks, **labels)

        (_, aux), (g_mi, g_heads) = jax.value_and_grad(mi_term, (0, 1), has_aux=True)(images, heads)
        lam = mi.relative_weight(g_dm, g_mi, rho)
        up_img, opt_img = tx_img.update(g_dm + lam * g_mi, opt[0], images)
        up_heads, opt_heads = tx_heads.update(g_heads, opt[1], heads)
        new = (optax.apply_updates(images, up_img), optax.apply_updates(heads, up_heads))
        return *new, (opt_img, opt_heads), {"dm": base, "mi": aux["mi"], "lambda": lam}

    images, opt = syn["images"], (tx_img.init(syn["images"]), tx_heads.init(heads))
    for it in range(iterations):
        images, heads, opt, metrics = step(images, heads, opt, jax.random.fold_in(key, 100 + it))
    return images, heads, metrics


if __name__ == "__main__":
    from train_eval_seeds import toy_dataset

    ds = toy_dataset()
    model = models.ConvNet(num_classes=ds.num_classes, width=32, depth=3)
    images, heads, metrics = distill(jax.random.key(0), ds, model, ipc=2, iterations=20, n_real=20)
    print(
        "DM loss", float(metrics["dm"]), "MI per block", metrics["mi"], "lambda", metrics["lambda"]
    )
