"""runner: the prologue and epilogue every mode shares, and the one workdir-ownership check."""

import json
import os

import numpy as np
import pytest
from helpers import tiny_config

from mim4dd_jax import artifacts, runner
from mim4dd_jax.errors import ConfigError

# The files each mode leaves in its workdir (what the owner is read from).
MODE_FILES = {
    "experts": {"meta.json": {"dataset": "fake"}},
    "distill": {"config.json": {"method": "dm"}},
    "evaluate": {"results.json": {"mode": "evaluate", "accuracy": {}}},
    "coreset": {"results.json": {"method": "random", "ipc": 1, "accuracy": {}}},
}


def _make(folder, mode):
    os.makedirs(folder, exist_ok=True)
    for name, content in MODE_FILES[mode].items():
        artifacts.write_json(os.path.join(folder, name), content)
    return str(folder)


def test_owner_is_read_from_each_modes_files(tmp_path):
    assert runner.owner(str(tmp_path / "new")) is None
    assert runner.owner(str(tmp_path)) is None  # empty
    for mode in MODE_FILES:
        assert runner.owner(_make(tmp_path / mode, mode)) == mode
    for name, text in (("bad", "{not json"), ("list", "[1]"), ("other", '{"accuracy": {}}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(text)
        assert runner.owner(str(tmp_path / name)) == "unknown", name


@pytest.mark.parametrize("held", sorted(MODE_FILES))
@pytest.mark.parametrize("mode", runner.MODES)
def test_a_mode_claims_its_own_workdir_and_refuses_every_other(tmp_path, held, mode):
    folder = _make(tmp_path / "w", held)
    before = sorted(os.listdir(folder))
    if held == mode:
        assert runner.claim(folder, mode) == folder
    else:
        with pytest.raises(ConfigError, match=f"holds another run's results \\(an? {held} run\\)"):
            runner.claim(folder, mode)
    assert sorted(os.listdir(folder)) == before


def test_an_unreadable_results_file_is_never_claimed(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    for mode in runner.MODES:
        with pytest.raises(ConfigError, match="an unknown run"):
            runner.claim(str(tmp_path), mode)


def test_an_unknown_mode_is_named_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="'distil'.*coreset.*distill"):
        runner.claim(str(tmp_path), "distil")


def test_start_creates_nothing_when_a_check_fails(tmp_path, fake_npz):
    config = tiny_config("dm,ipc1", **{"data.source": "npz", "data.path": fake_npz})
    seen = []

    def checks(dataset, folder):
        seen.append((dataset.num_classes, folder))
        raise ConfigError("bad")

    with pytest.raises(ConfigError, match="bad"):
        runner.start(config, str(tmp_path / "a" / "b"), "coreset", checks)
    assert seen == [(3, str(tmp_path / "a" / "b"))]
    assert not (tmp_path / "a").exists()
    started = runner.start(config, str(tmp_path / "a" / "b"), "coreset", lambda d, f: "read")
    assert started.workdir == str(tmp_path / "a" / "b") and os.path.isdir(started.workdir)
    assert started.checked == "read" and started.dataset.train_images.dtype == np.float32


def test_finish_writes_the_summary_with_the_machine(tmp_path):
    summary = runner.finish(str(tmp_path), {"accuracy": {"convnet": 0.5}})
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored == summary and set(stored) == {"accuracy", "machine"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["accuracy"] == {"convnet": 0.5}
    (tmp_path / "quiet").mkdir()
    runner.finish(str(tmp_path / "quiet"), {"x": 1}, log=False)
    assert not (tmp_path / "quiet" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("held", "mode"), [("experts", "distill"), ("distill", "coreset"), ("coreset", "experts")]
)
def test_the_real_modes_refuse_another_modes_workdir(tmp_path, fake_npz, held, mode):
    """Through each mode's run(): the refusal comes before any training or file."""
    from mim4dd_jax import coreset, distill, experts_run

    run = {"coreset": coreset.run, "distill": distill.run, "experts": experts_run.run}[mode]
    arg = {"coreset": "random,ipc1", "distill": "dm,ipc1", "experts": "experts"}[mode]
    config = tiny_config(arg, **{"data.source": "npz", "data.path": fake_npz})
    folder = _make(tmp_path / "w", held)
    before = {n: (tmp_path / "w" / n).read_bytes() for n in os.listdir(folder)}
    with pytest.raises(ConfigError, match=f"an? {held} run"):
        run(config, folder)
    assert {n: (tmp_path / "w" / n).read_bytes() for n in os.listdir(folder)} == before
