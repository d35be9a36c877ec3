"""Runs a study: a grid of ``run.py`` cells x seeds, resumable across sittings and machines.

  python benchmarks/study.py benchmarks/studies/reproduction/study.toml            # run / continue
  python benchmarks/study.py benchmarks/studies/reproduction/study.toml --only 'dm_*'
  python benchmarks/study.py benchmarks/studies/reproduction/study.toml --report    # tables only
  python benchmarks/study.py benchmarks/studies/reproduction/study.toml --list      # the plan

A study file (TOML) declares the grid as data::

    description = "..."
    config = "configs/fashion_mnist.py"   # default config file of every cell
    seeds = [0, 1, 2]                     # default seeds (--config.seed) of every cell
    compare = ["mi.weight"]               # fields whose paired differences are reported
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
- resumes an interrupted seed from its checkpoints (run.py resumes from its workdir); the child
  gets SIGTERM when the runner dies (``kill -9`` included), so it checkpoints and stops, and a
  rerun loses at most one ``distill.checkpoint_every`` interval; after a ``kill -9`` of both,
  run.py cuts ``metrics.jsonl`` back to its last checkpoint, so every step is traced once, and
  the wall time sums every sitting (a killed one up to its last write);
- writes ``runs/study/<study>/table.md`` and ``table.csv`` (per cell: final and best accuracy
  mean ± std over seeds, each seed being its mean over the evaluation models; seeds, models,
  iterations, s/iter, peak RSS, wall time; the published number and the difference),
  ``accuracy.png`` (mean ± std band over seeds against the iteration) and the paired
  differences of every two cells that differ only in one ``compare`` field (mean, standard
  error and the 95% t-interval over the shared seeds).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/study.py` puts benchmarks/, not the root, first
    sys.path.insert(0, ROOT)

from mim4dd_jax import artifacts  # noqa: E402  (after the sys.path fix)

RESULT_VERSION = 1


class StudyError(ValueError):
    """A mistake in a study file or the command line (printed as one line, exit 2)."""


@dataclass(frozen=True)
class Cell:
    """One grid point: a config argument plus overrides, run for each seed."""

    name: str
    config: str
    arg: str
    overrides: Mapping[str, Any]
    seeds: tuple[int, ...]
    published: float | None = None
    published_note: str = ""

    def key(self) -> tuple:
        """What two cells must share to be compared (all but their differing field)."""
        return (self.config, self.arg)


@dataclass
class Study:
    name: str
    path: str
    description: str
    cells: list[Cell]
    compare: tuple[str, ...]
    results_dir: str
    runs_dir: str
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ study files


# Cell names become folder names (workdirs, results): no glob characters, which break orbax.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-=,+")


def _value_name(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(c if c in _NAME_CHARS and c not in "=," else "_" for c in str(text))


# What a study file may hold, and what each entry must be (checked before anything runs).
TOP_KEYS = ("name", "description", "config", "seeds", "compare", "overrides", "cells", "grids")
CELL_KEYS = ("name", "arg", "config", "seeds", "published", "published_note", "overrides")
GRID_KEYS = (*CELL_KEYS, "axes")


class _Problems(list):
    """The problems found in a study file, one line each ("<file>: <where>: <what>"), in file
    order."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def add(self, where: str, message: str) -> None:
        line = f"{self.path}: {where}: {message}" if where else f"{self.path}: {message}"
        if line not in self:
            self.append(line)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_keys(entry: Mapping[str, Any], valid: Sequence[str], where: str, p: _Problems) -> None:
    for key in entry:
        if key not in valid:
            p.add(where, f"unknown key {key!r}; valid: {', '.join(valid)}")


