"""Mode ``experts``: trains an expert set for MTT trajectory matching (the reference's
``buffer.py``); its files are described in :mod:`mim4dd_jax.experts`.

Expert ``i`` is a fresh ``config.model`` trained ``experts.epochs`` epochs on the whole train split
(model space: normalised, ZCA-whitened when ``data.zca``) with plain SGD at ``experts.lr`` (0.01),
batch ``experts.batch_size`` (256, the last smaller batch kept) and per-sample DSA when
``experts.dsa``, as ``buffer.py`` does by default. Its parameters are kept after every epoch, and
it is tested on the whole test split after every epoch (``buffer.py`` does the same).

Randomness (a contract: resume and grouping rely on it): expert ``i`` starts from
``inner.init_variables(model, init_key(seed_key, i), shape)`` with ``init_key = fold_in(fold_in(
seed_key, i), 0)``; its epoch ``e`` (0-based) is one ``inner.sgd_epochs`` pass with key
``epoch_key(seed_key, i, e) = fold_in(fold_in(fold_in(seed_key, i), 1), e)``, where
``seed_key = jax.random.key(config.seed)``. Nothing depends on which experts share a group, on the
group size or on interruptions, so a resumed run equals an uninterrupted one, and ``group`` only
changes results by float rounding (vmapped vs single matmuls).

Execution: ``experts.group`` experts train together as ONE jitted program per epoch
(:func:`train_epoch`, vmapped over their parameters and keys; 0 = auto: 1 on CPU, where a vmapped
im2col conv became slower batched GEMMs, up to 8 on accelerators). The Python loop only iterates
groups and epochs, writes files and logs.

Every file is written atomically and a group's files are rewritten after every epoch, so a killed
run loses at most one epoch. Running again in the same workdir resumes each expert from its last
row; ``experts.num`` and ``experts.epochs`` are not in meta.json, so they may grow (more experts,
longer trajectories); everything else must match.

Momentum: ``inner.sgd_epochs`` starts its momentum buffer at zero on every call, so chaining
one-epoch calls would silently restart momentum each epoch. Rather than duplicate the SGD step
here, ``experts.momentum != 0`` is a ConfigError; ``buffer.py`` defaults to ``--mom 0`` (and
``--l2 0``), which the MTT experts use.
"""

from __future__ import annotations

import functools
import glob
import os
import time
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mim4dd_jax import artifacts, inner, models, runner
from mim4dd_jax import data as data_lib
from mim4dd_jax import evaluate as evaluate_lib
from mim4dd_jax.errors import ConfigError
from mim4dd_jax.experts import (
    META,
    check_meta,
    epochs_done,
    expert_path,
    make_meta,
    other_collections,
    read_expert,
    read_meta,
    unravelers,
)

_AUTO_GROUP_ACCELERATOR = 8


class EpochConfig(NamedTuple):
    """Static hyperparameters of :func:`train_epoch` (hashable: a jit static argument).

    strategy: the per-sample DSA strategy, "none" for no augmentation.
    """

    lr: float
    weight_decay: float
    batch_size: int
    strategy: str
    dataset: str
    test_batch_size: int = 500


def check_config(config: Any) -> None:
    """Checks ``config.experts``; raises ConfigError naming the bad field."""
    ex = config.experts
    for field, minimum in (("num", 1), ("epochs", 1), ("batch_size", 1), ("group", 0)):
        value = ex[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"experts.{field} must be an integer >= {minimum}, got {value!r}")
    if not ex.lr > 0:
        raise ConfigError(f"experts.lr must be > 0, got {ex.lr!r}")
    if not ex.weight_decay >= 0:
        raise ConfigError(f"experts.weight_decay must be >= 0, got {ex.weight_decay!r}")
    if ex.momentum != 0:
        raise ConfigError(
            f"experts.momentum must be 0 (the reference buffer.py uses 0), got {ex.momentum!r}: "
            "inner.sgd_epochs restarts its momentum buffer every epoch"
        )


