"""The one 2-D convolution every model in this library calls.

XLA:CPU runs ``lax.conv_general_dilated`` more than 100x slower inside a ``lax.scan`` /
``fori_loop`` body than outside one (jax-ml/jax#12868). Every inner loop here (evaluation
training, experts, the MTT unroll) is a scan, so on CPU we convolve by im2col instead: pad, take
the kh*kw shifted (strided) slices, concatenate them on the channel axis and do one matmul with
the kernel reshaped to [kh*kw*Cin, Cout]. It is built from pad/slice/concat/dot only, so it is
differentiable to any order and has no in-loop cliff. On accelerators XLA's native convolution is
the fast path, so ``impl="auto"`` picks it there.

``impl="hybrid"`` (stride 1) keeps XLA's convolution for the forward pass and the input gradient
and computes the weight gradient with GEMMs, because XLA:CPU's weight-gradient convolution is the
slow op (benchmarks/bench_conv.py). On CPU it made the DM step (no loops) 2.3x faster with half
the memory of im2col (BENCHMARKS.md). In the MTT student's unrolled loop it measured the same
speed as im2col (25.6 vs 24.5 s per 20-step iteration, jax 0.10.2), so "auto" keeps im2col for
loops.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from mim4dd_jax.errors import ConfigError, check_choice

IMPLS = ("auto", "im2col", "xla", "hybrid")


def resolve_impl(impl: str) -> str:
    """Returns "im2col", "xla" or "hybrid" for ``impl`` in IMPLS; "auto" depends on the default
    backend (im2col on CPU, xla elsewhere)."""
    check_choice("conv impl", impl, IMPLS)
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


def _pair(padding: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(padding, int):
        padding = (padding, padding)
    if len(padding) != 2 or any(int(p) != p or p < 0 for p in padding):
        raise ConfigError(f"bad conv padding {padding!r}; valid: an int >= 0 or a pair of them")
    return int(padding[0]), int(padding[1])


def _im2col(
    x: jax.Array, kernel: jax.Array, stride: int, pad: tuple[int, int], precision
) -> jax.Array:
    kh, kw, cin, cout = kernel.shape
    x = jnp.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    n, h, w, _ = x.shape
    ho = (h - kh) // stride + 1
    wo = (w - kw) // stride + 1
    # Column order (i, j, c) matches the row-major reshape of the HWIO kernel below.
    cols = [
        lax.slice(
            x,
            (0, i, j, 0),
            (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    # A plain 2-D GEMM is the shape XLA:CPU handles best.
    y = jnp.dot(
        patches.reshape(n * ho * wo, kh * kw * cin),
        kernel.reshape(kh * kw * cin, cout),
        precision=precision,
    )
    return y.reshape(n, ho, wo, cout)


def _xla(
    x: jax.Array, kernel: jax.Array, stride: int, pad: tuple[int, int], precision
) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad[0], pad[0]), (pad[1], pad[1])),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


def _weight_grad(
    x: jax.Array, g: jax.Array, kshape: tuple[int, ...], pad: tuple[int, int], precision
) -> jax.Array:
    """d kernel [kh, kw, Cin, Cout] of a stride-1 conv of x [N, H, W, Cin] with cotangent g.

    kernel[i, j] gets sum_{n,h,w} x_pad[n, h + i, w + j, :]^T g[n, h, w, :]: one GEMM per kernel
    offset with M = N*Ho*Wo (no 9x patch matrix in memory) unless Cin is tiny, where one GEMM on
    the concatenated slices [M, kh*kw*Cin] is better shaped. lax.pad allows negative padding.
    """
    kh, kw, cin, cout = kshape
    n, ho, wo, _ = g.shape
    x = lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), (pad[0], pad[0], 0), (pad[1], pad[1], 0), (0, 0, 0))
    )
    g2 = g.reshape(n * ho * wo, cout)
    cols = [
        lax.slice(x, (0, i, j, 0), (n, i + ho, j + wo, cin)).reshape(n * ho * wo, cin)
        for i in range(kh)
        for j in range(kw)
    ]
    if cin * kh * kw <= 64:
        patches = jnp.concatenate(cols, axis=-1)
        return jnp.dot(patches.T, g2, precision=precision).reshape(kh, kw, cin, cout)
    dk = [jnp.dot(c.T, g2, precision=precision) for c in cols]
    return jnp.stack(dk).reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _hybrid(x: jax.Array, kernel: jax.Array, pad: tuple[int, int], precision) -> jax.Array:
    """Stride-1 conv: XLA's convolution forward; a custom VJP whose input gradient is again a
    :func:`_hybrid` conv (of g with the flipped, in/out-swapped kernel, padding k - 1 - pad) and
    whose weight gradient is GEMMs (:func:`_weight_grad`), not XLA's slow weight-gradient conv.
    Both are built from differentiable ops, so it is differentiable to any order."""
    return _xla(x, kernel, 1, pad, precision)


def _hybrid_fwd(x, kernel, pad, precision):
    return _hybrid(x, kernel, pad, precision), (x, kernel)


def _hybrid_bwd(pad, precision, res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    dx = _hybrid(g, flipped, (kh - 1 - pad[0], kw - 1 - pad[1]), precision)
    return dx, _weight_grad(x, g, kernel.shape, pad, precision)


_hybrid.defvjp(_hybrid_fwd, _hybrid_bwd)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    impl: str = "auto",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """2-D cross-correlation (PyTorch ``Conv2d`` semantics) with symmetric zero padding.

    x: [N, H, W, Cin] float; kernel: [kh, kw, Cin, Cout] (HWIO).
    Returns [N, H', W', Cout] with H' = (H + 2*pad_h - kh) // stride + 1 (likewise W').
    impl: "auto" (im2col on CPU, XLA's convolution elsewhere), "im2col", "xla" or "hybrid" (XLA's
    convolution forward with a GEMM weight gradient, see :func:`_hybrid`; for code outside
    loop bodies on CPU, where it is the fastest; stride > 1 falls back to im2col).
    precision: passed to whichever path runs, so both agree; None is JAX's default (TF32 may be
    used on GPU, as PyTorch's cuDNN convolutions do by default).
    """
    impl = resolve_impl(impl)
    chex.assert_rank([x, kernel], 4)
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv2d: x has {x.shape[-1]} channels, kernel {kernel.shape} expects {kernel.shape[2]}"
        )
    if int(stride) != stride or stride < 1:
        raise ConfigError(f"bad conv stride {stride!r}; valid: an int >= 1")
    pad = _pair(padding)
    if impl == "hybrid" and int(stride) == 1:
        return _hybrid(x, kernel, pad, precision)
    fn = _xla if impl == "xla" else _im2col
    return fn(x, kernel, int(stride), pad, precision)
