"""A study file: its TOML format checked whole, the cells it declares, each cell's run.py
command and config, and where a study keeps its runs and its committed results.

The format itself (every key, with an example) is in the docstring of ``benchmarks/study.py``,
the runner; ``benchmarks/study_report.py`` turns the results into tables and
``benchmarks/study_mi.py`` adds the MI term's diagnostics. This module imports none of them.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from mim4dd_jax import artifacts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    # The cell whose runs this one's are the first iterations of (``prefix_of``): a seed of it
    # whose result is committed gives this cell's seed without a run (:func:`derive_prefix`).
    prefix_of: str | None = None

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
    # Declared (a, b) cell pairs whose paired differences are reported whatever fields they
    # differ in (e.g. a method against its base, which differ in several MI fields).
    pairs: tuple[tuple[str, str], ...] = ()


# ------------------------------------------------------------------------------ study files


# Cell names become folder names (workdirs, results): no glob characters, which break orbax.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-=,+")


def _value_name(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(c if c in _NAME_CHARS and c not in "=," else "_" for c in str(text))


# What a study file may hold, and what each entry must be (checked before anything runs).
TOP_KEYS = (
    "name",
    "description",
    "config",
    "seeds",
    "compare",
    "pairs",
    "overrides",
    "cells",
    "grids",
)
CELL_KEYS = ("name", "arg", "config", "seeds", "published", "published_note", "overrides")
GRID_KEYS = (*CELL_KEYS, "axes")
# A prefix cell names its parent and its length; the rest of its config is the parent's.
PREFIX_KEYS = ("name", "prefix_of", "iterations", "seeds", "published", "published_note")


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
        seeds, published = _seeds_and_published(entry, default_seeds, where, p)
        _check_text(entry, "config", where, p)
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
    prefixes = []
    for i, entry in enumerate(entries):
        cell_name = entry.get("name") or _value_name(entry.get("arg", ""))
        where = f"cell {cell_name!r}" if cell_name else f"cell {i + 1}"
        if "prefix_of" in entry:
            _check_keys(entry, PREFIX_KEYS, where, p)
            prefixes.append((entry, where))
            continue
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
    for entry, where in prefixes:
        cell = _prefix_cell(entry, cells, default_seeds, where, p)
        if cell is not None:
            cells.append(cell)
    names = [c.name for c in cells]
    for bad in dict.fromkeys(n for n in names if not n or set(n) - _NAME_CHARS):
        p.add(top, f"cell name {bad!r} may use only letters, digits and . _ - = , +")
    for duplicate in dict.fromkeys(n for n in names if names.count(n) > 1):
        p.add(top, f"two cells are named {duplicate!r}")
    if not cells and not p:
        p.add("", "the study declares no cells ([[cells]] or [[grids]])")
    pairs = _check_pairs(spec.get("pairs", []), cells, p)
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
        pairs=pairs,
    )


def _seeds_and_published(
    entry: Mapping[str, Any], default_seeds: tuple[int, ...] | None, where: str, p: _Problems
) -> tuple[tuple[int, ...] | None, float | None]:
    """A cell entry's seeds (the default unless given; None if bad) and published accuracy
    (None if absent or bad), with its name and published_note checked as text."""
    seeds = _check_seeds(entry["seeds"], where, p) if "seeds" in entry else default_seeds
    published = entry.get("published")
    if published is not None and not _is_number(published):
        p.add(where, f"published must be a number (the accuracy in %), got {published!r}")
        published = None
    for key in ("published_note", "name"):
        _check_text(entry, key, where, p)
    return seeds, published


def _prefix_cell(
    entry: Mapping[str, Any],
    cells: Sequence[Cell],
    default_seeds: tuple[int, ...] | None,
    where: str,
    p: _Problems,
) -> Cell | None:
    """``prefix_of = "<cell>"``, ``iterations = k``: the first k iterations of that cell's runs
    (its config with ``distill.iterations = k`` and the evaluations before k; k must be one
    of the parent's evaluations, so a committed parent seed holds this cell's result)."""
    parent_name, k = entry["prefix_of"], entry.get("iterations")
    by_name = {c.name: c for c in cells}
    if not isinstance(parent_name, str) or parent_name not in by_name:
        known = list(by_name)
        p.add(where, f"prefix_of {parent_name!r} names no cell{_suggest(str(parent_name), known)}")
        return None
    parent = by_name[parent_name]
    n = parent.overrides.get("distill.iterations")
    at = parent.overrides.get("distill.eval_at", [])
    every = parent.overrides.get("distill.eval_every")
    if not _is_int(n):
        p.add(where, f"prefix_of {parent_name!r}: that cell must set distill.iterations")
        return None
    if not _is_int(k) or not 0 < k < n:
        p.add(
            where,
            f"iterations must be an integer in 1..{n - 1} (a prefix of {parent_name!r}), got {k!r}",
        )
        return None
    if k not in at and not (_is_int(every) and every > 0 and k % every == 0):
        p.add(
            where,
            f"iterations {k} is not one of {parent_name!r}'s evaluations (distill.eval_at "
            f"{list(at)}, distill.eval_every {every}); its seeds could not be read from that cell's",
        )
        return None
    seeds, published = _seeds_and_published(entry, default_seeds, where, p)
    if seeds is None:
        return None
    overrides = {**parent.overrides, "distill.iterations": k}
    if "distill.eval_at" in overrides:
        overrides["distill.eval_at"] = [i for i in at if i < k]
    return Cell(
        name=str(entry.get("name") or f"{parent_name}-{k}"),
        config=parent.config,
        arg=parent.arg,
        overrides=overrides,
        seeds=seeds,
        published=published,
        published_note=str(entry.get("published_note", "")),
        prefix_of=parent_name,
    )


def _check_pairs(value: Any, cells: Sequence[Cell], p: _Problems) -> tuple[tuple[str, str], ...]:
    """``pairs = [["a", "b"], ...]``: two distinct declared cells of the same config and arg
    each (b - a is reported)."""
    example = 'e.g. [["mtt-base", "mtt-paper"]]'
    if not isinstance(value, list):
        p.add("", f"pairs must be a list of [a, b] cell names, {example}, got {value!r}")
        return ()
    by_name = {c.name: c for c in cells}
    pairs = []
    for pair in value:
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) for n in pair)
        ):
            p.add("", f"pairs: each pair must be [a, b], two cell names, {example}, got {pair!r}")
            continue
        where = f"pair {pair!r}"
        missing = [n for n in pair if n not in by_name]
        for n in missing:
            p.add(where, f"no cell is named {n!r}{_suggest(n, list(by_name))}")
        if missing:
            continue
        a, b = (by_name[n] for n in pair)
        if a.name == b.name:
            p.add(where, "pairs a cell with itself")
        elif a.key() != b.key():
            p.add(
                where,
                f"the cells run different configs ({a.config}:{a.arg} vs {b.config}:{b.arg}); "
                "a paired difference needs the same config and arg",
            )
        else:
            pairs.append((a.name, b.name))
    return tuple(pairs)


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


# ------------------------------------------------------------------------------ commands and paths


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


def result_path(study: Study, cell: Cell, seed: int) -> str:
    return os.path.join(study.results_dir, cell.name, f"seed{seed}.json")


def workdir_of(study: Study, cell: Cell, seed: int) -> str:
    return os.path.join(study.runs_dir, cell.name, f"seed{seed}")


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
