"""What every distillation step shares: the context a step builder gets, the MIM4DD term and
the guarded optax update (written once here for all base methods), and feature helpers.

- **MIM4DD add-on**: total = base + lambda * mi.mi_loss (= -sum_l w_l MI_l) over the blocks in
  ``mi.layers``; lambda = mi.weight ("absolute") or ``mi.relative_weight(g_base, g_mi,
  mi.weight)`` = mi.weight * |g_base| / |g_mi| on the image gradients ("relative": the weight is
  the ratio of the two pulls). The one ``mi.MIConfig`` (``StepContext.mi_config``) is built
  once per run and wraps the state's head params into ``mi.Heads``. The base method computes its
  loss and hands over what its MI features need (``carry``); the MI term then sees the synthetic
  images through those networks held fixed (real features carry no gradient), so the two image
  gradients come out separately and are logged (grad_norm_base/mi, grad_cos, grad_ratio). The
  heads have their own optax optimiser and maximise the bound. ``mi.weight == 0`` skips the MI
  code at trace time and the MI term consumes no random numbers, so the base method is
  reproduced exactly.
- **Numerical guard**: a step whose loss, any gradient or any updated value is not finite,
  or whose learned MTT lr is not positive, leaves the state unchanged (metric "skipped" = 1);
  ``distill.run`` stops after ``guard.max_consecutive`` in a row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from mim4dd_jax import augment as augment_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax import experts as experts_lib
from mim4dd_jax import mi, objectives, sharding
from mim4dd_jax import state as state_lib
from mim4dd_jax.errors import ConfigError
from mim4dd_jax.state import State

Metrics = dict[str, jax.Array]
# A base method's step body: (state, key, real_images [N, H, W, Ch], class_index, experts or
# None) -> (state, metrics); ``steps.make_step`` jits it and fixes the output shardings.
BaseStep = Callable[..., tuple[State, Metrics]]
# The base loss a method hands to StepContext.grad_and_update:
# (learned parts, state, *args) -> (base loss, (metrics, carry)); carry: the arrays its
# MIFeaturesFn needs (networks, real batch or features, DSA key), or None without MI.
BaseLossFn = Callable[..., tuple[jax.Array, tuple[Metrics, Any]]]
# The method's MI features: (synthetic images [C * ipc, H, W, Ch], carry) -> (real blocks,
# synthetic blocks), per model block [C * n_real, ...] and [C * ipc, ...], class-major.
MIFeaturesFn = Callable[[jax.Array, Any], tuple[Sequence[jax.Array], Sequence[jax.Array]]]

# Keeps the ratios finite when a gradient is exactly zero.
_TINY = 1e-30


class _MIGrads(NamedTuple):
    """The MI term of one step: its value (a loss), mi.mi_loss's aux, its gradients
    {"images", "heads"} and the norm of the part of the image gradient that comes through the
    unroll (``mi.through_unroll`` only, else None)."""

    value: jax.Array
    aux: Any
    grads: State
    unroll_norm: jax.Array | None


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
    mi_config: mi.MIConfig  # state.mi_config(config.mi): built once, passed down
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
        return state_lib.mi_weight(self.config)

    def by_class(self, x: Any) -> Any:
        """``x`` [C, ...] split over the mesh along its class axis.

        DM and DC work class by class, so the class axis is the one to split: real [C, n, ...]
        and synthetic [C, ipc, ...] batches alike, each device whole classes. (Splitting n
        instead would leave the synthetic side replicated, and the networks see the batches
        flattened class-major, so XLA would first gather the real batch to every device.)
        """
        return sharding.constrain(x, mesh=self.mesh, axis=0)

    @property
    def expert_features(self) -> bool:
        """Whether the MI term takes its features from expert checkpoints (``mi.feature_nets``)."""
        return state_lib.mi_features_from_experts(self.config)

    def expert_variables(self, key: jax.Array, experts: jax.Array) -> dict[str, Any]:
        """{"params"} of one expert checkpoint [E, T+1, P] drawn with ``key`` at a trained epoch
        (``experts.draw_checkpoint``): the MI term's trained feature network for this step."""
        if experts is None:
            raise ConfigError(
                "mi.feature_nets='experts' needs expert trajectories; valid: "
                "--config.mtt.experts_dir=<the workdir of an experts run>"
            )
        unravel, _ = experts_lib.unravelers(self.model, self.shape)
        return {"params": unravel(experts_lib.draw_checkpoint(key, experts))}

    def mi_labels(self, st: State) -> jax.Array:
        """The synthetic side's labels for the MI positives: the class ids [C * ipc], or with
        ``mi.mask="soft"`` and learned soft labels (MTT) their probabilities [C * ipc, C]
        (constants: the MI term does not train the labels)."""
        labels = st["labels"]
        if self.config.mi.mask == "soft" and labels.ndim == 2:
            return jax.nn.softmax(lax.stop_gradient(labels), axis=-1)
        return self.syn_classes

    def _base_and_mi_grads(
        self,
        base_fn: BaseLossFn,
        mi_features: MIFeaturesFn | None,
        learned: State,
        st: State,
        args: tuple[Any, ...],
        keep: jax.Array,
    ) -> tuple[jax.Array, Metrics, State, _MIGrads]:
        """(base, aux, grads of the base loss by learned part, the MI term's value and
        gradients): the two gradients apart, through the unroll or with the networks held fixed
        (see :meth:`grad_and_update`). keep: [N, 1, 1, 1] 1 for the images that learn."""
        if mi_features is None:
            raise ConfigError(
                f"method {self.config.method!r} does not provide MI features; valid: "
                "mi.weight=0 for it"
            )
        syn_labels, banks = self.mi_labels(st), st.get("banks")

        def mi_term(images: jax.Array, heads: Any, carry: Any) -> tuple[jax.Array, Any]:
            real_blocks, syn_blocks = mi_features(images, carry)
            if self.config.mi.objective == "cmidd":
                # The positive control reads the synthetic side only; XLA drops the real
                # features' unused computation.
                return mi.conditional_loss(
                    [syn_blocks[layer] for layer in self.layers],
                    self.syn_classes,
                    num_classes=self.num_classes,
                    reduce=self.mi_config.reduce,
                    layer_weights=self.mi_config.layer_weights,
                )
            return mi.mi_loss(
                mi.Heads(heads, self.mi_config),
                real=[lax.stop_gradient(real_blocks[layer]) for layer in self.layers],
                syn=[syn_blocks[layer] for layer in self.layers],
                real_labels=self.real_labels,
                syn_labels=syn_labels,
                banks=banks,
            )

        if not self.config.mi.through_unroll:
            (base, (aux, carry)), grads = jax.value_and_grad(base_fn, has_aux=True)(
                learned, st, *args
            )
            # The networks in carry are held fixed: the MI gradient reaches the images through
            # their features only.
            carry = lax.stop_gradient(carry)
            mi_in = {"images": learned["images"], "heads": learned["heads"]}
            (value, aux_mi), g_mi = jax.value_and_grad(
                lambda x: mi_term(x["images"], x["heads"], carry), has_aux=True
            )(mi_in)
            return base, aux, grads, _MIGrads(value, aux_mi, g_mi, None)
        base, aux, value, aux_mi, grads, g_mi, carry = _joint_grads(
            base_fn, mi_term, learned, st, args
        )
        # Diagnostic: how much of the MI pull comes through the unroll, i.e. differs from the
        # pull with the networks held fixed (one more pass over the features).
        fixed = lax.stop_gradient(carry)
        g_fixed = jax.grad(lambda x: mi_term(x, learned["heads"], fixed)[0])(learned["images"])
        g_through = (g_mi["images"] - g_fixed) * keep
        unroll_norm = jnp.sqrt(jnp.sum(g_through * g_through))
        return base, aux, grads, _MIGrads(value, aux_mi, g_mi, unroll_norm)

    def _weigh(
        self,
        term: _MIGrads,
        grads: State,
        base: jax.Array,
        g_base: jax.Array,
        norm_base: jax.Array,
        keep: jax.Array,
    ) -> tuple[State, jax.Array, Metrics]:
        """(grads with lambda * g_mi added to the images and the heads' gradient, the total
        loss, the MI metrics): lambda = mi.weight, or (relative) the ratio of pulls."""
        g_mi_images = term.grads["images"] * keep
        norm_mi = jnp.sqrt(jnp.sum(g_mi_images * g_mi_images))
        if self.config.mi.weight_mode == "relative":
            # The weight is a ratio of pulls; lambda is a constant of this step.
            lam = mi.relative_weight(g_base, g_mi_images, self.weight)
            head_scale = 1.0  # the heads maximise the bound itself, at their own lr
        else:
            lam = jnp.float32(self.weight)
            head_scale = lam
        grads = dict(grads)
        grads["images"] = grads["images"] + lam * term.grads["images"]
        grads["heads"] = jax.tree.map(lambda g: head_scale * g, term.grads["heads"])
        total = base + lam * term.value
        dot = jnp.sum(g_base * g_mi_images)
        metrics: Metrics = {
            "mi": term.aux["mi"],
            "grad_norm_mi": lam * norm_mi,
            "grad_cos": dot / (norm_base * norm_mi + _TINY),
            "grad_ratio": lam * norm_mi / (norm_base + _TINY),
            "mi_lambda": lam,
        }
        if term.unroll_norm is not None:
            metrics["mi_unroll_share"] = term.unroll_norm / (norm_mi + _TINY)
        return grads, total, metrics

    def grad_and_update(
        self,
        base_fn: BaseLossFn,
        st: State,
        *args: Any,
        mi_features: MIFeaturesFn | None = None,
    ) -> tuple[State, Metrics]:
        """The gradients of the base loss and of the MI term, their combination, the optax
        updates of the learned parts, the growth mask and the numerical guard.

        ``base_fn(learned, st, *args) -> (base, (metrics, carry))``; with ``mi.weight > 0``,
        ``mi_features(images, carry) -> (real_blocks, syn_blocks)`` gives the per-block features
        of the real batch [C * n_real, ...] (class-major, no gradient) and of the synthetic
        images [C * ipc, ...] through the network(s) the base loss used, held fixed (``carry``
        arrives stop-gradient); with ``mi.through_unroll`` (MTT) ``carry`` keeps its gradient,
        so the MI term also pulls on the images through the networks the base loss built from
        them (the student's unroll), see :func:`_joint_grads`. The two image gradients are
        taken separately (:meth:`_base_and_mi_grads`), so they can be logged and weighted
        (:meth:`_weigh`): ``mi.weight_mode="absolute"`` adds weight * g_mi, "relative" adds
        lambda * g_mi with lambda = weight * |g_base| / |g_mi| (so weight is the ratio of the
        two pulls). Only the images and the heads get MI gradient (never MTT's lr or labels).
        Metrics: grad_norm_base, grad_norm_mi (after the weight), grad_cos (of the two image
        gradients), grad_ratio (= grad_norm_mi / grad_norm_base) and mi_lambda; with
        ``mi.through_unroll`` also mi_unroll_share, |g_mi - g_mi with the networks held fixed| /
        |g_mi|: the part of the MI pull that comes through the unroll.
        """
        parts, txs = self.parts, self.txs
        learned = {name: st[name] for name in parts}
        keep = st["trainable"].astype(jnp.float32).reshape(-1, *([1] * len(self.shape)))
        new, opt = dict(st), dict(st["opt_state"])
        if not self.weight:
            (base, (aux, _)), grads = jax.value_and_grad(base_fn, has_aux=True)(learned, st, *args)
            term = None
        else:
            base, aux, grads, term = self._base_and_mi_grads(
                base_fn, mi_features, learned, st, args, keep
            )
        g_base = grads["images"] * keep
        norm_base = jnp.sqrt(jnp.sum(g_base * g_base))
        metrics: Metrics = {"base_loss": base, **aux, "grad_norm_base": norm_base}
        total = base
        if term is not None:
            grads, total, mi_metrics = self._weigh(term, grads, base, g_base, norm_base, keep)
            metrics.update(mi_metrics)
            if st.get("banks") is not None:
                new["banks"] = tuple(
                    mi.update_memory_bank(
                        bank, z, self.real_labels, momentum=self.config.mi.bank_momentum
                    )
                    for bank, z in zip(st["banks"], term.aux["real_embeddings"], strict=True)
                )
        for name in parts:
            updates, opt[name] = txs[name].update(grads[name], opt[name], st[name])
            new[name] = optax.apply_updates(st[name], updates)
        new["images"] = jnp.where(keep > 0, new["images"], st["images"])
        new["opt_state"] = opt
        # A finite gradient can still overflow into a non-finite update (a huge lr): reject it too.
        ok = jnp.isfinite(total) & _all_finite(grads) & _all_finite([new[n] for n in parts])
        if "syn_lr" in parts:
            # The reference lets a learned lr cross zero; a student that ascends its loss is
            # never what is meant, so such a step is rejected like a non-finite one.
            ok &= new["syn_lr"] > 0
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, st)
        return new, {"loss": total, **metrics, "skipped": (~ok).astype(jnp.int32)}


