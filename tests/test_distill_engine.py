"""The distillation outer loop: SIGTERM checkpoints and a restart resumes onto the same bytes,
incremental growth keeps the loaded images bit-identical, a different config in the workdir is
refused, the init file is checked, and the artifacts (TensorBoard, accuracy.png, grids) exist."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from helpers import SMALL_NET, tiny_config

from mim4dd_jax import distill
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib
from mim4dd_jax.errors import ConfigError

C, HW = 3, 8


def config_for(fake_npz, ipc, **overrides):
    fields = {
        "data.source": "npz",
        "data.path": fake_npz,
        **SMALL_NET,
        "distill.iterations": 5,
        "distill.checkpoint_every": 2,
        "distill.eval_every": 4,
        "distill.log_every": 1,
        "eval.epochs": 1,
        "eval.num_models": 1,
        **overrides,
    }
    return tiny_config(f"dm,ipc{ipc}", **fields)


def interrupt_at(monkeypatch, call):
    """Makes the step send this process SIGTERM right after its ``call``-th call (0-based)."""
    make_step = steps_lib.make_step

    def patched(config, dataset):
        step, calls = make_step(config, dataset), [0]

        def wrapped(*args):
            out = step(*args)
            if calls[0] == call:
                os.kill(os.getpid(), signal.SIGTERM)
            calls[0] += 1
            return out

        wrapped._cache_size = step._cache_size
        return wrapped

    monkeypatch.setattr(steps_lib, "make_step", patched)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_sigterm_checkpoints_and_the_restart_gives_identical_bytes(fake_npz, tmp_path, monkeypatch):
    # Evaluated at the end only: the schedule is tests/test_distill_eval_schedule.py's business.
    config = config_for(fake_npz, 2, **{"mi.weight": 0.1, "distill.eval_every": 0})
    distill.run(config, str(tmp_path / "straight"))

    interrupt_at(monkeypatch, 2)  # iteration 2: not a checkpoint step, the handler saves one
    with pytest.raises(SystemExit) as stopped:
        distill.run(config, str(tmp_path / "resumed"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert os.path.isdir(tmp_path / "resumed" / "checkpoints" / "3")
    monkeypatch.undo()
    distill.run(config, str(tmp_path / "resumed"))

    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert read(a / "distilled.npz") == read(b / "distilled.npz")
    assert json.loads(read(a / "results.json")) == json.loads(read(b / "results.json"))
    # Artifacts of a full run.
    for name in ("accuracy.png", "grid.png", "grid_000005.png", "config.json"):
        assert (a / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(a / "tensorboard"))
    rows = [json.loads(line) for line in read(a / "metrics.jsonl").decode().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5]
    assert all(r["compiles"] == 1 and r["skipped"] == 0 and r["peak_rss_bytes"] > 0 for r in losses)

    # The same workdir with a different image lr is refused, and nothing is touched.
    before = read(a / "distilled.npz")
    with pytest.raises(ConfigError, match="distill.lr=1.0, not 0.5"):
        distill.run(
            config_for(
                fake_npz, 2, **{"mi.weight": 0.1, "distill.eval_every": 0, "distill.lr": 0.5}
            ),
            str(a),
        )
    # A finished run is not re-evaluated in place with other settings, nor shortened.
    for change, message in (
        ({"eval.epochs": 2}, "eval.epochs=1, not 2"),
        ({"distill.iterations": 3}, "cannot be shortened"),
    ):
        with pytest.raises(ConfigError, match=message):
            distill.run(
                config_for(fake_npz, 2, **{"mi.weight": 0.1, "distill.eval_every": 0, **change}),
                str(a),
            )
    assert read(a / "distilled.npz") == before


# Growth is about the state's layout and the frozen rows, not about DSA: without it (in the
# distillation and the evaluation) the two runs compile in about half the time.
GROWTH = {"distill.iterations": 2, "distill.dsa": False, "eval.dsa": False}


def test_growth_keeps_the_loaded_images_bit_identical(fake_npz, tmp_path):
    small = tmp_path / "ipc1"
    distill.run(config_for(fake_npz, 1, **GROWTH), str(small))
    grown = tmp_path / "ipc3"
    config = config_for(
        fake_npz, 3, **{**GROWTH, "distill.init_from": str(small / "distilled.npz")}
    )
    distill.run(config, str(grown))
    with np.load(small / "distilled.npz") as old, np.load(grown / "distilled.npz") as new:
        for key in ("images", "model_images"):
            kept = new[key].reshape(C, 3, HW, HW, 1)[:, 0]
            np.testing.assert_array_equal(kept, old[key])  # bit-identical
        np.testing.assert_array_equal(new["labels"], np.repeat(np.arange(C), 3))
        init = state_lib.init_state(jax.random.key(0), _dataset_of(config), config)
        fresh = np.asarray(init["images"]).reshape(C, 3, HW, HW, 1)[:, 1:]
        learned = new["model_images"].reshape(C, 3, HW, HW, 1)[:, 1:]
        assert np.max(np.abs(learned - fresh)) > 1e-4  # the new images did learn


def _dataset_of(config):
    from mim4dd_jax import data

    return data.load_from_config(config.data)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"images": np.zeros((3, 4, 4, 1)), "labels": np.arange(3)}, "shape \\(4, 4, 1\\)"),
        ({"images": np.zeros((2, HW, HW, 1)), "labels": np.array([0, 1])}, "counts \\[1, 1, 0\\]"),
        ({"images": np.zeros((6, HW, HW, 1)), "labels": np.repeat(np.arange(3), 2)}, "ipc >= 2"),
        ({"images": np.zeros((3, HW, HW, 1)), "labels": np.arange(3) + 5}, "outside 0..2"),
    ],
)
def test_bad_init_file_is_one_clear_error(fake_npz, tmp_path, bad, message):
    path = tmp_path / "init.npz"
    np.savez(path, **bad)
    config = config_for(fake_npz, 1, **{"distill.init_from": str(path)})
    with pytest.raises(ConfigError, match=message):
        state_lib.read_init(str(path), _dataset_of(config), config)
