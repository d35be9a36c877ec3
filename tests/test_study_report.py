"""The study runner's selection and MI diagnostics (benchmarks/study.py, study_spec.py,
study_report.py and study_mi.py), without running run.py:
grid cell names (which hold commas) can be selected with --only, the per-step trace keeps the
diagnostics fields, --add_traces fills old results without touching their commit, and the
report gains an MI diagnostics table and plot computed from the traces."""

import json
import os
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, ROOT)
from benchmarks import study as study_lib  # noqa: E402
from benchmarks import study_mi, study_report, study_spec  # noqa: E402

STUDY = """
config = "configs/fashion_mnist.py"
seeds = [0, 1]
compare = ["mi.weight"]
[[cells]]
name = "base"
arg = "dm,ipc1"
[cells.overrides]
"mi.weight" = 0.0
[[grids]]
name = "g"
arg = "dm,ipc1"
[grids.axes]
"mi.head" = ["linear", "none"]
"mi.weight" = [0.3]
"""


@pytest.fixture
def study(tmp_path):
    folder = tmp_path / "studies" / "s"
    folder.mkdir(parents=True)
    (folder / "study.toml").write_text(STUDY)
    return study_spec.load_study(str(folder / "study.toml"), str(tmp_path / "runs"))


def metrics_rows(mi_scale):
    """Three logged training rows (and an evaluation row, which the trace drops)."""
    rows = []
    for step in (10, 20, 30):
        row = {"step": step, "loss": 1.0, "base_loss": 1.0, "grad_norm_base": 2.0}
        if mi_scale:
            row.update(
                mi=[0.1 * mi_scale * step, 0.2],
                grad_norm_mi=0.6,
                grad_ratio=0.3,
                grad_cos=0.01 * step,
                mi_lambda=100.0 / step,
            )
        rows.append(row)
    rows.append({"step": 30, "accuracy": {"convnet": {"mean": 0.5}}})
    return rows


def test_only_selects_grid_cells_whose_names_hold_commas(study):
    names = [c.name for c in study.cells]
    assert names == ["base", "g-mi.head=linear,mi.weight=0.3", "g-mi.head=none,mi.weight=0.3"]
    pick = lambda *values: [  # noqa: E731
        c.name
        for c in study_spec.select(study.cells, study_spec.only_patterns(study.cells, values))
    ]
    assert pick("g-mi.head=none,mi.weight=0.3") == ["g-mi.head=none,mi.weight=0.3"]
    assert pick("base,g-*linear*") == ["base", "g-mi.head=linear,mi.weight=0.3"]  # legacy commas
    assert pick("base", "g-mi.head=none*") == ["base", "g-mi.head=none,mi.weight=0.3"]
    with pytest.raises(study_spec.StudyError, match="matches no cell"):
        pick("nothing")


def test_trace_keeps_the_training_rows_and_the_diagnostics():
    trace = study_lib.trace(metrics_rows(1.0))
    assert [r["step"] for r in trace] == [10, 20, 30]
    assert trace[0] == {
        "step": 10,
        "loss": 1.0,
        "base_loss": 1.0,
        "grad_norm_base": 2.0,
        "mi": [1.0, 0.2],
        "grad_norm_mi": 0.6,
        "grad_ratio": 0.3,
        "grad_cos": 0.1,
        "mi_lambda": 10.0,
    }


def write_result(study, cell, seed, record, metrics=None):
    path = study_spec.result_path(study, cell, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f)
    if metrics is not None:
        workdir = study_spec.workdir_of(study, cell, seed)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in metrics)
    return path


def test_add_traces_fills_old_results_and_keeps_their_commit(study):
    base, linear, none = study.cells
    old = {"commit": "abc123", "final": {}, "best": {}}
    path = write_result(study, linear, 0, old, metrics_rows(1.0))
    write_result(study, linear, 1, {**old, "trace": [{"step": 1, "loss": 0.0}]}, metrics_rows(1.0))
    write_result(study, none, 0, old)  # no workdir: left alone
    assert study_lib.add_traces(study, study.cells) == 1
    with open(path) as f:
        record = json.load(f)
    assert record["commit"] == "abc123" and len(record["trace"]) == 3
    assert study_lib.add_traces(study, study.cells) == 0  # idempotent


def test_report_has_the_mi_diagnostics_table_and_plot(study):
    base, linear, none = study.cells

    def record(seed, mi_scale):
        acc = {"convnet": {"mean": 0.7 + 0.01 * seed, "std": 0.0, "all": [0.7], "iteration": 30}}
        return {
            "final": acc,
            "best": acc,
            "evaluations": {"convnet": [{"iteration": 30, "mean": 0.7, "std": 0.0}]},
            "iterations": 30,
            "num_models": 1,
            "trace": study_lib.trace(metrics_rows(mi_scale)),
        }

    for seed in (0, 1):
        write_result(study, base, seed, record(seed, 0.0))
        write_result(study, linear, seed, record(seed, 1.0 + seed))
    results = study_spec.load_results(study)
    diag = study_mi.diagnostics_frame(study, results).to_dict("records")
    assert [r["cell"] for r in diag] == [linear.name]  # the base has no MI term
    (row,) = diag
    assert row["seeds"] == 2
    assert row["grad_ratio"] == pytest.approx(0.3)
    assert row["grad_cos"] == pytest.approx(0.2)  # mean of 0.1, 0.2, 0.3
    assert row["mi_lambda"] == pytest.approx((10 + 5 + 100 / 30) / 3)
    # MI summed over layers, seed mean: first log 0.1*1*10+0.2 and 0.1*2*10+0.2.
    assert row["mi_first"] == pytest.approx((1.2 + 2.2) / 2)
    assert row["mi_last"] == pytest.approx((3.2 + 6.2) / 2)
    text = study_report.report(study)
    assert "MI term diagnostics" in text and linear.name in text.split("MI term diagnostics")[1]
    assert os.path.getsize(os.path.join(study.runs_dir, "diagnostics.png")) > 1000


