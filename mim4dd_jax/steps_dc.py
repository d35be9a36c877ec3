"""The DC / DSA step (Zhao et al., 2021; Zhao & Bilen, 2021): per-class gradient matching.

A fresh network per iteration, then ``outer_loop`` image updates by per-class gradient
matching, each on a freshly drawn real batch; between two of them the network trains
``inner_loop`` epochs on the (updated, constant) synthetic set with plain SGD at
``distill.lr_net`` (the reference's 0.01, no momentum), with per-sample DSA for DSA. The loop
over outer steps is a ``lax.scan`` inside the step. With MI, the network at that outer step
gives both the real and the synthetic features, on the batches and siamese DSA views that the
base loss matched; with ``mi.feature_nets="experts"`` an expert checkpoint drawn at each outer
step gives both instead (a trained feature space), while the base loss keeps its network.

Randomness: ``fold_in(key, 0)`` draws the network, outer step ``o`` uses
``k = fold_in(fold_in(key, 1), o)`` (``fold_in(k, 0)``: real batch, ``fold_in(k, 1)``: DSA,
``fold_in(k, 2)``: the expert checkpoint) and the network training after it
``fold_in(fold_in(key, 2), o)``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mim4dd_jax import augment as augment_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax import inner, methods, objectives
from mim4dd_jax.state import State
from mim4dd_jax.steps_core import BaseStep, StepContext, flat, siamese_blocks, warn_uneven

# The reference freezes BatchNorm statistics from this many real images per class.
_BN_REAL_PER_CLASS = 16


def outer_inner(config: Any) -> tuple[int, int]:
    """(outer_loop, inner_loop): the config's, or the reference's per-IPC defaults."""
    d = config.distill
    if d.outer_loop and d.inner_loop:
        return int(d.outer_loop), int(d.inner_loop)
    return objectives.dc_loops(config.ipc)


def train_on_synthetic(
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    epochs: int,
    batch_size: int,
    lr: float,
    strategy: str | None,
) -> Any:
    """The DC inner loop: ``epochs`` shuffled epochs of plain SGD (no momentum) on a constant set.

    variables: the network's variables; images: [N, H, W, Ch]; labels: [N] int32. Batches of
    ``batch_size`` (the last one padded and masked), per-sample DSA when ``strategy`` is set,
    training-mode norms. Returns the updated variables.
    """
    augment = None
    if strategy is not None:
        augment = functools.partial(augment_lib.augment, strategy=strategy, siamese=False)
    return inner.sgd_epochs(
        key,
        variables,
        lax.stop_gradient(images),
        lax.stop_gradient(labels),
        lr,
        model=model,
        passes=epochs,
        batch_size=batch_size,
        augment=augment,
    )


def build(ctx: StepContext) -> BaseStep:
    """The DC step body (registered as "dc" and "dsa" in ``mim4dd_jax.steps``; they differ
    only in their configs' ``distill.dsa``)."""
    config, model, strategy, chunk = ctx.config, ctx.model, ctx.strategy, ctx.chunk
    num_classes, ipc, shape, n_real = ctx.num_classes, ctx.ipc, ctx.shape, ctx.n_real
    # DC's real gradients class by class on CPU (BENCHMARKS.md), one group per device.
    dc_groups = 0
    if jax.default_backend() == "cpu":
        dc_groups = ctx.mesh.size if num_classes % ctx.mesh.size == 0 else 1
    # Measured (BENCHMARKS.md): XLA then gathers the real batch and runs DC replicated.
    warn_uneven("classes", num_classes, ctx.mesh, "the step runs replicated, no speed-up")

    def loss_fn(learned, st, variables, real_x, aug_key, expert_net):
        syn_x = ctx.by_class(learned["images"].reshape(num_classes, ipc, *shape))
        state = {k: v for k, v in variables.items() if k != "params"}
        base = objectives.dc_loss(
            variables["params"],
            real_x,
            syn_x,
            aug_key,
            model=model,
            dsa_strategy=strategy,
            state=state,
            real_groups=dc_groups,
        )
        if not ctx.weight:
            return base, ({}, None)
        return base, ({}, (variables if expert_net is None else expert_net, real_x, aug_key))

    def mi_features(images, carry):
        # The same views dc_loss matched: class c augmented with split(aug_key, C)[c].
        variables, real_x, aug_key = carry
        syn_x = ctx.by_class(images.reshape(num_classes, ipc, *shape))
        return siamese_blocks(model, variables, variables, real_x, syn_x, aug_key, strategy, chunk)

    def dc_step(state: State, key: jax.Array, real_images: jax.Array, index: Any, experts):
        outer, inner_epochs = outer_inner(config)
        variables = inner.init_variables(model, jax.random.fold_in(key, 0), shape)
        outer_key, train_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

        def body(carry, o):
            st, variables = carry
            k = jax.random.fold_in(outer_key, o)
            real_x = real_images[data_lib.sample_per_class(jax.random.fold_in(k, 0), index, n_real)]
            real_x = ctx.by_class(real_x)
            variables = objectives.refresh_batch_stats(
                variables, flat(real_x[:, :_BN_REAL_PER_CLASS]), model=model
            )
            expert_net = None
            if ctx.expert_features:
                expert_net = ctx.expert_variables(jax.random.fold_in(k, 2), experts)
            st, metrics = ctx.grad_and_update(
                loss_fn,
                st,
                variables,
                real_x,
                jax.random.fold_in(k, 1),
                expert_net,
                mi_features=mi_features,
            )
            if outer > 1:
                train = functools.partial(
                    train_on_synthetic,
                    images=st["images"],
                    labels=st["labels"],
                    key=jax.random.fold_in(train_key, o),
                    model=model,
                    epochs=inner_epochs,
                    batch_size=config.distill.batch_train,
                    lr=config.distill.lr_net,
                    strategy=strategy,
                )
                # The reference stops after the last image update without training the net.
                variables = lax.cond(o < outer - 1, train, lambda v: v, variables)
            return (st, variables), metrics

        (state, _), per_outer = lax.scan(body, (state, variables), jnp.arange(outer))
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), per_outer)
        metrics["skipped"] = jnp.sum(per_outer["skipped"])
        return state, {**metrics, "base_loss_outer": per_outer["base_loss"]}

    return dc_step


