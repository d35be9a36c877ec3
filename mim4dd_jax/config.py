"""Building and checking ml_collections configs.

Config files in ``configs/`` are thin: they name a dataset, hold its per-method/IPC hyperparameters as
data, and call :func:`build`. The argument string of ``get_config(arg)`` is a comma-separated list such
as ``"random,ipc10"`` or ``"herding,ipc1,local"``: a method, ``ipc<k>``, and optional flags (``local``
= a small variant that runs in minutes on a laptop CPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from mim4dd_jax import methods as methods_lib
from mim4dd_jax.errors import ConfigError, check_choice

# The methods that are not distillation methods, with the run mode that executes each; every
# registered distillation method (``methods``) runs in mode "distill".
OTHER_METHODS = {"random": "coreset", "herding": "coreset"}
OTHER_MODES = {"experts": "experts", "evaluate": "evaluate"}
ARG_FLAGS = ("local",)
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# config.precision: jax.default_matmul_precision for float32 matmuls and convolutions, applied
# by the CLI around the whole run (distillation, experts, evaluation). Gradient matching and MTT
# differentiate twice, so the default is full float32 ("float32") even where the backend's
# default is lower (TF32 on Ampere and later GPUs, bfloat16 passes on TPU). "tensorfloat32",
# "bfloat16" and "default" (the backend's own) trade accuracy for speed on GPU/TPU. On CPU all
# four compute in float32: a ConvNet gradient measured bitwise equal and as fast under each.
PRECISIONS = ("float32", "tensorfloat32", "bfloat16", "default")


def methods() -> dict[str, str]:
    """Every method name -> the run mode that executes it: the coreset baselines, the registered
    distillation methods (``methods.names()``; the built-ins are registered by ``steps``), the
    experts and evaluate modes."""
    from mim4dd_jax import steps  # noqa: F401  (registers the built-in methods)

    distill = {name: "distill" for name in methods_lib.names()}
    return {**OTHER_METHODS, **distill, **OTHER_MODES}


def method_defaults(method: str) -> dict[str, Any]:
    """A distillation method's published, dataset-independent choices (``Method.defaults``:
    image optimiser, iterations, whether matching uses DSA, the evaluation protocol) as dotted
    overrides; {} for the other methods. Config files override them per (method, ipc)."""
    if methods().get(method) != "distill":
        return {}
    return dict(methods_lib.get(method).defaults)


# ",local": a small variant of each mode, applied after the config file's own LOCAL (which holds
# the coreset fields). Distillation: 20 iterations with 64 real images per class and one model
# trained 20 epochs on 100 test images per class, i.e. a smoke test of the pipeline, not a result.
LOCAL_BY_MODE: dict[str, dict[str, Any]] = {
    "distill": {
        "distill.iterations": 20,
        "distill.batch_real": 64,
        "distill.eval_every": 0,
        "distill.log_every": 1,
        "eval.epochs": 20,
        "eval.num_models": 1,
        "data.test_per_class": 100,
        "mtt.syn_steps": 5,
        "mtt.expert_epochs": 1,
        "mtt.max_start_epoch": 2,
    },
    "experts": {
        "experts.num": 2,
        "experts.epochs": 2,
        "data.train_per_class": 100,
        "data.test_per_class": 100,
    },
}


def mtt_hparams(
    syn_steps: int,
    expert_epochs: int,
    max_start_epoch: int,
    lr_img: float,
    lr_lr: float,
    lr_teacher: float = 0.01,
    *,
    zca: bool = False,
    batch_syn: int = 0,
) -> dict[str, Any]:
    """One row of an MTT hyperparameter table as dotted config overrides."""
    return {
        "mtt.syn_steps": syn_steps,
        "mtt.expert_epochs": expert_epochs,
        "mtt.max_start_epoch": max_start_epoch,
        "distill.lr": lr_img,
        "mtt.lr_lr": lr_lr,
        "mtt.lr_teacher": lr_teacher,
        "data.zca": zca,
        "mtt.batch_syn": batch_syn,
    }


def mtt_fallback_hparams() -> dict[tuple[str, int], dict[str, Any]]:
    """MTT rows for datasets without a published setting (Fashion-MNIST, MNIST, SVHN): CIFAR-10's
    syn_steps / expert_epochs / max_start_epoch / lr_lr, without ZCA, with lr_img 100 and
    lr_teacher 0.01 at every IPC (CIFAR-10's own rows, configs/cifar10.py, start from lr 0.001
    at IPC 10/50 and use lr_img 1000 at IPC 50). Not tuned per dataset."""
    return {
        ("mtt", 1): mtt_hparams(50, 2, 2, 100.0, 1e-7),
        ("mtt", 10): mtt_hparams(30, 2, 20, 100.0, 1e-5),
        ("mtt", 50): mtt_hparams(30, 2, 40, 100.0, 1e-5),
    }


def parse_arg(arg: str) -> tuple[str, int, set[str]]:
    """Parses ``"method,ipc<k>[,flag...]"`` into (method, ipc, flags)."""
    method, ipc, flags = None, None, set()
    for token in (t.strip() for t in (arg or "").split(",") if t.strip()):
        if token.startswith("ipc") and token[3:].lstrip("-").isdigit():
            ipc = int(token[3:])
        elif token in ARG_FLAGS:
            flags.add(token)
        elif method is None:
            method = token
        else:
            raise ConfigError(
                f"config argument token {token!r} not understood; expected a method "
                f"({', '.join(methods())}), ipc<k> and optional flags ({', '.join(ARG_FLAGS)})"
            )
    method = method or "random"
    check_choice("method", method, methods())
    return method, (10 if ipc is None else ipc), flags


def build(
    dataset: Mapping[str, Any],
    arg: str,
    *,
    hparams: Mapping[tuple[str, int], Mapping[str, Any]] | None = None,
    local: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The full config for ``dataset`` (the ``config.data`` fields) and ``arg``.

    ``hparams[(method, ipc)]`` and then, with the ``local`` flag, ``local`` and
    ``LOCAL_BY_MODE[mode]`` are merged over the
    defaults with dotted keys, e.g. ``{"eval.epochs": 1000}``.
    """
    from mim4dd_jax import sharding  # its DEFAULTS are the mesh block's, written once there

    method, ipc, flags = parse_arg(arg)
    check_ipc(ipc)
    c = ml_collections.ConfigDict()
    c.method = method
    c.mode = methods()[method]
    c.ipc = ipc
    c.seed = 0
    c.precision = "float32"

    c.data = ml_collections.ConfigDict(
        dict(
            name="",
            source="auto",
            path="",
            tfds_data_dir="",
            train_per_class=0,
            test_per_class=0,
            zca=False,
            zca_reg=0.1,
        )
    )
    for name, value in dict(dataset).items():
        set_dotted(c, f"data.{name}", value)

    c.model = ml_collections.ConfigDict(
        dict(name="convnet", width=128, depth=3, norm="instance", act="relu", pool="avg")
    )
    c.conv_impl = "auto"
    # Training passes of the ConvNet (evaluation, experts, DC's inner steps, MTT's student) run
    # this many images at a time, each chunk rematerialised (models.apply_in_chunks): the same
    # numbers up to float rounding; 1.5x faster for a lone step on CPU, no faster in the
    # evaluation's loops and slower in MTT's (BENCHMARKS.md, "Micro-batched training step").
    # 0 = the whole batch at once.
    c.microbatch = 0

    c.dsa = ml_collections.ConfigDict(dict(strategy=DSA_STRATEGY))

    c.eval = ml_collections.ConfigDict(
        dict(
            models=("convnet",),
            num_models=5,
            epochs=300,
            batch_size=256,
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            dsa=False,
            test_batch_size=500,
            parallel="auto",
        )
    )
    if c.mode == "evaluate":
        # The .npz to evaluate (mode "evaluate" only: other modes' config fingerprints and
        # distilled.npz bytes stay as they were).
        c.eval.set = ""
        # What the set's float images are: "" = what the file declares (ours: pixel_range
        # "0_1"), else they must lie in [0, 1]; or "0_255", "0_1", "normalised" (model space).
        # uint8 images are always 0..255 pixels.
        c.eval.pixel_range = ""

    c.coreset = ml_collections.ConfigDict(dict(features="trained_net", feature_epochs=1))

    # Expert trajectories for MTT (mode "experts"; Cazenavette et al. 2022, buffer.py): ``num``
    # networks trained ``epochs`` epochs on the real train split with plain SGD and per-sample
    # DSA, parameters kept after every epoch. ``group`` experts train together as one vmapped
    # program (0 = auto: 1 on CPU, up to 8 on accelerators).
    c.experts = ml_collections.ConfigDict(
        dict(
            num=10,
            epochs=50,
            lr=0.01,
            momentum=0.0,
            weight_decay=0.0,
            batch_size=256,
            dsa=True,
            group=0,
        )
    )

    # Distillation (mode "distill"). outer_loop/inner_loop 0 = the reference's per-IPC values
    # (objectives.dc_loops); eval_every 0 = evaluate at the end only; eval_at: more iterations
    # to evaluate at (e.g. (0, 100, 250) for a convergence curve). real_chunk: the forward
    # passes over real images that need no gradient (DM's real side, the MI term's real
    # features) in slices of about this many images (-1 = 64 on CPU, where it keeps the
    # activations in cache, and one pass on accelerators; 0 = one pass).
    c.distill = ml_collections.ConfigDict(
        dict(
            iterations=1000,
            batch_real=256,
            init="real",
            optimizer="sgd",
            lr=0.1,
            momentum=0.5,
            dsa=True,
            eval_every=0,
            eval_at=(),
            log_every=10,
            outer_loop=0,
            inner_loop=0,
            lr_net=0.01,
            batch_train=256,
            init_from="",
            # init_from's float images, as eval.pixel_range: "" = what the file declares.
            init_from_range="",
            freeze_loaded=True,
            checkpoint_every=100,
            keep_checkpoints=3,
            real_chunk=-1,
        )
    )
    # Trajectory matching (Cazenavette et al. 2022). experts_dir: the workdir of an "experts" run.
    # Each iteration samples num_trajectories (expert, start epoch < max_start_epoch) pairs and
    # unrolls syn_steps student steps (minibatches of batch_syn; 0 = all images) from theta*_t
    # towards theta*_{t+expert_epochs}. The student lr starts at lr_teacher and, with learn_lr,
    # is learned as the reference learns it: SGD(lr_lr, momentum 0.5) on the lr itself.
    # learn_labels: soft labels, learned as logits initialised to label_logit * one-hot.
    # remat: "auto" (on except on GPU/TPU), "on" or "off".
    c.mtt = ml_collections.ConfigDict(
        dict(
            experts_dir="",
            syn_steps=20,
            expert_epochs=2,
            max_start_epoch=20,
            lr_teacher=0.01,
            learn_lr=True,
            lr_lr=1e-5,
            batch_syn=0,
            num_trajectories=1,
            remat="auto",
            learn_labels=False,
            lr_labels=1.0,
            label_logit=10.0,
        )
    )
    # A step with a non-finite loss or gradient is skipped (the state is kept); after
    # max_consecutive such steps in a row the run stops. With the MIM4DD term on, a run whose
    # MI estimate (summed over layers, best logged value) is still below mi_alive_nats at
    # iteration mi_alive_by gets a warning: its heads are not learning the bound, so the term's
    # gradient is noise (mi_alive_by 0: no check).
    c.guard = ml_collections.ConfigDict(
        dict(max_consecutive=10, mi_alive_by=100, mi_alive_nats=0.1)
    )
    # The device mesh (mim4dd_jax.sharding): shape () = all devices on one "data" axis; real
    # batches, MTT trajectories and evaluation models are split over it. distributed: "auto"
    # calls jax.distributed.initialize() when the environment is a multi-process launch, or
    # "on" / "off". shard_synthetic: shard the synthetic set by class instead of replicating it.
    c.mesh = ml_collections.ConfigDict(dict(sharding.DEFAULTS))
    # The MIM4DD term: total = base + lambda * mi_loss. 0 (the default) is the pure base method.
    # objective "mim4dd": the contrastive MI between real and synthetic (maximised); "cmidd":
    # CMIDD's class-conditional MI of the synthetic features alone (minimised, no heads: needs
    # head "none"), the studies' positive control.
    # weight_mode "absolute": lambda = weight; "relative": lambda = weight * |g_base| / |g_mi|
    # per step on the image gradients, so weight 0.1 means "the MI term pushes the images a tenth
    # as hard as the base loss" for every method and dataset.
    # layers=() uses every block; layer_weights=() weighs them all 1; chunk_size, k_pos, k_neg,
    # n_data = 0 mean "off" (None in mi.MIConfig). optimizer/lr train the projection heads
    # (heads=per_side: lr 3e-4; at 1e-3 the two sides' heads do not align, see README).
    # networks: "paired" takes real features from the real-side network (MTT: the expert at
    # t+M) and synthetic ones from the synthetic-side network (MTT: the student after the
    # unroll); "shared" passes both through the synthetic-side network. DM/DC have one network.
    # bank_slots > 0 keeps a per-class memory bank of that many real embeddings per layer
    # (updated with bank_momentum each step) whose entries join the real candidates.
    # head: "linear" / "mlp" are trained; "none" (features standardised with the real batch's
    # statistics) and "lda" (Fisher LDA on the real batch) are refitted every step, for networks
    # that change every step (DM); they need critic "cosine" and bank_slots = 0.
    # negatives (nce/nwj/js): "marginal" = every real candidate, an MI lower bound; "other_class"
    # = different labels only, a same- vs other-class divergence, not an MI bound (see mi.py).
    c.mi = ml_collections.ConfigDict(
        dict(
            weight=0.0,
            weight_mode="absolute",
            objective="mim4dd",
            layers=(),
            estimator="infonce",
            temperature=0.07,
            critic="cosine",
            reduce="gap",
            head="linear",
            embed_dim=128,
            hidden_dim=512,
            layer_weights=(),
            mask="hard",
            chunk_size=0,
            beta=0.0,
            k_pos=0,
            k_neg=0,
            n_data=0.0,
            negatives="marginal",
            optimizer="adam",
            lr=1e-3,
            networks="paired",
            through_unroll=False,
            heads="shared",
            feature_nets="random",
            bank_slots=0,
            bank_momentum=0.5,
        )
    )

    for overrides in (
        method_defaults(method),
        (hparams or {}).get((method, ipc), {}),
        (local if "local" in flags else {}),
        (LOCAL_BY_MODE.get(c.mode, {}) if "local" in flags else {}),
    ):
        for dotted, value in (overrides or {}).items():
            set_dotted(c, dotted, value)
    # Locked: assigning or updating a field that does not exist raises, in code as on the
    # command line.
    c.lock()
    return c


