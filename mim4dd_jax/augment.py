"""Differentiable Siamese Augmentation (DSA) on NHWC batches, in pure ``jax.numpy``.

DSA (Zhao & Bilen, 2021) augments the real and the synthetic batch with the *same* random
transform, and every transform is differentiable w.r.t. the pixels, so a matching loss can be
back-propagated through the augmentation into the synthetic images.

Each op group is a pure function ``rand_<op>(key, x, params, siamese) -> x'`` on ``x: [N, H, W, C]``
float. With ``siamese=True`` one set of random parameters is drawn for the whole batch (its shape
does not depend on ``N``), so the same key gives the identical transform on batches of different
sizes. With ``siamese=False`` every sample gets its own parameters.

The deterministic kernels (``adjust_*``, ``translate``, ``cut_out``, ``hflip``,
``affine_grid_sample``) take the sampled parameters explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
from jax import lax

from mim4dd_jax.errors import ConfigError, check_choice

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES = ("one", "all")
# Digit datasets: a mirrored digit is not the same digit, so DSA skips "flip" there.
DIGIT_DATASETS = frozenset({"mnist", "svhn", "svhn_cropped", "usps"})


@dataclasses.dataclass(frozen=True)
class DSAParams:
    """Magnitudes of the DSA ops (the reference defaults). Frozen, so usable as a jit static arg.

    prob_flip: probability of a horizontal flip.
    ratio_scale: per-axis scale factor drawn from U[1/ratio, ratio].
    ratio_rotate: rotation angle drawn from U[-ratio, ratio] degrees.
    ratio_crop_pad: max translation as a fraction of the side (rounded to whole pixels).
    ratio_cutout: side of the zeroed square as a fraction of the image side.
    brightness: additive shift drawn from (U[0, 1) - 0.5) * brightness.
    saturation: factor on the deviation from the per-pixel channel mean, U[0, 1) * saturation.
    contrast: factor on the deviation from the per-image mean, U[0, 1) + contrast.
    """

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self) -> None:
        ranges = {
            "prob_flip": (0.0, 1.0),
            "ratio_crop_pad": (0.0, 1.0),
            "ratio_cutout": (0.0, 1.0),
            "ratio_rotate": (0.0, math.inf),
            "brightness": (0.0, math.inf),
            "saturation": (0.0, math.inf),
            "contrast": (0.0, math.inf),
        }
        for name, (lo, hi) in ranges.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ConfigError(
                    f"DSAParams.{name}={value!r} is out of range; valid: [{lo}, {hi}]"
                )
        if not self.ratio_scale >= 1.0:
            raise ConfigError(
                f"DSAParams.ratio_scale={self.ratio_scale!r} is out of range; valid: >= 1.0"
            )


# ----------------------------------------------------------------------------------------------
# Deterministic kernels. Per-sample parameters are [N] arrays.
# ----------------------------------------------------------------------------------------------


def _per_sample(v: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[N] -> [N, 1, 1, 1] in the image dtype, so low-precision images are not upcast."""
    return jnp.asarray(v, dtype)[:, None, None, None]


def adjust_brightness(x: jax.Array, delta: jax.Array) -> jax.Array:
    """x + delta. x: [N, H, W, C]; delta: [N]."""
    return x + _per_sample(delta, x.dtype)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Scales each pixel's deviation from its channel mean. x: [N, H, W, C]; factor: [N]."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) * _per_sample(factor, x.dtype) + mean


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Scales the deviation from each image's mean over H, W, C. x: [N, H, W, C]; factor: [N]."""
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) * _per_sample(factor, x.dtype) + mean


def translate(x: jax.Array, dy: jax.Array, dx: jax.Array) -> jax.Array:
    """out[n, i, j] = x[n, i + dy[n], j + dx[n]], zero outside the image.

    x: [N, H, W, C]; dy, dx: [N] int.
    """
    n, h, w, _ = x.shape
    rows = jnp.arange(h)[None, :] + jnp.asarray(dy, jnp.int32)[:, None]  # [N, H]
    cols = jnp.arange(w)[None, :] + jnp.asarray(dx, jnp.int32)[:, None]  # [N, W]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    vals = x[
        jnp.arange(n)[:, None, None],
        jnp.clip(rows, 0, h - 1)[:, :, None],
        jnp.clip(cols, 0, w - 1)[:, None, :],
    ]
    return jnp.where(valid[..., None], vals, jnp.zeros((), x.dtype))


