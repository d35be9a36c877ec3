"""The study runner (benchmarks/study.py): a tiny 2-cell x 2-seed DM study on a 2-class npz
through the real CLI: the table's rows, a paired difference checked by hand, a second
invocation that runs nothing, and a run killed mid-cell that resumes from its checkpoint."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, SMALL_NET, TINY, cli_env, write_fake_npz

from mim4dd_jax import artifacts

sys.path.insert(0, ROOT)
from benchmarks import study as study_lib  # noqa: E402
from benchmarks import study_report, study_spec  # noqa: E402

pytestmark = pytest.mark.slow

# Student's t quantile t_{0.975, 1}: the 95% interval of a mean of 2 paired differences.
T_975_DF1 = 12.706204736174707


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "two_class.npz"
    return write_fake_npz(path, num_classes=2, per_class=10, hw=8, scale=60)


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def write_study(folder, npz_path, iterations=3, seeds=(0, 1), lrs=(0.1, 10.0), extra=None):
    overrides = {
        **TINY,
        "data.source": "npz",
        "data.path": npz_path,
        "distill.iterations": iterations,
        "distill.eval_every": 2,
        "distill.log_every": 1,
        "distill.checkpoint_every": 1,
        "eval.epochs": 2,
        "eval.num_models": 2,
        "eval.dsa": False,
        "distill.dsa": False,
        **SMALL_NET,
        **(extra or {}),
    }
    lines = [
        'description = "tiny"',
        'config = "configs/fashion_mnist.py"',
        f"seeds = {list(seeds)}",
        'compare = ["distill.lr"]',
        "[overrides]",
        *(f'"{k}" = {_toml_value(v)}' for k, v in overrides.items()),
        "[[grids]]",
        'name = "dm"',
        'arg = "dm,ipc1"',
        "[grids.axes]",
        f'"distill.lr" = {list(lrs)}',
    ]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "study.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture
def cli_environment(monkeypatch):
    for k, v in cli_env().items():
        monkeypatch.setenv(k, v)


def test_study_runs_tabulates_pairs_and_skips_done_cells(
    tmp_path, npz_path, cli_environment, monkeypatch
):
    path = write_study(str(tmp_path / "studies" / "tiny"), npz_path)
    runs_root = str(tmp_path / "runs")
    assert study_lib.main([path, "--runs_root", runs_root, "--quiet"]) == 0
    study = study_spec.load_study(path, runs_root)
    assert [c.name for c in study.cells] == ["dm-distill.lr=0.1", "dm-distill.lr=10.0"]

    results = study_spec.load_results(study)
    assert sorted(results) == sorted((c.name, s) for c in study.cells for s in (0, 1))
    record = results[("dm-distill.lr=0.1", 0)]
    # Iteration 0 (the initial set) is evaluated, then every 2 iterations and at the end.
    assert [e["iteration"] for e in record["evaluations"]["convnet"]] == [0, 2, 3]
    assert record["final"]["convnet"]["iteration"] == 3
    best = max(record["evaluations"]["convnet"], key=lambda e: e["mean"])
    assert record["best"]["convnet"]["mean"] == best["mean"]
    assert record["num_models"] == 2 and record["iterations"] == 3
    assert record["config"]["distill.lr"] == 0.1 and record["config"]["seed"] == 0
    # The run says what it ran on (studies span machines; speeds compare within one).
    machine = record["results"]["machine"]
    assert machine["backend"] == "cpu" and machine["cores"] == artifacts.usable_cores()
    assert machine["devices"].startswith("1x ") and machine["cpu"]

    # The table: one row per cell, with both seeds and the per-seed model means.
    import pandas as pd

    table = pd.read_csv(os.path.join(runs_root, "tiny", "table.csv"))
    assert list(table["cell"]) == ["dm-distill.lr=0.1", "dm-distill.lr=10.0"]
    assert list(table["seeds"]) == ["2/2", "2/2"]
    assert list(table["machine"]) == [f"{machine['cpu']} x{artifacts.usable_cores()}"] * 2
    for cell, row in zip(study.cells, table.to_dict("records"), strict=True):
        per_seed = [
            100 * np.mean(results[(cell.name, s)]["final"]["convnet"]["all"]) for s in (0, 1)
        ]
        assert row["final_mean"] == pytest.approx(np.mean(per_seed))
        assert row["final_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert os.path.isfile(os.path.join(runs_root, "tiny", "accuracy.png"))

    # The paired difference b - a over the two seeds, by hand.
    a, b = study.cells
    d = np.array(
        [
            100 * (results[(b.name, s)]["final"]["convnet"]["mean"])
            - 100 * (results[(a.name, s)]["final"]["convnet"]["mean"])
            for s in (0, 1)
        ]
    )
    half = T_975_DF1 * np.std(d, ddof=1) / np.sqrt(2)
    pairs = pd.read_csv(os.path.join(runs_root, "tiny", "paired.csv"))
    final = pairs[(pairs["which"] == "final") & (pairs["model"] == "convnet")].iloc[0]
    assert final["field"] == "distill.lr" and final["seeds"] == 2
    assert final["mean_diff"] == pytest.approx(d.mean())
    assert final["se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(2))
    if half > 0:
        assert final["ci95_low"] == pytest.approx(d.mean() - half, rel=1e-6, abs=1e-9)
        assert final["ci95_high"] == pytest.approx(d.mean() + half, rel=1e-6, abs=1e-9)

    # A second invocation, with the runs folder gone (a fresh clone), runs nothing: the
    # committed results are enough.
    calls = []
    monkeypatch.setattr(study_lib, "start_seed", lambda *a, **k: calls.append(a) or 1)
    assert study_lib.main([path, "--runs_root", str(tmp_path / "fresh_runs")]) == 0
    assert calls == []
    assert os.path.isfile(os.path.join(tmp_path, "fresh_runs", "tiny", "table.md"))


@pytest.mark.skipif(artifacts.usable_cores() < 2, reason="needs 2 cores to run 2 jobs apart")
def test_jobs_run_seeds_side_by_side_each_on_its_own_core(tmp_path, npz_path, cli_environment):
    path = write_study(str(tmp_path / "studies" / "tiny"), npz_path, seeds=(0,))
    runs_root = str(tmp_path / "runs")
    assert study_lib.main([path, "--runs_root", runs_root, "--quiet", "--jobs", "2"]) == 0
    study = study_spec.load_study(path, runs_root)
    results = study_spec.load_results(study)
    assert sorted(results) == sorted((c.name, 0) for c in study.cells)
    # Each run was pinned to one core, and the two ran at the same time: each started before
    # the other ended.
    assert [results[(c.name, 0)]["results"]["machine"]["cores"] for c in study.cells] == [1, 1]
    spans = []
    for cell in study.cells:
        workdir = study_spec.workdir_of(study, cell, 0)
        start = os.path.getmtime(os.path.join(workdir, "config.json"))
        spans.append((start, os.path.getmtime(os.path.join(workdir, "results.json"))))
    assert max(s for s, _ in spans) < min(e for _, e in spans)
    # Where a run runs does not change what it computes: one cell again, unpinned, alone.
    cell = study.cells[1]
    again = dataclasses.replace(study, runs_dir=str(tmp_path / "again"))
    assert study_lib.run_seed(again, cell, 0, quiet=True) == 0
    pinned = np.load(os.path.join(study_spec.workdir_of(study, cell, 0), "distilled.npz"))
    alone = np.load(os.path.join(study_spec.workdir_of(again, cell, 0), "distilled.npz"))
    np.testing.assert_array_equal(pinned["images"], alone["images"])


def test_jobs_are_split_over_the_cores_and_checked():
    assert study_lib.core_groups(2, [0, 1]) == [(0,), (1,)]
    assert study_lib.core_groups(2, [0, 1, 2]) == [(0, 1), (2,)]
    assert study_lib.core_groups(1, [4, 5]) == [(4, 5)]
    with pytest.raises(study_spec.StudyError, match=r"--jobs 3: valid: 1 to 2"):
        study_lib.core_groups(3, [0, 1])
    with pytest.raises(study_spec.StudyError, match=r"--jobs 0: valid: 1 to 2"):
        study_lib.core_groups(0, [0, 1])


def test_too_many_jobs_is_one_line_exit_2(tmp_path, npz_path, capsys):
    path = write_study(str(tmp_path / "s"), npz_path)
    jobs = artifacts.usable_cores() + 1
    assert study_lib.main([path, "--runs_root", str(tmp_path / "runs"), "--jobs", str(jobs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --jobs {jobs}: valid: 1 to {jobs - 1}, the cores this process may run on"
    assert not os.path.exists(tmp_path / "runs")


def test_a_killed_study_resumes_its_cell_from_the_checkpoint(tmp_path, npz_path):
    # A checkpoint every iteration; the runner is killed once a few exist.
    path = write_study(
        str(tmp_path / "studies" / "killed"),
        npz_path,
        iterations=40,
        seeds=(0,),
        lrs=(0.1,),
        extra={"distill.eval_every": 0},
    )
    runs_root = str(tmp_path / "runs")
    argv = [sys.executable, os.path.join(ROOT, "benchmarks", "study.py"), path]
    argv += ["--runs_root", runs_root]
    workdir = os.path.join(runs_root, "killed", "dm-distill.lr=0.1", "seed0")
    runner = subprocess.Popen(argv, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL)
    ckpt = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
        if steps and max(steps) >= 3:
            break
        time.sleep(0.2)
    else:
        runner.kill()
        pytest.fail("no checkpoint appeared")
    runner.send_signal(signal.SIGKILL)  # the runner dies; its child gets SIGTERM and saves
    runner.wait()
    time.sleep(0.5)
    deadline = time.time() + 60
    while time.time() < deadline and _child_alive(workdir):
        time.sleep(0.2)
    saved = max(int(n) for n in os.listdir(ckpt) if n.isdigit())
    assert not os.path.isfile(os.path.join(workdir, "results.json"))
    assert saved < 40

    out = subprocess.run(argv, cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(workdir + ".log") as f:
        log = f.read()
    assert f"resuming {workdir} from iteration {saved}" in log
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # SIGTERM made the child save after its current iteration: at most one checkpoint
    # interval (here one iteration) runs twice, and the run ends at the last iteration.
    steps = [r["step"] for r in rows if "loss" in r]
    assert sum(steps.count(s) > 1 for s in set(steps)) <= 1
    assert sorted(set(steps)) == list(range(1, 41))
    with open(os.path.join(workdir, "study_runner.json")) as f:
        assert json.load(f)["sittings"] == 2
    results_dir = os.path.join(tmp_path, "studies", "killed", "results")
    assert os.path.isfile(os.path.join(results_dir, "dm-distill.lr=0.1", "seed0.json"))


def test_a_study_killed_with_its_run_traces_every_step_once_and_sums_its_wall_time(
    tmp_path, npz_path
):
    """``kill -9`` of the runner's whole process group (runner and run.py, as a scheduler
    does): no SIGTERM, so run.py stops between checkpoints. The rerun traces every step once
    and counts the killed sitting's time too."""
    iterations = 40
    path = write_study(
        str(tmp_path / "studies" / "group"),
        npz_path,
        iterations=iterations,
        seeds=(0,),
        lrs=(0.1,),
        extra={"distill.eval_every": 0, "distill.checkpoint_every": 3},
    )
    runs_root = str(tmp_path / "runs")
    argv = [sys.executable, os.path.join(ROOT, "benchmarks", "study.py"), path]
    argv += ["--runs_root", runs_root]
    workdir = os.path.join(runs_root, "group", "dm-distill.lr=0.1", "seed0")
    ckpt, metrics = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "metrics.jsonl")

    def logged():
        rows = artifacts.read_metrics(metrics) if os.path.isfile(metrics) else []
        return [r["step"] for r in rows if "loss" in r]

    def saved():
        return max((int(n) for n in os.listdir(ckpt) if n.isdigit()), default=0)

    runner = subprocess.Popen(
        argv, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (os.path.isdir(ckpt) and saved() >= 3 and max(logged(), default=0) > saved()):
        assert runner.poll() is None and time.time() < deadline, "no checkpoint 3 in 300 s"
        time.sleep(0.005)
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait()
    deadline = time.time() + 60
    while time.time() < deadline and _child_alive(workdir):
        time.sleep(0.05)
    assert max(logged()) > saved() and not os.path.isfile(os.path.join(workdir, "results.json"))
    with open(os.path.join(workdir, "study_runner.json")) as f:
        first = json.load(f)
    # The killed sitting ran from its start to its last write, at least.
    killed_sitting = os.path.getmtime(metrics) - first["open"]
    assert killed_sitting > 0 and first["wall_s"] == 0

    out = subprocess.run(argv, cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert logged() == list(range(1, iterations + 1))
    results_dir = os.path.join(tmp_path, "studies", "group", "results")
    with open(os.path.join(results_dir, "dm-distill.lr=0.1", "seed0.json")) as f:
        record = json.load(f)
    assert [r["step"] for r in record["trace"]] == list(range(1, iterations + 1))
    with open(os.path.join(workdir, "study_runner.json")) as f:
        runner_record = json.load(f)
    assert runner_record["sittings"] == 2 and "open" not in runner_record
    assert record["wall_s"] == pytest.approx(runner_record["wall_s"])
    assert record["wall_s"] > killed_sitting


def _child_alive(workdir: str) -> bool:
    """Whether a run.py process with this workdir still runs."""
    out = subprocess.run(["pgrep", "-f", f"--workdir={workdir}"], capture_output=True)
    return out.returncode == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ('bogus = 1\n[[cells]]\narg = "dm,ipc1"\n', "unknown key 'bogus'"),
        ("seeds = [0]\n", "declares no cells"),
        ('[[cells]]\nname = "a"\n', "has no 'arg'"),
        ('[[cells]]\nname = "a"\narg = "dm"\n[[cells]]\nname = "a"\narg = "dc"\n', "two cells"),
        ("[[cells]\n", "not valid TOML"),
        ('[[cells]]\nname = "a[1]"\narg = "dm"\n', "may use only letters"),
    ],
)
def test_bad_study_files_are_one_line_errors(tmp_path, text, message, capsys):
    path = tmp_path / "study.toml"
    path.write_text(text)
    assert study_lib.main([str(path), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_only_selects_cells_and_names_the_valid_ones(tmp_path, npz_path):
    study = study_spec.load_study(write_study(str(tmp_path / "s"), npz_path))
    assert [c.name for c in study_spec.select(study.cells, ["*=10.0"])] == ["dm-distill.lr=10.0"]
    with pytest.raises(study_spec.StudyError, match="matches no cell; cells: dm"):
        study_spec.select(study.cells, ["nope"])


def test_machine_labels_name_the_accelerator_off_cpu():
    gpu = {"cpu": "AMD EPYC", "cores": 16, "backend": "gpu", "devices": "1x NVIDIA H200"}
    cpu = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "backend": "cpu", "devices": "1x cpu"}
    assert study_report._machine_name(gpu) == "1x NVIDIA H200"
    assert study_report._machine_name(cpu) == "Intel(R) Xeon(R) Processor x2"
    assert study_report._machine_name(None) == "-"  # records from before the field existed