def _check_seeds(value: Any, where: str, p: _Problems) -> tuple[int, ...] | None:
    """The seeds, or None (a problem recorded) unless ``value`` is a non-empty list of distinct
    integers."""
    if not isinstance(value, list) or not value:
        p.add(where, f"seeds must be a non-empty list of integers, e.g. [0, 1, 2], got {value!r}")
        return None
    bad = [s for s in value if not _is_int(s)]
    if bad:
        p.add(where, f"seeds must be integers, got {bad[0]!r} in {value!r}")
        return None
    if len(set(value)) != len(value):
        p.add(where, f"seeds {value!r} repeat a seed")
        return None
    return tuple(value)


def _check_overrides(value: Any, where: str, p: _Problems) -> dict[str, Any]:
    """The dotted overrides of an ``overrides`` table ({} and a problem if it is not one)."""
    if not isinstance(value, Mapping):
        p.add(where, f'overrides must be a table of "config.field" = value, got {value!r}')
        return {}
    # "a.b" = 1 and the unquoted a.b = 1 (which TOML reads as a nested table) both name a.b.
    return artifacts.flatten_dotted(value)


def _check_text(entry: Mapping[str, Any], key: str, where: str, p: _Problems) -> None:
    if key in entry and not isinstance(entry[key], str):
        p.add(where, f"{key} must be a string, got {entry[key]!r}")


