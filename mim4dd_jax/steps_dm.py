"""The DM step (Zhao & Bilen, 2023): distribution matching in a random network's embedding.

A fresh, frozen random network per iteration; loss = ``objectives.dm_loss_and_features`` with
siamese DSA; one image update per iteration. With MI, the sampled network gives both the real
and the synthetic features (on the views the base loss matched; the real ones are reused), or
with ``mi.feature_nets="experts"`` an expert checkpoint drawn each step does (a trained feature
space; same real batch and views), while the base loss keeps its random network.

Randomness: ``fold_in(key, 0|1|2)`` draw the real batch, the network and the DSA transforms;
``fold_in(key, 3)`` the expert checkpoint (``mi.feature_nets="experts"`` only).
"""

from __future__ import annotations

from typing import Any

import jax

from mim4dd_jax import data as data_lib
from mim4dd_jax import inner, methods, objectives
from mim4dd_jax.state import State
from mim4dd_jax.steps_core import BaseStep, StepContext, siamese_blocks, warn_uneven


def build(ctx: StepContext) -> BaseStep:
    """The DM step body (the builder of :data:`METHOD`)."""
    num_classes, ipc, shape, model = ctx.num_classes, ctx.ipc, ctx.shape, ctx.model
    # Measured (BENCHMARKS.md): XLA then gathers the real batch and runs DM replicated.
    warn_uneven("classes", num_classes, ctx.mesh, "the step runs replicated, no speed-up")

    def loss_fn(learned, st, variables, real_x, aug_key, expert_net):
        syn_x = ctx.by_class(learned["images"].reshape(num_classes, ipc, *shape))
        base, feats = objectives.dm_loss_and_features(
            variables,
            real_x,
            syn_x,
            aug_key,
            model=model,
            dsa_strategy=ctx.strategy,
            real_chunk=ctx.chunk,
        )
        if not ctx.weight:
            return base, ({}, None)
        if expert_net is not None:
            return base, ({}, (expert_net, real_x, aug_key))
        # The MI term reuses the real features of this forward pass (constants) and recomputes
        # the small synthetic side on the same network and views.
        return base, ({}, (variables, feats.real.blocks, aug_key))

    def mi_features(images, carry):
        syn_x = ctx.by_class(images.reshape(num_classes, ipc, *shape))
        if ctx.expert_features:
            expert_net, real_x, aug_key = carry
            return siamese_blocks(
                model, expert_net, expert_net, real_x, syn_x, aug_key, ctx.strategy, ctx.chunk
            )
        variables, real_blocks, aug_key = carry
        syn = objectives.dm_syn_features(
            variables, syn_x, aug_key, model=model, dsa_strategy=ctx.strategy
        )
        return real_blocks, syn.blocks

    def dm_step(state: State, key: jax.Array, real_images: jax.Array, index: Any, experts):
        real_key, net_key, aug_key = (jax.random.fold_in(key, i) for i in range(3))
        real_x = real_images[data_lib.sample_per_class(real_key, index, ctx.n_real)]
        real_x = ctx.by_class(real_x)
        variables = inner.init_variables(model, net_key, shape)
        expert_net = None
        if ctx.expert_features:
            expert_net = ctx.expert_variables(jax.random.fold_in(key, 3), experts)
        return ctx.grad_and_update(
            loss_fn, state, variables, real_x, aug_key, expert_net, mi_features=mi_features
        )

    return dm_step


# Zhao & Bilen 2023: SGD lr 1 with momentum 0.5 on the images, 20k iterations, siamese DSA;
# evaluation with DSA-trained models for 1000 epochs. DM's step has no loop, where XLA:CPU's
# conv is fast: the "hybrid" conv (XLA's forward, GEMM weight gradient) measured 2.3x faster
# than im2col with half the memory (BENCHMARKS.md).
METHOD = methods.Method(
    name="dm",
    build=build,
    defaults={
        "distill.iterations": 20000,
        "distill.lr": 1.0,
        "distill.momentum": 0.5,
        "distill.dsa": True,
        "distill.eval_every": 2000,
        "eval.dsa": True,
        "eval.epochs": 1000,
    },
    conv="hybrid",
    supports=frozenset({methods.EXPERT_FEATURES}),
)
