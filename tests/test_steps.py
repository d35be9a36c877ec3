"""The step registry (issue 14): the built-in methods are registered builders, an unknown name is
refused with the valid ones, and a new method is one registered function that gets the MI term,
the optax updates and the numerical guard without writing them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fake_dataset, run_cli, tiny_config

from mim4dd_jax import config as config_lib
from mim4dd_jax import data, inner, methods, state, steps
from mim4dd_jax.errors import ConfigError

C, IPC, HW = 3, 2, 8


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so a test's toy methods leave no trace."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods


def test_the_built_in_methods_are_registered():
    assert steps.BUILT_IN and methods.names() == ("dm", "dc", "dsa", "mtt")
    assert methods.get("dsa").build is methods.get("dc").build
    assert config_lib.methods() == {
        "random": "coreset",
        "herding": "coreset",
        **dict.fromkeys(("dm", "dc", "dsa", "mtt"), "distill"),
        "experts": "experts",
        "evaluate": "evaluate",
    }


def test_an_unknown_method_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match="'dm', 'dc', 'dsa', 'mtt'"):
        methods.get("dmm")
    with pytest.raises(
        ConfigError, match="'random', 'herding', 'dm', 'dc', 'dsa', 'mtt', 'experts'"
    ):
        config_lib.build({"name": "fake"}, "dmm,ipc1")


def test_a_registered_method_is_built_with_its_own_record(registry):
    # No edit anywhere else: the name, defaults, extra learned parts and lr come from the record.
    registry.register(
        methods.Method(
            "toy",
            build=_toy,
            defaults={"distill.iterations": 7, "eval.epochs": 3},
            learned=lambda config: ("syn_lr",),
            lr=lambda config: 0.25,
        )
    )
    config = config_lib.build({"name": "fake"}, "toy,ipc2")
    assert (config.mode, config.distill.iterations, config.eval.epochs) == ("distill", 7, 3)
    assert state.learned_parts(config) == ("images", "syn_lr")
    st = state.init_state(jax.random.key(0), fake_dataset(C, 12, HW), config)
    assert float(st["syn_lr"]) == 0.25 and set(st["opt_state"]) == {"images", "syn_lr"}


def _toy(ctx, poison: bool = False):
    """Per-class pixel-mean matching plus the MI term on a random network's features."""

    def loss_fn(learned, st, real_x, variables):
        syn_x = learned["images"].reshape(ctx.num_classes, ctx.ipc, *ctx.shape)
        base = jnp.sum((real_x.mean(1) - syn_x.mean(1)) ** 2)
        base = base * jnp.nan if poison else base
        return base, ({}, (variables, real_x))

    def mi_features(images, carry):
        variables, real_x = carry

        def blocks(x):
            return ctx.model.apply(variables, x.reshape(-1, *ctx.shape), features=True).blocks

        return blocks(real_x), blocks(images)

    def step(st, key, real_images, index, experts):
        real_x = real_images[data.sample_per_class(jax.random.fold_in(key, 0), index, ctx.n_real)]
        variables = inner.init_variables(ctx.model, jax.random.fold_in(key, 1), ctx.shape)
        return ctx.grad_and_update(loss_fn, st, real_x, variables, mi_features=mi_features)

    return step


@pytest.mark.parametrize("poison", [False, True])
def test_a_registered_method_gets_the_mi_term_the_updates_and_the_guard(registry, poison):
    registry.register(methods.Method("toy", build=lambda ctx: _toy(ctx, poison)))
    ds = fake_dataset(C, 12, HW)
    config = tiny_config(f"toy,ipc{IPC}", **{"model.depth": 1, "mi.weight": 0.1})
    st = state.init_state(jax.random.key(0), ds, config)
    before = {k: jax.tree.map(np.array, st[k]) for k in ("images", "heads")}
    step = steps.make_step(config, ds)
    index = data.class_index(ds.train_labels, C)
    new, metrics = step(st, jax.random.key(1), jnp.asarray(ds.train_images), index)
    assert metrics["mi"].shape == (1,)  # one MI layer: the depth-1 model's block
    changed = [
        not np.array_equal(jax.tree.leaves(before[k])[0], np.asarray(jax.tree.leaves(new[k])[0]))
        for k in ("images", "heads")
    ]
    if poison:  # a NaN loss: the shared guard keeps the state and counts the skip
        assert int(metrics["skipped"]) == 1 and changed == [False, False]
    else:  # the images and the MI heads both learned
        assert int(metrics["skipped"]) == 0 and changed == [True, True]
        assert float(metrics["loss"]) != float(metrics["base_loss"])


TOY_CONFIG = '''"""A user's method in one file: registered here, run by run.py; no edit to the library."""
import json

import jax
import jax.numpy as jnp

from mim4dd_jax import config, data, methods


def build(ctx):
    def loss_fn(learned, st, real_x):
        syn_x = learned["images"].reshape(ctx.num_classes, ctx.ipc, *ctx.shape)
        return jnp.sum((real_x.mean(1) - syn_x.mean(1)) ** 2), ({}, None)

    def step(st, key, real_images, index, experts):
        real_x = real_images[data.sample_per_class(key, index, ctx.n_real)]
        return ctx.grad_and_update(loss_fn, st, real_x)

    return step


methods.register(methods.Method("pixelmean", build=build, defaults={"distill.iterations": 2}))


def get_config(arg):
    return config.build({"name": "fake", "source": "npz", "path": NPZ}, arg)
'''


def test_a_method_registered_in_a_config_file_runs_through_run_py(fake_npz, tmp_path):
    path = tmp_path / "toy_method.py"
    path.write_text(TOY_CONFIG.replace("NPZ", repr(fake_npz)))
    workdir = tmp_path / "run"
    r = run_cli(
        f"--config={path}:pixelmean,ipc2",
        f"--workdir={workdir}",
        "--config.model.width=8",
        "--config.model.depth=1",
        "--config.eval.epochs=1",
        "--config.eval.num_models=1",
        "--config.distill.batch_real=4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert (results["method"], results["ipc"], results["iteration"]) == ("pixelmean", 2, 2)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [2]  # log_every 10: the last step