def test_the_study_modules_import_one_way():
    # study (CLI, runner) -> study_report -> study_mi -> study_spec (the study file), read with
    # ast, functions included: no module imports one above it.
    import ast

    allowed = {
        "study_spec": set(),
        "study_mi": {"study_spec"},
        "study_report": {"study_spec", "study_mi"},
        "study": {"study_spec", "study_report"},
    }
    for name, ok in allowed.items():
        with open(os.path.join(ROOT, "benchmarks", f"{name}.py")) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                imported.add(node.module.removeprefix("benchmarks."))
            elif isinstance(node, ast.Import):
                imported |= {a.name.removeprefix("benchmarks.") for a in node.names}
        assert imported & set(allowed) <= ok, (name, imported & set(allowed))


PAIRED = """
config = "configs/fashion_mnist.py"
seeds = [0, 1, 2]
compare = ["mi.weight"]
pairs = [["base", "mi"], ["base", "weight"]]
[[cells]]
name = "base"
arg = "dm,ipc1"
[cells.overrides]
"mi.weight" = 0.0
"distill.eval_at" = [0, 100]
[[cells]]
name = "mi"
arg = "dm,ipc1"
[cells.overrides]
"mi.weight" = 0.1
"mi.head" = "none"
"distill.eval_at" = [100]
[[cells]]
name = "weight"
arg = "dm,ipc1"
[cells.overrides]
"mi.weight" = 0.1
"distill.eval_at" = [0, 100]
"""


def test_declared_pairs_and_accuracy_by_iteration(tmp_path):
    folder = tmp_path / "studies" / "p"
    folder.mkdir(parents=True)
    (folder / "study.toml").write_text(PAIRED)
    study = study_spec.load_study(str(folder / "study.toml"), str(tmp_path / "runs"))
    assert study.pairs == (("base", "mi"), ("base", "weight"))
    base, mi, weight = study.cells

    def record(points):  # {iteration: accuracy in %}; the last is the final one
        evals = [{"iteration": it, "mean": acc / 100, "std": 0.0} for it, acc in points.items()]
        final = {"convnet": {**evals[-1], "all": [evals[-1]["mean"]]}}
        return {"final": final, "best": final, "evaluations": {"convnet": evals}}

    for seed in (0, 1, 2):
        write_result(study, base, seed, record({0: 50.0 + seed, 100: 70.0, 200: 80.0}))
        write_result(study, mi, seed, record({100: 70.0 + seed, 200: 81.0 + seed}))
        write_result(study, weight, seed, record({0: 50.0 + seed, 100: 70.0, 200: 80.5}))
    results = study_spec.load_results(study)

    diffs = study_report.paired_differences(study, results)
    final = diffs[diffs["which"] == "final"].to_dict("records")
    # base/weight differ in mi.weight only: the compare row, not repeated for the declared pair.
    assert [(r["a"], r["b"], r["field"]) for r in final] == [
        ("base (mi.weight=0.0)", "weight (mi.weight=0.1)", "mi.weight"),
        ("base", "mi", "distill.eval_at+mi.head+mi.weight"),
    ]
    # mi - base at the end: 1, 2, 3 points; mean 2, SE 1/sqrt(3), t(0.975, 2) = 4.3027.
    row = final[1]
    assert row["seeds"] == 3 and row["mean_diff"] == pytest.approx(2.0)
    assert row["se"] == pytest.approx(0.57735, abs=1e-4)
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((-0.4841, 4.4841), abs=1e-3)

    iters = study_report.iteration_frame(study, results)
    at = {(r["cell"], r["iteration"]): r for r in iters.to_dict("records")}
    assert set(at) == {(c, i) for c in ("base", "weight") for i in (0, 100, 200)} | {
        ("mi", 100),
        ("mi", 200),
    }
    assert at[("base", 0)]["mean"] == pytest.approx(51.0) and at[("base", 0)]["std"] == 1.0
    paired = study_report.paired_by_iteration(study, results)
    rows = {(r["b"], r["iteration"]): r for r in paired.to_dict("records")}
    # Iteration 0 only where both cells evaluated it.
    assert sorted(rows) == [
        ("mi", 100),
        ("mi", 200),
        ("weight", 0),
        ("weight", 100),
        ("weight", 200),
    ]
    assert rows[("mi", 100)]["mean_diff"] == pytest.approx(1.0)
    assert rows[("weight", 200)]["mean_diff"] == pytest.approx(0.5)
    assert rows[("weight", 200)]["ci95_low"] == pytest.approx(0.5)  # no spread: the point

    text = study_report.report(study)
    assert "| base | convnet | 51.00 ± 1.00 (3) | 70.00 ± 0.00 (3) | 80.00 ± 0.00 (3) |" in text
    assert "| mi | convnet | - | 71.00 ± 1.00 (3) | 82.00 ± 1.00 (3) |" in text
    assert "| base | mi | convnet | 200 | 3 | +2.00 | 0.58 | [-0.48, +4.48] |" in text
    for name in ("iterations.csv", "paired_iterations.csv", "table.md"):
        assert os.path.getsize(os.path.join(study.runs_dir, name)) > 0
