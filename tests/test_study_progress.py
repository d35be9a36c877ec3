"""``study.py --list`` says where each unfinished seed stands and the hours left, from its
workdir's config.json and metrics.jsonl (fake ones here: nothing is run)."""

import json
import os
import sys
import textwrap

import pytest
from helpers import ROOT

sys.path.insert(0, ROOT)
from benchmarks import study as study_lib  # noqa: E402
from benchmarks import study_spec  # noqa: E402

STUDY = """
[[cells]]
name = "a"
arg = "dm,ipc1"
seeds = [0, 1, 2]
[cells.overrides]
"distill.iterations" = 100

[[cells]]
name = "b"
arg = "dm,ipc1"
"""


def fake_workdir(workdir, *, iterations=100, eval_at="(0, 50)", eval_every=0, rows=(), config=None):
    os.makedirs(workdir, exist_ok=True)
    config = {
        "mode": "distill",
        "distill.iterations": iterations,
        "distill.eval_at": eval_at,
        "distill.eval_every": eval_every,
        "ipc": 1,
        "eval.epochs": 300,
        **(config or {}),
    }
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def train(step, t, s_per_iter):
    return {"step": step, "loss": 1.0, "s_per_iter": s_per_iter, "time": t}


def acc(step, t):
    return {"step": step, "time": t, "accuracy": {"convnet": {"mean": 0.5, "std": 0.0}}}


# An evaluation at 0 (nothing logged before it: not timed); 10-step windows at 2 or 4 s/iter
# after a slow first (compiling) one, which the median leaves out (with it, the median is 3);
# the evaluation at 50, 30 s after the window ending there.
ROWS = [
    acc(0, 0.0),
    train(10, 100.0, 9.0),
    train(20, 120.0, 2.0),
    train(30, 140.0, 2.0),
    train(40, 160.0, 4.0),
    train(50, 180.0, 2.0),
    acc(50, 210.0),
    train(60, 230.0, 4.0),
]


def test_progress_reads_iteration_speed_and_the_evaluations_left(tmp_path):
    fake_workdir(tmp_path, rows=ROWS)
    where = study_lib.progress(str(tmp_path))
    # Left: the final evaluation (at 100); 0 and 50 ran. The compiling window is left out.
    assert where == study_lib.Progress(
        iteration=60,
        iterations=100,
        s_per_iter=2.0,
        evals_left=1,
        eval_s=30.0,
        protocol=(("eval.epochs", "300"), ("ipc", "1")),
    )
    assert where.left_s() == pytest.approx(40 * 2.0 + 30.0)
    assert where.untimed == 0


def test_progress_counts_evaluations_as_distill_schedules_them(tmp_path):
    # eval_every 20 and eval_at (5,) over 50 iterations: 0, 5, 20, 40 and the final 50.
    fake_workdir(tmp_path, iterations=50, eval_at="(5,)", eval_every=20, rows=[train(10, 5, 1.0)])
    where = study_lib.progress(str(tmp_path))
    assert where.evals_left == 5 and where.eval_s is None and where.untimed == 5
    # Untimed evaluations are left out of the hours (and counted apart), not guessed.
    assert where.left_s() == pytest.approx(40 * 1.0)


def test_an_evaluation_after_a_resume_is_not_timed_across_the_gap(tmp_path):
    # The window before the accuracy row ends at another iteration (a resume in between).
    fake_workdir(tmp_path, rows=[train(10, 0.0, 1.0), train(20, 10.0, 1.0), acc(50, 5000.0)])
    where = study_lib.progress(str(tmp_path))
    assert where.eval_s is None and where.evals_left == 2  # 0 and 100; 50 ran


def test_no_progress_before_a_log_or_for_an_experts_run(tmp_path):
    assert study_lib.progress(str(tmp_path / "nothing")) is None
    fake_workdir(tmp_path / "experts", rows=[])
    with open(tmp_path / "experts" / "config.json", "w") as f:
        json.dump({"mode": "experts"}, f)
    assert study_lib.progress(str(tmp_path / "experts")) is None


def plan_study(tmp_path):
    """STUDY written under tmp_path: (its path, the runs root, the loaded study)."""
    folder = tmp_path / "studies" / "plan"
    folder.mkdir(parents=True)
    path = folder / "study.toml"
    path.write_text(textwrap.dedent(STUDY))
    runs = tmp_path / "runs"
    return path, runs, study_spec.load_study(str(path), str(runs), check_configs=False)


def list_lines(path, runs, capsys):
    assert study_lib.main([str(path), "--runs_root", str(runs), "--list"]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_list_gives_each_seed_its_state_and_the_hours_left(tmp_path, capsys):
    path, runs, study = plan_study(tmp_path)
    a, b = study.cells
    # Seed 0 of a is done (3600 s); seed 1 is part-way; seed 2 and b's seed are not started.
    done = study_spec.result_path(study, a, 0)
    os.makedirs(os.path.dirname(done))
    with open(done, "w") as f:
        json.dump({"wall_s": 3600.0}, f)
    fake_workdir(study_spec.workdir_of(study, a, 1), rows=ROWS)

    lines = list_lines(path, runs, capsys)
    assert [line.split(":")[0] for line in lines[:-1]] == [
        "done  a seed 0",
        "part  a seed 1 (iteration 60 of 100, 2.0 s/iter, 1 evaluation left (~30 s each); "
        "~0.0 h left)",
        "todo  a seed 2 (as its cell's done seeds; ~1.0 h left)",
        "todo  b seed 0 (not started)",
    ]
    # 110 s + 3600 s measured; b's seed has no estimate.
    assert (
        lines[-1] == "left: 3 runs, ~1.0 h measured (one run at a time); 1 run with no estimate yet"
    )


def test_list_lends_a_measured_evaluation_time_only_within_one_protocol(tmp_path, capsys):
    path, runs, study = plan_study(tmp_path)
    a, b = study.cells
    # Seed 0 timed an evaluation (30 s); seed 1 (same protocol) and b (other eval.epochs) have
    # not: two evaluations left each (50 and 100) at 1 s/iter over 80 iterations.
    fake_workdir(study_spec.workdir_of(study, a, 0), rows=ROWS)
    fresh = [acc(0, 0.0), train(10, 100.0, 9.0), train(20, 110.0, 1.0)]
    fake_workdir(study_spec.workdir_of(study, a, 1), rows=fresh)
    fake_workdir(study_spec.workdir_of(study, b, 0), rows=fresh, config={"eval.epochs": 1000})

    lines = list_lines(path, runs, capsys)
    states = [line.split(":")[0] for line in lines[:-1]]
    assert states[1] == (
        "part  a seed 1 (iteration 20 of 100, 1.0 s/iter, 2 evaluations left (~30 s each, as "
        "timed in other runs); ~0.0 h left)"
    )
    assert states[3] == (
        "part  b seed 0 (iteration 20 of 100, 1.0 s/iter, 2 evaluations left (untimed); "
        "~0.0 h left)"
    )
    # 40*2+30 (a0) + 80+60 (a1) + 80 (b0); b's two evaluations are the untimed ones.
    assert lines[-1] == (
        "left: 4 runs, ~0.1 h measured (one run at a time); plus 2 untimed evaluations; "
        "1 run with no estimate yet"
    )
