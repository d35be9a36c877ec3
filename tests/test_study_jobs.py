"""``study.py --jobs N``: the scheduler, with a stand-in for run.py (no JAX), so these are fast.
Each stand-in records when it ran and on which cores, then exits as told; a failed run is
recorded and the study goes on, a run stopped from outside stops the others and the study."""

import json
import os
import signal
import sys
import threading
import time

import pytest
from helpers import ROOT

sys.path.insert(0, ROOT)
from benchmarks import study as study_lib  # noqa: E402
from benchmarks import study_spec  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and 2 cores",
)

# argv: workdir, seconds to sleep, how to end ("fail": exit 1; "sigterm": kill itself as an
# outside SIGTERM would).
STAND_IN = """
import json, os, signal, sys, time
workdir, sleep, end = sys.argv[1], float(sys.argv[2]), sys.argv[3]
start = time.time()
time.sleep(sleep)
with open(os.path.join(workdir, "ran.json"), "w") as f:
    json.dump({"start": start, "end": time.time(), "cores": sorted(os.sched_getaffinity(0))}, f)
if end == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(1)
"""


def _study(tmp_path, names):
    text = "".join(f'[[cells]]\nname = "{n}"\narg = "dm,ipc1"\n' for n in names)
    path = tmp_path / "studies" / "jobs" / "study.toml"
    path.parent.mkdir(parents=True)
    path.write_text('seeds = [0]\nconfig = "configs/fashion_mnist.py"\n' + text)
    return study_spec.load_study(str(path), str(tmp_path / "runs"), check_configs=False)


def _stand_in(monkeypatch, plan):
    """run.py -> the stand-in, with (sleep, end) per cell name."""

    def command(cell, seed, workdir):
        sleep, end = plan[cell.name]
        return [sys.executable, "-c", STAND_IN, workdir, str(sleep), end]

    monkeypatch.setattr(study_lib, "command", command)