def load_study(path: str, runs_root: str | None = None, *, check_configs: bool = False) -> Study:
    """Parses and checks a study file whole: unknown keys, types, names and (``check_configs``)
    every cell's run.py config (:func:`config_problems`). StudyError lists every problem, one
    line each."""
    if not os.path.isfile(path):
        raise StudyError(f"study file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"study file {path!r} is not valid TOML: {e}") from None
    p = _Problems(path)
    top = ""
    _check_keys(spec, TOP_KEYS, top, p)
    for key in ("name", "description", "config"):
        _check_text(spec, key, top, p)
    folder = os.path.dirname(os.path.abspath(path))
    name = spec.get("name") or os.path.basename(folder)
    default_config = spec.get("config", "configs/fashion_mnist.py")
    default_seeds = _check_seeds(spec["seeds"], top, p) if "seeds" in spec else (0,)
    compare = spec.get("compare", [])
    if not isinstance(compare, list) or not all(isinstance(c, str) for c in compare):
        p.add(top, f'compare must be a list of config fields, e.g. ["mi.weight"], got {compare!r}')
        compare = []
    common = _check_overrides(spec.get("overrides", {}), top, p)
    cells: list[Cell] = []

    def add(entry: Mapping[str, Any], cell_name: str, extra: Mapping[str, Any], where: str) -> None:
        arg = entry.get("arg")
        if not isinstance(arg, str):
            p.add(where, "has no 'arg'" if arg is None else f"arg must be a string, got {arg!r}")
            return
        seeds = default_seeds
        if "seeds" in entry:
            seeds = _check_seeds(entry["seeds"], where, p)
        published = entry.get("published")
        if published is not None and not _is_number(published):
            p.add(where, f"published must be a number (the accuracy in %), got {published!r}")
            published = None
        for key in ("config", "published_note", "name"):
            _check_text(entry, key, where, p)
        overrides = _check_overrides(entry.get("overrides", {}), where, p)
        if seeds is None:
            return
        cells.append(
            Cell(
                name=cell_name,
                config=str(entry.get("config", default_config)),
                arg=arg,
                overrides={**common, **overrides, **extra},
                seeds=seeds,
                published=published,
                published_note=str(entry.get("published_note", "")),
            )
        )

    entries = spec.get("cells", [])
    grids = spec.get("grids", [])
    for key, value in (("cells", entries), ("grids", grids)):
        if not isinstance(value, list) or not all(isinstance(e, Mapping) for e in value):
            p.add(top, f"{key} must be an array of tables ([[{key}]]), got {value!r}")
    entries = [e for e in entries if isinstance(e, Mapping)] if isinstance(entries, list) else []
    grids = [g for g in grids if isinstance(g, Mapping)] if isinstance(grids, list) else []
    for i, entry in enumerate(entries):
        cell_name = entry.get("name") or _value_name(entry.get("arg", ""))
        where = f"cell {cell_name!r}" if cell_name else f"cell {i + 1}"
        _check_keys(entry, CELL_KEYS, where, p)
        add(entry, str(cell_name), {}, where)
    for grid in grids:
        grid_name = grid.get("name", "grid")
        where = f"grid {grid_name!r}"
        _check_keys(grid, GRID_KEYS, where, p)
        axes = grid.get("axes", {})
        axes = artifacts.flatten_dotted(axes) if isinstance(axes, Mapping) else {}
        if not axes or not all(isinstance(v, list) and v for v in axes.values()):
            p.add(where, 'needs [grids.axes] of non-empty lists, e.g. "mi.weight" = [0.0, 0.1]')
            continue
        for values in product(*axes.values()):
            point = dict(zip(axes, values, strict=True))
            suffix = ",".join(f"{k}={_value_name(v)}" for k, v in point.items())
            add(grid, f"{grid_name}-{suffix}", point, where)
    names = [c.name for c in cells]
    for bad in dict.fromkeys(n for n in names if not n or set(n) - _NAME_CHARS):
        p.add(top, f"cell name {bad!r} may use only letters, digits and . _ - = , +")
    for duplicate in dict.fromkeys(n for n in names if names.count(n) > 1):
        p.add(top, f"two cells are named {duplicate!r}")
    if not cells and not p:
        p.add("", "the study declares no cells ([[cells]] or [[grids]])")
    if check_configs and not p:
        for problem in config_problems(cells, compare):
            p.add("", problem)
    if p:
        raise StudyError("\n".join(p))
    runs_root = runs_root or os.path.join(ROOT, "runs", "study")
    return Study(
        name=name,
        path=path,
        description=spec.get("description", ""),
        cells=cells,
        compare=tuple(compare),
        results_dir=os.path.join(folder, "results"),
        runs_dir=os.path.join(runs_root, name),
    )


def _suggest(name: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def cell_config(cell: Cell, seed: int) -> Any:
    """The config run.py builds for (cell, seed), parsed from the same argv by the same absl /
    ml_collections flag parser; raises what run.py's parser raises."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["run.py", *command(cell, seed, "unused")[2:]]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    with warnings.catch_warnings():
        # ml_collections loads config files with the deprecated load_module(): not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        values(argv)
    return holder.value


def config_problems(cells: Sequence[Cell], compare: Sequence[str] = ()) -> list[str]:
    """Every cell's config built from its overrides as run.py builds it (same flag parser), and
    checked as run.py checks it before it touches a workdir (``config.validate``, the mode),
    except the mesh's device count, which only the machine that runs a cell knows. One line per
    problem, naming the cell. Touches no device (the runner must not hold an accelerator's
    memory while its cells run)."""
    from mim4dd_jax import cli, sharding
    from mim4dd_jax import config as config_lib
    from mim4dd_jax.errors import ConfigError, check_choice

    problems, bases, fields = [], {}, set()
    for cell in cells:
        where = f"cell {cell.name!r}"
        path = os.path.join(ROOT, cell.config)
        if not os.path.isfile(path):
            problems.append(f"{where}: config file {cell.config!r} does not exist")
            continue
        base_cell = Cell(cell.name, cell.config, cell.arg, {}, cell.seeds)
        if (cell.config, cell.arg) not in bases:
            try:
                bases[(cell.config, cell.arg)] = cell_config(base_cell, cell.seeds[0])
            except Exception as e:  # noqa: BLE001 - run.py reports any parse failure as one line
                bases[(cell.config, cell.arg)] = cli._one_line(e)
        base = bases[(cell.config, cell.arg)]
        if isinstance(base, str):
            problems.append(f"{where}: config {cell.config}:{cell.arg}: {base}")
            continue
        known = sorted(artifacts.flatten_dotted(base.to_dict()))
        fields.update(known)
        unknown = [k for k in cell.overrides if k not in known]
        for k in unknown:
            problems.append(f"{where}: unknown config key {k!r}{_suggest(k, known)}")
        if unknown:
            continue
        try:
            config = cell_config(cell, cell.seeds[0])
            check_choice("mode", config.mode, cli.MODES)
            checked = config.copy_and_resolve_references()
            mesh = checked.get("mesh")
            if mesh is not None:
                with checked.unlocked():
                    del checked["mesh"]  # its device count is checked where the cell runs
                check_choice("mesh.distributed", mesh.distributed, sharding.DISTRIBUTED)
            config_lib.validate(checked)
        except ConfigError as e:
            problems.append(f"{where}: {e}")
        except Exception as e:  # noqa: BLE001 - as run.py: a flag value it cannot parse
            problems.append(f"{where}: {cli._one_line(e)}")
    for name in compare:
        if fields and name not in fields:
            problems.append(f"compare: unknown config field {name!r}{_suggest(name, fields)}")
    return problems


def only_patterns(cells: Sequence[Cell], values: Sequence[str]) -> list[str]:
    """The globs of the ``--only`` values: each value whole when it matches a cell (grid cell
    names hold commas), else its comma-separated parts."""
    patterns = []
    for value in values:
        if any(fnmatch.fnmatchcase(c.name, value) for c in cells):
            patterns.append(value)
        else:
            patterns += [p for p in value.split(",") if p]
    return patterns


def select(cells: Sequence[Cell], patterns: Sequence[str]) -> list[Cell]:
    """The cells whose name matches any glob in ``patterns`` (all when empty)."""
    if not patterns:
        return list(cells)
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        raise StudyError(
            f"--only {','.join(patterns)!r} matches no cell; cells: {', '.join(c.name for c in cells)}"
        )
    return chosen


# ------------------------------------------------------------------------------ running


def flag_value(value: Any) -> str:
    """A config value as ml_collections' ``--config.x=...`` parser reads it."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value)


def command(cell: Cell, seed: int, workdir: str) -> list[str]:
    """The ``run.py`` argv of one (cell, seed)."""
    args = [
        sys.executable,
        os.path.join(ROOT, "run.py"),
        f"--config={os.path.join(ROOT, cell.config)}:{cell.arg}",
        f"--workdir={workdir}",
        f"--config.seed={seed}",
    ]
    args += [f"--config.{k}={flag_value(v)}" for k, v in cell.overrides.items()]
    return args


# Runs argv[2:] after asking Linux to send it SIGTERM when this runner dies (PR_SET_PDEATHSIG,
# kept across exec), even by SIGKILL: the child then checkpoints and stops, so a rerun never
# finds a second writer in the workdir. A wrapper, not preexec_fn, which is unsafe in a
# multithreaded parent (JAX's, in the tests).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(143); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def result_path(study: Study, cell: Cell, seed: int) -> str:
    return os.path.join(study.results_dir, cell.name, f"seed{seed}.json")


def workdir_of(study: Study, cell: Cell, seed: int) -> str:
    return os.path.join(study.runs_dir, cell.name, f"seed{seed}")


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


def run_seed(study: Study, cell: Cell, seed: int, *, quiet: bool = False) -> int:
    """Runs (or resumes) one seed in its workdir; returns run.py's exit code."""
    workdir = workdir_of(study, cell, seed)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    argv = command(cell, seed, workdir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    print(f"[{study.name}] {cell.name} seed {seed}: {' '.join(argv[1:])}", flush=True)
    log_path = workdir + ".log"
    # Counted at the start, so that a SIGKILLed sitting counts too; its time is closed at its
    # end, or by the next sitting when the runner was killed with its child.
    os.makedirs(workdir, exist_ok=True)
    record = _runner_record(workdir)
    _close_sitting(workdir, record)
    record["sittings"] += 1
    record["open"] = time.time()
    artifacts.write_json(os.path.join(workdir, "study_runner.json"), record)
    with open(log_path, "a") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.DEVNULL if quiet else log,
        )
        try:
            code = child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)
            code = child.wait()
            raise
        finally:
            record = _runner_record(workdir)
            _close_sitting(workdir, record, end=time.time())
            artifacts.write_json(os.path.join(workdir, "study_runner.json"), record)
    return code


# ------------------------------------------------------------------------------ collecting


def collect(study: Study, cell: Cell, seed: int) -> dict[str, Any]:
    """The small, committed record of one finished seed, from its workdir."""
    workdir = workdir_of(study, cell, seed)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    history = artifacts.accuracy_history(workdir)
    rows = artifacts.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    timed = [r["s_per_iter"] for r in rows if "s_per_iter" in r]
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
        # The first log window includes compilation: the median ignores it.
        "s_per_iter": float(_median(timed[1:] or timed)) if timed else None,
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


def _wall_s(workdir: str) -> float:
    """The summed wall time of every sitting of a run, an unclosed last one included."""
    record = _runner_record(workdir)
    _close_sitting(workdir, record)
    return float(record["wall_s"])


# Per logged step, what the MI diagnostics plot and table need (a few KB per run).
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


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def load_results(study: Study) -> dict[tuple[str, int], dict[str, Any]]:
    """{(cell, seed): record} of every committed result of the study's cells."""
    out = {}
    for cell in study.cells:
        for seed in cell.seeds:
            path = result_path(study, cell, seed)
            if os.path.isfile(path):
                with open(path) as f:
                    out[(cell.name, seed)] = json.load(f)
    return out


def run_study(
    study: Study, cells: Iterable[Cell], *, quiet: bool = False, max_runs: int | None = None
) -> list[str]:
    """Runs every unfinished (cell, seed) of ``cells``, seed-major (every cell's first seed,
    then every cell's second, ...: a whole table early, more seeds later); returns the
    failures."""
    failures, runs = [], 0
    cells = list(cells)
    order = sorted(
        ((i, j, cell, seed) for j, cell in enumerate(cells) for i, seed in enumerate(cell.seeds)),
        key=lambda t: (t[0], t[1]),
    )
    for _, _, cell, seed in order:
        if os.path.isfile(result_path(study, cell, seed)):
            continue
        finished = os.path.join(workdir_of(study, cell, seed), "results.json")
        if not os.path.isfile(finished):
            if max_runs is not None and runs >= max_runs:
                return failures
            runs += 1
            code = run_seed(study, cell, seed, quiet=quiet)
            if code != 0 or not os.path.isfile(finished):
                failures.append(f"{cell.name} seed {seed}: run.py exited {code}")
                print(f"[{study.name}] FAILED {failures[-1]}", flush=True)
                if code in (-signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGINT, 130):
                    return failures  # stopped from outside: stop the study too
                continue
        collect(study, cell, seed)
        print(f"[{study.name}] {cell.name} seed {seed}: collected", flush=True)
    return failures


# ------------------------------------------------------------------------------ reporting


def seed_accuracy(record: Mapping[str, Any], which: str, model: str) -> float | None:
    """A seed's accuracy (%): the mean over its evaluation models of its final/best evaluation."""
    entry = record.get(which, {}).get(model)
    return None if entry is None else 100.0 * float(entry["mean"])


def summary_frame(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]]):
    """A pandas DataFrame, one row per (cell, evaluation model)."""
    import numpy as np
    import pandas as pd

    rows = []
    for cell in study.cells:
        records = [results[(cell.name, s)] for s in cell.seeds if (cell.name, s) in results]
        models = sorted({m for r in records for m in r.get("final", {})}) or ["-"]
        for model in models:
            row: dict[str, Any] = {
                "cell": cell.name,
                "arg": cell.arg,
                "model": model,
                "seeds": f"{len(records)}/{len(cell.seeds)}",
            }
            for which in ("final", "best"):
                accs = [seed_accuracy(r, which, model) for r in records]
                accs = np.array([a for a in accs if a is not None])
                row[f"{which}_mean"] = accs.mean() if accs.size else math.nan
                row[f"{which}_std"] = accs.std(ddof=1) if accs.size > 1 else math.nan
            row["models"] = ",".join(sorted({str(r.get("num_models")) for r in records})) or "-"
            iters = sorted({int(r.get("iterations", 0)) for r in records})
            row["iterations"] = ",".join(map(str, iters)) or "-"
            for key, scale in (("s_per_iter", 1.0), ("peak_rss_bytes", 2.0**-30)):
                vals = [r[key] * scale for r in records if r.get(key) is not None]
                row[key if scale == 1 else "peak_rss_gib"] = np.mean(vals) if vals else math.nan
            walls = [r["wall_s"] / 60 for r in records if r.get("wall_s")]
            row["wall_min"] = np.mean(walls) if walls else math.nan
            # Older records lack it; s/iter and wall time compare only within one machine.
            machines = {_machine_name(r.get("results", {}).get("machine")) for r in records}
            row["machine"] = "; ".join(sorted(machines)) or "-"
            row["published"] = cell.published if cell.published is not None else math.nan
            row["final_minus_published"] = row["final_mean"] - row["published"]
            row["best_minus_published"] = row["best_mean"] - row["published"]
            row["published_note"] = cell.published_note
            rows.append(row)
    return pd.DataFrame(rows)