def cut_out(x: jax.Array, cy: jax.Array, cx: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Zeroes rows [cy - sh//2, cy - sh//2 + sh) x cols [cx - sw//2, ...), clipped to the image.

    x: [N, H, W, C]; cy, cx: [N] int centres; size: (sh, sw) static.
    """
    _, h, w, _ = x.shape
    sh, sw = size
    top = jnp.asarray(cy, jnp.int32)[:, None] - sh // 2
    left = jnp.asarray(cx, jnp.int32)[:, None] - sw // 2
    r = jnp.arange(h)[None, :]
    c = jnp.arange(w)[None, :]
    in_rows = (r >= top) & (r < top + sh)  # [N, H]
    in_cols = (c >= left) & (c < left + sw)  # [N, W]
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return x * (~hole).astype(x.dtype)[..., None]


def hflip(x: jax.Array, do_flip: jax.Array) -> jax.Array:
    """Mirrors the samples where do_flip along W. x: [N, H, W, C]; do_flip: [N] bool."""
    return jnp.where(jnp.asarray(do_flip)[:, None, None, None], x[:, :, ::-1, :], x)


def scale_theta(sx: jax.Array, sy: jax.Array) -> jax.Array:
    """Affine matrices [N, 2, 3] (torch affine_grid convention) scaling x by sx and y by sy.

    sx > 1 samples a wider input range, so the content shrinks.
    """
    zero = jnp.zeros_like(sx)
    return jnp.stack([jnp.stack([sx, zero, zero], -1), jnp.stack([zero, sy, zero], -1)], axis=-2)


def rotation_theta(angle: jax.Array) -> jax.Array:
    """Affine matrices [N, 2, 3] (torch affine_grid convention) rotating by angle [N] radians."""
    cos, sin, zero = jnp.cos(angle), jnp.sin(angle), jnp.zeros_like(angle)
    return jnp.stack([jnp.stack([cos, -sin, zero], -1), jnp.stack([sin, cos, zero], -1)], axis=-2)


def _base_coords(size: int, align_corners: bool) -> jax.Array:
    """Normalised [-1, 1] coordinates of the pixel centres along one axis, as torch defines them."""
    if align_corners:
        return jnp.linspace(-1.0, 1.0, size, dtype=jnp.float32)
    return (2.0 * jnp.arange(size, dtype=jnp.float32) + 1.0) / size - 1.0


def _unnormalise(coord: jax.Array, size: int, align_corners: bool) -> jax.Array:
    if align_corners:
        return (coord + 1.0) * 0.5 * (size - 1)
    return ((coord + 1.0) * size - 1.0) * 0.5


def affine_grid_sample(x: jax.Array, theta: jax.Array, *, align_corners: bool = True) -> jax.Array:
    """torch ``grid_sample(x, affine_grid(theta))``: bilinear, zero padding, on NHWC.

    The output pixel at normalised (x_o, y_o) reads the input at theta @ [x_o, y_o, 1]; x is the
    W axis, y the H axis, both in [-1, 1].
    x: [N, H, W, C] float; theta: [N, 2, 3]. Returns [N, H, W, C].
    """
    n, h, w, _ = x.shape
    chex.assert_shape(theta, (n, 2, 3))
    theta = theta.astype(jnp.float32)
    gx = _base_coords(w, align_corners)[None, None, :]  # [1, 1, W]
    gy = _base_coords(h, align_corners)[None, :, None]  # [1, H, 1]
    t = theta[:, :, :, None, None]  # [N, 2, 3, 1, 1]
    src_x = t[:, 0, 0] * gx + t[:, 0, 1] * gy + t[:, 0, 2]  # [N, H, W]
    src_y = t[:, 1, 0] * gx + t[:, 1, 1] * gy + t[:, 1, 2]
    ix = _unnormalise(src_x, w, align_corners)
    iy = _unnormalise(src_y, h, align_corners)
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    wx1, wy1 = ix - x0, iy - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    batch = jnp.arange(n)[:, None, None]

    def corner(yi: jax.Array, xi: jax.Array, weight: jax.Array) -> jax.Array:
        valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        vals = x[batch, jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
        weight = jnp.where(valid, weight, 0.0).astype(x.dtype)
        return vals * weight[..., None]

    return (
        corner(y0, x0, (1.0 - wy1) * (1.0 - wx1))
        + corner(y0, x0 + 1, (1.0 - wy1) * wx1)
        + corner(y0 + 1, x0, wy1 * (1.0 - wx1))
        + corner(y0 + 1, x0 + 1, wy1 * wx1)
    )


# ----------------------------------------------------------------------------------------------
# Random op groups: (key, x, params, siamese) -> x'.
# ----------------------------------------------------------------------------------------------


# Each op makes a single draw of all its parameters: every jax.random call adds a threefry
# computation, and those dominate compile time on CPU.


def _uniform(key: jax.Array, n: int, siamese: bool, k: int) -> jax.Array:
    """k parameters per sample, U[0, 1), as [N, k]; one draw shared by the batch when siamese."""
    u = jax.random.uniform(key, (k,) if siamese else (n, k), jnp.float32)
    return jnp.broadcast_to(u, (n, k))


def _randint(
    key: jax.Array, n: int, siamese: bool, lo: tuple[int, ...], hi: tuple[int, ...]
) -> jax.Array:
    """Integers in [lo[i], hi[i]) as [N, k]; one draw shared by the batch when siamese.

    Built on a uniform draw: jax.random.randint costs twice the threefry work to compile.
    """
    lo_ = jnp.array(lo, jnp.float32)
    hi_ = jnp.array(hi, jnp.float32)
    v = jnp.floor(lo_ + _uniform(key, n, siamese, len(lo)) * (hi_ - lo_))
    # u * span can round up to span in float32.
    return jnp.clip(v, lo_, hi_ - 1.0).astype(jnp.int32)


def rand_color(key: jax.Array, x: jax.Array, params: DSAParams, siamese: bool) -> jax.Array:
    """Brightness, then saturation, then contrast, each with its own draw. x: [N, H, W, C]."""
    u = _uniform(key, x.shape[0], siamese, 3)
    x = adjust_brightness(x, (u[:, 0] - 0.5) * params.brightness)
    x = adjust_saturation(x, u[:, 1] * params.saturation)
    return adjust_contrast(x, u[:, 2] + params.contrast)


def rand_crop(key: jax.Array, x: jax.Array, params: DSAParams, siamese: bool) -> jax.Array:
    """Integer translation by up to round(side * ratio_crop_pad) pixels, zero fill."""
    n, h, w, _ = x.shape
    shift_h = int(h * params.ratio_crop_pad + 0.5)
    shift_w = int(w * params.ratio_crop_pad + 0.5)
    d = _randint(key, n, siamese, (-shift_h, -shift_w), (shift_h + 1, shift_w + 1))
    return translate(x, d[:, 0], d[:, 1])


def rand_cutout(key: jax.Array, x: jax.Array, params: DSAParams, siamese: bool) -> jax.Array:
    """Zeroes a round(side * ratio_cutout) square whose centre may sit on the border."""
    n, h, w, _ = x.shape
    sh = int(h * params.ratio_cutout + 0.5)
    sw = int(w * params.ratio_cutout + 0.5)
    # As in the reference: an even-sized hole may be centred one past the last pixel.
    centre = _randint(key, n, siamese, (0, 0), (h + 1 - sh % 2, w + 1 - sw % 2))
    return cut_out(x, centre[:, 0], centre[:, 1], (sh, sw))


def rand_flip(key: jax.Array, x: jax.Array, params: DSAParams, siamese: bool) -> jax.Array:
    """Horizontal mirror with probability prob_flip."""
    return hflip(x, _uniform(key, x.shape[0], siamese, 1)[:, 0] < params.prob_flip)


def rand_scale(key: jax.Array, x: jax.Array, params: DSAParams, siamese: bool) -> jax.Array:
    """Independent x/y scaling with factors in [1/ratio_scale, ratio_scale], bilinear."""
    ratio = params.ratio_scale
    s = _uniform(key, x.shape[0], siamese, 2) * (ratio - 1.0 / ratio) + 1.0 / ratio
    return affine_grid_sample(x, scale_theta(s[:, 0], s[:, 1]))


def rand_rotate(key: jax.Array, x: jax.Array, params: DSAParams, siamese: bool) -> jax.Array:
    """Rotation by an angle in [-ratio_rotate, ratio_rotate] degrees, bilinear."""
    u = _uniform(key, x.shape[0], siamese, 1)[:, 0]
    angle = (u - 0.5) * 2.0 * math.radians(params.ratio_rotate)
    return affine_grid_sample(x, rotation_theta(angle))


OpFn = Callable[[jax.Array, jax.Array, DSAParams, bool], jax.Array]

OP_FNS: Mapping[str, OpFn] = types.MappingProxyType(
    {
        "color": rand_color,
        "crop": rand_crop,
        "cutout": rand_cutout,
        "flip": rand_flip,
        "scale": rand_scale,
        "rotate": rand_rotate,
    }
)
OPS: tuple[str, ...] = tuple(OP_FNS)


# ----------------------------------------------------------------------------------------------
# Strategy-level API.
# ----------------------------------------------------------------------------------------------


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """'_'-separated op names -> tuple of ops; "" and "none" give ()."""
    if strategy == "" or strategy.lower() == "none":
        return ()
    ops = tuple(strategy.split("_"))
    for op in ops:
        check_choice("augmentation op", op, OPS)
    return ops


def strategy_for_dataset(strategy: str, dataset: str) -> str:
    """Drops "flip" for digit datasets (mnist, svhn, svhn_cropped, usps; case-insensitive).

    Returns "none" when no op is left.
    """
    ops = parse_strategy(strategy)
    if dataset.lower() in DIGIT_DATASETS:
        ops = tuple(op for op in ops if op != "flip")
    return "_".join(ops) or "none"


def chosen_op(key: jax.Array, strategy: str) -> jax.Array:
    """Index into ``parse_strategy(strategy)`` of the op group that mode "one" applies for key.

    Returns an int32 scalar; -1 for the identity strategy.
    """
    ops = parse_strategy(strategy)
    if not ops:
        return jnp.asarray(-1, jnp.int32)
    choice_key, _ = jax.random.split(key)
    return _randint(choice_key, 1, True, (0,), (len(ops),))[0, 0]


def augment(
    key: jax.Array,
    x: jax.Array,
    *,
    strategy: str = DEFAULT_STRATEGY,
    params: DSAParams = DSAParams(),  # noqa: B008 (frozen, immutable default)
    mode: str = "one",
    siamese: bool = True,
) -> jax.Array:
    """Applies DSA to a batch. x: [N, H, W, C] float -> [N, H, W, C].

    mode "one": one op group of the strategy, drawn uniformly per call (the reference 'S');
    mode "all": every op group in order (the reference 'M'). With siamese=True the same key gives
    the same transform on any batch (e.g. real and synthetic of different sizes). In mode "one"
    the op ``chosen_op(key, strategy)`` gets the same key whatever the strategy, so
    augment(key, x) == augment(key, x, strategy=that op).
    jit with strategy, params, mode and siamese static.
    """
    check_choice("augmentation mode", mode, MODES)
    ops = parse_strategy(strategy)
    chex.assert_rank(x, 4)
    chex.assert_type(x, float)
    if not ops:
        return x
    _, op_key = jax.random.split(key)

    def apply(name: str, k: jax.Array, images: jax.Array) -> jax.Array:
        return OP_FNS[name](k, images, params, siamese)

    if mode == "all":
        for name, k in zip(ops, jax.random.split(op_key, len(ops)), strict=True):
            x = apply(name, k, x)
        return x
    if len(ops) == 1:
        return apply(ops[0], op_key, x)
    branches = [functools.partial(apply, name) for name in ops]
    return lax.switch(chosen_op(key, strategy), branches, op_key, x)
