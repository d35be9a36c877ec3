"""Tests for mim4dd_jax.augment (DSA)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim4dd_jax import augment as aug
from mim4dd_jax.errors import ConfigError

PARAMS = aug.DSAParams()
KEYS = [jax.random.key(s) for s in (0, 1, 2, 3)]
# One shared key batch for the statistical tests (each new split count is another compile).
MANY_KEYS = jax.random.split(jax.random.key(42), 256)


def _images(n: int, h: int = 8, w: int = 8, c: int = 3, seed: int = 0) -> jax.Array:
    """Deterministic, asymmetric pixels in [0, 1): fractional parts of multiples of 1/phi.

    Cheaper than jax.random here: every new fixture shape would compile another threefry.
    """
    i = np.arange(n * h * w * c, dtype=np.float64).reshape(n, h, w, c) + 1000 * seed
    return jnp.asarray(np.mod(i * 0.6180339887 + 0.1, 1.0), jnp.float32)


@functools.cache
def _jitted(op: str):
    # One compile per op and shape: much cheaper on CPU than eager op-by-op dispatch.
    return jax.jit(aug.OP_FNS[op], static_argnums=(2, 3))


def _apply(op: str, key: jax.Array, x: jax.Array, siamese: bool = True, params=PARAMS):
    return _jitted(op)(key, x, params, siamese)


# Shared jitted entry points, so tests using the same shapes share compiles.
AUGMENT = jax.jit(aug.augment, static_argnames=("strategy", "params", "mode", "siamese"))
AFFINE = jax.jit(aug.affine_grid_sample, static_argnames=("align_corners",))


# --- siamese / per-sample -------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", aug.OPS)
def test_siamese_same_transform_across_batch_sizes(op, channels):
    xa = _images(2, c=channels)
    xb = jnp.concatenate([xa, _images(3, c=channels, seed=1)])
    for key in KEYS:
        ya = _apply(op, key, xa)
        yb = _apply(op, key, xb)
        np.testing.assert_allclose(yb[:2], ya, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", aug.MODES)
def test_siamese_full_strategy_across_batch_sizes(mode):
    xa = _images(2)
    xb = jnp.concatenate([xa, _images(3, seed=1)])
    for seed in range(6):
        key = jax.random.key(seed)
        ya = AUGMENT(key, xa, mode=mode)
        np.testing.assert_allclose(AUGMENT(key, xb, mode=mode)[:2], ya, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", aug.OPS)
def test_per_sample_vs_siamese_on_identical_samples(op):
    x = jnp.tile(_images(1, c=3), (16, 1, 1, 1))
    key = jax.random.key(7)
    per_sample = _apply(op, key, x, siamese=False)
    rows_equal = [bool(jnp.allclose(per_sample[i], per_sample[0])) for i in range(16)]
    assert not all(rows_equal), f"{op}: per-sample mode gave one transform for all samples"
    shared = _apply(op, key, x, siamese=True)
    np.testing.assert_allclose(shared, jnp.broadcast_to(shared[:1], shared.shape), atol=1e-6)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", aug.OPS)
def test_gradient_wrt_pixels_finite_and_nonzero(op):
    x = _images(2, c=3)
    weights = _images(2, c=3, seed=5) - 0.5
    loss = lambda v: jnp.sum(weights * aug.OP_FNS[op](KEYS[1], v, PARAMS, True))
    grad = jax.jit(jax.grad(loss))(x)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.max(jnp.abs(grad))) > 1e-3


def test_gradient_through_lax_switch():
    x = _images(2)
    loss = lambda v, k: jnp.sum(aug.augment(k, v, strategy="crop_scale") ** 2)
    grad_fn = jax.jit(jax.grad(loss))
    for key in KEYS[:2]:
        grad = grad_fn(x, key)
        assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 1e-3


# --- identity strategies and affine helper --------------------------------------------------


@pytest.mark.parametrize("strategy", ["", "none", "None"])
def test_identity_strategies(strategy):
    x = _images(2)
    assert aug.parse_strategy(strategy) == ()
    np.testing.assert_array_equal(aug.augment(KEYS[0], x, strategy=strategy), x)
    np.testing.assert_array_equal(aug.augment(KEYS[0], x, strategy=strategy, mode="all"), x)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 6, 10, 3)])
def test_affine_identity_rotation_zero_scale_one(shape, align_corners):
    x = _images(*shape)
    n = shape[0]
    sample = functools.partial(AFFINE, align_corners=align_corners)
    np.testing.assert_allclose(sample(x, aug.rotation_theta(jnp.zeros(n))), x, atol=1e-5)
    np.testing.assert_allclose(sample(x, aug.scale_theta(jnp.ones(n), jnp.ones(n))), x, atol=1e-5)


def test_affine_rotation_90_is_counterclockwise_pixel_permutation():
    x = _images(2, h=7, w=7)
    out = AFFINE(x, aug.rotation_theta(jnp.full((2,), math.pi / 2)))
    # torch convention: input coords = theta @ output coords, so out[i, j] = x[j, W-1-i].
    np.testing.assert_allclose(out, jnp.rot90(x, k=1, axes=(1, 2)), atol=1e-5)


def test_affine_scale_zero_padding_and_bilinear():
    x = jnp.arange(5.0)[None, None, :, None] * jnp.ones((1, 3, 1, 1))  # value = column index
    zoom_out = AFFINE(x, aug.scale_theta(jnp.array([2.0]), jnp.array([1.0])))
    # align_corners=True on W=5: columns 1..3 read input columns 0, 2, 4; the border is padding.
    np.testing.assert_allclose(zoom_out[0, :, :, 0], jnp.tile(jnp.array([0, 0, 2, 4, 0.0]), (3, 1)))
    zoom_in = AFFINE(x, aug.scale_theta(jnp.array([0.5]), jnp.array([1.0])))
    np.testing.assert_allclose(zoom_in[0, 0, :, 0], [1.0, 1.5, 2.0, 2.5, 3.0], atol=1e-5)


def test_rand_scale_and_rotate_ranges_match_reference():
    # With ratio 1 the scale factor range collapses to {1}; rotation 0 degrees is the identity.
    x = _images(3, c=1)
    params = aug.DSAParams(ratio_scale=1.0, ratio_rotate=0.0)
    for op in ("scale", "rotate"):
        np.testing.assert_allclose(_apply(op, KEYS[0], x, False, params), x, atol=1e-5)


# --- flip, crop, cutout ---------------------------------------------------------------------


def test_flip_is_exact_mirror():
    x = _images(4, c=3)
    flipped = aug.hflip(x, jnp.array([True, False, True, False]))
    np.testing.assert_array_equal(flipped[0], x[0, :, ::-1, :])
    np.testing.assert_array_equal(flipped[1], x[1])
    always = _apply("flip", KEYS[2], x, False, aug.DSAParams(prob_flip=1.0))
    np.testing.assert_array_equal(always, x[:, :, ::-1, :])
    never = _apply("flip", KEYS[2], x, False, aug.DSAParams(prob_flip=0.0))
    np.testing.assert_array_equal(never, x)


def test_flip_draws_both_outcomes():
    x = _images(1)
    outs = np.asarray(jax.vmap(lambda k: _apply("flip", k, x))(MANY_KEYS[:32]))
    x = np.asarray(x)
    n_flipped = int(np.sum(np.all(outs == x[:, :, ::-1], axis=(1, 2, 3, 4))))
    n_kept = int(np.sum(np.all(outs == x, axis=(1, 2, 3, 4))))
    assert n_flipped + n_kept == 32 and n_flipped > 4 and n_kept > 4


def test_translate_zero_fill():
    x = _images(1, h=6, w=6) + 1.0  # strictly positive, so zeros can only come from filling
    out = aug.translate(x, jnp.array([1]), jnp.array([-2]))
    assert out.shape == x.shape
    np.testing.assert_array_equal(out[0, :5, 2:], x[0, 1:, :4])
    np.testing.assert_array_equal(out[0, 5, :], 0.0)
    np.testing.assert_array_equal(out[0, :, :2], 0.0)


@pytest.mark.parametrize("size", [8, 12])
def test_rand_crop_is_bounded_translation(size):
    x = _images(1, h=size, w=size) + 1.0
    bound = int(size * PARAMS.ratio_crop_pad + 0.5)
    shifts = [(dy, dx) for dy in range(-bound, bound + 1) for dx in range(-bound, bound + 1)]
    dy, dx = np.array(shifts).T
    candidates = np.asarray(jax.vmap(lambda a, b: aug.translate(x, a[None], b[None]))(dy, dx))
    outs = np.asarray(jax.vmap(lambda k: _apply("crop", k, x))(MANY_KEYS[:64]))
    assert outs.shape == (64, *x.shape)
    # equal[k, s]: output k is exactly the translation by shifts[s]
    equal = np.all(outs[:, None] == candidates[None], axis=(2, 3, 4, 5))
    assert np.all(equal.any(axis=1)), "crop output is not a translation within the bound"
    seen = {shifts[s] for s in equal.argmax(axis=1)}
    assert len(seen) > 3 and any(s != (0, 0) for s in seen)


def test_cut_out_exact_area():
    x = jnp.ones((1, 8, 8, 2))
    inner = aug.cut_out(x, jnp.array([4]), jnp.array([4]), (4, 4))
    assert float(jnp.mean(inner == 0)) == pytest.approx(0.25)
    np.testing.assert_array_equal(inner[0, 2:6, 2:6], 0.0)
    corner = aug.cut_out(x, jnp.array([0]), jnp.array([8]), (4, 4))  # clipped to 2 x 2
    np.testing.assert_array_equal(corner[0, :2, 6:], 0.0)
    assert int(jnp.sum(corner[0, :, :, 0] == 0)) == 4


@pytest.mark.parametrize("size", [8, 10, 12])
def test_rand_cutout_area_fraction(size):
    x = jnp.ones((1, size, size, 1))
    side = int(size * PARAMS.ratio_cutout + 0.5)
    outs = np.asarray(jax.vmap(lambda k: _apply("cutout", k, x))(MANY_KEYS[:64]))[:, 0, :, :, 0]
    zeros = np.sum(outs == 0, axis=(1, 2))
    # A hole of side s, centred anywhere on the image, keeps at least ceil(s/2) rows and columns.
    min_side = side - side // 2
    assert zeros.max() == side * side  # full hole: ratio_cutout**2 of the area
    assert zeros.min() >= min_side * min_side
    rows = np.any(outs == 0, axis=2).sum(axis=1)
    cols = np.any(outs == 0, axis=1).sum(axis=1)
    np.testing.assert_array_equal(zeros, rows * cols)  # the hole is one axis-aligned rectangle
    # The centre range is symmetric (an even hole may be centred one past the last pixel), so the
    # smallest clipped hole is as small at the bottom border as at the top.
    hole_rows = np.any(outs == 0, axis=2)  # [K, H]
    at_top = rows[hole_rows[:, 0]]
    at_bottom = rows[hole_rows[:, -1]]
    assert at_top.min() == at_bottom.min() == min_side
    mean_fraction = zeros.mean() / size**2
    assert 0.4 * PARAMS.ratio_cutout**2 < mean_fraction <= PARAMS.ratio_cutout**2


# --- colour ---------------------------------------------------------------------------------


def test_colour_formulas_on_known_input():
    pixel = jnp.array([0.0, 0.3, 0.9])
    x = jnp.stack([pixel, pixel * 0.5])[None, None, :, :]  # [1, 1, 2, 3]
    np.testing.assert_allclose(aug.adjust_brightness(x, jnp.array([0.25])), x + 0.25)
    sat = aug.adjust_saturation(x, jnp.array([2.0]))
    np.testing.assert_allclose(sat[0, 0, 0], [-0.4, 0.2, 1.4], atol=1e-6)  # mean 0.4 per pixel
    np.testing.assert_allclose(sat[0, 0, 1], [-0.2, 0.1, 0.7], atol=1e-6)  # mean 0.2
    con = aug.adjust_contrast(x, jnp.array([0.5]))  # image mean 0.3
    np.testing.assert_allclose(con[0, 0, 0], [0.15, 0.3, 0.6], atol=1e-6)
    np.testing.assert_allclose(con[0, 0, 1], [0.15, 0.225, 0.375], atol=1e-6)


def test_rand_colour_brightness_range_on_constant_grey_image():
    # On a 1-channel constant image saturation and contrast are no-ops, leaving the brightness
    # shift (U[0, 1) - 0.5) * brightness.
    x = jnp.full((1, 4, 4, 1), 0.2)
    outs = jax.vmap(lambda k: _apply("color", k, x))(MANY_KEYS)
    shift = outs[:, 0, 0, 0, 0] - 0.2
    np.testing.assert_allclose(outs, jnp.broadcast_to(outs[:, :, :1, :1], outs.shape), atol=1e-6)
    assert float(jnp.min(shift)) >= -0.5 and float(jnp.max(shift)) < 0.5
    assert float(jnp.min(shift)) < -0.4 and float(jnp.max(shift)) > 0.4


def test_rand_colour_composes_three_adjustments():
    # Pixels (a, -a, 0): channel mean and image mean are both 0, so after the three adjustments a
    # pixel is (k*s*a + b, -k*s*a + b, b) with s in [0, saturation), k in [contrast, contrast+1).
    a = jnp.linspace(0.1, 1.0, 4)
    x = jnp.stack([a, -a, jnp.zeros(4)], axis=-1)[None, None]  # [1, 1, 4, 3]
    outs = jax.vmap(lambda k: _apply("color", k, x))(MANY_KEYS)[:, 0, 0]  # [K, 4, 3]
    b = outs[:, :, 2]
    gain = (outs[:, :, 0] - b) / a
    np.testing.assert_allclose(gain, jnp.broadcast_to(gain[:, :1], gain.shape), atol=1e-4)
    upper = PARAMS.saturation * (PARAMS.contrast + 1.0)
    assert float(jnp.min(gain)) >= 0.0 and float(jnp.max(gain)) < upper
    assert float(jnp.max(gain)) > 0.5 * upper


# --- strategy / mode ------------------------------------------------------------------------


def test_mode_one_draws_every_op_uniformly():
    idx = np.asarray(jax.vmap(lambda k: aug.chosen_op(k, aug.DEFAULT_STRATEGY))(MANY_KEYS))
    counts = np.bincount(idx, minlength=len(aug.OPS))
    assert counts.shape == (6,) and counts.min() > 20, counts  # expected 42.7 each


def test_mode_one_applies_the_chosen_op():
    x = _images(2)
    seen = set()
    for s in range(16):
        key = jax.random.key(s)
        op = aug.OPS[int(aug.chosen_op(key, aug.DEFAULT_STRATEGY))]
        seen.add(op)
        full = AUGMENT(key, x, mode="one")
        np.testing.assert_allclose(full, AUGMENT(key, x, strategy=op, mode="one"), atol=1e-6)
    assert len(seen) >= 4


def test_mode_all_applies_every_op_in_order():
    x = _images(2)
    _, op_key = jax.random.split(KEYS[0])
    keys = jax.random.split(op_key, 2)
    expected = _apply("cutout", keys[1], _apply("crop", keys[0], x))
    out = aug.augment(KEYS[0], x, strategy="crop_cutout", mode="all")
    np.testing.assert_array_equal(out, expected)


def test_unknown_op_and_mode_raise_config_error():
    x = _images(1)
    with pytest.raises(ConfigError, match=r"'blur'.*'color'.*'rotate'"):
        aug.augment(KEYS[0], x, strategy="color_blur")
    with pytest.raises(ConfigError, match=r"'sometimes'.*'one'.*'all'"):
        aug.augment(KEYS[0], x, mode="sometimes")
    with pytest.raises(ConfigError, match="prob_flip"):
        aug.DSAParams(prob_flip=1.5)


def test_strategy_for_dataset():
    full = aug.DEFAULT_STRATEGY
    no_flip = "color_crop_cutout_scale_rotate"
    for name in ("mnist", "MNIST", "svhn", "SVHN", "svhn_cropped", "usps"):
        assert aug.strategy_for_dataset(full, name) == no_flip
    for name in ("fashion_mnist", "FashionMNIST", "cifar10"):
        assert aug.strategy_for_dataset(full, name) == full
    assert aug.strategy_for_dataset("flip", "mnist") == "none"
    assert aug.strategy_for_dataset("none", "mnist") == "none"


def test_params_hashable_static_arg():
    assert hash(aug.DSAParams()) == hash(aug.DSAParams())
    x = _images(2)
    out = AUGMENT(KEYS[0], x, strategy="flip", params=aug.DSAParams(prob_flip=1.0))
    np.testing.assert_array_equal(out, x[:, :, ::-1])


@pytest.mark.parametrize("siamese", [True, False])
def test_jit_and_vmap_over_keys(siamese):
    # A smaller strategy keeps compile time down; it still covers lax.switch over a batched
    # index with a colour, a gather and an affine branch.
    strategy = "color_crop_rotate"
    x = _images(2)
    keys = MANY_KEYS[:4]
    batched = jax.jit(jax.vmap(lambda k: aug.augment(k, x, strategy=strategy, siamese=siamese)))(
        keys
    )
    assert batched.shape == (4, *x.shape)
    for i in range(4):
        single = AUGMENT(keys[i], x, strategy=strategy, siamese=siamese)
        np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-5)
    assert not bool(jnp.allclose(batched[0], batched[1]))
