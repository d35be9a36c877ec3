"""Models: reference shapes and parameter counts, layer semantics, init distribution."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from mim4dd_jax import models
from mim4dd_jax.conv import conv2d
from mim4dd_jax.errors import ConfigError

HI = lax.Precision.HIGHEST
EPS = 1e-5


def _rbg(seed):
    # RngBitGenerator keys compile much faster on CPU than threefry for the big networks.
    return jax.random.key(seed, impl="rbg")


def _abstract_params(model, image_shape):
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# Counts of the torch reference networks (DatasetCondensation networks.py), worked by hand:
# ConvNet-3 on RGB: conv 3*9*128+128, 2x (128*9*128+128), 3 instance norms 2*128, Dense 2048*10+10.
# On 1-channel input the first conv has 1*9*128+128, i.e. 2304 fewer: 317,706 (not 316,938).
# VGG11 (9,231,114) and ResNet18 (11,173,962) on CIFAR-10 are the well-known counts of these
# architectures; GroupNorm's affine has as many parameters as BatchNorm's.
PARAM_COUNTS = [
    ("convnet", (32, 32, 3), 320_010),
    ("convnet", (28, 28, 1), 317_706),
    ("alexnet", (32, 32, 3), 1_872_202),
    ("alexnet", (28, 28, 1), 1_865_802),
    ("vgg11", (32, 32, 3), 9_231_114),
    ("vgg11", (28, 28, 1), 9_229_962),
    ("resnet18", (32, 32, 3), 11_173_962),
    ("resnet18", (28, 28, 1), 11_172_810),
]


@pytest.mark.parametrize("name,shape,expected", PARAM_COUNTS)
def test_parameter_counts_match_reference(name, shape, expected):
    model = models.get_model(name, num_classes=10)
    assert _count(_abstract_params(model, shape)) == expected


SHAPES = {
    ("convnet", (28, 28, 1)): (((16, 16, 128), (8, 8, 128), (4, 4, 128)), 2048),
    ("convnet", (32, 32, 3)): (((16, 16, 128), (8, 8, 128), (4, 4, 128)), 2048),
    ("alexnet", (28, 28, 1)): (((16, 16, 128), (8, 8, 192), (4, 4, 192)), 3072),
    ("alexnet", (32, 32, 3)): (((16, 16, 128), (8, 8, 192), (4, 4, 192)), 3072),
    ("vgg11", (28, 28, 1)): (
        ((16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512), (1, 1, 512)),
        512,
    ),
    ("vgg11", (32, 32, 3)): (
        ((16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512), (1, 1, 512)),
        512,
    ),
    ("resnet18", (28, 28, 1)): (((28, 28, 64), (14, 14, 128), (7, 7, 256), (4, 4, 512)), 512),
    ("resnet18", (32, 32, 3)): (((32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)), 512),
}


@pytest.mark.parametrize("name,shape", SHAPES.keys())
def test_block_shapes_and_embedding_dim(name, shape):
    blocks, dim = SHAPES[(name, shape)]
    model = models.get_model(name, num_classes=10)
    assert models.block_shapes(model, shape) == blocks
    assert models.embedding_dim(model, shape) == dim


def test_convnet_depth_and_width_change_shapes():
    model = models.get_model("convnet", num_classes=10, width=32, depth=4)
    expected = ((32, 32, 32), (16, 16, 32), (8, 8, 32), (4, 4, 32))
    assert models.block_shapes(model, (64, 64, 3)) == expected
    assert models.embedding_dim(model, (64, 64, 3)) == 4 * 4 * 32
    no_pool = models.get_model("convnet", num_classes=10, width=8, pool="none")
    assert models.embedding_dim(no_pool, (28, 28, 1)) == 32 * 32 * 8


# --- layer semantics: the ConvNet against a plain-jnp rewrite of the reference, every combo ---


def _ref_norm(kind, h, p):
    n, hh, ww, c = h.shape
    if kind == "none":
        return h
    if kind == "batch":  # eval mode with fresh running statistics (mean 0, var 1)
        return h / jnp.sqrt(1.0 + EPS) * p["scale"] + p["bias"]
    if kind == "instance":
        g = h.reshape(n, hh, ww, c, 1)
    elif kind == "group":
        g = h.reshape(n, hh, ww, 4, c // 4)
    else:  # layer
        g = h.reshape(n, hh, ww, 1, c)
    axes = (1, 2, 4)
    g = (g - g.mean(axes, keepdims=True)) / jnp.sqrt(g.var(axes, keepdims=True) + EPS)
    return g.reshape(h.shape) * p["scale"] + p["bias"]


_REF_ACT = {
    "relu": lambda h: jnp.maximum(h, 0.0),
    "leaky_relu": lambda h: jnp.where(h > 0, h, 0.01 * h),
    "sigmoid": lambda h: 1.0 / (1.0 + jnp.exp(-h)),
    "swish": lambda h: h / (1.0 + jnp.exp(-h)),
}


def _ref_pool(kind, h):
    n, hh, ww, c = h.shape
    if kind == "none":
        return h
    w = h.reshape(n, hh // 2, 2, ww // 2, 2, c)
    return w.mean((2, 4)) if kind == "avg" else w.max((2, 4))


def _ref_convnet(params, x, depth, norm, act, pool):
    h = x
    for d in range(depth):
        p = params[f"conv{d}"]
        pad = 3 if x.shape[-1] == 1 and d == 0 else 1
        dims = ("NHWC", "HWIO", "NHWC")
        h = lax.conv_general_dilated(h, p["kernel"], (1, 1), [(pad, pad)] * 2, None, None, dims)
        h = h + p["bias"]
        h = _ref_pool(pool, _REF_ACT[act](_ref_norm(norm, h, params.get(f"norm{d}"))))
    emb = h.reshape(h.shape[0], -1)
    return jnp.dot(emb, params["classifier"]["kernel"], precision=HI) + params["classifier"]["bias"]


def _perturb(params, key):
    # Moves norm scales/biases off 1/0 so the affine part (and its shape) is exercised.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize(
    "norm,act,pool", list(itertools.product(models.NORMS, models.ACTS, models.POOLS))
)
def test_convnet_every_norm_act_pool_matches_reference_math(norm, act, pool):
    # Eager on purpose: 60 tiny models share one cache of compiled ops, where jit would compile
    # each model from scratch.
    depth = 2
    model = models.ConvNet(num_classes=3, width=8, depth=depth, norm=norm, act=act, pool=pool)
    # Small inputs make the first norm's variance ~1e-3, so a wrong eps would show.
    x = 0.02 * jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    variables = {**model.init(_rbg(0), x)}
    variables["params"] = params = _perturb(variables["params"], _rbg(1))
    out = model.apply(variables, x, features=True)

    sides = (4, 2) if pool != "none" else (8, 8)
    assert out.logits.shape == (2, 3)
    assert out.embedding.shape == (2, sides[1] * sides[1] * 8)
    assert [b.shape for b in out.blocks] == [(2, s, s, 8) for s in sides]
    expected = _ref_convnet(params, x, depth, norm, act, pool)
    np.testing.assert_allclose(out.logits, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(model.apply(variables, x), out.logits)


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        ({"name": "resnet50"}, "resnet50"),
        ({"name": "convnet", "norm": "instancenorm"}, "instancenorm"),
        ({"name": "alexnet", "norm": "weight"}, "weight"),
        ({"name": "convnet", "act": "gelu"}, "gelu"),
        ({"name": "convnet", "pool": "min"}, "min"),
        ({"name": "vgg11", "conv_impl": "cudnn"}, "cudnn"),
    ],
)
def test_unknown_names_raise_config_error(kwargs, bad):
    with pytest.raises(ConfigError, match=f"'{bad}'.*valid choices"):
        models.get_model(num_classes=10, **kwargs)


def test_module_built_directly_with_bad_value_raises_config_error():
    model = models.ConvNet(num_classes=10, width=8, act="tanh")
    with pytest.raises(ConfigError, match="'tanh'.*'relu'"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_get_model_is_case_insensitive_and_uses_reference_norms():
    assert isinstance(models.get_model("ResNet18", num_classes=10), models.ResNet18)
    assert models.get_model("AlexNet", num_classes=10).norm == "none"
    assert models.get_model("vgg11", num_classes=10).norm == "instance"
    assert models.get_model("alexnet", num_classes=10, norm="batch").norm == "batch"
    convnet = models.get_model("convnet", num_classes=7, width=16, depth=2, act="swish")
    assert (convnet.num_classes, convnet.width, convnet.depth, convnet.act) == (7, 16, 2, "swish")


def test_im2col_and_xla_give_same_convnet_outputs():
    x = jax.random.normal(jax.random.key(3), (2, 28, 28, 1))
    outs = {}
    for impl in ("im2col", "xla"):
        model = models.ConvNet(num_classes=10, width=8, conv_impl=impl)
        variables = model.init(_rbg(0), x)  # same key: same params
        outs[impl] = model.apply(variables, x, features=True)
    assert outs["im2col"].embedding.shape == (2, 4 * 4 * 8)
    for a, b in zip(jax.tree.leaves(outs["im2col"]), jax.tree.leaves(outs["xla"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _fake_variables(model, x, key):
    """Variables shaped as model.init would make them, without compiling a per-layer init.

    Kernels ~ U(+-1/sqrt(fan_in)), biases small, norm scales near 1: realistic magnitudes.
    """
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    paths, tree = jax.tree_util.tree_flatten_with_path(shapes)
    total = sum(int(np.prod(s.shape)) for _, s in paths)
    flat = np.asarray(jax.random.uniform(key, (total,), minval=-1.0, maxval=1.0))
    leaves, offset = [], 0
    for path, s in paths:
        size = int(np.prod(s.shape))
        u = flat[offset : offset + size].reshape(s.shape)
        offset += size
        name = path[-1].key
        if name == "kernel":
            u = u / np.sqrt(np.prod(s.shape[:-1]))
        elif name in ("scale", "var"):
            u = 1.0 + 0.1 * u
        else:
            u = 0.1 * u
        leaves.append(jnp.asarray(u, jnp.float32))
    return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "resnet18"])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_cross_architecture_models_forward_with_features(name, shape):
    # XLA's conv compiles faster here; the im2col path is checked against it in test_conv.py.
    model = models.get_model(name, num_classes=10, conv_impl="xla")
    x = jax.random.normal(jax.random.key(4), (2, *shape))
    variables = _fake_variables(model, x, _rbg(0))
    out = jax.jit(lambda v, x: model.apply(v, x, features=True))(variables, x)
    blocks, dim = SHAPES[(name, shape)]
    assert out.logits.shape == (2, 10)
    assert out.embedding.shape == (2, dim)
    assert tuple(b.shape[1:] for b in out.blocks) == blocks
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))
    assert float(jnp.std(out.logits)) > 1e-3  # not collapsed to a constant
    last = out.blocks[-1]
    if name == "resnet18":  # 4x4 average pooling of the last stage
        last = last.mean(axis=(1, 2))
    np.testing.assert_allclose(out.embedding, last.reshape(2, -1), rtol=1e-5, atol=1e-5)
    dense = variables["params"]["classifier"]
    logits = jnp.dot(out.embedding, dense["kernel"], precision=HI) + dense["bias"]
    np.testing.assert_allclose(out.logits, logits, rtol=1e-4, atol=1e-4)


def test_batch_norm_convnet_trains_one_step():
    model = models.ConvNet(num_classes=4, width=8, depth=2, norm="batch")
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3)) * 2.0 + 1.0
    y = jnp.arange(2)
    variables = model.init(_rbg(0), x)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    def step(params, stats, opt_state):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    new_params, new_stats, _, loss = step(params, stats, opt_state)
    assert np.isfinite(float(loss))
    assert not np.allclose(new_params["conv0"]["kernel"], params["conv0"]["kernel"])
    # torch momentum 0.1 from a zero start: running mean = 0.1 * batch mean of conv0's output.
    conv0 = conv2d(x, params["conv0"]["kernel"], padding=1) + params["conv0"]["bias"]
    np.testing.assert_allclose(
        new_stats["norm0"]["mean"], 0.1 * conv0.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    # Eval mode uses the running statistics, so it differs from train mode's batch statistics.
    new_vars = {"params": new_params, "batch_stats": new_stats}
    train_logits, _ = model.apply(new_vars, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(model.apply(new_vars, x, train=False), train_logits, atol=1e-3)


def test_init_matches_torch_default_uniform():
    model = models.ConvNet(num_classes=10)  # width 128, as DM samples it
    # The default (threefry) key, as users pass; lazy_init skips the forward pass.
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.jit(lambda k: model.lazy_init(k, x))(jax.random.key(0))["params"]
    checks = [
        (params["conv1"]["kernel"], 128 * 3 * 3),
        (params["conv1"]["bias"], 128 * 3 * 3),
        (params["conv0"]["kernel"], 3 * 3 * 3),
        (params["classifier"]["kernel"], 2048),
    ]
    for w, fan_in in checks:
        w = np.asarray(w).ravel()
        bound = 1.0 / np.sqrt(fan_in)
        assert np.max(np.abs(w)) <= bound
        assert np.max(np.abs(w)) > 0.9 * bound  # fills the interval, not a narrower one
        if w.size >= 3000:
            # U(-b, b) has std b/sqrt(3) = 1/sqrt(3*fan_in); relative error ~ 1/sqrt(2*size).
            np.testing.assert_allclose(np.std(w), 1.0 / np.sqrt(3 * fan_in), rtol=0.03)
            assert abs(np.mean(w)) < 0.05 * bound
    # The norms start at identity affine, as torch's do.
    np.testing.assert_array_equal(params["norm0"]["scale"], np.ones(128))
    np.testing.assert_array_equal(params["norm0"]["bias"], np.zeros(128))
