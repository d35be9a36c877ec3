"""The shell every mode (coreset, distill, experts, evaluate) runs in: one prologue, one epilogue
and one answer to "is this workdir mine?".

Prologue (:func:`start`): the workdir is claimed (checked, nothing created), the data loaded
unwhitened, the mode's data-dependent checks run; only when all of them pass is the workdir
created and the ZCA fit (if any) cached in it. So a user mistake never leaves a folder behind.
Epilogue (:func:`finish`): the summary goes to metrics.jsonl and, with the machine, to
``results.json`` (atomically).

A workdir's owner is read from the files each mode leaves (no marker file, so workdirs written
before this module stay readable): ``meta.json`` = experts, ``config.json`` = distill, a
``results.json`` with ``"mode": "evaluate"`` = evaluate, with a ``"method"`` = coreset; any other
``results.json`` is an unknown run, refused by every mode.
A mode refuses a workdir another mode owns; whether a workdir of its own mode holds *the same*
run (resume) stays the mode's own check.

One writer per workdir: :func:`start` locks it (``flock`` on the folder itself, on the main
process only) until the mode's ``run`` (decorated with :func:`holds_workdir`) returns or raises,
so a second run started on it, say while the first is still checkpointing after a SIGTERM,
stops with one line instead of writing beside it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

from mim4dd_jax import artifacts, sharding
from mim4dd_jax import data as data_lib
from mim4dd_jax.errors import ConfigError, check_choice

RESULTS = "results.json"
MODES = ("coreset", "distill", "experts", "evaluate")
# The file that marks each mode's workdir from its first moments (coreset and evaluate write
# only results.json, at the end).
_MARKERS = (("meta.json", "experts"), ("config.json", "distill"))

T = TypeVar("T")
R = TypeVar("R")


def owner(workdir: str) -> str | None:
    """The mode whose run ``workdir`` holds (one of :data:`MODES`), or None for a new or empty
    folder (or one holding none of the modes' files)."""
    for name, mode in _MARKERS:
        if os.path.exists(os.path.join(workdir, name)):
            return mode
    results = os.path.join(workdir, RESULTS)
    if not os.path.isfile(results):
        return None
    try:
        with open(results) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return "unknown"  # unreadable: never overwrite it
    if not isinstance(stored, dict):
        return "unknown"
    if stored.get("mode") == "evaluate":
        return "evaluate"
    # A distillation's results.json has "method" too, but its config.json was found above.
    return "coreset" if "method" in stored else "unknown"


def claim(workdir: str, mode: str) -> str:
    """The absolute ``workdir`` for a ``mode`` run, checked without creating anything
    (``artifacts.check_workdir``). ConfigError, naming the owner, if another mode's run is
    there: its files (results.json, distilled.npz, ...) would be overwritten or mixed."""
    check_choice("mode", mode, MODES)
    workdir = artifacts.check_workdir(workdir)
    found = owner(workdir)
    if found not in (None, mode):
        article = "an" if found[0] in "aeiou" else "a"
        raise ConfigError(
            f"workdir {workdir!r} holds another run's results ({article} {found} run); "
            f"choose a new --workdir for this {mode} run"
        )
    return workdir


# The workdirs this process holds (absolute path -> the open folder whose flock is the claim).
# Process state by nature: the lock lives as long as that descriptor, and the OS drops it when
# the process ends, even by SIGKILL, so a lock is never stale.
_HELD: dict[str, int] = {}


def lock(workdir: str) -> None:
    """Claims the existing folder ``workdir`` for this process alone until :func:`unlock` or
    the process ends (again by this process: a no-op). ConfigError if another process holds it.
    A filesystem without ``flock`` support is not locked."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if workdir in _HELD:
        return
    fd = artifacts.lock_folder(workdir)
    if fd is None:
        raise ConfigError(
            f"workdir {workdir!r} is in use by another run (still running, or saving its "
            "checkpoint after a stop signal); wait for it to end, or choose another --workdir"
        )
    _HELD[workdir] = fd


def unlock(workdir: str) -> None:
    """Releases ``workdir`` if this process holds it."""
    fd = _HELD.pop(os.path.abspath(os.path.expanduser(workdir)), None)
    if fd is not None:
        os.close(fd)


def holds_workdir(run: Callable[..., R]) -> Callable[..., R]:
    """Decorates a mode's ``run(config, workdir, ...)``: the workdir that :func:`start` locked
    is released when it returns or raises (a refused resume, a stop signal, the guard), so a
    later run in another process is not refused while this one lives on (a notebook)."""

    @functools.wraps(run)
    def wrapper(config: Any, workdir: str, *args: Any, **kwargs: Any) -> R:
        try:
            return run(config, workdir, *args, **kwargs)
        finally:
            unlock(workdir)

    return wrapper


class Started(NamedTuple, Generic[T]):
    """What :func:`start` hands the mode: the created workdir (absolute), the dataset (whitened
    when the config says so) and whatever the mode's ``checks`` returned."""

    workdir: str
    dataset: data_lib.Dataset
    checked: T


def start(
    config: Any,
    workdir: str,
    mode: str,
    checks: Callable[[data_lib.Dataset, str], T] | None = None,
) -> Started[T]:
    """The prologue of a ``mode`` run: claim ``workdir``, load ``config.data`` unwhitened, run
    ``checks(dataset, workdir)`` (the mode's data-dependent checks; they raise ConfigError and
    may return what they read), then create the workdir and whiten into its ZCA cache."""
    workdir = claim(workdir, mode)
    # Only the main process writes the workdir's files (and a shared filesystem may lock
    # across hosts). An existing workdir is claimed before the data loads.
    main = sharding.is_main_process()
    if main and os.path.isdir(workdir):
        lock(workdir)
    dataset = data_lib.load_from_config(config.data, whitened=False)
    checked = checks(dataset, workdir) if checks is not None else None
    workdir = artifacts.prepare_workdir(workdir)
    if main:
        lock(workdir)
    dataset = data_lib.whiten_from_config(dataset, config.data, cache_dir=workdir)
    return Started(workdir, dataset, checked)


def finish(workdir: str, summary: dict[str, Any], *, log: bool = True) -> dict[str, Any]:
    """The epilogue: ``summary`` as metrics.jsonl row 0 (``log``; modes that log as they go pass
    False), then with ``machine`` added as ``workdir/results.json``. Returns the summary."""
    if log:
        artifacts.MetricWriter(workdir).write(0, **summary)
    summary["machine"] = artifacts.machine()
    artifacts.write_json(os.path.join(workdir, RESULTS), summary)
    return summary
