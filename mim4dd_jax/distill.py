"""Distillation with DM, DC/DSA or MTT, optionally plus the MIM4DD mutual-information term:
the run loop (:func:`run`) with its checkpoints, evaluation schedule, artifacts, signals and
workdir checks.

The distillation code splits by concern; no module imports one that imports it back
(``tests/test_imports.py``), and the valid choice names live in ``choices`` for ``config``:

- ``state``: the synthetic state pytree (layout, init, init_from/growth, optimisers, shardings);
- ``steps``: the registry of base methods and ``make_step``, the jitted, donated step;
  ``steps_core``: the MIM4DD term, the guarded update and the context every method gets;
  ``steps_dm`` / ``steps_dc`` / ``steps_mtt``: one module per base method;
- ``distill`` (here): the host loop.

One iteration is one jitted, pure ``step(state, key, real_images, class_index, experts) ->
(state, metrics)`` with the state donated; the real train split (and, for MTT, the expert
trajectories) live on device, and per-class real batches and (expert, start epoch) pairs are
drawn inside the step.

Randomness (part of the contract, tests rely on it): ``run`` uses ``fold_in(seed_key, 0)`` for
``init_state``, ``fold_in(seed_key, 1)`` for every evaluation and ``fold_in(fold_in(seed_key,
2), it)`` for iteration ``it``, so a resumed run replays exactly the iterations it had not
done. Within a step, see each method's module; within ``init_state``, see ``state``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mim4dd_jax import artifacts, methods, runner, sharding
from mim4dd_jax import checkpoint as checkpoint_lib
from mim4dd_jax import config as config_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax import evaluate as evaluate_lib
from mim4dd_jax import experts as experts_lib
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib
from mim4dd_jax.errors import ConfigError
from mim4dd_jax.state import State


def needs_experts(config: Any) -> bool:
    """Whether the run reads expert trajectories: the method matches them (``Method.needs_experts``,
    MTT), or the MI term draws its feature networks from them (``mi.feature_nets="experts"``)."""
    if methods.get(config.method).needs_experts:
        return True
    return state_lib.mi_features_from_experts(config)


def min_expert_epochs(config: Any) -> int:
    """Epochs an expert needs: the method's (``Method.expert_epochs``; one trained epoch as an
    MI feature network)."""
    return methods.get(config.method).expert_epochs(config)


# ----------------------------------------------------------------------------------------------
# The outer loop.
# ----------------------------------------------------------------------------------------------


def _memory_stats() -> dict[str, int | None]:
    """Peak device memory where the backend reports it, and the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_bytes": stats.get("peak_bytes_in_use"), "peak_rss_bytes": rss_kib * 1024}


def _save_artifacts(
    workdir: str, state: State, dataset: data_lib.Dataset, config: Any, iteration: int
) -> None:
    model_images = sharding.to_host(state["images"])
    pixels = dataset.to_pixels(model_images)
    labels = state_lib.eval_labels(state)
    artifacts.save_synthetic_set(
        workdir,
        pixels,
        labels,
        dataset.num_classes,
        lr=state_lib.student_lr(state, config),
        config=config.to_dict(),
        iteration=np.int64(iteration),
        # Model-space copy: growing or continuing from this file is then exact (no round trip
        # through pixel space) when the normalisation matches.
        model_images=model_images,
        mean=dataset.mean,
        std=dataset.std,
        zca=np.bool_(dataset.zca is not None),
    )
    # The same picture as grid.png: copy its bytes rather than render it again.
    with open(os.path.join(workdir, "grid.png"), "rb") as src:
        png = src.read()
    with artifacts.atomic_write(os.path.join(workdir, f"grid_{iteration:06d}.png")) as dst:
        dst.write(png)


# Fields that never change the images or the results: they may differ on any rerun.
_RUN_FIELDS = (
    "distill.log_every",
    "distill.checkpoint_every",
    "distill.keep_checkpoints",
    "distill.real_chunk",  # slicing the real forward pass changes only float rounding
    "microbatch",  # likewise for the training passes
    "guard",
    "mesh",  # the same run on other devices gives the same images up to float rounding
)
# While a run is unfinished its length and evaluation settings may change too. Once it has
# finished (results.json exists) only distill.iterations may grow: other evaluation settings
# would silently overwrite its results.
_RESUMABLE_FIELDS = (
    *_RUN_FIELDS,
    "distill.iterations",
    "distill.eval_every",
    "distill.eval_at",
    "eval",
)