def check(config: Any) -> None:
    """DC/DSA's own checks: without explicit loops, the reference's per-IPC ones must exist."""
    d = config.distill
    if not (d.outer_loop and d.inner_loop):
        objectives.dc_loops(config.ipc)


# Zhao et al. 2021 (DC) and Zhao & Bilen 2021 (DSA): image SGD lr 0.1, momentum 0.5. The
# reference's DC starts from Gaussian noise (its --init default, kept by its table command) and
# matches without augmentation, evaluated 300 epochs without it; DSA starts from real images,
# matches with siamese DSA and evaluates DSA-trained models for 1000 epochs.
DC = methods.Method(
    name="dc",
    build=build,
    defaults={
        "distill.init": "noise",
        "distill.iterations": 1000,
        "distill.lr": 0.1,
        "distill.momentum": 0.5,
        "distill.dsa": False,
        "distill.eval_every": 500,
    },
    supports=frozenset({methods.EXPERT_FEATURES}),
    check=check,
)
# DC with distill.dsa on: the same step.
DSA = methods.Method(
    name="dsa",
    build=build,
    defaults={
        "distill.iterations": 1000,
        "distill.lr": 0.1,
        "distill.momentum": 0.5,
        "distill.dsa": True,
        "distill.eval_every": 500,
        "eval.dsa": True,
        "eval.epochs": 1000,
    },
    supports=frozenset({methods.EXPERT_FEATURES}),
    check=check,
)
