"""How fast do MTT's MI heads learn the bound? Head training alone, on the features of a real run.

    .venv/bin/python benchmarks/probe_mi_heads.py RUN_WORKDIR [--steps 300]

RUN_WORKDIR is an MTT distillation's workdir (its config.json, distilled.npz and
``mtt.experts_dir``). Its synthetic images and learned lr are frozen; for every (expert, start
epoch) pair the student is unrolled once on them, as the MTT step does. Then each arm trains
fresh heads for ``--steps`` updates, each on one feature set: a pair drawn as the step draws it, a
class-balanced real batch (the real side through the expert at t + expert_epochs, the synthetic
side through the student, siamese DSA views), and prints the summed InfoNCE estimate (nats,
ceiling ln(C) per layer) at the update's start. The images do not move, so the curve is the most
the heads can do in that many updates: an estimate that stays near 0 here stays near 0 in the
run, and the MI gradient on the images is then the gradient of a bound on nothing.
Arms (``--arms``): shared vs per-side heads, the synthetic head's init (a copy of the real side's,
or its own draw), the optimiser and its lr (the runner's defaults: ``mi.optimizer`` adam,
``mi.lr`` 1e-3). Features come from a pool (``--pool`` sets, computed once), so the arms see
the same draws.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = {
    # name: (heads, synthetic head's init, optimiser, lr)
    "shared-adam1e-3": ("shared", "-", "adam", 1e-3),
    "copy-adam1e-3": ("per_side", "copy", "adam", 1e-3),
    "indep-adam1e-3": ("per_side", "independent", "adam", 1e-3),
    "indep-adam1e-2": ("per_side", "independent", "adam", 1e-2),
    "copy-adam1e-4": ("per_side", "copy", "adam", 1e-4),
    "copy-adam3e-4": ("per_side", "copy", "adam", 3e-4),
    "indep-adam1e-4": ("per_side", "independent", "adam", 1e-4),
    "shared-adam1e-4": ("shared", "-", "adam", 1e-4),
    "copy-sgd0.1": ("per_side", "copy", "sgd", 0.1),
    "copy-sgd1": ("per_side", "copy", "sgd", 1.0),
    "shared-sgd1": ("shared", "-", "sgd", 1.0),
    "shared-adam3e-4": ("shared", "-", "adam", 3e-4),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=300, help="head updates per arm")
    p.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    p.add_argument("--reduce", default="", help="mi.reduce (default: the run's)")
    p.add_argument("--pool", type=int, default=24, help="feature sets, drawn from per update")
    p.add_argument("--report", default="10,50,100,200,300")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from benchmarks.bench_step import _load_config
    from mim4dd_jax import config as config_lib
    from mim4dd_jax import data as data_lib
    from mim4dd_jax import experts as experts_lib
    from mim4dd_jax import mi, models, objectives
    from mim4dd_jax import state as state_lib
    from mim4dd_jax.steps_core import siamese_blocks

    with open(os.path.join(args.workdir, "config.json")) as f:
        stored = json.load(f)
    config = _load_config("fashion_mnist", f"mtt,ipc{stored['ipc']}")
    for dotted in ("mi.reduce", "mi.temperature", "mi.head", "mtt.experts_dir"):
        config_lib.set_dotted(config, dotted, stored[dotted])
    config_lib.set_dotted(config, "mi.weight", 0.1)
    if args.reduce:
        config_lib.set_dotted(config, "mi.reduce", args.reduce)
    syn = np.load(os.path.join(args.workdir, "distilled.npz"))
    images, labels, lr = (jnp.asarray(syn[k]) for k in ("model_images", "labels", "lr"))
    dataset = data_lib.load_from_config(config.data)
    shape, classes = dataset.image_shape, dataset.num_classes
    model = models.build_model(config, classes)
    unravel, _ = experts_lib.unravelers(model, shape)
    m = config.mtt
    trajs = experts_lib.load(
        m.experts_dir,
        dataset=dataset,
        config=config,
        min_epochs=m.max_start_epoch - 1 + m.expert_epochs,
    ).trajectories
    strategy = experts_lib.dsa_strategy(config, dataset.name)
    pairs = [(e, t) for e in range(trajs.shape[0]) for t in range(m.max_start_epoch)]
    t0 = time.perf_counter()
    unroll = jax.jit(
        lambda start, key: objectives.student_unroll(
            unravel(start),
            images,
            labels,
            lr,
            key,
            model=model,
            syn_steps=int(m.syn_steps),
            dsa_strategy=strategy,
        )
    )
    students = [unroll(trajs[e, t], jax.random.key(i)) for i, (e, t) in enumerate(pairs)]
    reals = [unravel(trajs[e, t + m.expert_epochs]) for e, t in pairs]
    print(f"{len(pairs)} students unrolled in {time.perf_counter() - t0:.0f} s", flush=True)
    real_images = jnp.asarray(dataset.train_images)
    index = data_lib.class_index(dataset.train_labels, classes)
    n_real = int(stored["distill.batch_real"])
    layers = state_lib.mi_layers(config, model, shape)
    blocks = models.block_shapes(model, shape)
    real_labels = objectives.class_labels(classes, n_real)
    syn_labels = objectives.class_labels(classes, stored["ipc"])

    @jax.jit
    def features(real_net, student, key):
        real_x = real_images[data_lib.sample_per_class(jax.random.fold_in(key, 0), index, n_real)]
        r, s = siamese_blocks(
            model,
            {"params": real_net},
            {"params": student},
            real_x,
            images.reshape(classes, -1, *shape),
            jax.random.fold_in(key, 1),
            strategy,
            256,
        )
        return [r[i] for i in layers], [s[i] for i in layers]

    # A pool of (pair, real batch, DSA view) feature sets, computed once: the heads' updates
    # are cheap, the features are not, and the images do not move here anyway.
    pool = []
    for i in range(args.pool):
        key = jax.random.fold_in(jax.random.key(2), i)
        k = int(jax.random.randint(key, (), 0, len(pairs)))
        pool.append(features(reals[k], students[k], key))
    print(f"{args.pool} feature sets in {time.perf_counter() - t0:.0f} s", flush=True)

    marks = sorted({int(x) for x in args.report.split(",")})
    print(f"| arm | {' | '.join(f'update {s}' for s in marks)} |")
    print(f"|---|{'---|' * len(marks)}")
    for name in args.arms.split(","):
        sharing, init, opt_name, head_lr = ARMS[name]
        config_lib.set_dotted(config, "mi.heads", sharing)
        cfg = state_lib.mi_config(config.mi)
        shapes = [blocks[i] for i in layers]
        heads = mi.init_heads(jax.random.key(1), shapes, config=cfg)
        if init == "independent":
            other = mi.init_heads(jax.random.key(7), shapes, config=cfg).params
            params = tuple(
                {**h, "proj_syn": o["proj"]} for h, o in zip(heads.params, other, strict=True)
            )
            heads = mi.Heads(params, cfg)
        tx = getattr(optax, opt_name)(head_lr)
        opt = tx.init(heads)

        @jax.jit
        def train(heads, opt, real, syn_f, tx=tx):
            def loss(hp):
                value, aux = mi.mi_loss(
                    hp, real=real, syn=syn_f, real_labels=real_labels, syn_labels=syn_labels
                )
                return value, aux["mi"]

            (_, est), g = jax.value_and_grad(loss, has_aux=True)(heads)
            upd, opt = tx.update(g, opt, heads)
            return optax.apply_updates(heads, upd), opt, est

        row = []
        for step in range(1, args.steps + 1):
            k = int(
                jax.random.randint(jax.random.fold_in(jax.random.key(3), step), (), 0, args.pool)
            )
            heads, opt, est = train(heads, opt, *pool[k])
            if step in marks:
                row.append(f"{float(jnp.sum(est)):.3f}")
        print(f"| {name} | {' | '.join(row)} |", flush=True)


if __name__ == "__main__":
    main()
