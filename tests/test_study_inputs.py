"""A study file is checked whole before anything runs (issue 28): a typo in a key, a type or a
late cell's config is one ``error:`` line each, exit code 2, and nothing is run or written."""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, cli_env

sys.path.insert(0, ROOT)
from benchmarks import study as study_lib  # noqa: E402
from benchmarks import study_spec  # noqa: E402

GOOD = """
[[cells]]
name = "first"
arg = "dm,ipc1"
[cells.overrides]
"distill.iterations" = 3
"""

# case: (study file text, the text its one error line must hold)
TYPOS = {
    "misspelt cell table": (
        GOOD + '[[cells]]\nname = "b"\narg = "dm,ipc1"\n[cells.overide]\n"distill.lr" = 0.5\n',
        "cell 'b': unknown key 'overide'; valid: name, arg, config, seeds,",
    ),
    "misspelt cell key": (
        GOOD + '[[cells]]\nname = "b"\narg = "dm,ipc1"\nseed = [5]\n',
        "cell 'b': unknown key 'seed'",
    ),
    "misspelt top-level key": ("seed = [1]\n" + GOOD, "unknown key 'seed'; valid: name,"),
    "misspelt grid key": (
        GOOD + '[[grids]]\nname = "g"\narg = "dm,ipc1"\nseed = [0]\n[grids.axes]\n"mi.weight" '
        "= [0.0]\n",
        "grid 'g': unknown key 'seed'",
    ),
    "seeds not integers": (
        GOOD + '[[cells]]\nname = "b"\narg = "dm,ipc1"\nseeds = ["a"]\n',
        "cell 'b': seeds must be integers, got 'a' in ['a']",
    ),
    "seeds not a list": ("seeds = 3\n" + GOOD, "seeds must be a non-empty list of integers"),
    "overrides not a table": (
        GOOD + '[[cells]]\nname = "b"\narg = "dm,ipc1"\noverrides = 5\n',
        "cell 'b': overrides must be a table",
    ),
    "published not a number": (
        GOOD + '[[cells]]\nname = "b"\narg = "dm,ipc1"\npublished = "high"\n',
        "cell 'b': published must be a number (the accuracy in %), got 'high'",
    ),
    "unknown config key in a later cell": (
        GOOD + '[[cells]]\nname = "b"\narg = "dm,ipc1"\n[cells.overrides]\n'
        '"distill.iterationz" = 3\n',
        "cell 'b': unknown config key 'distill.iterationz' (did you mean 'distill.iterations'?)",
    ),
    "config value of the wrong type": (
        GOOD + '[[cells]]\nname = "b"\narg = "dm,ipc1"\n[cells.overrides]\n"mi.weight" = "big"\n',
        "cell 'b': flag --config.mi.weight=big: could not convert string to float: 'big'",
    ),
    "config value run.py refuses": (
        GOOD + '[[cells]]\nname = "b"\narg = "dm,ipc1"\n[cells.overrides]\n"distill.lr" = -1\n',
        "cell 'b': distill.lr must be > 0, got -1.0",
    ),
    "unknown choice in a grid": (
        GOOD + '[[grids]]\nname = "g"\narg = "dm,ipc1"\n[grids.axes]\n'
        '"mi.estimator" = ["infonce", "infonse"]\n',
        "cell 'g-mi.estimator=infonse': unknown MI estimator 'infonse'",
    ),
    "unknown method": (
        GOOD + '[[cells]]\nname = "b"\narg = "dmm,ipc1"\n',
        "cell 'b': config configs/fashion_mnist.py:dmm,ipc1: unknown method 'dmm'",
    ),
    "unknown compare field": ('compare = ["mi.wieght"]\n' + GOOD, "compare: unknown config field"),
    "pair naming no cell": (
        'pairs = [["first", "secnd"]]\n' + GOOD + '[[cells]]\nname = "second"\narg = "dm,ipc1"\n',
        "pair ['first', 'secnd']: no cell is named 'secnd' (did you mean 'second'?)",
    ),
    "pair not two names": ('pairs = [["first"]]\n' + GOOD, "each pair must be [a, b]"),
    "pairs not a list": ('pairs = "first"\n' + GOOD, "pairs must be a list of [a, b] cell names"),
    "pair across configs": (
        'pairs = [["first", "b"]]\n' + GOOD + '[[cells]]\nname = "b"\narg = "dc,ipc1"\n',
        "the cells run different configs (configs/fashion_mnist.py:dm,ipc1 vs "
        "configs/fashion_mnist.py:dc,ipc1)",
    ),
}


@pytest.fixture
def no_runs(monkeypatch):
    """Fails the test if the runner starts a run.py."""
    calls = []
    monkeypatch.setattr(study_lib, "start_seed", lambda *a, **k: calls.append(a) or 0)
    return calls