def set_dotted(c: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Sets ``c.a.b = value`` for ``dotted == "a.b"``; an unknown field is a ConfigError naming
    it and the nearest valid one (a misspelt key in a config file's HPARAMS must not silently
    leave the default in place)."""
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
        node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config field {dotted!r}{nearest_field(c, dotted)}")
    node[leaf] = value


def nearest_field(c: ml_collections.ConfigDict, dotted: str) -> str:
    """ "; did you mean 'a.b'?" for the closest field of ``c`` to ``dotted``, or ""."""
    import difflib

    from mim4dd_jax import artifacts

    close = difflib.get_close_matches(dotted, list(artifacts.flatten_dotted(c.to_dict())), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_ipc(ipc: int, smallest_class: int | None = None) -> None:
    """IPC must be positive and, once the data is known, at most the smallest class size."""
    if ipc <= 0:
        raise ConfigError(f"ipc must be a positive integer, got {ipc}")
    if smallest_class is not None and ipc > smallest_class:
        raise ConfigError(
            f"ipc {ipc} is larger than the smallest class ({smallest_class} examples); "
            f"choose ipc <= {smallest_class}"
        )


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks every name and range that can be checked without data; raises ConfigError."""
    # late: config files import this module. None of these imports config: the choices of
    # modules that do (coreset, experts, the distillation modules) live in mim4dd_jax.choices.
    from mim4dd_jax import augment, choices, data, experts_run, inner, models

    check_choice("method", c.method, methods())
    check_ipc(c.ipc)
    check_choice("precision", c.precision, PRECISIONS)
    check_choice("data.source", c.data.source, data.SOURCES)
    check_choice("coreset.features", c.coreset.features, choices.FEATURE_SPACES)
    for name in (None, *c.eval.models):
        models.build_model(c, 10, name)
    augment.parse_strategy(c.dsa.strategy)
    check_choice("eval.parallel", c.eval.parallel, inner.PARALLEL)
    for field in ("eval.pixel_range", "distill.init_from_range"):
        block, name = field.split(".")
        if c.get(block) is not None and c[block].get(name, ""):
            check_choice(field, c[block][name], data.PIXEL_RANGES)
    for field, minimum in (
        ("eval.lr", 0.0),
        ("eval.num_models", 0),
        ("eval.batch_size", 0),
        ("eval.test_batch_size", 0),
    ):
        value = c[field.split(".")[0]][field.split(".")[1]]
        if not value > minimum:
            raise ConfigError(f"{field} must be > {minimum}, got {value}")
    if c.eval.epochs < 0:
        raise ConfigError(f"eval.epochs must be >= 0, got {c.eval.epochs}")
    if "distill" in c:
        _validate_distill(c)
    if "experts" in c:
        experts_run.check_config(c)
    if "mesh" in c:
        _validate_mesh(c.mesh)


def _validate_mesh(m: ml_collections.ConfigDict) -> None:
    """Checks ``config.mesh`` against this run's devices (call after any distributed init)."""
    import jax

    from mim4dd_jax import sharding

    check_choice("mesh.distributed", m.distributed, sharding.DISTRIBUTED)
    if not isinstance(m.shard_synthetic, bool):
        raise ConfigError(f"mesh.shard_synthetic must be True or False, got {m.shard_synthetic!r}")
    sharding.check_mesh(m.shape, m.axes, jax.device_count())


def _validate_distill(c: ml_collections.ConfigDict) -> None:
    """Checks the ``distill`` and ``mi`` blocks (names, ranges, MI options, DC loops)."""
    from mim4dd_jax import state as state_lib
    from mim4dd_jax.choices import (
        INITS,
        MI_FEATURE_NETS,
        MI_NETWORKS,
        MI_OBJECTIVES,
        MI_WEIGHT_MODES,
        OPTIMIZERS,
        REMAT,
    )

    d = c.distill
    check_choice("distill.optimizer", d.optimizer, OPTIMIZERS)
    check_choice("distill.init", d.init, INITS)
    check_choice("mi.optimizer", c.mi.optimizer, OPTIMIZERS)
    for field, value, minimum in (
        ("distill.iterations", d.iterations, 0),
        ("distill.eval_every", d.eval_every, 0),
        ("distill.outer_loop", d.outer_loop, 0),
        ("distill.inner_loop", d.inner_loop, 0),
        ("distill.batch_real", d.batch_real, 1),
        ("distill.batch_train", d.batch_train, 1),
        ("distill.log_every", d.log_every, 1),
        ("distill.checkpoint_every", d.checkpoint_every, 0),
        ("distill.keep_checkpoints", d.keep_checkpoints, 1),
        ("distill.real_chunk", d.real_chunk, -1),
        ("guard.max_consecutive", c.guard.max_consecutive, 1),
        ("guard.mi_alive_by", c.guard.mi_alive_by, 0),
        ("mtt.syn_steps", c.mtt.syn_steps, 1),
        ("mtt.expert_epochs", c.mtt.expert_epochs, 1),
        ("mtt.max_start_epoch", c.mtt.max_start_epoch, 1),
        ("mtt.batch_syn", c.mtt.batch_syn, 0),
        ("mtt.num_trajectories", c.mtt.num_trajectories, 1),
        ("mi.bank_slots", c.mi.bank_slots, 0),
        ("microbatch", c.get("microbatch", 0), 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{field} must be an integer >= {minimum}, got {value!r}")
    for field, value in (
        ("distill.lr", d.lr),
        ("distill.lr_net", d.lr_net),
        ("mi.lr", c.mi.lr),
        ("mi.temperature", c.mi.temperature),
        ("mtt.lr_teacher", c.mtt.lr_teacher),
        ("mtt.lr_lr", c.mtt.lr_lr),
        ("mtt.lr_labels", c.mtt.lr_labels),
    ):
        if not value > 0:
            raise ConfigError(f"{field} must be > 0, got {value!r}")
    if not 0 <= d.momentum < 1:
        raise ConfigError(f"distill.momentum must be in [0, 1), got {d.momentum!r}")
    nats = c.guard.mi_alive_nats
    if isinstance(nats, bool) or not isinstance(nats, int | float) or not math.isfinite(nats):
        raise ConfigError(f"guard.mi_alive_nats must be a finite number, got {nats!r}")
    state_lib.mi_weight(c)
    check_choice("mi.networks", c.mi.networks, MI_NETWORKS)
    check_choice("mi.weight_mode", c.mi.weight_mode, MI_WEIGHT_MODES)
    check_choice("mi.feature_nets", c.mi.feature_nets, MI_FEATURE_NETS)
    check_choice("mi.objective", c.mi.objective, MI_OBJECTIVES)
    if c.mi.objective == "cmidd" and c.mi.head != "none":
        raise ConfigError(
            f"mi.objective='cmidd' reads the network's features directly and trains no head, "
            f"so mi.head={c.mi.head!r} would be built for nothing; valid: mi.head='none'"
        )
    if not isinstance(c.mi.through_unroll, bool):
        raise ConfigError(f"mi.through_unroll must be True or False, got {c.mi.through_unroll!r}")
    # The experts and evaluate modes carry a distill block too, for no distillation method.
    method = methods_lib.get(c.method) if c.method in methods_lib.names() else None
    supports = method.supports if method is not None else frozenset()
    if c.mi.through_unroll and methods_lib.THROUGH_UNROLL not in supports:
        which = _listed(methods_lib.supporting(methods_lib.THROUGH_UNROLL))
        raise ConfigError(
            f"mi.through_unroll is for method {which} (the student's unroll), not {c.method!r}; "
            f"valid: --config.method={which} or mi.through_unroll=False"
        )
    if c.mi.feature_nets == "experts" and methods_lib.EXPERT_FEATURES not in supports:
        raise ConfigError(
            f"mi.feature_nets='experts' is for "
            f"{_listed(methods_lib.supporting(methods_lib.EXPERT_FEATURES), ', ', ' and ')}, not "
            f"{c.method!r} (its MI features already come from its own networks); valid: "
            "mi.feature_nets='random'"
        )
    for it in d.eval_at:
        if isinstance(it, bool) or not isinstance(it, int) or not 0 <= it <= d.iterations:
            raise ConfigError(
                f"distill.eval_at entry {it!r} is not an iteration; valid: integers in "
                f"0..distill.iterations={d.iterations}"
            )
    if not 0 <= c.mi.bank_momentum < 1:
        raise ConfigError(f"mi.bank_momentum must be in [0, 1), got {c.mi.bank_momentum!r}")
    check_choice("mtt.remat", c.mtt.remat, REMAT)
    if c.mtt.learn_labels and methods_lib.LEARN_LABELS not in supports:
        which = _listed(methods_lib.supporting(methods_lib.LEARN_LABELS))
        raise ConfigError(
            f"mtt.learn_labels is for method {which}, not {c.method!r}; valid: "
            f"--config.method={which} or mtt.learn_labels=False"
        )
    state_lib.mi_config(c.mi)
    if method is not None:
        method.check(c)


def _listed(names: tuple[str, ...], sep: str = "|", last: str = "|") -> str:
    """``names`` joined for a message: "a|b", or with ``sep``/``last`` "a, b and c"."""
    if len(names) < 2:
        return "".join(names)
    return sep.join(names[:-1]) + last + names[-1]
