"""The one 2-D convolution every model in this library calls.

XLA:CPU runs ``lax.conv_general_dilated`` more than 100x slower inside a ``lax.scan`` /
``fori_loop`` body than outside one (jax-ml/jax#12868). Every inner loop here (evaluation
training, experts, the MTT unroll) is a scan, so on CPU we convolve by im2col instead: pad, take
the kh*kw shifted (strided) slices, concatenate them on the channel axis and do one matmul with
the kernel reshaped to [kh*kw*Cin, Cout]. It is built from pad/slice/concat/dot only, so it is
differentiable to any order and has no in-loop cliff. On accelerators XLA's native convolution is
the fast path, so ``impl="auto"`` picks it there.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from mim4dd_jax.errors import ConfigError, check_choice

IMPLS = ("auto", "im2col", "xla")


def resolve_impl(impl: str) -> str:
    """Returns "im2col" or "xla" for ``impl`` in IMPLS; "auto" depends on the default backend."""
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
    impl: "auto" (im2col on CPU, XLA's convolution elsewhere), "im2col" or "xla".
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
    fn = _im2col if impl == "im2col" else _xla
    return fn(x, kernel, int(stride), pad, precision)
