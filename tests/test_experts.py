"""Expert trajectories: file layout, the documented init key, resume = uninterrupted run, group
size changes nothing but rounding, load() checks, and run.py end to end on Fashion-MNIST."""

import json
import os

import jax
import numpy as np
import pytest

from mim4dd_jax import config as config_lib
from mim4dd_jax import data, experts, experts_run, inner, models
from mim4dd_jax.errors import ConfigError

C, PER_CLASS, HW = 3, 12, 8


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    """3 classes of 8x8 grey uint8 images whose brightness depends on the class."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(C), PER_CLASS)
    x = np.clip(rng.normal(60.0 + 60.0 * y[:, None, None], 40.0, (len(y), HW, HW)), 0, 255)
    path = str(tmp_path_factory.mktemp("data") / "fake.npz")
    np.savez(
        path, x_train=x.astype(np.uint8), y_train=y, x_test=x[::2].astype(np.uint8), y_test=y[::2]
    )
    return path


def make_config(npz_path, **overrides):
    c = config_lib.build({"name": "fake"}, "experts")
    tiny = {
        "data.source": "npz",
        "data.path": npz_path,
        "model.width": 8,
        "model.depth": 2,
        "dsa.strategy": "crop_flip",  # still DSA, with a smaller program to compile
        "experts.num": 2,
        "experts.epochs": 2,
        "experts.batch_size": 16,  # 36 images: two full batches and a padded one
        "experts.group": 1,
    }
    for dotted, value in {**tiny, **overrides}.items():
        config_lib.set_dotted(c, dotted, value)
    return c


def read(folder, i):
    with np.load(experts.expert_path(str(folder), i)) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def fresh(npz_path, tmp_path_factory):
    """2 experts x 2 epochs in one uninterrupted run (group 1)."""
    folder = tmp_path_factory.mktemp("fresh")
    return folder, experts_run.run(make_config(npz_path), str(folder))


def test_trajectory_rows_start_at_the_documented_init(npz_path, fresh):
    folder, summary = fresh
    config = make_config(npz_path)
    model = models.build_model(config, C)
    for i in range(2):
        rec = read(folder, i)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), i), 0)
        # init_flat is the jitted ravel of inner.init_variables (compiled by run() already).
        p0 = np.asarray(experts_run.init_flat(key, model=model, image_shape=(HW, HW, 1))[0])
        assert rec["params"].shape == (3, p0.size) and rec["params"].dtype == np.float32
        np.testing.assert_array_equal(rec["params"][0], p0)
        assert np.all(np.isfinite(rec["params"]))
        assert np.abs(np.diff(rec["params"], axis=0)).max(axis=1).min() > 1e-4  # rows differ
        assert rec["test_accuracy"].shape == (2,) and rec["state"].shape == (0,)
        assert np.all((rec["test_accuracy"] >= 0) & (rec["test_accuracy"] <= 1))
    meta = json.load(open(folder / "meta.json"))
    assert meta["num_params"] == p0.size and meta["model"]["width"] == 8
    assert meta["dsa"]["strategy"] == "crop_flip" and meta["image_shape"] == [HW, HW, 1]
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    assert sorted((r["expert"], r["epoch"]) for r in rows) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert json.load(open(folder / "results.json")) == summary
    finals = [read(folder, i)["test_accuracy"][-1] for i in range(2)]
    np.testing.assert_allclose(summary["test_accuracy"]["all"], finals)
    assert (summary["num"], summary["epochs"]) == (2, 2)


def test_resume_with_more_experts_and_epochs_equals_an_uninterrupted_run(npz_path, fresh, tmp_path):
    folder, summary = fresh
    experts_run.run(make_config(npz_path, **{"experts.num": 1, "experts.epochs": 1}), str(tmp_path))
    assert read(tmp_path, 0)["params"].shape[0] == 2
    assert not os.path.exists(experts.expert_path(str(tmp_path), 1))
    resumed = experts_run.run(make_config(npz_path), str(tmp_path))
    for i in range(2):
        for name, value in read(folder, i).items():
            np.testing.assert_array_equal(read(tmp_path, i)[name], value)
    assert resumed == summary
    # Nothing left to do: no training, same files.
    before = os.path.getmtime(experts.expert_path(str(tmp_path), 0))
    experts_run.run(make_config(npz_path), str(tmp_path))
    assert os.path.getmtime(experts.expert_path(str(tmp_path), 0)) == before


def test_groups_of_two_with_padding_and_mixed_epochs_match_group_one(npz_path, fresh, tmp_path):
    folder, _ = fresh
    # First a lone expert in a padded group of 2, then expert 0 (1 epoch done) and expert 1
    # (none) share a group while standing at different epochs.
    grouped = {"experts.group": 2}
    experts_run.run(
        make_config(npz_path, **grouped, **{"experts.num": 1, "experts.epochs": 1}), str(tmp_path)
    )
    experts_run.run(make_config(npz_path, **grouped), str(tmp_path))
    for i in range(2):
        np.testing.assert_allclose(
            read(tmp_path, i)["params"], read(folder, i)["params"], rtol=1e-5, atol=1e-5
        )


def test_resume_with_another_config_names_the_field(npz_path, fresh):
    folder, _ = fresh
    with pytest.raises(ConfigError, match=r"experts\.lr: stored 0\.01, current 0\.02"):
        experts_run.run(make_config(npz_path, **{"experts.lr": 0.02}), str(folder))


def test_momentum_is_refused(npz_path, tmp_path):
    with pytest.raises(ConfigError, match="experts.momentum must be 0"):
        experts_run.run(make_config(npz_path, **{"experts.momentum": 0.9}), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_load(npz_path, fresh, tmp_path):
    folder, _ = fresh
    config = make_config(npz_path)
    dataset = data.load_from_config(config.data)
    loaded = experts.load(str(folder), dataset=dataset, config=config, min_epochs=2)
    assert loaded.trajectories.shape == (2, 3, loaded.meta["num_params"])
    np.testing.assert_array_equal(loaded.trajectories[1], read(folder, 1)["params"])
    params = loaded.unravel(loaded.trajectories[0, -1])
    model = models.build_model(config, C)
    init = jax.eval_shape(lambda: inner.init_variables(model, jax.random.key(1), (HW, HW, 1)))
    assert jax.tree.structure(params) == jax.tree.structure(init["params"])
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, init["params"])

    with pytest.raises(ConfigError, match="the longest has 2"):
        experts.load(str(folder), dataset=dataset, config=config, min_epochs=3)
    wide = make_config(npz_path, **{"model.width": 16})
    with pytest.raises(ConfigError, match=r"model\.width: stored 8, current 16"):
        experts.load(str(folder), dataset=dataset, config=wide, min_epochs=1)
    with pytest.raises(ConfigError, match="train them first: python run.py"):
        experts.load(str(tmp_path / "none"), dataset=dataset, config=config, min_epochs=1)
    # How the experts trained is not checked: a distillation run may use another seed.
    other_seed = make_config(npz_path, **{"seed": 3})
    experts.load(str(folder), dataset=dataset, config=other_seed, min_epochs=1)


def test_load_keeps_long_enough_experts_truncated_to_the_shortest(npz_path, fresh, tmp_path):
    folder, _ = fresh
    # Expert 0 with 2 epochs (copied), expert 1 with 1.
    for name in ("meta.json", "expert_000.npz"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    rec = read(folder, 1)
    np.savez(
        experts.expert_path(str(tmp_path), 1),
        params=rec["params"][:2],
        test_accuracy=rec["test_accuracy"][:1],
        state=rec["state"],
    )
    config = make_config(npz_path)
    dataset = data.load_from_config(config.data)
    both = experts.load(str(tmp_path), dataset=dataset, config=config, min_epochs=1)
    assert both.trajectories.shape[:2] == (2, 2)
    np.testing.assert_array_equal(both.trajectories[1], rec["params"][:2])
    longest = experts.load(str(tmp_path), dataset=dataset, config=config, min_epochs=2)
    assert longest.trajectories.shape[:2] == (1, 3)


def test_draw_checkpoint_is_a_function_of_the_key_and_skips_the_init():
    # [E=3, T+1=4, P=2]: row (e, t) holds (e, t), so a draw names itself.
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(4), indexing="ij"), -1).astype(np.float32)
    traj = jax.numpy.asarray(grid)
    key = jax.random.key(7)
    draws = [experts.draw_checkpoint(jax.random.fold_in(key, it), traj) for it in range(200)]
    again = [experts.draw_checkpoint(jax.random.fold_in(key, it), traj) for it in range(200)]
    np.testing.assert_array_equal(np.stack(draws), np.stack(again))
    pairs = {tuple(int(v) for v in d) for d in draws}
    assert pairs == {(e, t) for e in range(3) for t in (1, 2, 3)}  # every trained checkpoint
    jitted = jax.jit(experts.draw_checkpoint, static_argnames="min_epoch")
    np.testing.assert_array_equal(jitted(jax.random.fold_in(key, 5), traj), draws[5])
    assert int(experts.draw_checkpoint(key, traj, min_epoch=3)[1]) == 3
    with pytest.raises(ConfigError, match="epoch 4 is not in 0..3"):
        experts.draw_checkpoint(key, traj, min_epoch=4)
