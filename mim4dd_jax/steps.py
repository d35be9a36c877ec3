"""The distillation step: the built-in methods' registration (``methods``: one record per
method) and :func:`make_step`, which turns the configured method into one jitted, donated
function.

A builder takes a :class:`steps_core.StepContext` and returns the method's step body
``(state, key, real_images, class_index, experts) -> (state, metrics)``; it writes the base
loss (returning what its MI features need) and the function that gives those features, and
hands both to ``ctx.grad_and_update``, so the MIM4DD term, its weighting and diagnostics, the
optax updates, the growth mask and the numerical guard are the same for every method. The built-in methods live one family per module (``steps_dm``, ``steps_dc``,
``steps_mtt``, each with its ``methods.Method`` record); a new one is one more record,
registered with ``methods.register``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mim4dd_jax import augment as augment_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax import methods, models, objectives, sharding, steps_dc, steps_dm, steps_mtt
from mim4dd_jax import state as state_lib
from mim4dd_jax.state import State
from mim4dd_jax.steps_core import Metrics, StepContext

StepFn = Callable[..., tuple[State, Metrics]]

# The built-in methods, registered here in this order (the order of the names in messages and
# in ``config.methods()``); user code registers its own with ``methods.register``.
BUILT_IN = (steps_dm.METHOD, steps_dc.DC, steps_dc.DSA, steps_mtt.METHOD)
for _method in BUILT_IN:
    methods.register(_method)


def matching_strategy(config: Any, dataset_name: str) -> str | None:
    """The DSA strategy used while distilling (siamese for DM/DC, per-sample in the MTT
    student), or None (``distill.dsa`` off)."""
    if not config.distill.dsa:
        return None
    strategy = augment_lib.strategy_for_dataset(config.dsa.strategy, dataset_name)
    return None if strategy == "none" else strategy


def step_model(config: Any, num_classes: int) -> nn.Module:
    """The network the step differentiates through: ``config.model``, with the method's preferred
    conv on CPU under ``conv_impl="auto"`` (``Method.conv``: DM's "hybrid"; methods with loops,
    DC's inner training and the MTT student, keep im2col)."""
    model = models.build_model(config, num_classes)
    conv = methods.get(config.method).conv
    return model if conv is None else models.prefer_conv(model, config, conv)


def real_chunk(config: Any) -> int:
    """``distill.real_chunk`` resolved: -1 is 64 on CPU (measured best of 20-320 for the DM step,
    BENCHMARKS.md) and 0 (one pass) on accelerators, where big batches are the fast case."""
    chunk = int(config.distill.real_chunk)
    return objectives.default_real_chunk() if chunk == -1 else chunk


def _real_batch(config: Any, counts: np.ndarray) -> int:
    # The reference takes the first n of a class permutation, i.e. the whole class when smaller.
    return int(min(config.distill.batch_real, int(np.min(counts))))


def make_context(config: Any, dataset: data_lib.Dataset, mesh: Mesh) -> StepContext:
    """The :class:`StepContext` of ``config`` on ``dataset`` (metadata and label counts only)."""
    num_classes, shape = dataset.num_classes, dataset.image_shape
    model = step_model(config, num_classes)
    n_real = _real_batch(config, np.bincount(dataset.train_labels, minlength=num_classes))
    return StepContext(
        config=config,
        dataset=dataset,
        model=model,
        strategy=matching_strategy(config, dataset.name),
        n_real=n_real,
        chunk=real_chunk(config),
        mesh=mesh,
        layers=state_lib.mi_layers(config, model, shape),
        mi_config=state_lib.mi_config(config.mi),
        txs=state_lib.optimizers(config),
        parts=state_lib.learned_parts(config),
        real_labels=objectives.class_labels(num_classes, n_real),
        syn_classes=objectives.class_labels(num_classes, config.ipc),
    )


def make_step(config: Any, dataset: data_lib.Dataset, mesh: Mesh | None = None) -> StepFn:
    """The jitted ``step(state, key, real_images, class_index, experts=None) -> (state, metrics)``.

    real_images: [N, H, W, Ch] float32, the train split in model space (on device);
    class_index: ``data.class_index`` of its labels; experts (MTT only): [E, T+1, P] float32
    flattened expert trajectories (``experts.load``). The state is donated. metrics: "loss"
    (the total), "base_loss" (DC: means over the outer steps), "skipped" (1 if the numerical
    guard rejected the update), "grad_norm_base" (of the image gradient), plus "mi" [L] (nats
    per MI layer), "grad_norm_mi", "grad_cos", "grad_ratio" and "mi_lambda" when
    ``mi.weight > 0`` (``steps_core.StepContext.grad_and_update``); DC/DSA add "base_loss_outer" [outer_loop]; MTT adds "syn_lr". Only ``dataset``'s metadata
    and label counts are read here.

    Sharding (``mesh``, default ``sharding.mesh_from_config(config)``): DM and DC split their
    real [C, n, ...] and synthetic [C, ipc, ...] batches by class, MTT its (expert, start)
    pairs, over all mesh devices. A count the devices do not divide gives the same results
    without the split's benefit: XLA pads MTT's pairs (devices idle) and, for C, gathers the
    real batch and runs DM/DC replicated (BENCHMARKS.md). The state leaves the step
    with ``state.state_shardings`` (replicated by default), the metrics replicated; XLA inserts
    the collectives (the image gradient gathered from the class shards, the gradient summed
    over pairs). Place the inputs with ``state.place_state`` (and the real images / trajectories
    replicated) as ``distill.run`` does. One device: no constraint at all.
    """
    builder = methods.get(config.method).build
    mesh = sharding.mesh_from_config(config) if mesh is None else mesh
    ctx = make_context(config, dataset, mesh)
    state_lib.check_plan(config, dataset.num_classes, mesh)
    base_step = builder(ctx)
    num_classes, ipc, shape = ctx.num_classes, ctx.ipc, ctx.shape

    def step(
        state: State,
        key: jax.Array,
        real_images: jax.Array,
        index: Any,
        experts: jax.Array | None = None,
    ):
        chex.assert_shape(state["images"], (num_classes * ipc, *shape))
        chex.assert_shape(real_images, (None, *shape))
        chex.assert_type(real_images, jnp.float32)
        new, metrics = base_step(state, key, real_images, index, experts)
        # Fixed output layouts: the next call sees the input shardings it was compiled for, and
        # every process can read the metrics.
        new = sharding.constrain_like(new, state_lib.state_shardings(new, mesh, config))
        return new, sharding.constrain(metrics, mesh, None)

    return jax.jit(step, donate_argnums=(0,))
