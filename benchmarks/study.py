"""Runs a study: a grid of ``run.py`` cells x seeds, resumable across sittings and machines.

  python benchmarks/study.py benchmarks/studies/reproduction/study.toml            # run / continue
  python benchmarks/study.py benchmarks/studies/reproduction/study.toml --only 'dm_*'
  python benchmarks/study.py benchmarks/studies/reproduction/study.toml --report    # tables only
  python benchmarks/study.py benchmarks/studies/reproduction/study.toml --list      # plan, hours left
  python benchmarks/study.py benchmarks/studies/reproduction/study.toml --jobs 2    # 2 at once

A study file (TOML) declares the grid as data::

    description = "..."
    config = "configs/fashion_mnist.py"   # default config file of every cell
    seeds = [0, 1, 2]                     # default seeds (--config.seed) of every cell
    compare = ["mi.weight"]               # fields whose paired differences are reported
    pairs = [["dm_ipc1", "dm_ipc1_mi"]]   # optional: cell pairs (b - a) reported whatever differs
    [overrides]                           # --config.* overrides of every cell
    "distill.eval_every" = 250

    [[cells]]                             # one cell ...
    name = "dm_ipc1"
    arg = "dm,ipc1"                       # config argument: configs/<file>.py:<arg>
    seeds = [0]                           # optional, replaces the default
    published = 70.7                      # optional: the published accuracy (%) ...
    published_note = "DM, ConvNet-3"      # ... and what it is (best or final, its protocol)
    [cells.overrides]
    "distill.iterations" = 2000

    [[cells]]                             # ... or the first k iterations of one
    name = "dm_ipc1_500"
    prefix_of = "dm_ipc1"                 # its config, distill.iterations = k
    iterations = 500                      # k: one of the parent's evaluations

    [[grids]]                             # ... or a cross product of cells
    name = "screen"
    arg = "dm,ipc10"
    [grids.axes]
    "mi.weight" = [0.0, 0.1]
    "mi.head" = ["linear", "none"]

The whole file is checked before anything runs or is written: unknown keys (top level, cell,
grid), the types (seeds integers, published a number, overrides a table, ...) and every cell's
config, built from its overrides by run.py's own flag parser and checked as run.py checks it
(unknown fields, values, choices). Every problem is one ``error:`` line; then exit code 2.
``--list`` is the dry run.

Each (cell, seed) is one ``run.py`` process with its workdir in
``runs/study/<study>/<cell>/seed<k>``. The runner

- skips a seed whose results are committed in
  ``benchmarks/studies/<study>/results/<cell>/seed<k>.json`` (so a fresh clone continues where
  the last sitting stopped), and collects one whose workdir finished but was never collected;
- gives a seed of a prefix cell (``prefix_of = "<cell>"``, ``iterations = k``: that cell's
  config run for k iterations, k one of its evaluations) without a run when its parent's result
  of that seed is committed: the record is the parent's cut at k (:func:`derive_prefix`), marked
  ``derived_from``. A shorter protocol thus reuses the longer runs' prefixes;
- with ``--jobs N``, runs N seeds at once, each pinned to its own share of the cores: a small
  step (MTT IPC 1) uses two cores poorly, so two runs on one core each get ~1.3x as much done;
  when nothing is left to start, the running seed with the most time left (over 10 minutes at
  its measured speed) is stopped at a checkpoint and resumed on the freed cores too;
- first reruns the inputs of the seeds it is to run (a cell whose workdir another cell's
  overrides name, e.g. ``mtt.experts_dir``) when their results are committed but their workdir
  is gone, keeping the committed record (:func:`rebuild_inputs`);
- resumes an interrupted seed from its checkpoints (run.py resumes from its workdir); the child
  gets SIGTERM when the runner dies (``kill -9`` included), so it checkpoints and stops, and a
  rerun loses at most one ``distill.checkpoint_every`` interval; SIGTERM (or Ctrl-C) to the
  runner passes it on and waits for the children to stop, and a rerun started while an old
  child still holds its workdir waits for it (run.py locks its workdir); after a ``kill -9``
  of both, run.py cuts ``metrics.jsonl`` back to its last checkpoint, so every step is traced
  once, and the wall time sums every sitting (a killed one up to its last write);
- writes ``runs/study/<study>/table.md`` and ``table.csv`` (per cell: final and best accuracy
  mean ± std over seeds, each seed being its mean over the evaluation models; seeds, models,
  iterations, s/iter, peak RSS, wall time; the published number and the difference),
  ``accuracy.png`` (mean ± std band over seeds against the iteration) and the paired
  differences of every two cells that differ only in one ``compare`` field and of every
  declared pair (mean, standard error and the 95% t-interval over the shared seeds);
  ``iterations.csv`` and a table.md section hold each cell's accuracy at every evaluated
  iteration, and (``paired_iterations.csv``) each declared pair's difference there.

This file is the command line and the runner (running, resuming and collecting seeds);
``study_spec.py`` reads and checks the study file (cells, configs, commands, paths),
``study_report.py`` writes the tables and ``study_mi.py`` the MI term's diagnostics.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/study.py` puts benchmarks/, not the root, first
    sys.path.insert(0, ROOT)

from benchmarks.study_report import report  # noqa: E402  (after the sys.path fix)
from benchmarks.study_spec import (  # noqa: E402
    Cell,
    Study,
    StudyError,
    command,
    load_study,
    only_patterns,
    result_path,
    select,
    workdir_of,
)
from mim4dd_jax import artifacts  # noqa: E402

RESULT_VERSION = 1


# ------------------------------------------------------------------------------ running


# Runs argv[3:] after asking Linux to send it SIGTERM when this runner dies (PR_SET_PDEATHSIG,
# kept across exec), even by SIGKILL: the child then checkpoints and stops; a rerun started
# before it has (it locks its workdir while it runs) waits for it in start_seed. argv[2],
# when not empty, pins it to those cores (``--jobs``; kept across exec, and XLA sizes its
# thread pool by it). A wrapper, not preexec_fn, which is unsafe in a multithreaded parent
# (JAX's, in the tests).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(143); "
    "sys.argv[2] and os.sched_setaffinity(0, [int(c) for c in sys.argv[2].split(',')]); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)
# How often the runner looks at its children with --jobs > 1.
_POLL_S = 1.0
# With --jobs > 1 and nothing left to start, a running seed is resumed on the freed cores too
# (XLA sizes its thread pool when it starts, so only a restart uses them): at most once a
# minute, and only a seed with more than 10 minutes left at its measured speed, since the
# restart costs a checkpoint, a reload and a compile (~1 min for MTT IPC 1).
_WIDEN_CHECK_S = 60.0
_WIDEN_MIN_LEFT_S = 600.0


def _runner_record(workdir: str) -> dict[str, Any]:
    """study_runner.json: ``sittings`` (run.py starts), ``wall_s`` (their summed wall time) and,
    while a sitting runs, ``open`` (its start time)."""
    path = os.path.join(workdir, "study_runner.json")
    if not os.path.isfile(path):
        return {"wall_s": 0.0, "sittings": 0}
    with open(path) as f:
        return json.load(f)


def _last_alive(workdir: str) -> float:
    """When the run in ``workdir`` last wrote anything (its log, metrics, checkpoints): the end
    of a sitting whose runner was killed with it."""
    paths = [workdir + ".log", workdir, os.path.join(workdir, "checkpoints")]
    paths += [os.path.join(workdir, n) for n in ("metrics.jsonl", "distilled.npz", "results.json")]
    return max((os.path.getmtime(p) for p in paths if os.path.exists(p)), default=0.0)


def _close_sitting(workdir: str, record: dict[str, Any], end: float | None = None) -> None:
    """Adds an open sitting's time to ``wall_s``: up to ``end``, or, for a sitting whose runner
    died without closing it (``kill -9`` of the whole process group), up to the run's last
    sign of life."""
    start = record.pop("open", None)
    if start is not None:
        end = _last_alive(workdir) if end is None else end
        record["wall_s"] += max(0.0, end - start)


@dataclasses.dataclass
class _Running:
    """One started run.py child and what closing it needs."""

    cell: Cell
    seed: int
    workdir: str
    child: subprocess.Popen
    log: IO[str]
    cores: tuple[int, ...] | None


# How long a seed's start waits for a run that still holds its workdir (a run.py stopping after
# a signal finishes its step and saves a checkpoint first: minutes for a slow step).
_WORKDIR_WAIT_S = 1800.0


def _wait_for_workdir(study: Study, workdir: str, timeout_s: float = _WORKDIR_WAIT_S) -> None:
    """Returns once no process holds ``workdir`` (run.py locks it while it runs, see
    ``mim4dd_jax.runner.lock``), or after ``timeout_s`` (the child then says who holds it)."""
    if not os.path.isdir(workdir):
        return
    deadline, said = time.time() + timeout_s, False
    while (fd := artifacts.lock_folder(workdir)) is None and time.time() <= deadline:
        if not said:
            print(f"[{study.name}] waiting for the run still in {workdir}", flush=True)
            said = True
        time.sleep(2.0)
    if fd is not None:
        os.close(fd)  # released before the child starts


def start_seed(
    study: Study,
    cell: Cell,
    seed: int,
    *,
    quiet: bool = False,
    cores: Sequence[int] | None = None,
) -> _Running:
    """Starts (or resumes) one seed in its workdir, pinned to ``cores`` when given; does not
    wait (:func:`finish_seed` does)."""
    workdir = workdir_of(study, cell, seed)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    _wait_for_workdir(study, workdir)
    argv = command(cell, seed, workdir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    pin = ",".join(map(str, cores)) if cores else ""
    pinned = f" (cores {pin})" if pin else ""
    print(f"[{study.name}] {cell.name} seed {seed}{pinned}: {' '.join(argv[1:])}", flush=True)
    # Counted at the start, so that a SIGKILLed sitting counts too; its time is closed at its
    # end, or by the next sitting when the runner was killed with its child.
    os.makedirs(workdir, exist_ok=True)
    record = _runner_record(workdir)
    _close_sitting(workdir, record)
    record["sittings"] += 1
    record["open"] = time.time()
    artifacts.write_json(os.path.join(workdir, "study_runner.json"), record)
    log = open(workdir + ".log", "a")  # noqa: SIM115  (closed by finish_seed)
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), pin, *argv],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.DEVNULL if quiet else log,
        )
    except BaseException:
        log.close()
        raise
    return _Running(cell, seed, workdir, child, log, tuple(cores) if cores else None)


def finish_seed(run: _Running) -> int:
    """Waits for a started seed (SIGTERM to it on Ctrl-C), closes its sitting; returns run.py's
    exit code."""
    try:
        code = run.child.wait()
    except KeyboardInterrupt:
        run.child.send_signal(signal.SIGTERM)
        run.child.wait()
        raise
    finally:
        run.log.close()
        record = _runner_record(run.workdir)
        _close_sitting(run.workdir, record, end=time.time())
        artifacts.write_json(os.path.join(run.workdir, "study_runner.json"), record)
    return code


def run_seed(
    study: Study,
    cell: Cell,
    seed: int,
    *,
    quiet: bool = False,
    cores: Sequence[int] | None = None,
) -> int:
    """Runs (or resumes) one seed in its workdir and waits; returns run.py's exit code."""
    return finish_seed(start_seed(study, cell, seed, quiet=quiet, cores=cores))