def _joint_grads(
    base_fn: BaseLossFn,
    mi_term: Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]],
    learned: State,
    st: State,
    args: tuple[Any, ...],
) -> tuple[jax.Array, Metrics, jax.Array, Any, State, State, Any]:
    """The base and MI gradients when the MI term differentiates through the base loss's
    networks too (``mi.through_unroll``: MTT's student is a function of the images).

    One forward pass (the unroll runs once) and one batched backward pass: ``jax.vjp`` of
    (base, mi) pulled back with the cotangents (1, 0) and (0, 1) under ``vmap``. The two image
    gradients stay apart for the relative weight and the diagnostics. Returns (base, aux,
    mi_value, mi_aux, grads of the base loss by learned part, {"images", "heads"} of the MI
    term, the base loss's carry); the MI gradient on MTT's lr and labels is dropped, as without
    ``through_unroll``.
    """

    def joint(x: State) -> tuple[tuple[jax.Array, jax.Array], tuple[Metrics, Any, Any]]:
        base, (aux, carry) = base_fn(x, st, *args)
        mi_value, mi_aux = mi_term(x["images"], x["heads"], carry)
        return (base, mi_value), (aux, mi_aux, carry)

    (base, mi_value), pull, (aux, mi_aux, carry) = jax.vjp(joint, learned, has_aux=True)
    eye = jnp.eye(2, dtype=base.dtype)
    (both,) = jax.vmap(pull)((eye[:, 0], eye[:, 1]))
    grads = jax.tree.map(lambda g: g[0], both)
    g_mi = {name: jax.tree.map(lambda g: g[1], both[name]) for name in ("images", "heads")}
    return base, aux, mi_value, mi_aux, grads, g_mi, carry


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