# Fields added after runs were already made, with the value that reproduces what those runs did:
# a workdir whose config.json lacks such a field is the same run when the new value is this one.
_ADDED_FIELDS = {
    "precision": "float32",
    "mi.weight_mode": "absolute",
    "microbatch": 0,
    "mi.through_unroll": False,
    "mi.heads": "shared",
    "mi.feature_nets": "random",
    "mi.objective": "mim4dd",
    "distill.eval_at": "()",
    "distill.init_from_range": "",
}


class _BoundWatch:
    """Warns once when the MI estimate (summed over layers, the best logged value) is still
    below ``guard.mi_alive_nats`` at iteration ``guard.mi_alive_by``: the heads are not learning
    the bound, so the term pulls on the images with the gradient of a bound on nothing (seen
    with per-side heads at Adam 1e-3 in MTT: BENCHMARKS.md, "MIM4DD, the paper's form")."""

    def __init__(self, config: Any) -> None:
        g = config.guard
        on = config.mi.objective == "mim4dd" and bool(state_lib.mi_weight(config))
        self.by, self.nats = (int(g.mi_alive_by) if on else 0), float(g.mi_alive_nats)
        self.best, self.warned = -float("inf"), False

    def see(self, iteration: int, mi_sum: float) -> bool:
        """Takes one logged window's estimate summed over layers; True when it warned (once)."""
        if not self.by or self.warned:
            return False
        self.best = max(self.best, mi_sum)
        if iteration < self.by or self.best >= self.nats:
            return False
        self.warned = True
        message = (
            f"warning: the MI estimate is still below guard.mi_alive_nats={self.nats:g} nats "
            f"(best {self.best:.3g}, summed over layers) at iteration {iteration}: the heads are "
            "not learning the bound, so the MI term's gradient is noise; try a lower mi.lr "
            "(mi.heads=per_side: 3e-4) or mi.reduce=flatten (guard.mi_alive_by=0: no check)"
        )
        logging.warning(message)
        artifacts.progress_write(message)
        return True


def _config_fingerprint(config: Any) -> dict[str, Any]:
    """Every config field, flattened to dotted names and JSON scalars."""
    flat = artifacts.flatten_dotted(config.to_dict())
    scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
    return json.loads(json.dumps(scalars))