def core_groups(jobs: int, cores: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """``jobs`` disjoint, near-equal groups of ``cores`` (default: the cores this process may
    run on), one per concurrent run. A run of a small step uses two cores poorly (MTT IPC 1:
    21.0 s/iter on one core, 13.4 on two), so two runs side by side get more done."""
    if cores is None:
        if not hasattr(os, "sched_getaffinity"):
            raise StudyError(
                f"--jobs {jobs}: runs are pinned to cores with Linux's sched_setaffinity, which "
                "this OS lacks; valid here: 1"
            )
        cores = sorted(os.sched_getaffinity(0))
    if not 1 <= jobs <= len(cores):
        raise StudyError(
            f"--jobs {jobs}: valid: 1 to {len(cores)}, the cores this process may run on"
        )
    size, extra = divmod(len(cores), jobs)
    groups, at = [], 0
    for j in range(jobs):
        n = size + (j < extra)
        groups.append(tuple(cores[at : at + n]))
        at += n
    return groups


# ------------------------------------------------------------------------------ collecting


def collect(study: Study, cell: Cell, seed: int) -> dict[str, Any]:
    """The small, committed record of one finished seed, from its workdir."""
    workdir = workdir_of(study, cell, seed)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    history = artifacts.accuracy_history(workdir)
    rows = artifacts.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    rss = [r["peak_rss_bytes"] for r in rows if r.get("peak_rss_bytes")]
    config_path = os.path.join(workdir, "config.json")
    config = None
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    scalars = {k: v for k, v in (rows[-1] if rows else {}).items() if k not in ("accuracy",)}
    record = {
        "version": RESULT_VERSION,
        "study": study.name,
        "cell": cell.name,
        "seed": seed,
        "commit": _commit(),
        "config_file": cell.config,
        "arg": cell.arg,
        "overrides": dict(cell.overrides),
        "iterations": int(results.get("iteration", 0)),
        "evaluations": {
            model: [{"iteration": it, **points[it]} for it in sorted(points)]
            for model, points in history.items()
        },
        **artifacts.final_and_best(history),
        "num_models": _num_models(history),
        "s_per_iter": _step_speed(rows),
        "peak_rss_bytes": max(rss) if rss else None,
        "wall_s": _wall_s(workdir) or None,
        "last_metrics": scalars,
        "trace": trace(rows),
        "results": results,
        "config": config,
    }
    os.makedirs(os.path.dirname(result_path(study, cell, seed)), exist_ok=True)
    artifacts.write_json(result_path(study, cell, seed), record, indent=1, sort_keys=True)
    return record


def derive_prefix(parent: Mapping[str, Any], cell: Cell) -> dict[str, Any] | None:
    """The record of ``cell`` (``prefix_of`` a cell, ``distill.iterations`` k) from its parent
    cell's record of the same seed, or None when that run has no evaluation at k: the
    evaluations and trace up to k, final and best among those. A run's state at iteration k does
    not depend on how long it is to run (each step's key is ``fold_in(key, it)``, no schedule
    spans the run, evaluations use their own key; ``tests/test_distill_eval_schedule.py``), so
    these are the numbers a run of k iterations gives. Its wall time is not known (None)."""
    k = int(cell.overrides["distill.iterations"])
    curves = {
        model: {int(e["iteration"]): {f: e[f] for f in e if f != "iteration"} for e in evals}
        for model, evals in parent.get("evaluations", {}).items()
    }
    if not curves or any(k not in points for points in curves.values()):
        return None
    cut = {
        model: {it: v for it, v in points.items() if it <= k} for model, points in curves.items()
    }
    chosen = artifacts.final_and_best(cut)
    rows = [r for r in parent.get("trace", []) if r.get("step", 0) <= k]
    config = dict(parent.get("config") or {})
    for key in ("distill.iterations", "distill.eval_at"):
        if key in cell.overrides and key in config:
            config[key] = cell.overrides[key]
    results = dict(parent.get("results") or {})
    results.update(
        iteration=k,
        accuracy={m: {f: v[f] for f in ("all", "mean", "std")} for m, v in chosen["final"].items()},
        final=chosen["final"],
        best=chosen["best"],
    )
    return {
        **parent,
        "cell": cell.name,
        "overrides": dict(cell.overrides),
        "iterations": k,
        "evaluations": {
            m: [{"iteration": it, **v} for it, v in sorted(p.items())] for m, p in cut.items()
        },
        **chosen,
        "s_per_iter": _step_speed(rows),
        "wall_s": None,
        "last_metrics": dict(rows[-1]) if rows else {},
        "trace": rows,
        "results": results,
        "config": config,
        "derived_from": {
            "cell": parent.get("cell"),
            "seed": parent.get("seed"),
            "iterations": parent.get("iterations"),
        },
    }


def derive_prefixes(study: Study, cells: Iterable[Cell]) -> int:
    """Writes the result of every seed of a ``prefix_of`` cell that its parent's committed
    result holds (:func:`derive_prefix`); returns how many it wrote."""
    by_name, written = {c.name: c for c in study.cells}, 0
    for cell in cells:
        if cell.prefix_of is None:
            continue
        for seed in cell.seeds:
            path = result_path(study, cell, seed)
            source = result_path(study, by_name[cell.prefix_of], seed)
            if os.path.isfile(path) or not os.path.isfile(source):
                continue
            with open(source) as f:
                record = derive_prefix(json.load(f), cell)
            if record is None:
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            artifacts.write_json(path, record, indent=1, sort_keys=True)
            written += 1
            print(
                f"[{study.name}] {cell.name} seed {seed}: the first {cell.overrides['distill.iterations']} "
                f"iterations of {cell.prefix_of} seed {seed} (no run)",
                flush=True,
            )
    return written


def _wall_s(workdir: str) -> float:
    """The summed wall time of every sitting of a run, an unclosed last one included."""
    record = _runner_record(workdir)
    _close_sitting(workdir, record)
    return float(record["wall_s"])


# Per logged step, what the MI diagnostics plot and table need (benchmarks/study_mi.py; a few
# KB per run).
TRACE_FIELDS = (
    "loss",
    "base_loss",
    "mi",
    "grad_norm_base",
    "grad_norm_mi",
    "grad_cos",
    "grad_ratio",
    "mi_lambda",
    "syn_lr",
    "s_per_iter",
)


def trace(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The training rows of metrics.jsonl (those with a loss), cut to TRACE_FIELDS + step."""
    return [
        {"step": r["step"], **{k: r[k] for k in TRACE_FIELDS if k in r}}
        for r in rows
        if "loss" in r
    ]


def add_traces(study: Study, cells: Sequence[Cell]) -> int:
    """Adds the trace to committed results that lack one, from their workdirs (all else kept,
    the commit included). Returns how many were updated."""
    updated = 0
    for cell in cells:
        for seed in cell.seeds:
            path = result_path(study, cell, seed)
            metrics = os.path.join(workdir_of(study, cell, seed), "metrics.jsonl")
            if not (os.path.isfile(path) and os.path.isfile(metrics)):
                continue
            with open(path) as f:
                record = json.load(f)
            if record.get("trace"):
                continue
            record["trace"] = trace(artifacts.read_metrics(metrics))
            artifacts.write_json(path, record, indent=1, sort_keys=True)
            updated += 1
    return updated


def _commit() -> str | None:
    """The commit of the tree the runner runs from (plus "+dirty" if it has changes)."""
    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _num_models(history: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> int:
    """The number of models in the last evaluation of the first architecture."""
    for points in history.values():
        if points:
            return len(points[max(points)]["all"])
    return 0


def _step_speed(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The median s/iter of metrics.jsonl's logged windows; the first includes compilation, so
    the median leaves it out."""
    timed = [r["s_per_iter"] for r in rows if "s_per_iter" in r]
    return float(_median(timed[1:] or timed)) if timed else None


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where an unfinished distillation stands, from its workdir: the last logged iteration of
    ``iterations``, the median s/iter of its logged windows (the first, which compiles, left
    out), the evaluations still to run and the median seconds one took so far (None: none ran)."""

    iteration: int
    iterations: int
    s_per_iter: float | None
    evals_left: int
    eval_s: float | None
    # What an evaluation's time depends on (IPC, the eval/model/data fields): runs that share it
    # can lend each other a measured evaluation time (see list_plan).
    protocol: tuple = ()

    def left_s(self) -> float | None:
        """Seconds left at the measured speeds, the evaluations counted only once one has been
        timed (see ``untimed``); None before the first logged speed."""
        if self.s_per_iter is None:
            return None
        left = (self.iterations - self.iteration) * self.s_per_iter
        return left + self.evals_left * (self.eval_s or 0.0)

    @property
    def untimed(self) -> int:
        """Evaluations left that ``left_s`` leaves out: none of this run's has been timed."""
        return self.evals_left if self.eval_s is None else 0


def progress(workdir: str) -> Progress | None:
    """The :class:`Progress` of a distillation workdir; None when it has not logged yet or is
    not a distillation (an experts run)."""
    config_path = os.path.join(workdir, "config.json")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if not (os.path.isfile(config_path) and os.path.isfile(metrics_path)):
        return None
    with open(config_path) as f:
        config = json.load(f)
    if config.get("mode") != "distill":
        return None
    iterations = int(config["distill.iterations"])
    every = int(config.get("distill.eval_every") or 0)
    at = config.get("distill.eval_at") or ()
    at = {int(i) for i in (ast.literal_eval(at) if isinstance(at, str) else at)}
    # As distill.py schedules them: before each step it is due at, and once after the last.
    due = {i for i in range(iterations) if (every and i % every == 0) or i in at} | {iterations}
    rows = artifacts.read_metrics(metrics_path)
    trained = [r for r in rows if "loss" in r]
    # An evaluation's time: its accuracy row's stamp minus the row logged just before it, when
    # that row is the training window ending at the same iteration (not across a resume).
    eval_s, evaluated = [], set()
    for before, row in zip([None, *rows[:-1]], rows, strict=True):
        if "accuracy" not in row:
            continue
        evaluated.add(int(row["step"]))
        if before and "loss" in before and before["step"] == row["step"] and "time" in before:
            eval_s.append(row["time"] - before["time"])
    return Progress(
        iteration=max((int(r["step"]) for r in trained), default=0),
        iterations=iterations,
        s_per_iter=_step_speed(trained),
        evals_left=len(due - evaluated),
        eval_s=float(_median(eval_s)) if eval_s else None,
        protocol=_eval_protocol(config),
    )


_EVAL_FIELDS = ("ipc", "conv_impl", "precision")
_EVAL_PREFIXES = ("eval.", "model.", "data.")


def _eval_protocol(config: dict) -> tuple:
    """The fields of a run's flat config.json that set how long one evaluation takes."""
    return tuple(
        sorted(
            (k, repr(v))
            for k, v in config.items()
            if k in _EVAL_FIELDS or k.startswith(_EVAL_PREFIXES)
        )
    )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def list_plan(study: Study, cells: Sequence[Cell]) -> list[str]:
    """``--list``: per seed, done / part / todo, with its command; for a started seed where it
    stands and the hours left at its measured speeds (its evaluations at its own measured time,
    else at that of the listed runs with the same evaluation protocol); for a seed not started,
    the median wall time of its cell's done seeds. Then the hours left in all, at the speeds
    the runs had on the cores they had (a run on one core of two is slower than one alone)."""
    lines, known, unknown, untimed = [], 0.0, 0, 0
    # Evaluation times measured in any listed workdir, by protocol: a run none of whose own
    # evaluations has been timed yet borrows their median (same models, epochs, IPC, data).
    wheres = {(c.name, s): progress(workdir_of(study, c, s)) for c in cells for s in c.seeds}
    measured: dict[tuple, list[float]] = {}
    for where in wheres.values():
        if where and where.eval_s is not None:
            measured.setdefault(where.protocol, []).append(where.eval_s)
    for cell in cells:
        done_wall = []
        for seed in cell.seeds:
            path = result_path(study, cell, seed)
            if os.path.isfile(path):
                with open(path) as f:
                    wall = json.load(f).get("wall_s")
                if wall:
                    done_wall.append(float(wall))
        for seed in cell.seeds:
            cmd = " ".join(command(cell, seed, "…")[2:])
            if os.path.isfile(result_path(study, cell, seed)):
                lines.append(f"done  {cell.name} seed {seed}: {cmd}")
                continue
            parents = [c for c in study.cells if c.name == cell.prefix_of]
            if parents and os.path.isfile(result_path(study, parents[0], seed)):
                lines.append(f"done  {cell.name} seed {seed}: a prefix of {cell.prefix_of}'s")
                continue
            where = wheres[cell.name, seed]
            if where:
                lent = where.eval_s is None and where.protocol in measured
                if lent:
                    where = dataclasses.replace(where, eval_s=_median(measured[where.protocol]))
                left = where.left_s()
                notes = [f"iteration {where.iteration} of {where.iterations}"]
                if where.s_per_iter:
                    notes.append(f"{where.s_per_iter:.1f} s/iter")
                if where.evals_left:
                    each = f"~{where.eval_s:.0f} s each" if where.eval_s is not None else "untimed"
                    each += ", as timed in other runs" if lent else ""
                    notes.append(f"{_count(where.evals_left, 'evaluation')} left ({each})")
                untimed += where.untimed
                state = f"part  {cell.name} seed {seed} ({', '.join(notes)}"
            elif done_wall:
                left = _median(done_wall)
                state = f"todo  {cell.name} seed {seed} (as its cell's done seeds"
            else:
                left = None
                state = f"todo  {cell.name} seed {seed} (not started"
            if left is None:
                unknown += 1
            else:
                known += left
                state += f"; ~{_hours(left)} left"
            lines.append(f"{state}): {cmd}")
    todo = sum(not line.startswith("done") for line in lines)
    tail = [f"left: {_count(todo, 'run')}, ~{_hours(known)} measured (one run at a time)"]
    if untimed:
        tail.append(f"plus {_count(untimed, 'untimed evaluation')}")
    if unknown:
        tail.append(f"{_count(unknown, 'run')} with no estimate yet")
    lines.append("; ".join(tail))
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _collect(study: Study, cell: Cell, seed: int) -> None:
    collect(study, cell, seed)
    print(f"[{study.name}] {cell.name} seed {seed}: collected", flush=True)


def _ended(study: Study, run: _Running, code: int, failures: list[str]) -> bool:
    """Collects a finished seed, or records its failure; True when it was stopped from outside
    (then the study stops too)."""
    if code == 0 and os.path.isfile(os.path.join(run.workdir, "results.json")):
        _collect(study, run.cell, run.seed)
        return False
    failures.append(f"{run.cell.name} seed {run.seed}: run.py exited {code}")
    print(f"[{study.name}] FAILED {failures[-1]}", flush=True)
    return code in (-signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGINT, 130)


def _merge(groups: Sequence[tuple[int, ...] | None]) -> tuple[int, ...]:
    return tuple(sorted(c for group in groups for c in group or ()))


def _widest_candidate(running: Sequence[_Running]) -> _Running | None:
    """The running seed with the most time left, if more than ``_WIDEN_MIN_LEFT_S`` (a seed
    not yet logged, or an experts run, has no estimate and is left alone)."""
    best, best_left = None, _WIDEN_MIN_LEFT_S
    for run in running:
        where = progress(run.workdir)
        left = where.left_s() if where else None
        if left is not None and left > best_left:
            best, best_left = run, left
    return best


def inputs_of(study: Study, cell: Cell) -> list[tuple[Cell, int]]:
    """The (cell, seed) runs whose workdir ``cell``'s overrides name (e.g. ``mtt.experts_dir``
    = an experts cell's workdir): that run's files are an input of every seed of ``cell``.
    Paths are resolved from the repository root, where run.py runs."""
    where = lambda path: os.path.realpath(os.path.join(ROOT, path))  # noqa: E731
    runs = {where(workdir_of(study, c, s)): (c, s) for c in study.cells for s in c.seeds}
    named = [where(v) for v in cell.overrides.values() if isinstance(v, str) and v]
    return [runs[path] for path in dict.fromkeys(named) if path in runs and runs[path][0] != cell]


def rebuild_inputs(
    study: Study, todo: Sequence[tuple[Cell, int]], *, quiet: bool = False
) -> list[str]:
    """Reruns each input (:func:`inputs_of`) of a seed in ``todo`` whose result is committed
    but whose workdir is gone (``runs/`` does not outlive its machine), one at a time on every
    core, before the seeds that read it start; returns the failures. The committed record is
    kept; the rebuilt run's results are checked against it (an input's seed makes it the same
    set on the same kind of machine) and a difference is printed, not fatal: another device
    rebuilds it with its own numerics."""
    failures: list[str] = []
    needed: dict[tuple[str, int], tuple[Cell, int]] = {}
    for cell, _ in todo:
        needed.update(((c.name, s), (c, s)) for c, s in inputs_of(study, cell))
    for cell, seed in needed.values():
        workdir = workdir_of(study, cell, seed)
        committed = result_path(study, cell, seed)
        if os.path.isfile(os.path.join(workdir, "results.json")) or not os.path.isfile(committed):
            continue  # present, or not yet run: the todo list runs and collects it
        print(
            f"[{study.name}] {cell.name} seed {seed}: rebuilding its workdir, an input", flush=True
        )
        code = run_seed(study, cell, seed, quiet=quiet)
        if code != 0 or not os.path.isfile(os.path.join(workdir, "results.json")):
            failures.append(f"{cell.name} seed {seed} (an input): run.py exited {code}")
            print(f"[{study.name}] FAILED {failures[-1]}", flush=True)
            continue
        with open(committed) as f:
            old = json.load(f).get("results") or {}
        with open(os.path.join(workdir, "results.json")) as f:
            new = json.load(f)
        keys = [k for k in old if k in new and k != "machine" and "time" not in k]
        differ = ", ".join(k for k in keys if old[k] != new[k])
        verdict = (
            f"differs from the committed record in {differ}"
            if differ
            else "the same as the committed record"
        )
        print(f"[{study.name}] {cell.name} seed {seed}: rebuilt, {verdict}", flush=True)
    return failures


def run_study(
    study: Study,
    cells: Iterable[Cell],
    *,
    quiet: bool = False,
    max_runs: int | None = None,
    jobs: int = 1,
) -> list[str]:
    """Runs every unfinished (cell, seed) of ``cells``, seed-major (every cell's first seed,
    then every cell's second, ...: a whole table early, more seeds later); returns the
    failures. ``jobs`` > 1 runs that many at once, each pinned to its own share of the cores
    (:func:`core_groups`); each run is the same program either way (its keys do not depend on
    where it runs)."""
    failures: list[str] = []
    cells = list(cells)
    derive_prefixes(study, cells)
    order = sorted(
        ((i, j, cell, seed) for j, cell in enumerate(cells) for i, seed in enumerate(cell.seeds)),
        key=lambda t: (t[0], t[1]),
    )
    todo = [(c, s) for _, _, c, s in order if not os.path.isfile(result_path(study, c, s))]
    failures += rebuild_inputs(study, todo, quiet=quiet)
    free: list[tuple[int, ...] | None] = core_groups(jobs) if jobs > 1 else [None]
    running: list[_Running] = []
    widening: _Running | None = None  # a seed stopped to resume it on more cores
    runs, stopped, next_widen = 0, False, 0.0
    try:
        while todo or running:
            while todo and free and not stopped:
                cell, seed = todo[0]
                if os.path.isfile(os.path.join(workdir_of(study, cell, seed), "results.json")):
                    todo.pop(0)
                    _collect(study, cell, seed)
                    continue
                if max_runs is not None and runs >= max_runs:
                    todo.clear()
                    break
                todo.pop(0)
                runs += 1
                # Fewer seeds left than core groups: each takes its share of the spare ones.
                take = max(1, len(free) // (len(todo) + 1)) if jobs > 1 else 1
                cores = _merge(free[:take]) if jobs > 1 else free[0]
                del free[:take]
                running.append(start_seed(study, cell, seed, quiet=quiet, cores=cores))
            if not running:
                break
            spare = jobs > 1 and free and not todo and not stopped
            if spare and widening is None and time.time() >= next_widen:
                next_widen = time.time() + _WIDEN_CHECK_S
                widening = _widest_candidate(running)
                if widening is not None:
                    cores = _merge([widening.cores, *free])
                    print(
                        f"[{study.name}] {widening.cell.name} seed {widening.seed}: nothing "
                        f"left to start, so it resumes on cores {','.join(map(str, cores))}",
                        flush=True,
                    )
                    widening.child.send_signal(signal.SIGTERM)  # it checkpoints and stops
            # One run and no spare cores: wait for it; else look at each until one has ended.
            done = running[0] if len(running) == 1 and widening is None and not free else None
            done = done or next((r for r in running if r.child.poll() is not None), None)
            if done is None:
                time.sleep(_POLL_S)
                continue
            running.remove(done)
            code = finish_seed(done)
            if done is widening:
                widening = None
                finished = os.path.isfile(os.path.join(done.workdir, "results.json"))
                if code in (-signal.SIGTERM, 128 + signal.SIGTERM) and not (finished or stopped):
                    cores = _merge([done.cores, *free])
                    free.clear()
                    running.append(
                        start_seed(study, done.cell, done.seed, quiet=quiet, cores=cores)
                    )
                    continue
            free.append(done.cores)
            if _ended(study, done, code, failures) and not stopped:
                stopped = True  # stopped from outside: stop the others, then the study
                todo.clear()
                for other in running:
                    other.child.send_signal(signal.SIGTERM)
    except KeyboardInterrupt:
        for other in running:
            other.child.send_signal(signal.SIGTERM)
        for other in running:
            finish_seed(other)
        raise
    return failures


# ------------------------------------------------------------------------------ CLI


class Terminated(KeyboardInterrupt):
    """SIGTERM to the runner, handled as Ctrl-C is: each running seed gets SIGTERM and the
    runner waits for it to checkpoint and stop, so a rerun right after finds its workdir free."""


@contextlib.contextmanager
def sigterm_stops_the_runs() -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated` (once; a second one is ignored while the
    runs stop)."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", help="a study file (TOML)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="a glob of cell names (repeat for more); a value that matches no cell whole is "
        "split at commas, so 'dm_*,dc_*' works and grid names (which hold commas) match too",
    )
    parser.add_argument("--report", action="store_true", help="only write the tables")
    parser.add_argument("--list", action="store_true", help="print the plan and what is done")
    parser.add_argument("--runs_root", default=None, help="default: runs/study")
    parser.add_argument("--max_runs", type=int, default=None, help="stop after N run.py runs")
    parser.add_argument("--quiet", action="store_true", help="run.py's stderr to /dev/null")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run.py runs at once, each pinned to its own share of the cores (default 1)",
    )
    parser.add_argument(
        "--add_traces",
        action="store_true",
        help="add the per-step diagnostics trace to committed results made without one",
    )
    args = parser.parse_args(argv)
    try:
        # Running or listing checks every cell's config first: a typo in a late cell must not
        # surface after the earlier cells have run. Tables of committed results need no config.
        check = not (args.report or args.add_traces)
        study = load_study(args.study, args.runs_root, check_configs=check)
        cells = select(study.cells, only_patterns(study.cells, args.only))
        if args.jobs != 1:
            core_groups(args.jobs)
    except StudyError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(list_plan(study, cells)))
        return 0
    if args.add_traces:
        print(f"[{study.name}] traces added to {add_traces(study, cells)} results", flush=True)
    failures = []
    if not (args.report or args.add_traces):
        try:
            with sigterm_stops_the_runs():
                failures = run_study(
                    study, cells, quiet=args.quiet, max_runs=args.max_runs, jobs=args.jobs
                )
        except KeyboardInterrupt as e:
            print(f"[{study.name}] stopped: the running seeds saved checkpoints", file=sys.stderr)
            return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    print(report(study))
    print(f"[{study.name}] tables: {os.path.relpath(study.runs_dir, ROOT)}/", flush=True)
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