def _ran(study, name):
    path = os.path.join(study_spec.workdir_of(study, _cell(study, name), 0), "ran.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _cell(study, name):
    return next(c for c in study.cells if c.name == name)


def test_jobs_keep_n_runs_going_each_on_its_own_core(tmp_path, monkeypatch):
    study = _study(tmp_path, ["a", "b", "c"])
    _stand_in(monkeypatch, {"a": (1.5, "fail"), "b": (3.0, "fail"), "c": (0.5, "fail")})
    failures = study_lib.run_study(study, study.cells, quiet=True, jobs=2)
    # Failed runs are recorded and the study goes on: all three ran.
    assert failures == [f"{n} seed 0: run.py exited 1" for n in ("a", "c", "b")]
    ran = {n: _ran(study, n) for n in "abc"}
    groups = study_lib.core_groups(2)
    # a and b started together on the two groups; c took a's group when a ended, while b ran.
    assert ran["a"]["cores"] == list(groups[0]) and ran["b"]["cores"] == list(groups[1])
    assert ran["c"]["cores"] == list(groups[0])
    assert ran["b"]["start"] < ran["a"]["end"] <= ran["c"]["start"] < ran["b"]["end"]
    # Every run counted its sitting and closed it.
    for n in "abc":
        with open(
            os.path.join(study_spec.workdir_of(study, _cell(study, n), 0), "study_runner.json")
        ) as f:
            record = json.load(f)
        assert record["sittings"] == 1 and "open" not in record and record["wall_s"] > 0


def test_one_job_runs_unpinned_one_at_a_time(tmp_path, monkeypatch):
    study = _study(tmp_path, ["a", "b"])
    _stand_in(monkeypatch, {"a": (0.5, "fail"), "b": (0.1, "fail")})
    assert len(study_lib.run_study(study, study.cells, quiet=True)) == 2
    a, b = _ran(study, "a"), _ran(study, "b")
    assert a["end"] <= b["start"]
    assert a["cores"] == b["cores"] == sorted(os.sched_getaffinity(0))


def test_a_run_stopped_from_outside_stops_the_others_and_the_study(tmp_path, monkeypatch):
    study = _study(tmp_path, ["long", "stopped", "never"])
    _stand_in(
        monkeypatch, {"long": (60.0, "fail"), "stopped": (0.5, "sigterm"), "never": (0.1, "fail")}
    )
    t0 = time.time()
    failures = study_lib.run_study(study, study.cells, quiet=True, jobs=2)
    # The long run got SIGTERM from the runner (it never wrote ran.json), the third never started.
    assert time.time() - t0 < 30
    assert sorted(failures) == [
        "long seed 0: run.py exited -15",
        "stopped seed 0: run.py exited -15",
    ]
    assert _ran(study, "long") is None and _ran(study, "stopped") is not None
    assert not os.path.exists(study_spec.workdir_of(study, _cell(study, "never"), 0))


def test_max_runs_counts_starts_across_jobs(tmp_path, monkeypatch):
    study = _study(tmp_path, ["a", "b", "c"])
    _stand_in(monkeypatch, {n: (0.2, "fail") for n in "abc"})
    assert len(study_lib.run_study(study, study.cells, quiet=True, jobs=2, max_runs=2)) == 2
    assert _ran(study, "a") and _ran(study, "b") and _ran(study, "c") is None


def test_jobs_without_affinity_is_one_clear_error(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    with pytest.raises(
        study_spec.StudyError, match=r"--jobs 2: .*sched_setaffinity.*valid here: 1"
    ):
        study_lib.core_groups(2)


# argv: workdir. Logs like a distillation with ~1000 s left (config.json, metrics.jsonl), then
# waits; SIGTERM makes it record its cores in stopped.json and exit 143 as run.py does (after a
# checkpoint). Started again (stopped.json there), it records its cores in ran.json and fails.
LONG_STAND_IN = """
import json, os, signal, sys, time
workdir = sys.argv[1]
cores = sorted(os.sched_getaffinity(0))
stopped = os.path.join(workdir, "stopped.json")
if os.path.isfile(stopped):
    with open(os.path.join(workdir, "ran.json"), "w") as f:
        json.dump({"cores": cores}, f)
    sys.exit(1)
def stop(*_):
    with open(stopped, "w") as f:
        json.dump({"cores": cores}, f)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"mode": "distill", "distill.iterations": 110, "distill.eval_at": "()",
               "distill.eval_every": 0}, f)
with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in (10, 20):
        f.write(json.dumps({"step": step, "loss": 1.0, "s_per_iter": 10.0}) + "\\n")
time.sleep(60)
sys.exit(1)
"""


def test_with_nothing_left_to_start_a_long_run_resumes_on_the_freed_cores(tmp_path, monkeypatch):
    study = _study(tmp_path, ["long", "short"])
    # Look again soon if long has not logged yet when short ends (a slow machine).
    monkeypatch.setattr(study_lib, "_WIDEN_CHECK_S", 0.2)

    def command(cell, seed, workdir):
        if cell.name == "long":
            return [sys.executable, "-c", LONG_STAND_IN, workdir]
        return [sys.executable, "-c", STAND_IN, workdir, "1.0", "fail"]

    monkeypatch.setattr(study_lib, "command", command)
    t0 = time.time()
    failures = study_lib.run_study(study, study.cells, quiet=True, jobs=2)
    assert time.time() - t0 < 30  # long was stopped, not waited for
    # The restart is not a failure; the resumed run's own exit is.
    assert failures == ["short seed 0: run.py exited 1", "long seed 0: run.py exited 1"]
    groups = study_lib.core_groups(2)
    workdir = study_spec.workdir_of(study, _cell(study, "long"), 0)
    with open(os.path.join(workdir, "stopped.json")) as f:
        assert json.load(f)["cores"] == list(groups[0])
    assert _ran(study, "long")["cores"] == sorted(groups[0] + groups[1])
    with open(os.path.join(workdir, "study_runner.json")) as f:
        assert json.load(f)["sittings"] == 2


def test_a_run_near_its_end_is_not_restarted(tmp_path, monkeypatch):
    # ~900 s left at its speed, under a 5000 s threshold: long runs to its end on its own core.
    study = _study(tmp_path, ["long", "short"])
    monkeypatch.setattr(study_lib, "_WIDEN_MIN_LEFT_S", 5000.0)

    def command(cell, seed, workdir):
        if cell.name == "long":
            return [sys.executable, "-c", LONG_STAND_IN.replace("sleep(60)", "sleep(3)"), workdir]
        return [sys.executable, "-c", STAND_IN, workdir, "0.5", "fail"]

    monkeypatch.setattr(study_lib, "command", command)
    failures = study_lib.run_study(study, study.cells, quiet=True, jobs=2)
    assert failures == ["short seed 0: run.py exited 1", "long seed 0: run.py exited 1"]
    workdir = study_spec.workdir_of(study, _cell(study, "long"), 0)
    assert not os.path.exists(os.path.join(workdir, "stopped.json"))


def test_fewer_seeds_than_jobs_share_the_spare_cores(tmp_path, monkeypatch):
    study = _study(tmp_path, ["only"])
    _stand_in(monkeypatch, {"only": (0.1, "fail")})
    assert len(study_lib.run_study(study, study.cells, quiet=True, jobs=2)) == 1
    assert _ran(study, "only")["cores"] == sorted(os.sched_getaffinity(0))


def test_sigterm_to_the_runner_waits_for_its_runs_to_stop(tmp_path, monkeypatch):
    # The stand-in takes 1.5 s to stop after SIGTERM (run.py finishes its step and saves a
    # checkpoint): the runner returns only after that, so a rerun finds the workdir free.
    study = _study(tmp_path, ["long"])
    slow_stop = LONG_STAND_IN.replace("def stop(*_):\n", "def stop(*_):\n    time.sleep(1.5)\n")
    monkeypatch.setattr(
        study_lib, "command", lambda cell, seed, workdir: [sys.executable, "-c", slow_stop, workdir]
    )
    workdir = study_spec.workdir_of(study, _cell(study, "long"), 0)

    def terminate_once_the_child_runs():
        # The stand-in writes config.json after installing its SIGTERM handler.
        while not os.path.isfile(os.path.join(workdir, "config.json")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_the_child_runs, daemon=True).start()
    with pytest.raises(study_lib.Terminated), study_lib.sigterm_stops_the_runs():
        study_lib.run_study(study, study.cells, quiet=True)
    assert os.path.isfile(os.path.join(workdir, "stopped.json"))
    with open(os.path.join(workdir, "study_runner.json")) as f:
        assert "open" not in json.load(f)  # its sitting was closed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


# argv: workdir, results.json to write ("" for none), input workdir to check: the stand-in
# records whether its input existed when it started, writes its results and exits 0 if it has
# any to write.
INPUT_STAND_IN = """
import json, os, sys
workdir, results, needs = sys.argv[1], sys.argv[2], sys.argv[3]
seen = os.path.isfile(os.path.join(needs, "results.json")) if needs else None
with open(os.path.join(workdir, "ran.json"), "w") as f:
    json.dump({"input_there": seen}, f)
if results:
    with open(os.path.join(workdir, "results.json"), "w") as f:
        f.write(results)
sys.exit(0 if results else 1)
"""


@pytest.mark.parametrize("rebuilt_accuracy", [0.5, 0.6])
def test_a_committed_input_whose_workdir_is_gone_is_rebuilt_first(
    tmp_path, monkeypatch, capsys, rebuilt_accuracy
):
    """A fresh machine has the experts cell's committed result but not its workdir, which the
    MTT cells read (mtt.experts_dir): the runner reruns it before them and keeps the record."""
    folder = tmp_path / "studies" / "inputs"
    folder.mkdir(parents=True)
    experts_dir = str(tmp_path / "runs" / "inputs" / "experts" / "seed0")
    (folder / "study.toml").write_text(
        'seeds = [0]\nconfig = "configs/fashion_mnist.py"\n'
        '[[cells]]\nname = "experts"\narg = "experts"\n'
        f'[[cells]]\nname = "mtt"\narg = "mtt,ipc1"\n[cells.overrides]\n"mtt.experts_dir" = "{experts_dir}"\n'
    )
    study = study_spec.load_study(str(folder / "study.toml"), str(tmp_path / "runs"))
    experts, mtt = study.cells
    assert study_lib.inputs_of(study, mtt) == [(experts, 0)] and not study_lib.inputs_of(
        study, experts
    )
    committed = {"results": {"test_accuracy": 0.5, "machine": "x"}, "commit": "old"}
    path = study_spec.result_path(study, experts, 0)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(committed, f)

    def command(cell, seed, workdir):
        if cell.name == "experts":
            results = json.dumps({"test_accuracy": rebuilt_accuracy, "machine": "y"})
            return [sys.executable, "-c", INPUT_STAND_IN, workdir, results, ""]
        return [sys.executable, "-c", INPUT_STAND_IN, workdir, "", experts_dir]

    monkeypatch.setattr(study_lib, "command", command)
    failures = study_lib.run_study(study, [mtt], quiet=True)
    assert failures == ["mtt seed 0: run.py exited 1"]  # the stand-in's own exit
    assert _ran(study, "mtt") == {"input_there": True}
    with open(path) as f:
        assert json.load(f) == committed  # the record is kept
    out = capsys.readouterr().out
    if rebuilt_accuracy == 0.5:
        assert "experts seed 0: rebuilt, the same as the committed record" in out
    else:
        assert "experts seed 0: rebuilt, differs from the committed record in test_accuracy" in out
    # Its workdir is there now: a second pass does not rebuild it again.
    assert study_lib.rebuild_inputs(study, [(mtt, 0)], quiet=True) == []
    assert "rebuilding" not in capsys.readouterr().out