def resolve_group(group: int, num: int) -> int:
    """Experts per program: ``group`` (0 = 1 on CPU, min(num, 8) on accelerators), at most num."""
    if group == 0:
        group = 1 if jax.default_backend() == "cpu" else _AUTO_GROUP_ACCELERATOR
    return max(1, min(group, num))


def init_key(seed_key: jax.Array, i: jax.Array | int) -> jax.Array:
    """The key of expert ``i``'s initialisation."""
    return jax.random.fold_in(jax.random.fold_in(seed_key, i), 0)


def epoch_key(seed_key: jax.Array, i: jax.Array | int, e: jax.Array | int) -> jax.Array:
    """The key of expert ``i``'s epoch ``e`` (0-based): shuffling and augmentation."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(seed_key, i), 1), e)


@functools.partial(jax.jit, static_argnames=("model", "hparams"), donate_argnames=("params",))
def train_epoch(
    seed_key: jax.Array,
    ids: jax.Array,
    epochs: jax.Array,
    active: jax.Array,
    params: jax.Array,
    state: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    test_images: jax.Array,
    test_labels: jax.Array,
    *,
    model: nn.Module,
    hparams: EpochConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One epoch of a group of G experts, as one program (vmapped when G > 1).

    Args:
      seed_key: ``jax.random.key(config.seed)``.
      ids, epochs: [G] int32, each member's expert index and its 0-based epoch.
      active: [G] bool; inactive members (padding, or experts already done) keep their values.
      params: [G, P] float32 flattened "params" (donated); state: [G, S] float32 the other
        collections.
      images: [N, H, W, C] float32 train split in model space; labels: [N] int32.
      test_images, test_labels: the test split, [M, H, W, C] and [M].
    Returns:
      (params [G, P], state [G, S], test accuracy [G] in [0, 1] after the epoch).
    """
    g = ids.shape[0]
    chex.assert_shape([ids, epochs, active], (g,))
    chex.assert_rank([params, state, images, test_images], [2, 2, 4, 4])
    chex.assert_equal_shape_prefix([params, state], 1)
    chex.assert_type([params, images, test_images], jnp.float32)
    unravel_params, unravel_state = unravelers(model, images.shape[1:])
    augment = None
    if hparams.strategy != "none":
        augment = evaluate_lib.dsa_augment_fn(hparams.strategy, hparams.dataset)

    def one(i, e, on, p, s):
        variables = {**unravel_state(s), "params": unravel_params(p)}
        variables = inner.sgd_epochs(
            epoch_key(seed_key, i, e),
            variables,
            images,
            labels,
            hparams.lr,
            model=model,
            passes=1,
            batch_size=hparams.batch_size,
            weight_decay=hparams.weight_decay,
            augment=augment,
        )
        acc = inner.accuracy(
            model, variables, test_images, test_labels, batch_size=hparams.test_batch_size
        )
        new_p, new_s = (
            ravel_pytree(variables["params"])[0],
            ravel_pytree(other_collections(variables))[0],
        )
        return jnp.where(on, new_p, p), jnp.where(on, new_s, s), acc

    if g == 1:
        # No vmap for a group of one: on CPU a vmapped im2col conv is a batched GEMM, which ran
        # slower than a plain one (BENCHMARKS.md).
        out = one(ids[0], epochs[0], active[0], params[0], state[0])
        return jax.tree.map(lambda x: x[None], out)
    return jax.vmap(one)(ids, epochs, active, params, state)


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def init_flat(
    key: jax.Array, *, model: nn.Module, image_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Flattened (params [P], state [S]) of ``inner.init_variables(model, key, image_shape)``:
    "params" and the other collections, each by ``ravel_pytree``."""
    variables = inner.init_variables(model, key, image_shape)
    return ravel_pytree(variables["params"])[0], ravel_pytree(other_collections(variables))[0]


class _Record(NamedTuple):
    params: np.ndarray  # [n + 1, P]
    test_accuracy: np.ndarray  # [n]
    state: np.ndarray  # [S]


def _write_expert(path: str, record: _Record) -> None:
    n = record.test_accuracy.shape[0]
    chex.assert_shape(record.params, (n + 1, None))
    chex.assert_rank(record.state, 1)
    artifacts.save_npz(
        path,
        params=np.asarray(record.params, np.float32),
        test_accuracy=np.asarray(record.test_accuracy, np.float32),
        state=np.asarray(record.state, np.float32),
    )


def _chunks(todo: list[int], group: int) -> tuple[list[list[int]], int]:
    """Consecutive chunks of ``todo`` of equal size (the last may be shorter), as few as groups
    of ``group`` allow: 10 experts in groups of 8 train as 5 + 5, not 8 + 2 (+ 6 padding)."""
    n_chunks = -(-len(todo) // group)
    size = -(-len(todo) // n_chunks)
    return [todo[k : k + size] for k in range(0, len(todo), size)], size


def _train_chunk(
    chunk: list[int],
    size: int,
    *,
    workdir: str,
    epochs: int,
    seed_key: jax.Array,
    model: nn.Module,
    hparams: EpochConfig,
    arrays: tuple[jax.Array, ...],
    image_shape: tuple[int, ...],
    writer: artifacts.MetricWriter,
    bar: Any,
) -> None:
    """Trains the experts of ``chunk`` (padded to ``size`` slots) up to ``epochs`` epochs each,
    from their files when present; rewrites each member's file after every epoch."""
    records: dict[int, _Record] = {}
    done: dict[int, int] = {}
    for i in chunk:
        path = expert_path(workdir, i)
        if os.path.exists(path):
            stored = read_expert(path)
            n = len(stored["test_accuracy"])
            params = np.zeros((epochs + 1, stored["params"].shape[1]), np.float32)
            params[: n + 1] = stored["params"]
            acc = np.zeros(epochs, np.float32)
            acc[:n] = stored["test_accuracy"]
            records[i], done[i] = _Record(params, acc, stored["state"]), n
        else:
            p0, s0 = jax.device_get(
                init_flat(init_key(seed_key, i), model=model, image_shape=image_shape)
            )
            params = np.zeros((epochs + 1, p0.shape[0]), np.float32)
            params[0] = p0
            records[i], done[i] = _Record(params, np.zeros(epochs, np.float32), np.array(s0)), 0
    # Padding slots repeat the first member and stay inactive: one program shape for all chunks.
    slots = chunk + [chunk[0]] * (size - len(chunk))
    real = np.arange(size) < len(chunk)
    params = jnp.asarray(np.stack([records[i].params[done[i]] for i in slots]))
    state = jnp.asarray(np.stack([records[i].state for i in slots]))
    label = f"expert {chunk[0]}" if len(chunk) == 1 else f"experts {chunk[0]}-{chunk[-1]}"
    while True:
        active = real & np.asarray([done[i] < epochs for i in slots])
        if not active.any():
            return
        # Members may stand at different epochs (e.g. a resume with another group size).
        current = np.asarray([min(done[i], epochs - 1) for i in slots], np.int32)
        start = time.perf_counter()
        params, state, acc = train_epoch(
            seed_key,
            jnp.asarray(slots, jnp.int32),
            jnp.asarray(current),
            jnp.asarray(active),
            params,
            state,
            *arrays,
            model=model,
            hparams=hparams,
        )
        # Copies: a host view of ``params`` would dangle once the next epoch donates it.
        host_params, host_state, host_acc = (np.array(x, copy=True) for x in (params, state, acc))
        seconds = time.perf_counter() - start  # the group's wall time; the first includes compiling
        for slot in np.flatnonzero(active):
            i, e = slots[slot], done[slots[slot]]
            rec = records[i]
            rec.params[e + 1] = host_params[slot]
            rec.test_accuracy[e] = host_acc[slot]
            records[i] = rec = rec._replace(state=host_state[slot])
            done[i] = e + 1
            _write_expert(
                expert_path(workdir, i),
                _Record(rec.params[: e + 2], rec.test_accuracy[: e + 1], rec.state),
            )
            writer.write(
                e + 1,
                expert=i,
                epoch=e + 1,
                test_accuracy=float(host_acc[slot]),
                s_per_epoch=seconds,
            )
        bar.set_postfix_str(
            f"{label} epoch {max(done[i] for i in chunk)}: test acc "
            f"{100 * float(np.mean(host_acc[active])):.2f} %"
        )
        bar.update(1)


@runner.holds_workdir
def run(config: Any, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) ``experts.num`` experts for ``experts.epochs`` epochs into ``workdir``.

    Writes meta.json, expert_{i:03d}.npz, metrics.jsonl and results.json (their layout:
    :mod:`mim4dd_jax.experts`). Returns the results: dataset, num, epochs and the test accuracy (in [0, 1]) after
    ``epochs`` epochs: mean, std and all, over the ``num`` experts.
    """
    check_config(config)
    ex = config.experts

    def checks(dataset: data_lib.Dataset, folder: str) -> dict[str, Any]:
        """The meta of this run, checked against the folder's (same run to resume)."""
        meta = make_meta(config, dataset)
        meta_path = os.path.join(folder, META)
        if os.path.exists(meta_path):
            check_meta(
                read_meta(meta_path),
                meta,
                where=f"the experts in {folder!r}",
                hint=" (use another --workdir, or the stored values to resume)",
            )
        elif glob.glob(os.path.join(folder, "expert_*.npz")):
            # Without meta.json nothing says what these files were trained with: never resume.
            raise ConfigError(f"{folder!r} holds expert files but no {META}; use another --workdir")
        return meta

    workdir, dataset, meta = runner.start(config, workdir, "experts", checks)
    meta_path = os.path.join(workdir, META)
    if not os.path.exists(meta_path):
        artifacts.write_json(meta_path, meta)

    model = models.build_model(config, dataset.num_classes)
    hparams = EpochConfig(
        lr=float(ex.lr),
        weight_decay=float(ex.weight_decay),
        batch_size=int(ex.batch_size),
        strategy=meta["dsa"]["strategy"],
        dataset=dataset.name,
        test_batch_size=int(config.eval.test_batch_size),
    )
    arrays = tuple(
        jnp.asarray(a)  # the whole splits live on device
        for a in (
            dataset.train_images,
            dataset.train_labels,
            dataset.test_images,
            dataset.test_labels,
        )
    )
    seed_key = jax.random.key(config.seed)

    def done_of(i: int) -> int:
        path = expert_path(workdir, i)
        return epochs_done(path) if os.path.exists(path) else 0

    done = {i: done_of(i) for i in range(ex.num)}
    todo = [i for i in range(ex.num) if done[i] < ex.epochs]
    writer = artifacts.MetricWriter(workdir)
    if todo:
        chunks, size = _chunks(todo, resolve_group(ex.group, len(todo)))
        # A chunk runs until its least-trained member is done.
        total = sum(ex.epochs - min(done[i] for i in chunk) for chunk in chunks)
        with artifacts.progress_bar("experts", total) as bar:
            for chunk in chunks:
                _train_chunk(
                    chunk,
                    size,
                    workdir=workdir,
                    epochs=ex.epochs,
                    seed_key=seed_key,
                    model=model,
                    hparams=hparams,
                    arrays=arrays,
                    image_shape=dataset.image_shape,
                    writer=writer,
                    bar=bar,
                )
    # After ``epochs`` epochs, also for experts whose files go further (a run with more epochs).
    final = []
    for i in range(ex.num):
        accuracies = read_expert(expert_path(workdir, i), ("test_accuracy",))["test_accuracy"]
        final.append(float(accuracies[ex.epochs - 1]))
    summary = {
        "dataset": dataset.name,
        "num": ex.num,
        "epochs": ex.epochs,
        "test_accuracy": {"mean": float(np.mean(final)), "std": float(np.std(final)), "all": final},
    }
    runner.finish(workdir, summary, log=False)
    artifacts.progress_write(
        f"{ex.num} experts, {ex.epochs} epochs: test accuracy "
        f"{100 * summary['test_accuracy']['mean']:.2f} ± {100 * summary['test_accuracy']['std']:.2f} %"
    )
    return summary