def _matches(name: str, fields: Sequence[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


def check_same_run(workdir: str, config: Any) -> None:
    """ConfigError if ``workdir`` holds a distillation with a different config (names the first
    differing field). ``_RESUMABLE_FIELDS`` may differ while the run is unfinished; a finished
    run only accepts ``_RUN_FIELDS`` and more iterations."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = _config_fingerprint(config)
    finished = os.path.isfile(os.path.join(workdir, "results.json"))
    allowed = (*_RUN_FIELDS, "distill.iterations") if finished else _RESUMABLE_FIELDS
    hint = "resume it with the same config or choose a new --workdir"
    if finished:
        hint = (
            "it has finished; to evaluate its set differently use evaluate mode: "
            "--config=<dataset config>:evaluate "
            f"--config.eval.set={os.path.join(workdir, 'distilled.npz')} and a new --workdir"
        )
    for name, value in _ADDED_FIELDS.items():
        if name not in old and new.get(name) == value:
            old[name] = value
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name) and not _matches(name, allowed):
            raise ConfigError(
                f"workdir {workdir!r} holds a run with {name}={old.get(name)!r}, not "
                f"{new.get(name)!r}; {hint}"
            )
    done, wanted = old.get("distill.iterations", 0), new.get("distill.iterations", 0)
    if finished and wanted < done:
        raise ConfigError(
            f"workdir {workdir!r} holds a finished run of distill.iterations={done}; it cannot "
            f"be shortened to {wanted}; choose a new --workdir"
        )


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it checkpoints)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handlers, stop only by the end
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _load_experts(config: Any, dataset: data_lib.Dataset) -> Any:
    folder = config.mtt.experts_dir
    if not folder:
        what = config.method if methods.get(config.method).needs_experts else None
        what = what or "mi.feature_nets='experts'"
        raise ConfigError(
            f"{what} needs expert trajectories: set --config.mtt.experts_dir to the workdir of "
            "an experts run (python run.py --config=<dataset config>:experts --workdir=...)"
        )
    return experts_lib.load(
        folder, dataset=dataset, config=config, min_epochs=min_expert_epochs(config)
    )


@runner.holds_workdir
def run(config: Any, workdir: str) -> dict[str, Any]:
    """Distils ``config.data`` with ``config.method`` (+ MI) and writes the workdir artifacts.

    Resumes from the newest checkpoint in ``workdir/checkpoints`` (same config required; see
    :func:`check_same_run`). Writes ``metrics.jsonl`` and TensorBoard events (loss, base loss,
    per-layer MI, the image-gradient norms of both terms and their ratio and cosine, MTT lr, skipped steps, s/iter, peak memory, compile count, accuracy rows),
    ``distilled.npz`` (pixel space, plus a model-space copy), ``grid.png`` and
    ``grid_<iteration>.png`` at every evaluation (each ``distill.eval_every`` iterations,
    counting 0 = the initial set, and at the end), ``accuracy.png`` and ``results.json``.
    SIGTERM/SIGINT save a checkpoint and stop.

    Devices: the step runs on ``config.mesh`` (see ``steps.make_step``), evaluation spreads its
    models over it. In a multi-process launch (``mesh.distributed``) every process runs this
    loop and saves the orbax checkpoints together; only process 0 writes the other artifacts.
    """
    sharding.initialize_distributed(sharding.options(config)["distributed"])
    mesh = sharding.mesh_from_config(config)
    main = sharding.is_main_process()

    def checks(dataset: data_lib.Dataset, folder: str) -> experts_lib.Experts | None:
        config_lib.check_ipc(config.ipc, data_lib.smallest_class(dataset))
        state_lib.check_plan(config, dataset.num_classes, mesh)
        if config.distill.init_from:
            state_lib.read_init(config.distill.init_from, dataset, config)
        loaded = _load_experts(config, dataset) if needs_experts(config) else None
        check_same_run(folder, config)
        return loaded

    workdir, dataset, experts = runner.start(config, workdir, "distill", checks)
    if main:
        artifacts.write_json(
            os.path.join(workdir, "config.json"), _config_fingerprint(config), sort_keys=True
        )

    index = data_lib.class_index(dataset.train_labels, dataset.num_classes)
    d = config.distill
    key = jax.random.key(config.seed)
    # Placed before the restore: orbax restores into the template's shardings.
    state = state_lib.place_state(
        state_lib.init_state(jax.random.fold_in(key, 0), dataset, config), mesh, config
    )
    checkpoints = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=d.keep_checkpoints
    )
    start = 0
    restored = checkpoints.restore(state)
    if restored is not None:
        start, state = restored
        logging.warning("resuming %s from iteration %d", workdir, start)
    step = steps_lib.make_step(config, dataset)
    writer = artifacts.MetricWriter(workdir, tensorboard=True) if main else None
    if writer is not None:
        # A killed run may have logged steps after its last checkpoint; they are redone now, so
        # they go (each step once in the trace), and so does a final evaluation, always redone.
        writer.resume_at(
            start, keep=lambda row: not ("accuracy" in row and row["step"] == d.iterations)
        )
    everywhere = sharding.replicated(mesh)
    real_images = sharding.put(np.asarray(dataset.train_images, np.float32), everywhere)
    trajectories = None if experts is None else sharding.put(experts.trajectories, everywhere)
    eval_key, step_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    summary: dict[str, Any] = {"method": config.method, "ipc": config.ipc, "dataset": dataset.name}

    def evaluate(iteration: int) -> None:
        if main:
            _save_artifacts(workdir, state, dataset, config, iteration)
        if (
            iteration != d.iterations
            and jax.process_count() == 1
            and all(
                iteration in points
                for points in artifacts.accuracy_history(workdir).values() or [{}]
            )
        ):
            return  # a resumed run already evaluated this iteration before it stopped
        # Every process evaluates: the models are spread over the whole mesh.
        results = evaluate_lib.evaluate_from_config(
            eval_key,
            sharding.to_host(state["images"]),
            state_lib.eval_labels(state),
            dataset,
            config,
            lr=state_lib.student_lr(state, config),
            mesh=mesh,
        )
        summary["accuracy"] = {r.model: r.as_dict() for r in results}
        summary["iteration"] = iteration
        if not main:
            return
        writer.write(iteration, accuracy=summary["accuracy"])
        with open(os.path.join(workdir, "grid.png"), "rb") as f:  # written by _save_artifacts
            writer.write_image(iteration, "synthetic/grid", f.read())
        artifacts.save_accuracy_plot(workdir)
        for r in results:
            artifacts.progress_write(f"{config.method} ipc{config.ipc} it {iteration}: {r}")

    eval_at = {int(i) for i in d.eval_at}
    mi_on = bool(state_lib.mi_weight(config))
    logging.info("distilling %s ipc %d for %d iterations", config.method, config.ipc, d.iterations)
    bar = artifacts.progress_iter(
        range(start, d.iterations),
        f"{config.method} ipc{config.ipc}",
        d.iterations,
        unit="it",
        initial=start,
        enabled=main,  # in logs too: a distillation's bar is its progress line
    )
    window_start, window, consecutive_skips = time.perf_counter(), [], 0
    alive = _BoundWatch(config) if main else None
    with _StopRequest() as stop:
        for it in bar:
            if (d.eval_every and it % d.eval_every == 0) or it in eval_at:
                evaluate(it)
                window_start, window = time.perf_counter(), []
            state, metrics = step(
                state, jax.random.fold_in(step_key, it), real_images, index, trajectories
            )
            window.append(metrics)
            done = it + 1
            if done % d.log_every == 0 or done == d.iterations or stop.signum is not None:
                rows = jax.device_get(window)  # the only host sync, once per log window
                now = time.perf_counter()
                for m in rows:
                    consecutive_skips = consecutive_skips + 1 if m["skipped"] else 0
                row = {k: np.asarray(v).tolist() for k, v in rows[-1].items()}
                row["skipped"] = int(sum(int(m["skipped"]) for m in rows))
                # The first window includes compilation.
                row["s_per_iter"] = (now - window_start) / len(rows)
                row["compiles"] = step._cache_size()
                row.update(_memory_stats())
                if writer is not None:
                    writer.write(done, **row)
                postfix = {"loss": f"{row['loss']:.4g}"}
                if mi_on:
                    mi_sum = float(np.sum(row["mi"]))
                    postfix["mi"] = f"{mi_sum:.3g}"
                    if alive is not None:
                        alive.see(done, mi_sum)
                    # How hard the MI term pushes the images, relative to the base loss.
                    postfix["mi/base"] = f"{row['grad_ratio']:.2g}"
                bar.set_postfix(postfix)
                window_start, window = now, []
                if consecutive_skips >= config.guard.max_consecutive:
                    checkpoints.close()
                    raise ConfigError(
                        f"{consecutive_skips} consecutive steps had a non-finite loss or "
                        "gradient or (MTT) a learned lr <= 0 "
                        f"(guard.max_consecutive={config.guard.max_consecutive}); lower "
                        "distill.lr or mtt.lr_lr. The last good checkpoint and distilled.npz "
                        "are kept"
                    )
            if stop.signum is not None or (d.checkpoint_every and done % d.checkpoint_every == 0):
                checkpoints.save(done, state)
            if stop.signum is not None:
                checkpoints.close()
                bar.close()
                logging.warning("stopped by signal %d after iteration %d", stop.signum, done)
                raise SystemExit(128 + stop.signum)
    checkpoints.save(d.iterations, state)
    checkpoints.close()
    evaluate(d.iterations)
    if main:
        # "accuracy" (= "final") is the last evaluation, which DC/DSA/DM's code reports; MTT's
        # code reports the best over its evaluations. Both are recorded, labelled.
        summary.update(artifacts.final_and_best(artifacts.accuracy_history(workdir)))
        summary["num_models"] = int(config.eval.num_models)
        if experts is not None:
            # The count this run matched against (the reference trains 100), not experts.num.
            shape = experts.trajectories.shape
            summary["experts"] = {
                "num": int(shape[0]),
                "epochs": int(shape[1]) - 1,
                "dir": config.mtt.experts_dir,
            }
        runner.finish(workdir, summary, log=False)
    return summary
