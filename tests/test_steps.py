"""The step registry (issue 14): the built-in methods are registered builders, an unknown name is
refused with the valid ones, and a new method is one registered function that gets the MI term,
the optax updates and the numerical guard without writing them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fake_dataset, tiny_config

from mim4dd_jax import data, inner, state, steps
from mim4dd_jax.errors import ConfigError

C, IPC, HW = 3, 2, 8


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so a test's toy methods leave no trace."""
    monkeypatch.setattr(steps, "_BUILDERS", dict(steps._BUILDERS))
    return steps


def test_the_built_in_methods_are_registered():
    assert steps.names() == ("dm", "dc", "dsa", "mtt")
    assert steps.get("dsa") is steps.get("dc")


def test_an_unknown_method_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match="'dm', 'dc', 'dsa', 'mtt'"):
        steps.get("dmm")


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
    registry.register("toy")(lambda ctx: _toy(ctx, poison))
    ds = fake_dataset(C, 12, HW)
    config = tiny_config(f"dm,ipc{IPC}", **{"model.depth": 1, "mi.weight": 0.1})
    config.method = "toy"
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