def _machine_name(machine: Mapping[str, Any] | None) -> str:
    """A short label of results.json's ``machine``: the devices off CPU, else the CPU x cores."""
    if not machine:
        return "-"
    if machine.get("backend") not in (None, "cpu"):
        return str(machine.get("devices"))
    return f"{machine.get('cpu')} x{machine.get('cores')}"


def differing_field(a: Cell, b: Cell) -> str | None:
    """The one override in which two cells of the same config and arg differ, else None."""
    if a.key() != b.key():
        return None
    keys = set(a.overrides) | set(b.overrides)
    diff = [k for k in sorted(keys) if a.overrides.get(k) != b.overrides.get(k)]
    return diff[0] if len(diff) == 1 else None


def paired_differences(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]]):
    """A DataFrame of b - a over the shared seeds for every pair of cells that differ only in
    one of ``study.compare``: mean, standard error, 95% t-interval (scipy), per model and for
    both the final and the best evaluation."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    rows = []
    for i, a in enumerate(study.cells):
        for b in study.cells[i + 1 :]:
            name = differing_field(a, b)
            if name is None or name not in study.compare:
                continue
            seeds = [s for s in a.seeds if (a.name, s) in results and (b.name, s) in results]
            if not seeds:
                continue
            models = set(results[(a.name, seeds[0])].get("final", {}))
            for model in sorted(models):
                for which in ("final", "best"):
                    xa = np.array(
                        [seed_accuracy(results[(a.name, s)], which, model) for s in seeds]
                    )
                    xb = np.array(
                        [seed_accuracy(results[(b.name, s)], which, model) for s in seeds]
                    )
                    d = xb - xa
                    lo = hi = se = math.nan
                    if len(d) > 1:
                        se = float(stats.sem(d))
                        if se > 0:
                            ci = stats.ttest_rel(xb, xa).confidence_interval(0.95)
                            lo, hi = float(ci.low), float(ci.high)
                        else:
                            lo = hi = float(d.mean())
                    rows.append(
                        {
                            "field": name,
                            "a": f"{a.name} ({name}={a.overrides.get(name)})",
                            "b": f"{b.name} ({name}={b.overrides.get(name)})",
                            "model": model,
                            "which": which,
                            "seeds": len(d),
                            "mean_diff": float(d.mean()),
                            "se": se,
                            "ci95_low": lo,
                            "ci95_high": hi,
                        }
                    )
    return pd.DataFrame(rows)


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt % value


def markdown(study: Study, table, diffs) -> str:
    """The study's tables as markdown (accuracies in %)."""
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        "Accuracy (%) over seeds (each seed = the mean over its evaluation models); "
        "final = last evaluation, best = best evaluation over the run.",
        "",
        "| cell | arg | model | seeds | models/seed | iterations | final | best | published "
        "| final − pub | best − pub | s/iter | peak RSS GiB | wall min/seed | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        lines.append(
            f"| {r['cell']} | {r['arg']} | {r['model']} | {r['seeds']} | {r['models']} | "
            f"{r['iterations']} | {_pm(r['final_mean'], r['final_std'])} | "
            f"{_pm(r['best_mean'], r['best_std'])} | {_num(r['published'], '%.1f')} | "
            f"{_num(r['final_minus_published'], '%+.2f')} | "
            f"{_num(r['best_minus_published'], '%+.2f')} | {_num(r['s_per_iter'], '%.3f')} | "
            f"{_num(r['peak_rss_gib'], '%.2f')} | {_num(r['wall_min'], '%.1f')} | "
            f"{r['machine']} |"
        )
    if len(diffs):
        lines += [
            "",
            "Paired differences b − a (accuracy points) over the shared seeds, 95% t-interval:",
            "",
            "| field | a | b | model | eval | seeds | mean | SE | 95% CI |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in diffs.to_dict("records"):
            ci = (
                "-"
                if math.isnan(r["ci95_low"])
                else f"[{r['ci95_low']:+.2f}, {r['ci95_high']:+.2f}]"
            )
            lines.append(
                f"| {r['field']} | {r['a']} | {r['b']} | {r['model']} | {r['which']} | "
                f"{r['seeds']} | {r['mean_diff']:+.2f} | {_num(r['se'], '%.2f')} | {ci} |"
            )
    return "\n".join(lines) + "\n"


def plot(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]], path: str) -> None:
    """Accuracy against iteration: one line per cell (first evaluation model), ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell in study.cells:
        records = [results[(cell.name, s)] for s in cell.seeds if (cell.name, s) in results]
        curves = []
        for r in records:
            evals = r.get("evaluations", {})
            if evals:
                model = sorted(evals)[0]
                curves.append({e["iteration"]: 100 * e["mean"] for e in evals[model]})
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        acc = np.array([[c[s] for s in steps] for c in curves])
        mean, std = acc.mean(0), acc.std(0)
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{cell.name} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(study.name)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    with artifacts.atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def diagnostics_frame(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]]):
    """Per cell with an MI term: the mean over logged steps (and seeds) of grad_ratio, grad_cos
    and mi_lambda, and the MI estimate (nats, summed over layers) at the first and last log."""
    import pandas as pd

    rows = []
    for cell in study.cells:
        traces = _mi_traces(cell, results)
        if not traces:
            continue
        steps = [r for t in traces for r in t]
        rows.append(
            {
                "cell": cell.name,
                "seeds": len(traces),
                "grad_ratio": _mean_of(steps, "grad_ratio"),
                "grad_cos": _mean_of(steps, "grad_cos"),
                "mi_lambda": _mean_of(steps, "mi_lambda"),
                "mi_first": sum(sum(t[0]["mi"]) for t in traces) / len(traces),
                "mi_last": sum(sum(t[-1]["mi"]) for t in traces) / len(traces),
            }
        )
    return pd.DataFrame(rows)


def _mi_traces(
    cell: Cell, results: Mapping[tuple[str, int], Mapping[str, Any]]
) -> list[list[dict[str, Any]]]:
    """The traces of the cell's collected seeds that log an MI term."""
    traces = [
        results[(cell.name, s)].get("trace") or [] for s in cell.seeds if (cell.name, s) in results
    ]
    return [t for t in traces if t and "mi" in t[-1]]


