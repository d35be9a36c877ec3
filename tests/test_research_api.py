"""The config-free research API (issue 26): mi.relative_weight, heads that carry their options,
jit without functools.partial, inner.train and state.init_images."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fake_dataset, tiny_config

from mim4dd_jax import inner, mi, models, state
from mim4dd_jax.errors import ConfigError

MODEL = models.ConvNet(num_classes=3, width=8, depth=2, conv_impl="xla")


def _features(n_real=9, n_syn=6):
    k = jax.random.split(jax.random.key(0), 2)
    v = MODEL.init(k[0], jnp.zeros((1, 8, 8, 1)))
    x_real = jax.random.normal(k[0], (n_real, 8, 8, 1))
    x_syn = jax.random.normal(k[1], (n_syn, 8, 8, 1))
    real = MODEL.apply(v, x_real, features=True).blocks
    syn = MODEL.apply(v, x_syn, features=True).blocks
    return real, syn, jnp.arange(n_real) % 3, jnp.arange(n_syn) % 3


def test_relative_weight_gives_the_ratio_of_pulls_over_pytrees():
    k = jax.random.split(jax.random.key(1), 4)
    g_base = {"a": jax.random.normal(k[0], (3, 4)), "b": jax.random.normal(k[1], (5,))}
    g_mi = {"a": jax.random.normal(k[2], (3, 4)), "b": jax.random.normal(k[3], (5,))}
    lam = mi.relative_weight(g_base, g_mi, 0.3)
    norm = lambda t: np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(t)))  # noqa
    np.testing.assert_allclose(lam * norm(g_mi), 0.3 * norm(g_base), rtol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, g_mi)
    assert float(mi.relative_weight(g_base, zero, 0.3)) == 0.0  # safe at 0
    assert float(mi.relative_weight(zero, g_mi, 0.3)) == 0.0
    grad = jax.grad(lambda x: mi.relative_weight(x, g_mi, 0.3))(g_base)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad))  # a constant


def test_heads_carry_their_options_and_refuse_conflicting_ones():
    real, syn, yr, ys = _features()
    shapes = models.block_shapes(MODEL, (8, 8, 1))  # (h, w, c) per block, no batch axis
    heads = mi.init_heads(jax.random.key(2), shapes, head="none", estimator="nce")
    assert isinstance(heads, mi.Heads) and heads.config.head == "none"
    kw = dict(real=real, syn=syn, real_labels=yr, syn_labels=ys)
    loss, aux = mi.mi_loss(heads, **kw)  # no options repeated
    assert aux["mi"].shape == (2,) and np.isfinite(float(loss))
    assert float(mi.mi_loss(heads, estimator="nce", **kw)[0]) == float(loss)  # agreeing: fine
    with pytest.raises(ConfigError, match="head='linear' conflicts with the heads' head='none'"):
        mi.mi_loss(heads, head="linear", **kw)
    with pytest.raises(ConfigError, match="mi.Heads that mi.init_heads returns"):
        mi.mi_loss(heads.params, **kw)
    with pytest.raises(ConfigError, match="unknown MI option 'temprature'"):
        mi.mi_loss(heads, temprature=0.1, **kw)


def test_init_heads_takes_block_shapes_and_checks_them_against_reduce():
    real, syn, yr, ys = _features()
    shapes = models.block_shapes(MODEL, (8, 8, 1))
    flat = mi.init_heads(jax.random.key(3), shapes, reduce="flatten", embed_dim=4)
    batched = mi.init_heads(jax.random.key(3), [(1, *s) for s in shapes], config=flat.config)
    jax.tree.map(np.testing.assert_array_equal, flat.params, batched.params)
    h, w, c = shapes[0]
    assert flat[0]["proj"]["params"]["out"]["kernel"].shape == (h * w * c, 4)
    kw = dict(real_labels=yr, syn_labels=ys)
    mi.mi_loss(flat, real=real, syn=syn, **kw)
    with pytest.raises(ConfigError, match="MI layer 0: real features of shape"):
        mi.mi_loss(flat, real=real[::-1], syn=syn[::-1], **kw)  # layers swapped
    with pytest.raises(ConfigError, match="bad MI feature shape"):
        mi.init_heads(jax.random.key(3), [(2, 4, 4, 8, 1)])


def test_jit_needs_no_partial():
    real, syn, yr, ys = _features()
    heads = mi.init_heads(jax.random.key(4), models.block_shapes(MODEL, (8, 8, 1)), mask="hard")
    kw = dict(real=real, syn=syn, real_labels=yr, syn_labels=ys)
    eager = mi.mi_loss(heads, **kw)[0]
    np.testing.assert_allclose(jax.jit(mi.mi_loss)(heads, **kw)[0], eager, rtol=1e-6)
    z_real, z_syn = real[0].reshape(9, -1), syn[0].reshape(6, -1)
    cfg = mi.MIConfig(estimator="js", temperature=0.5)
    emb = dict(real=z_real, syn=z_syn, real_labels=yr, syn_labels=ys)
    np.testing.assert_allclose(
        jax.jit(mi.embedding_mi)(config=cfg, **emb), mi.embedding_mi(config=cfg, **emb), rtol=1e-6
    )
    scores = mi.critic_scores(real=z_real, syn=z_syn)
    pos = mi.positive_mask(real_labels=yr, syn_labels=ys)
    for bound in (mi.infonce, mi.nce, mi.nwj, mi.js):
        np.testing.assert_allclose(jax.jit(bound)(scores, pos), bound(scores, pos), rtol=1e-6)


def test_train_is_any_optax_optimiser_and_vmaps_over_keys():
    x = jax.random.normal(jax.random.key(5), (12, 8, 8, 1))
    y = jnp.arange(12) % 3
    v0 = inner.init_variables(MODEL, jax.random.key(6), (8, 8, 1))
    # One SGD step by hand: the batch is permutation(fold_in(fold_in(key, 0), 0))[:batch].
    key = jax.random.key(7)
    got = inner.train(v0, x, y, model=MODEL, tx=optax.sgd(0.1), steps=1, batch_size=5, key=key)
    idx = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 0), 0), 12)[:5]

    def loss(p):
        logits = MODEL.apply({"params": p}, x[idx], train=True)
        return jnp.mean(inner.cross_entropy(logits, y[idx]))

    want = jax.tree.map(lambda p, g: p - 0.1 * g, v0["params"], jax.grad(loss)(v0["params"]))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got["params"], want
    )
    # SGD here: Adam's first steps are ~lr * sign(g), so a conv bias whose gradient is float
    # noise (instance norm cancels it) would differ between two equally valid programs.
    tx = optax.sgd(0.05, momentum=0.9)
    run = lambda k: inner.train(k, x, y, model=MODEL, tx=tx, steps=3, batch_size=4, key=k)  # noqa
    keys = jax.random.split(jax.random.key(8), 2)
    many = jax.jit(jax.vmap(run))(keys)
    one = run(keys[1])  # from a key: a fresh init_variables
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-4, atol=1e-6), many, one)
    same = inner.train(v0, x, y, model=MODEL, tx=tx, steps=0, batch_size=4, key=key)
    jax.tree.map(np.testing.assert_array_equal, same, v0)
    with pytest.raises(ConfigError, match="bad train steps"):
        inner.train(v0, x, y, model=MODEL, tx=tx, steps=-1, batch_size=4, key=key)


def test_init_images_without_a_config_is_init_state_s():
    ds = fake_dataset(3, 12, 8)
    key = jax.random.key(9)
    config = tiny_config("dm,ipc4")
    st = state.init_state(key, ds, config)
    syn = state.init_images(jax.random.fold_in(key, 0), ds, 4)
    np.testing.assert_array_equal(syn["images"], st["images"])
    np.testing.assert_array_equal(syn["labels"], np.repeat(np.arange(3), 4))
    noise = state.init_images(key, ds, 2, init="noise")
    assert noise["images"].shape == (6, 8, 8, 1) and abs(float(noise["images"].mean())) < 0.5
    with pytest.raises(ConfigError, match="ipc=13 distinct images per class"):
        state.init_images(key, ds, 13)
    with pytest.raises(ConfigError, match="init"):
        state.init_images(key, ds, 2, init="zeros")
