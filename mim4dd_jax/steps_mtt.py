"""The MTT step (Cazenavette et al., 2022): trajectory matching against expert checkpoints.

``mtt.num_trajectories`` (expert, start epoch t) pairs per iteration; the student starts at
theta*_t, takes ``mtt.syn_steps`` SGD steps on synthetic minibatches with per-sample DSA
(``objectives.student_unroll``, a ``lax.scan``, rematerialised per step unless ``mtt.remat`` is
off), and the loss is ``objectives.mtt_loss`` against theta*_{t+expert_epochs}, averaged over the
pairs (vmapped). The student lr ``syn_lr`` is learned as the reference learns it: SGD(mtt.lr_lr,
momentum 0.5) on the lr itself. The reference does not keep it positive; here a step that would
make it <= 0 is rejected by the numerical guard like a non-finite one.

With MI, the synthetic features come from the student after its unroll (on all synthetic
images) and the real ones from the expert at t + expert_epochs (on a fresh class-balanced real
batch, the same siamese views per class): the paper's two networks, one trained on the real
data and one on the synthetic set. By default the student is held fixed for the MI term, so
the MI gradient reaches the images through their features only; ``mi.through_unroll`` lets it
also flow back through the student's unroll (one forward unroll, one batched backward pass:
``steps_core._joint_grads``). Either way it never trains the lr or the labels.
``mi.networks = "shared"`` sends the real batch through the student instead.

Randomness: ``fold_in(key, 0)`` draws the (expert, start) pairs, ``fold_in(key, 1)`` the
student minibatches and DSA (split per pair), ``fold_in(key, 2)`` the MI real batch and
``fold_in(key, 3)`` its DSA views.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from mim4dd_jax import data as data_lib
from mim4dd_jax import experts as experts_lib
from mim4dd_jax import inner, methods, objectives, sharding
from mim4dd_jax.choices import REMAT
from mim4dd_jax.errors import ConfigError, check_choice
from mim4dd_jax.state import State
from mim4dd_jax.steps_core import BaseStep, StepContext, siamese_blocks, warn_uneven


def resolve_remat(value: str, backend: str | None = None) -> bool:
    """``mtt.remat``: "on", "off", or "auto" = on except on GPU/TPU. On CPU, rematerialising
    each student step is both smaller and faster (BENCHMARKS.md); accelerators have the memory."""
    check_choice("mtt.remat", value, REMAT)
    if value == "auto":
        return (backend or jax.default_backend()) not in ("gpu", "tpu")
    return value == "on"


def build(ctx: StepContext) -> BaseStep:
    """The MTT step body (the builder of :data:`METHOD`).

    The k (expert, start) pairs are vmapped; on a mesh that vmapped axis is split over the
    devices, so k = device count runs k unrolls in the wall time of one. The step's ``experts``
    argument: [E, T+1, P] float32 flattened expert trajectories (``experts.load``)."""
    config, model, strategy, mesh = ctx.config, ctx.model, ctx.strategy, ctx.mesh
    num_classes, ipc, shape, n_real = ctx.num_classes, ctx.ipc, ctx.shape, ctx.n_real
    m = config.mtt
    collections = jax.eval_shape(lambda: inner.init_variables(model, jax.random.key(0), shape))
    if set(collections) != {"params"}:
        raise ConfigError(
            f"mtt needs a model without batch statistics; model.norm={config.model.norm!r} has "
            f"{sorted(set(collections) - {'params'})}; valid: instance, layer, group or none"
        )
    unravel, _ = experts_lib.unravelers(model, shape)
    remat = resolve_remat(m.remat)
    batch_syn = int(m.batch_syn) or num_classes * ipc
    k_pairs = int(m.num_trajectories)
    shared = config.mi.networks == "shared"
    warn_uneven("mtt.num_trajectories", k_pairs, mesh, "XLA pads it, some devices idle")

    def loss_fn(learned, st, starts, targets, unroll_keys, real_x, aug_key):
        images = learned["images"]
        lr = learned.get("syn_lr", st["syn_lr"])
        labels = learned.get("labels", st["labels"])
        syn_y = jax.nn.softmax(labels, axis=-1) if labels.ndim == 2 else labels

        def one(start, target, key):
            start_params = unravel(start)
            final = objectives.student_unroll(
                start_params,
                images,
                syn_y,
                lr,
                key,
                model=model,
                syn_steps=int(m.syn_steps),
                batch_syn=batch_syn,
                dsa_strategy=strategy,
                remat=remat,
            )
            return objectives.mtt_loss(final, start_params, unravel(target)), final

        losses, finals = jax.vmap(one)(starts, targets, unroll_keys)
        base = jnp.mean(losses)
        carry = None
        if real_x is not None:
            student = jax.tree.map(lambda a: a[0], finals)
            real_net = student if shared else unravel(targets[0])
            carry = (student, real_net, real_x, aug_key)
        return base, ({"syn_lr": lr}, carry)

    def mi_features(images, carry):
        # carry arrives stop-gradient unless mi.through_unroll (then the student is a function
        # of the images and the MI gradient flows back through its unroll too).
        student, real_net, real_x, aug_key = carry
        return siamese_blocks(
            model,
            {"params": real_net},
            {"params": student},
            real_x,
            images.reshape(num_classes, ipc, *shape),
            aug_key,
            strategy,
            ctx.chunk,
        )

    def mtt_step(state: State, key: jax.Array, real_images: jax.Array, index: Any, experts):
        chex.assert_rank(experts, 3)
        pair_key, unroll_key, real_key, aug_key = (jax.random.fold_in(key, i) for i in range(4))
        e = jax.random.randint(jax.random.fold_in(pair_key, 0), (k_pairs,), 0, experts.shape[0])
        t = jax.random.randint(jax.random.fold_in(pair_key, 1), (k_pairs,), 0, m.max_start_epoch)
        starts, targets = experts[e, t], experts[e, t + m.expert_epochs]
        unroll_keys = jax.random.split(unroll_key, k_pairs)
        starts, targets, unroll_keys = sharding.constrain((starts, targets, unroll_keys), mesh, 0)
        real_x = None
        if ctx.weight:
            real_x = real_images[data_lib.sample_per_class(real_key, index, n_real)]
            real_x = sharding.constrain(real_x, mesh, 0)
        return ctx.grad_and_update(
            loss_fn,
            state,
            starts,
            targets,
            unroll_keys,
            real_x,
            aug_key,
            mi_features=mi_features,
        )

    return mtt_step


def learned(config: Any) -> tuple[str, ...]:
    """MTT's learned parts beyond the images (and heads): the student lr, the soft labels."""
    m = config.mtt
    return (*(("syn_lr",) if m.learn_lr else ()), *(("labels",) if m.learn_labels else ()))


def expert_epochs(config: Any) -> int:
    """Epochs an expert needs: start epochs t < max_start_epoch and targets t + expert_epochs."""
    return int(config.mtt.max_start_epoch) - 1 + int(config.mtt.expert_epochs)


# Cazenavette et al. 2022: SGD momentum 0.5 on the pixels; the student and the evaluation
# models train with DSA; the student lr starts at the experts' (mtt.lr_teacher) and the
# evaluation uses the learned one, 1000 epochs.
METHOD = methods.Method(
    name="mtt",
    build=build,
    defaults={
        "distill.iterations": 5000,
        "distill.lr": 1000.0,
        "distill.momentum": 0.5,
        "distill.dsa": True,
        "distill.eval_every": 1000,
        "eval.dsa": True,
        "eval.epochs": 1000,
    },
    learned=learned,
    lr=lambda config: config.mtt.lr_teacher,
    needs_experts=True,
    expert_epochs=expert_epochs,
    supports=frozenset({methods.THROUGH_UNROLL, methods.LEARN_LABELS}),
)
