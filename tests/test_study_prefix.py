"""Prefix cells of a study (``prefix_of``, ``iterations``): the first k iterations of another
cell's runs. Their config is the parent's cut at k, their seeds come from the parent's
committed results without a run (the run of k iterations is the prefix of the longer one:
tests/test_distill_eval_schedule.py), and a bad declaration is one line, exit 2."""

import json
import os
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, ROOT)
from benchmarks import study as study_lib  # noqa: E402
from benchmarks import study_spec  # noqa: E402

PARENT = """
config = "configs/fashion_mnist.py"
seeds = [0, 1]
[[cells]]
name = "long"
arg = "dm,ipc1"
[cells.overrides]
"distill.iterations" = 500
"distill.eval_at" = [0, 100, 250]
"mi.weight" = 0.1
"""


def load(tmp_path, text):
    folder = tmp_path / "studies" / "s"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.toml").write_text(text)
    return study_spec.load_study(str(folder / "study.toml"), str(tmp_path / "runs"))


def prefix(k=250, extra=""):
    return f'[[cells]]\nname = "short"\nprefix_of = "long"\niterations = {k}\n{extra}'


def test_a_prefix_cell_is_its_parents_config_cut_at_its_length(tmp_path):
    study = load(tmp_path, PARENT + prefix(extra="seeds = [0, 1, 2]\n"))
    long, short = study.cells
    assert (short.config, short.arg, short.prefix_of) == (long.config, long.arg, "long")
    assert short.seeds == (0, 1, 2)
    assert short.overrides == {
        "distill.iterations": 250,
        "distill.eval_at": [0, 100],
        "mi.weight": 0.1,
    }
    # Its config is the one run.py builds from those overrides (checked like any cell).
    assert study_spec.config_problems(study.cells) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            prefix().replace('"long"', '"lng"'),
            "prefix_of 'lng' names no cell (did you mean 'long'?)",
        ),
        (prefix(200), "iterations 200 is not one of 'long''s evaluations"),
        (prefix(500), "iterations must be an integer in 1..499"),
        (prefix(250, 'arg = "dm,ipc1"\n'), "unknown key 'arg'"),
    ],
)
def test_a_bad_prefix_cell_is_one_line_exit_2(tmp_path, capsys, extra, message):
    path = tmp_path / "study.toml"
    path.write_text(PARENT + extra)
    assert study_lib.main([str(path), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def parent_record(seed):
    accs = {0: 0.50, 100: 0.72, 250: 0.70, 500: 0.75}
    evals = [
        {"iteration": it, "mean": a + seed / 100, "std": 0.01, "all": [a + seed / 100]}
        for it, a in accs.items()
    ]
    return {
        "cell": "long",
        "seed": seed,
        "commit": "abc",
        "iterations": 500,
        "evaluations": {"convnet": evals},
        "final": {"convnet": {**evals[-1]}},
        "best": {"convnet": {**evals[-1]}},
        "trace": [
            {"step": s, "loss": 1.0, "s_per_iter": float(s)} for s in (100, 200, 300, 400, 500)
        ],
        "wall_s": 1000.0,
        "results": {"iteration": 500, "machine": {"cpu": "x", "cores": 2}},
        "config": {"distill.iterations": 500, "distill.eval_at": [0, 100, 250], "mi.weight": 0.1},
    }


def test_a_prefix_seed_is_read_from_its_parents_result_without_a_run(tmp_path, monkeypatch):
    study = load(tmp_path, PARENT + prefix(extra="seeds = [0, 1, 2]\n"))
    long, short = study.cells
    for seed in (0, 1):
        path = study_spec.result_path(study, long, seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(parent_record(seed), f)
    started = []
    monkeypatch.setattr(
        study_lib, "start_seed", lambda s, c, seed, **kw: started.append(seed) or 1 / 0
    )
    with pytest.raises(ZeroDivisionError):  # seed 2 has no parent result: it is started
        study_lib.run_study(study, [short])
    assert started == [2]
    with open(study_spec.result_path(study, short, 1)) as f:
        record = json.load(f)
    assert record["cell"] == "short" and record["iterations"] == 250
    assert [e["iteration"] for e in record["evaluations"]["convnet"]] == [0, 100, 250]
    assert record["final"]["convnet"]["iteration"] == 250
    assert record["final"]["convnet"]["mean"] == pytest.approx(0.71)
    assert record["best"]["convnet"]["iteration"] == 100  # the best before 250, not 500's
    assert record["results"]["accuracy"]["convnet"]["mean"] == pytest.approx(0.71)
    assert [r["step"] for r in record["trace"]] == [100, 200]
    assert record["s_per_iter"] == 200.0 and record["wall_s"] is None
    assert record["config"]["distill.iterations"] == 250
    assert record["config"]["distill.eval_at"] == [0, 100]
    assert record["derived_from"] == {"cell": "long", "seed": 1, "iterations": 500}
    assert record["commit"] == "abc"  # the code that ran it


def test_a_parent_without_an_evaluation_at_the_prefix_gives_nothing(tmp_path):
    study = load(tmp_path, PARENT + prefix())
    record = parent_record(0)
    record["evaluations"]["convnet"] = [
        e for e in record["evaluations"]["convnet"] if e["iteration"] != 250
    ]
    assert study_lib.derive_prefix(record, study.cells[1]) is None


def test_list_marks_a_prefix_seed_done_once_its_parent_is(tmp_path, capsys):
    study = load(tmp_path, PARENT + prefix())
    path = study_spec.result_path(study, study.cells[0], 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(parent_record(0), f)
    lines = study_lib.list_plan(study, study.cells)
    assert "done  short seed 0: a prefix of long's" in lines
    assert any(line.startswith("todo  short seed 1") for line in lines)
