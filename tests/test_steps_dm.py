"""The DM step with the MI features from expert checkpoints (mi.feature_nets="experts"): the
base loss keeps its random network, the MI term's network is drawn from the checkpoints by the
step key, and a missing or wrong expert folder is one line, exit 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fake_dataset, fake_experts, run_cli, tiny_config
from jax.flatten_util import ravel_pytree

from mim4dd_jax import config as config_lib
from mim4dd_jax import (
    data,
    experts,
    mi,
    objectives,
    steps,
    steps_core,
)
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib
from mim4dd_jax.errors import ConfigError

C, PER_CLASS, HW, IPC = 3, 12, 8, 2
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def dataset():
    return fake_dataset(C, PER_CLASS, HW)


def make_config(**overrides):
    return tiny_config(f"dm,ipc{IPC}", **{"mi.weight": 0.5, **overrides})


@pytest.fixture(scope="module")
def trajectories(dataset):
    """[2, 3, P]: two inits, each drifting over two 'epochs' (distinct networks)."""
    return fake_experts(make_config(), dataset, drift=0.05)


def one_step(config, dataset, trajectories, it=0):
    init = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    step = steps_lib.make_step(config, dataset)
    real, index = jnp.asarray(dataset.train_images), data.class_index(dataset.train_labels, C)
    images0 = np.array(init["images"])
    state, metrics = step(init, jax.random.fold_in(KEY, it), real, index, trajectories)
    return images0, np.asarray(state["images"]), jax.device_get(metrics)


def test_expert_features_are_drawn_by_the_step_key(dataset, trajectories):
    config = make_config(**{"mi.feature_nets": "experts"})
    images0, new, metrics = one_step(config, dataset, trajectories)
    _, again, _ = one_step(config, dataset, trajectories)
    np.testing.assert_array_equal(new, again)
    _, random_net, random_metrics = one_step(make_config(), dataset, trajectories)
    # Same base loss (its random network and batch are untouched), another MI pull.
    np.testing.assert_allclose(metrics["base_loss"], random_metrics["base_loss"], rtol=1e-6)
    np.testing.assert_allclose(
        metrics["grad_norm_base"], random_metrics["grad_norm_base"], rtol=1e-6
    )
    assert np.max(np.abs(new - random_net)) > 0
    assert metrics["skipped"] == 0 and np.all(np.isfinite(metrics["mi"]))

    # The MI features are those of the checkpoint fold_in(fold_in(key, it), 3) draws.
    ctx = steps.make_context(config, dataset, steps.sharding.mesh_from_config(config))
    key = jax.random.fold_in(KEY, 0)
    drawn = experts.draw_checkpoint(jax.random.fold_in(key, 3), trajectories)
    net = ctx.expert_variables(jax.random.fold_in(key, 3), trajectories)
    np.testing.assert_array_equal(ravel_pytree(net["params"])[0], drawn)
    real_key, aug_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 2)
    index = data.class_index(dataset.train_labels, C)
    real_x = jnp.asarray(dataset.train_images)[data.sample_per_class(real_key, index, ctx.n_real)]
    real_blocks, syn_blocks = steps_core.siamese_blocks(
        ctx.model,
        net,
        net,
        real_x,
        jnp.asarray(images0).reshape(C, IPC, HW, HW, 1),
        aug_key,
        ctx.strategy,
        ctx.chunk,
    )
    # mi = the estimate on those features with the initial heads (what the step reports).
    init = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)
    _, aux = mi.mi_loss(
        mi.Heads(init["heads"], ctx.mi_config),
        real=list(real_blocks),
        syn=list(syn_blocks),
        real_labels=objectives.class_labels(C, ctx.n_real),
        syn_labels=objectives.class_labels(C, IPC),
    )
    np.testing.assert_allclose(metrics["mi"], aux["mi"], rtol=1e-4, atol=1e-6)


def test_expert_features_need_experts(dataset):
    step = steps_lib.make_step(make_config(**{"mi.feature_nets": "experts"}), dataset)
    init = state_lib.init_state(KEY, dataset, make_config(**{"mi.feature_nets": "experts"}))
    real, index = jnp.asarray(dataset.train_images), data.class_index(dataset.train_labels, C)
    with pytest.raises(ConfigError, match="needs expert trajectories"):
        step(init, KEY, real, index, None)
    with pytest.raises(ConfigError, match="mi.feature_nets='experts' is for dm, dc and dsa"):
        config_lib.validate(tiny_config("mtt,ipc1", **{"mi.feature_nets": "experts"}))
    with pytest.raises(ConfigError, match=r"mi.feature_nets.*'expert'.*random.*experts"):
        config_lib.validate(make_config(**{"mi.feature_nets": "expert"}))


@pytest.mark.parametrize("folder", ["", "no/such/folder"])
def test_a_bad_experts_dir_is_one_line_and_exit_2(tmp_path, folder):
    r = run_cli(
        "--config=configs/fashion_mnist.py:dm,ipc1,local",
        f"--workdir={tmp_path / 'w'}",
        "--config.mi.weight=0.1",
        "--config.mi.feature_nets=experts",
        f"--config.mtt.experts_dir={folder}",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert ("needs expert trajectories" if not folder else "does not exist") in lines[0]
    assert not (tmp_path / "w").exists()