def _mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def plot_diagnostics(
    study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]], path: str
) -> bool:
    """MI estimate (summed over layers), grad_cos and mi_lambda against the step, one line per
    cell with an MI term (seed mean). False (nothing written) when no cell has one."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    panels = (("mi", "MI estimate (nats, sum over layers)"), ("grad_cos", "cos(g_base, g_mi)"))
    panels += (("mi_lambda", "lambda"),)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    # A study has more MI cells than a 10-colour cycle: 20 colours, then a second line style.
    colours = plt.get_cmap("tab20").colors
    drawn = 0
    for cell in study.cells:
        traces = _mi_traces(cell, results)
        if not traces:
            continue
        steps = sorted(set.intersection(*({r["step"] for r in t} for t in traces)))
        style = dict(color=colours[drawn % 20], linestyle=("-", "--")[drawn // 20 % 2])
        for ax, (key, label) in zip(axes, panels, strict=True):
            by_step = [{r["step"]: r[key] for r in t} for t in traces]
            values = np.array([[np.sum(b[s]) for s in steps] for b in by_step]).mean(0)
            ax.plot(steps, values, label=cell.name, **style)
            ax.set_xlabel("iteration")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        drawn += 1
    if drawn:
        # Loose bounds (NCE at a low temperature) reach -1e4 nats while the useful ones sit
        # in [0, 3 log K]: linear near zero, logarithmic beyond, so both stay readable.
        axes[0].set_yscale("symlog", linthresh=10.0)
        axes[2].set_yscale("log")
        fig.legend(
            *axes[0].get_legend_handles_labels(),
            loc="upper center",
            ncol=4,
            fontsize=7,
            bbox_to_anchor=(0.5, 0.0),
        )
        with artifacts.atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return drawn > 0


def report(study: Study) -> str:
    """Writes table.md, table.csv, paired.csv and accuracy.png under the study's runs folder;
    returns the markdown."""
    results = load_results(study)
    table = summary_frame(study, results)
    diffs = paired_differences(study, results)
    os.makedirs(study.runs_dir, exist_ok=True)
    text = markdown(study, table, diffs)
    with artifacts.atomic_write(os.path.join(study.runs_dir, "table.md"), "w") as f:
        f.write(text)
    with artifacts.atomic_write(os.path.join(study.runs_dir, "table.csv"), "w") as f:
        table.to_csv(f, index=False)
    with artifacts.atomic_write(os.path.join(study.runs_dir, "paired.csv"), "w") as f:
        diffs.to_csv(f, index=False)
    plot(study, results, os.path.join(study.runs_dir, "accuracy.png"))
    diag = diagnostics_frame(study, results)
    if len(diag):
        plot_diagnostics(study, results, os.path.join(study.runs_dir, "diagnostics.png"))
        text += "\n### MI term diagnostics (mean over logged steps)\n\n"
        text += "| cell | seeds | grad_ratio | grad_cos | lambda | MI first | MI last |\n"
        text += "|---|---|---|---|---|---|---|\n"
        for r in diag.to_dict("records"):
            text += (
                f"| {r['cell']} | {r['seeds']} | {r['grad_ratio']:.3g} | {r['grad_cos']:+.3f} | "
                f"{r['mi_lambda']:.3g} | {r['mi_first']:.3f} | {r['mi_last']:.3f} |\n"
            )
        with artifacts.atomic_write(os.path.join(study.runs_dir, "table.md"), "w") as f:
            f.write(text)
    return text


# ------------------------------------------------------------------------------ CLI


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
    except StudyError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.list:
        for cell in cells:
            for seed in cell.seeds:
                done = os.path.isfile(result_path(study, cell, seed))
                state = "done" if done else "todo"
                print(f"{state}  {cell.name} seed {seed}: {' '.join(command(cell, seed, '…')[2:])}")
        return 0
    if args.add_traces:
        print(f"[{study.name}] traces added to {add_traces(study, cells)} results", flush=True)
    failures = (
        []
        if args.report or args.add_traces
        else run_study(study, cells, quiet=args.quiet, max_runs=args.max_runs)
    )
    print(report(study))
    print(f"[{study.name}] tables: {os.path.relpath(study.runs_dir, ROOT)}/", flush=True)
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