def write(tmp_path, text):
    folder = tmp_path / "studies" / "typo"
    folder.mkdir(parents=True)
    path = folder / "study.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", sorted(TYPOS))
def test_a_typo_is_one_line_exit_2_and_nothing_runs_or_is_written(tmp_path, capsys, no_runs, case):
    text, expected = TYPOS[case]
    path = write(tmp_path, text)
    runs_root = tmp_path / "runs"
    assert study_lib.main([path, "--runs_root", str(runs_root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {path}: ") and expected in err[0], err[0]
    assert no_runs == []
    assert not runs_root.exists()
    assert sorted(os.listdir(os.path.dirname(path))) == ["study.toml"]  # no results/


def test_every_problem_of_a_file_is_reported_once(tmp_path, capsys, no_runs):
    text = GOOD + textwrap.dedent(
        """
        [[cells]]
        name = "a"
        arg = "dm,ipc1"
        [cells.overide]
        "distill.lr" = 0.5
        [[cells]]
        name = "b"
        arg = "dm,ipc1"
        seed = [5]
        [[cells]]
        name = "c"
        arg = "dm,ipc1"
        seeds = ["a"]
        [[cells]]
        name = "d"
        arg = "dm,ipc1"
        overrides = 5
        [[cells]]
        name = "e"
        arg = "dm,ipc1"
        published = "high"
        """
    )
    path = write(tmp_path, text)
    assert study_lib.main([path, "--runs_root", str(tmp_path / "runs"), "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[2] for line in err] == [f"cell '{c}'" for c in "abcde"], err
    assert no_runs == [] and not (tmp_path / "runs").exists()


def test_config_problems_of_every_cell_are_reported_not_only_the_first(tmp_path):
    text = GOOD + textwrap.dedent(
        """
        [[cells]]
        name = "b"
        arg = "dm,ipc1"
        [cells.overrides]
        "distill.lr" = -1
        [[cells]]
        name = "c"
        arg = "dm,ipc1"
        [cells.overrides]
        "eval.models" = ["convnet", "nope"]
        """
    )
    with pytest.raises(study_spec.StudyError) as e:
        study_spec.load_study(write(tmp_path, text), check_configs=True)
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert "cell 'b': distill.lr must be > 0" in lines[0]
    assert "cell 'c': unknown model 'nope'" in lines[1]


def test_unquoted_dotted_keys_name_the_same_field(tmp_path):
    # TOML reads distill.iterations = 4 as a nested table: it is the field distill.iterations,
    # not a replacement of the whole distill block.
    text = '[[cells]]\nname = "a"\narg = "dm,ipc1"\n[cells.overrides]\ndistill.iterations = 4\n'
    study = study_spec.load_study(write(tmp_path, text), check_configs=True)
    assert dict(study.cells[0].overrides) == {"distill.iterations": 4}
    config = study_spec.cell_config(study.cells[0], 0)
    assert config.distill.iterations == 4 and config.distill.lr == 1.0


def test_the_checked_config_is_the_one_run_py_builds(tmp_path):
    text = textwrap.dedent(
        """
        seeds = [3]
        [overrides]
        "distill.iterations" = 7
        [[grids]]
        name = "g"
        arg = "dm,ipc10"
        [grids.overrides]
        "eval.models" = ["convnet", "alexnet"]
        [grids.axes]
        "mi.weight" = [0, 0.5]
        """
    )
    study = study_spec.load_study(write(tmp_path, text), check_configs=True)
    config = study_spec.cell_config(study.cells[1], 3)
    assert config.seed == 3 and config.ipc == 10 and config.distill.iterations == 7
    assert config.mi.weight == 0.5 and tuple(config.eval.models) == ("convnet", "alexnet")


COMMITTED_STUDIES = sorted(os.listdir(os.path.join(ROOT, "benchmarks", "studies")))


@pytest.mark.parametrize("name", COMMITTED_STUDIES)
def test_committed_study_files_pass_the_structural_checks(name):
    path = os.path.join(ROOT, "benchmarks", "studies", name, "study.toml")
    study = study_spec.load_study(path)
    assert study.cells


@pytest.mark.parametrize("name", COMMITTED_STUDIES)
def test_committed_studies_build_every_config(name):
    path = os.path.join(ROOT, "benchmarks", "studies", name, "study.toml")
    assert study_spec.load_study(path, check_configs=True).cells


def test_checking_configs_touches_no_device(tmp_path):
    """The runner must not hold an accelerator (its memory) while its run.py children run."""
    path = write(tmp_path, GOOD)
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from benchmarks import study, study_spec;"
        f"study_spec.load_study({path!r}, check_configs=True);"
        "from jax._src import xla_bridge;"
        "print(xla_bridge.backends_are_initialized())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
