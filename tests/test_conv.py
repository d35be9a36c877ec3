"""conv2d: the im2col and hybrid paths must match XLA's convolution in values and in 1st/2nd
derivatives."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mim4dd_jax import conv
from mim4dd_jax.errors import ConfigError

HI = lax.Precision.HIGHEST


def _close(a, b, rtol=2e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def _derivatives(impl, x, kernel, cot, stride, padding):
    """Values, first derivatives and second derivatives (of the squared-gradient norm)."""
    f = functools.partial(conv.conv2d, stride=stride, padding=padding, impl=impl, precision=HI)
    y = f(x, kernel)
    # A random cotangent, not a plain sum, so every output position weighs differently.
    loss = lambda x, k: jnp.sum(f(x, k) * cot)
    g = jax.grad(loss, argnums=(0, 1))

    def grad_sq(x, k):
        gx, gk = g(x, k)
        return jnp.sum(gx**2) + jnp.sum(gk**2) + jnp.sum(gx * x) * jnp.sum(gk * k)

    return y, g(x, kernel), jax.grad(grad_sq, argnums=(0, 1))(x, kernel)


CASES = {
    # name: (N, H, W, Cin, kh, kw, Cout, stride, padding)
    "first_conv_1ch_28x28_pad3": (2, 28, 28, 1, 3, 3, 128, 1, 3),
    "wide_128_to_128_pad1": (2, 8, 8, 128, 3, 3, 128, 1, 1),
    "5x5_stride1_pad2": (2, 9, 9, 4, 5, 5, 6, 1, 2),
    "3x3_stride2_pad1_even": (2, 8, 8, 5, 3, 3, 7, 2, 1),
    "3x3_stride2_pad1_odd": (2, 7, 7, 5, 3, 3, 7, 2, 1),
    "1x1_stride2_shortcut": (2, 7, 7, 5, 1, 1, 7, 2, 0),
    "asymmetric_padding_tuple": (2, 6, 9, 3, 3, 3, 4, 1, (2, 0)),
}


@pytest.mark.parametrize("impl", ["im2col", "hybrid"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_impl_matches_xla_values_and_derivatives(case, impl):
    n, h, w, cin, kh, kw, cout, stride, padding = case
    kx, kk, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, h, w, cin))
    kernel = jax.random.normal(kk, (kh, kw, cin, cout)) / np.sqrt(kh * kw * cin)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    ho, wo = (h + 2 * ph - kh) // stride + 1, (w + 2 * pw - kw) // stride + 1
    cot = jax.random.normal(kc, (n, ho, wo, cout))

    run = jax.jit(_derivatives, static_argnums=(0, 4, 5))
    y_i, g_i, h_i = run(impl, x, kernel, cot, stride, padding)
    y_x, g_x, h_x = run("xla", x, kernel, cot, stride, padding)

    assert y_i.shape == (n, ho, wo, cout)
    _close(y_i, y_x)
    for a, b in zip(g_i, g_x, strict=True):
        _close(a, b)
    for a, b in zip(h_i, h_x, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0  # the second derivative is not trivially zero
        _close(a, b)


def test_matches_hand_computed_cross_correlation():
    # Guards against both paths sharing a convention error (e.g. a flipped kernel).
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 2, 0, 0].set(1.0)  # picks the top-right neighbour
    for impl in ("im2col", "xla", "hybrid"):
        y = conv.conv2d(x, kernel, padding=1, impl=impl)[0, :, :, 0]
        # Output (r, c) reads input (r - 1, c + 1), zero outside the image.
        expected = np.zeros((4, 4))
        expected[1:, :3] = np.arange(16.0).reshape(4, 4)[:3, 1:]
        np.testing.assert_array_equal(np.asarray(y), expected)


@pytest.mark.parametrize("impl", ["im2col", "hybrid"])
def test_works_inside_scan_and_jit(impl):
    kx, kk = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 6, 6, 4))
    kernel = jax.random.normal(kk, (3, 3, 4, 4)) * 0.2

    def unroll(impl, kernel):
        step = lambda h, _: (jnp.tanh(conv.conv2d(h, kernel, padding=1, impl=impl)), None)
        h, _ = lax.scan(step, x, None, length=3)
        return jnp.sum(h**2)

    val_scan, grad_scan = jax.jit(jax.value_and_grad(functools.partial(unroll, impl)))(kernel)

    def loop(kernel):
        h = x
        for _ in range(3):
            h = jnp.tanh(conv.conv2d(h, kernel, padding=1, impl="xla"))
        return jnp.sum(h**2)

    val_loop, grad_loop = jax.value_and_grad(loop)(kernel)
    _close(val_scan, val_loop)
    _close(grad_scan, grad_loop)


def test_auto_resolves_to_im2col_on_cpu():
    assert jax.default_backend() == "cpu"
    assert conv.resolve_impl("auto") == "im2col"
    assert conv.resolve_impl("xla") == "xla"


def test_unknown_impl_raises_config_error():
    x, kernel = jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2))
    with pytest.raises(ConfigError, match=r"'cudnn'.*'auto', 'im2col', 'xla', 'hybrid'"):
        conv.conv2d(x, kernel, impl="cudnn")


def test_bad_arguments_raise():
    x, kernel = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2))
    with pytest.raises(ValueError, match="channels"):
        conv.conv2d(x, kernel)
    good = jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ConfigError, match="stride"):
        conv.conv2d(x, good, stride=0)
    with pytest.raises(ConfigError, match="padding"):
        conv.conv2d(x, good, padding=-1)
