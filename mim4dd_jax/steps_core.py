"""What every distillation step shares: the context a step builder gets, the MIM4DD term and
the guarded optax update (written once here for all base methods), and feature helpers.

- **MIM4DD add-on**: total = base + mi.weight * mi.mi_loss (= -sum_l w_l MI_l) over the blocks
  in ``mi.layers``; real features carry no gradient. Each base method chooses which networks
  give the real and the synthetic features (see its module). The heads have their own optax
  optimiser and descend the same total, i.e. they maximise the MI bound. ``mi.weight == 0``
  skips the MI code at trace time and the MI term consumes no random numbers, so the base
  method is reproduced exactly.
- **Numerical guard**: a step whose loss, any gradient or any updated value is not finite,
  or whose learned MTT lr is not positive, leaves the state unchanged (metric "skipped" = 1);
  ``distill.run`` stops after ``guard.max_consecutive`` in a row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from mim4dd_jax import augment as augment_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax import mi, objectives, sharding
from mim4dd_jax.state import State

Metrics = dict[str, jax.Array]
# A base method's step body: (state, key, real_images [N, H, W, Ch], class_index, experts or
# None) -> (state, metrics); ``steps.make_step`` jits it and fixes the output shardings.
BaseStep = Callable[..., tuple[State, Metrics]]
# The loss a base method hands to StepContext.grad_and_update:
# (learned parts, state, *args) -> (total, metrics), usually ending in StepContext.with_mi.
LossFn = Callable[..., tuple[jax.Array, Metrics]]

# Metrics key that carries the real embeddings from the loss to the memory-bank update.
_BANK_UPDATE = "_bank_update"


@dataclasses.dataclass(frozen=True, eq=False)
class StepContext:
    """Everything a step builder needs, resolved once from the config and the dataset.

    Shapes: the synthetic images are [num_classes * ipc, *shape] (class-major); a real batch
    drawn with ``data.sample_per_class(key, index, n_real)`` is [num_classes, n_real, *shape].
    """

    config: Any
    dataset: data_lib.Dataset  # only its metadata and label counts are read
    model: nn.Module  # steps.step_model: the network the step differentiates through
    strategy: str | None  # siamese DSA strategy while matching (None: off)
    n_real: int  # real images per class per draw
    chunk: int  # steps.real_chunk: slices of the real forward pass (0 = one pass)
    mesh: Mesh
    layers: tuple[int, ...]  # the model blocks with an MI head
    mi_opts: dict[str, Any]  # state.mi_options(config.mi)
    txs: dict[str, optax.GradientTransformation]  # state.optimizers(config)
    parts: tuple[str, ...]  # state.learned_parts(config)
    # Made once, outside the trace, so every step sees the same constants.
    real_labels: jax.Array  # [C * n_real] int32, the class of each flattened real batch row
    syn_classes: jax.Array  # [C * ipc] int32, the class of each synthetic image

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def ipc(self) -> int:
        return self.config.ipc

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.image_shape)

    @property
    def weight(self) -> float:
        return float(self.config.mi.weight)

    def by_class(self, x: Any) -> Any:
        """``x`` [C, ...] split over the mesh along its class axis.

        DM and DC work class by class, so the class axis is the one to split: real [C, n, ...]
        and synthetic [C, ipc, ...] batches alike, each device whole classes. (Splitting n
        instead would leave the synthetic side replicated, and the networks see the batches
        flattened class-major, so XLA would first gather the real batch to every device.)
        """
        return sharding.constrain(x, mesh=self.mesh, axis=0)

    def with_mi(
        self,
        base: jax.Array,
        learned: State | None,
        st: State | None,
        real_blocks: Sequence[jax.Array],
        syn_blocks: Sequence[jax.Array],
    ) -> tuple[jax.Array, Metrics]:
        """base + weight * MI loss of the heads (and memory banks) in ``learned``/``st``.

        real_blocks: per-block features of the real batch [C * n_real, ...] (class-major);
        syn_blocks: of the synthetic set [C * ipc, ...]. With ``mi.weight == 0`` pass
        ``(None, None, (), ())``: the MI code is skipped at trace time."""
        if not self.weight:
            return base, {"base_loss": base}
        banks = st.get("banks")
        mi_value, aux = mi.mi_loss(
            learned.get("heads", st["heads"]),
            [lax.stop_gradient(real_blocks[layer]) for layer in self.layers],
            [syn_blocks[layer] for layer in self.layers],
            self.real_labels,
            self.syn_classes,
            banks=banks,
            **self.mi_opts,
        )
        metrics = {"base_loss": base, "mi": aux["mi"]}
        if banks is not None:
            metrics[_BANK_UPDATE] = aux["real_embeddings"]
        return base + self.weight * mi_value, metrics

    def grad_and_update(self, loss_fn: LossFn, st: State, *args: Any) -> tuple[State, Metrics]:
        """value_and_grad of ``loss_fn(learned, st, *args)`` over the learned parts, their optax
        updates, the growth mask, and the numerical guard."""
        parts, txs, real_labels = self.parts, self.txs, self.real_labels
        learned = {name: st[name] for name in parts}
        (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(learned, st, *args)
        new, opt = dict(st), dict(st["opt_state"])
        if _BANK_UPDATE in aux:
            aux = dict(aux)
            new["banks"] = tuple(
                mi.update_memory_bank(bank, z, real_labels, momentum=self.config.mi.bank_momentum)
                for bank, z in zip(st["banks"], aux.pop(_BANK_UPDATE), strict=True)
            )
        for name in parts:
            updates, opt[name] = txs[name].update(grads[name], opt[name], st[name])
            new[name] = optax.apply_updates(st[name], updates)
        keep = st["trainable"].reshape(-1, *([1] * len(self.shape)))
        new["images"] = jnp.where(keep, new["images"], st["images"])
        new["opt_state"] = opt
        # A finite gradient can still overflow into a non-finite update (a huge lr): reject it too.
        ok = jnp.isfinite(total) & _all_finite(grads) & _all_finite([new[n] for n in parts])
        if "syn_lr" in parts:
            # The reference lets a learned lr cross zero; a student that ascends its loss is
            # never what is meant, so such a step is rejected like a non-finite one.
            ok &= new["syn_lr"] > 0
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, st)
        return new, {"loss": total, **aux, "skipped": (~ok).astype(jnp.int32)}


# A step builder: StepContext -> the method's step body (registered in mim4dd_jax.steps).
Builder = Callable[[StepContext], BaseStep]


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def augment_classes(keys: jax.Array, x: jax.Array, strategy: str | None) -> jax.Array:
    """Siamese DSA of x [C, n, H, W, Ch], class c with keys[c] (as objectives.dc_loss does)."""
    if strategy is None:
        return x
    one = lambda k, xc: augment_lib.augment(k, xc, strategy=strategy, siamese=True)
    return jax.vmap(one)(keys, x)


def flat(x: jax.Array) -> jax.Array:
    """[C, n, ...] -> [C * n, ...] (class-major)."""
    return x.reshape(-1, *x.shape[2:])


def siamese_blocks(
    model: nn.Module,
    real_variables: Any,
    syn_variables: Any,
    real_x: jax.Array,
    syn_x: jax.Array,
    aug_key: jax.Array,
    strategy: str | None,
    real_chunk: int,
) -> tuple[Sequence[jax.Array], Sequence[jax.Array]]:
    """Per-block features of real [C, n, ...] and synthetic [C, ipc, ...] batches (flattened
    class-major) for the MI term: class c of both under the siamese DSA view of
    ``split(aug_key, C)[c]``, the real batch through ``real_variables`` (no gradient, in slices
    of ~real_chunk images, see ``steps.real_chunk``), the synthetic one through
    ``syn_variables``."""
    keys = jax.random.split(aug_key, real_x.shape[0])
    real_a = augment_classes(keys, lax.stop_gradient(real_x), strategy)
    syn_a = augment_classes(keys, syn_x, strategy)
    real_out = objectives.features_in_slices(model, real_variables, real_a, real_chunk)
    syn_out = model.apply(syn_variables, flat(syn_a), train=False, features=True)
    return real_out.blocks, syn_out.blocks


def warn_uneven(what: str, count: int, mesh: Mesh, consequence: str) -> None:
    """Logs a warning when ``count`` does not divide over the mesh's devices."""
    d = sharding.size(mesh)
    if d > 1 and count % d:
        logging.warning(
            "%s=%d does not divide over the %d devices: %s (same results); a multiple of %d "
            "splits evenly",
            what,
            count,
            d,
            consequence,
            d,
        )
