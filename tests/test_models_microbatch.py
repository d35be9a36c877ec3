"""config.microbatch (issue 15): training passes of the ConvNet run a few images at a time,
rematerialised. The numbers are those of the whole-batch call up to float rounding: value,
gradient, second derivative (DC's matching and MTT's unroll differentiate through training
steps), inside ``lax.scan``, with a batch the chunk does not divide, and through the whole
evaluation training; batch norm, which couples the images, runs whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fake_dataset, tiny_config

from mim4dd_jax import inner, models
from mim4dd_jax.errors import ConfigError

N, HW, K = 10, 8, 3  # 10 images in chunks of 4: two full chunks and a padded one


def setup(norm="instance", chunk=4):
    model = models.get_model("convnet", num_classes=K, width=8, depth=2, norm=norm)
    chunked = models.get_model(
        "convnet", num_classes=K, width=8, depth=2, norm=norm, microbatch=chunk
    )
    variables = inner.init_variables(model, jax.random.key(0), (HW, HW, 1))
    x = jax.random.normal(jax.random.key(1), (N, HW, HW, 1))
    y = jnp.arange(N) % K
    return model, chunked, variables, x, y


def loss_of(model):
    def loss(params, x, y, state):
        logits, _ = inner.apply_train(model, {**state, "params": params}, x)
        return jnp.mean(inner.cross_entropy(logits, y))

    return loss


def tree_close(a, b, rtol=1e-5, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def test_chunked_forward_and_features_equal_the_whole_batch():
    model, _, variables, x, _ = setup()
    for kwargs in ({"train": True}, {"train": False, "features": True}):
        whole = model.apply(variables, x, **kwargs)
        chunked = models.apply_in_chunks(model, variables, x, 4, **kwargs)
        tree_close(chunked, whole)
        assert jax.tree.map(jnp.shape, chunked) == jax.tree.map(jnp.shape, whole)


def test_gradient_and_second_derivative_equal_the_whole_batch():
    model, chunked, variables, x, y = setup()
    params, state = variables["params"], {}
    # apply_train does chunk (a scan over chunks in the program), else the checks below are void.
    assert "scan" in str(jax.make_jaxpr(loss_of(chunked))(params, x, y, state))
    assert "scan" not in str(jax.make_jaxpr(loss_of(model))(params, x, y, state))
    g_whole = jax.grad(loss_of(model))(params, x, y, state)
    g_chunk = jax.grad(loss_of(chunked))(params, x, y, state)
    tree_close(g_chunk, g_whole)

    # d/dx of |d loss / d params|^2: the shape of DC's gradient matching and MTT's unroll.
    def second(m):
        def f(x):
            g = jax.grad(loss_of(m))(params, x, y, state)
            return sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g))

        return jax.grad(f)(x)

    h_whole, h_chunk = second(model), second(chunked)
    assert float(jnp.max(jnp.abs(h_whole))) > 0
    tree_close(h_chunk, h_whole, rtol=1e-4, atol=1e-6)


def test_sgd_steps_inside_scan_equal_the_whole_batch():
    model, chunked, variables, x, y = setup()

    def run(m):
        def body(p, _):
            g = jax.grad(loss_of(m))(p, x, y, {})
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

        return jax.jit(lambda p: jax.lax.scan(body, p, None, length=3)[0])(variables["params"])

    tree_close(run(chunked), run(model))


def test_batch_norm_runs_the_whole_batch():
    model, _, variables, x, _ = setup(norm="batch")
    assert "batch_stats" in variables
    # Chunks would normalise each chunk with its own statistics; the helper must not chunk.
    whole = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(
        np.asarray(models.apply_in_chunks(model, variables, x, 4, train=False)),
        np.asarray(whole),
    )


def test_evaluation_training_with_microbatch_matches_and_the_field_is_validated():
    ds = fake_dataset(K, 6, HW)
    accs = {}
    for chunk in (0, 4):
        config = tiny_config("dm,ipc1", **{"microbatch": chunk, "eval.epochs": 3})
        model = models.build_model(config, K)
        assert model.microbatch == chunk
        variables = inner.train_classifier(
            jax.random.key(3),
            jnp.asarray(ds.train_images),
            jnp.asarray(ds.train_labels),
            0.01,
            model=model,
            config=inner.TrainConfig(epochs=3, batch_size=8),
        )
        accs[chunk] = variables["params"]
    tree_close(accs[4], accs[0], rtol=1e-4, atol=1e-6)

    from mim4dd_jax import config as config_lib

    bad = tiny_config("dm,ipc1", **{"microbatch": -1})
    with pytest.raises(ConfigError, match="microbatch must be an integer >= 0, got -1"):
        config_lib.validate(bad)
