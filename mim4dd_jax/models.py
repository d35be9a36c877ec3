"""Flax networks of the dataset-distillation literature (DatasetCondensation's networks.py).

Every model is called as ``model.apply(variables, x, train=False, features=False)`` with
x: [N, H, W, C] float32 and returns logits [N, num_classes], or with ``features=True`` a
:class:`ModelOutput` holding the logits, the penultimate embedding and per-block feature maps.

Layers use PyTorch's default initialisation (weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)))
because DM samples random networks and its embedding statistics must match the reference. Norms
use eps 1e-5 as torch does. Feature maps are NHWC, so a flattened embedding is ordered (H, W, C)
where torch's is (C, H, W): the same features, permuted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mim4dd_jax.conv import IMPLS, conv2d
from mim4dd_jax.errors import check_choice

NORMS = ("instance", "group", "layer", "batch", "none")
ACTS = ("relu", "leaky_relu", "sigmoid", "swish")
POOLS = ("avg", "max", "none")
MODELS = ("convnet", "alexnet", "vgg11", "resnet18")

# torch's default eps; flax's norms default to 1e-6 (BatchNorm aside).
_EPS = 1e-5


class ModelOutput(NamedTuple):
    """What a model returns with ``features=True``.

    logits: [N, num_classes]; embedding: [N, D], the flattened input of the final Dense;
    blocks: one [N, h, w, c] feature map per conv block / stage, taken after its pooling.
    """

    logits: jax.Array
    embedding: jax.Array
    blocks: tuple[jax.Array, ...]


def torch_uniform(fan_in: int) -> Callable[..., jax.Array]:
    """Initializer drawing U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch's default for both the
    weight and the bias of Linear and Conv2d (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """Conv2d as in torch (square kernel, symmetric zero padding) via :func:`conv.conv2d`.

    Params: "kernel" [k, k, Cin, features] (HWIO) and, if use_bias, "bias" [features].
    x: [N, H, W, Cin] -> [N, H', W', features].
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        init = torch_uniform(cin * k * k)
        kernel = self.param("kernel", init, (k, k, cin, self.features))
        y = conv2d(x, kernel, stride=self.stride, padding=self.padding, impl=self.impl)
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,))
        return y


class Dense(nn.Module):
    """Linear layer with torch's default init. Params: "kernel" [Din, features], "bias".

    x: [N, Din] -> [N, features].
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_uniform(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return jnp.dot(x, kernel) + bias


class InstanceNorm(nn.Module):
    """torch ``GroupNorm(C, C)`` on NHWC maps: per image and channel, (x - mean) / sqrt(var + eps)
    over H and W (biased variance, computed in two passes), then the affine scale and bias [C].

    The parameters are those of flax ``GroupNorm(group_size=1)``. The variance is written as a
    contraction of the centred map with itself, because XLA:CPU fuses the same mean of squares
    into a slow broadcast-reduce loop: the norm is 1.3-1.6x faster than flax's at DM's batch
    (benchmarks/bench_norm.py) and, with the sliced real pass, the DM step 1.6x (BENCHMARKS.md).
    HIGHEST precision keeps TF32 out of it on GPU. x: [N, H, W, C] -> [N, H, W, C].
    """

    epsilon: float = _EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, c = x.shape
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        centred = x - jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.einsum("nhwc,nhwc->nc", centred, centred, precision=lax.Precision.HIGHEST)
        inv = lax.rsqrt(var / (h * w) + self.epsilon)[:, None, None, :] * scale
        return centred * inv + bias


def _norm(kind: str, train: bool, name: str) -> Callable[[jax.Array], jax.Array]:
    """The norm layer after a conv, on NHWC maps; built inside the caller's compact scope."""
    if kind == "instance":
        return InstanceNorm(name=name)
    if kind == "group":
        return nn.GroupNorm(num_groups=4, epsilon=_EPS, use_fast_variance=False, name=name)
    if kind == "layer":
        # torch LayerNorm([C, H, W]): statistics and elementwise affine over the whole map.
        axes = (-3, -2, -1)
        return nn.LayerNorm(
            epsilon=_EPS, reduction_axes=axes, feature_axes=axes, use_fast_variance=False, name=name
        )
    if kind == "batch":
        # flax momentum m keeps m of the old statistic; torch's momentum 0.1 keeps 0.9.
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=_EPS, name=name)
    return lambda x: x


def _activation(kind: str) -> Callable[[jax.Array], jax.Array]:
    return {
        "relu": nn.relu,
        "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.01),
        "sigmoid": nn.sigmoid,
        "swish": nn.swish,
    }[kind]


def _pool(kind: str, x: jax.Array) -> jax.Array:
    """2x2 stride-2 pooling; odd sizes are floored, as in torch."""
    if kind == "avg":
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    if kind == "max":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return x


def _check_input(x: jax.Array) -> None:
    chex.assert_rank(x, 4)
    chex.assert_type(x, jnp.floating)


def _finish(
    h: jax.Array, blocks: list[jax.Array], num_classes: int, features: bool
) -> jax.Array | ModelOutput:
    embedding = h.reshape(h.shape[0], -1)
    logits = Dense(num_classes, name="classifier")(embedding)
    if features:
        return ModelOutput(logits, embedding, tuple(blocks))
    return logits


class ConvNet(nn.Module):
    """The DD-standard ConvNet: depth x [conv3x3(width) -> norm -> act -> pool], then Dense.

    The first conv pads by 3 when the input has one channel (28x28 -> 32x32, ending at 4x4 for
    depth 3), else every conv pads by 1. x: [N, H, W, C] float32.
    """

    num_classes: int
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    act: str = "relu"
    pool: str = "avg"
    conv_impl: str = "auto"
    # Not used by __call__: how training passes run it (:func:`apply_in_chunks`, which
    # inner.apply_train calls); 0 = the whole batch at once.
    microbatch: int = 0

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, features: bool = False
    ) -> jax.Array | ModelOutput:
        _check_input(x)
        check_choice("norm", self.norm, NORMS)
        check_choice("activation", self.act, ACTS)
        check_choice("pooling", self.pool, POOLS)
        act = _activation(self.act)
        one_channel = x.shape[-1] == 1
        blocks = []
        h = x
        for d in range(self.depth):
            pad = 3 if one_channel and d == 0 else 1
            h = Conv(self.width, 3, padding=pad, impl=self.conv_impl, name=f"conv{d}")(h)
            h = _norm(self.norm, train, f"norm{d}")(h)
            h = _pool(self.pool, act(h))
            blocks.append(h)
        return _finish(h, blocks, self.num_classes, features)


class AlexNet(nn.Module):
    """DatasetCondensation's small AlexNet: conv5(128) pool, conv5(192) pool, conv3(256),
    conv3(192), conv3(192) pool, then Dense; each conv followed by [norm ->] ReLU.

    norm="none" is the reference 'AlexNet', norm="batch" its 'AlexNetBN'. The first conv pads by
    4 for 1-channel input (28 -> 32), else 2, so both end at 4x4x192. Blocks: the 3 pooled stages.
    """

    num_classes: int
    norm: str = "none"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, features: bool = False
    ) -> jax.Array | ModelOutput:
        _check_input(x)
        check_choice("norm", self.norm, NORMS)
        stages = (
            ((128, 5, 4 if x.shape[-1] == 1 else 2),),
            ((192, 5, 2),),
            ((256, 3, 1), (192, 3, 1), (192, 3, 1)),
        )
        blocks = []
        h = x
        i = 0
        for stage in stages:
            for width, k, pad in stage:
                h = Conv(width, k, padding=pad, impl=self.conv_impl, name=f"conv{i}")(h)
                h = nn.relu(_norm(self.norm, train, f"norm{i}")(h))
                i += 1
            h = _pool("max", h)
            blocks.append(h)
        return _finish(h, blocks, self.num_classes, features)


# Channels per conv; "M" ends a stage with 2x2 max pooling.
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG11 as in DatasetCondensation: conv3x3 -> norm -> ReLU per layer, 5 max-pooled stages,
    Dense on the flattened 1x1x512 map. The first conv pads by 3 for 1-channel input (28 -> 32).

    norm="instance" is the reference 'VGG11', norm="batch" its 'VGG11BN'. Blocks: the 5 stages.
    """

    num_classes: int
    norm: str = "instance"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, features: bool = False
    ) -> jax.Array | ModelOutput:
        _check_input(x)
        check_choice("norm", self.norm, NORMS)
        one_channel = x.shape[-1] == 1
        blocks = []
        h = x
        for i, v in enumerate(_VGG11):
            if v == "M":
                h = _pool("max", h)
                blocks.append(h)
                continue
            pad = 3 if one_channel and i == 0 else 1
            h = Conv(v, 3, padding=pad, impl=self.conv_impl, name=f"conv{i}")(h)
            h = nn.relu(_norm(self.norm, train, f"norm{i}")(h))
        return _finish(h, blocks, self.num_classes, features)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3(stride) -> norm -> ReLU -> conv3x3 -> norm, plus a shortcut
    (1x1 conv(stride) -> norm when the shape changes), then ReLU. Convs have no bias."""

    planes: int
    stride: int = 1
    norm: str = "instance"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = lambda k, s, p, name: Conv(
            self.planes, k, stride=s, padding=p, use_bias=False, impl=self.conv_impl, name=name
        )
        out = conv(3, self.stride, 1, "conv1")(x)
        out = nn.relu(_norm(self.norm, train, "norm1")(out))
        out = _norm(self.norm, train, "norm2")(conv(3, 1, 1, "conv2")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = _norm(self.norm, train, "shortcut_norm")(
                conv(1, self.stride, 0, "shortcut_conv")(x)
            )
        return nn.relu(out + shortcut)


class ResNet18(nn.Module):
    """DatasetCondensation's ResNet18 (CIFAR stem: conv3x3(64), no max pool), 4 stages of 2 basic
    blocks (64, 128, 256, 512; strides 1, 2, 2, 2), 4x4 average pooling, Dense.

    28x28 input ends at 4x4 as 32x32 does (28 -> 14 -> 7 -> 4), so both embed to 512.
    norm="instance" is the reference 'ResNet18', norm="batch" its 'ResNet18BN'. Blocks: the 4
    stages' outputs.
    """

    num_classes: int
    norm: str = "instance"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, features: bool = False
    ) -> jax.Array | ModelOutput:
        _check_input(x)
        check_choice("norm", self.norm, NORMS)
        h = Conv(64, 3, padding=1, use_bias=False, impl=self.conv_impl, name="conv1")(x)
        h = nn.relu(_norm(self.norm, train, "norm1")(h))
        blocks = []
        for s, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            for b in range(2):
                h = BasicBlock(
                    planes,
                    stride if b == 0 else 1,
                    self.norm,
                    self.conv_impl,
                    name=f"layer{s + 1}_{b}",
                )(h, train)
            blocks.append(h)
        h = nn.avg_pool(h, (4, 4), strides=(4, 4), padding="VALID")
        return _finish(h, blocks, self.num_classes, features)


# The norm each architecture has in the reference's cross-architecture evaluation.
_REFERENCE_NORM = {
    "convnet": "instance",
    "alexnet": "none",
    "vgg11": "instance",
    "resnet18": "instance",
}


def get_model(
    name: str,
    *,
    num_classes: int,
    width: int = 128,
    depth: int = 3,
    norm: str | None = None,
    act: str = "relu",
    pool: str = "avg",
    conv_impl: str = "auto",
    microbatch: int = 0,
) -> nn.Module:
    """Builds a model by name (case-insensitive): convnet, alexnet, vgg11 or resnet18.

    width/depth/act/pool/microbatch apply to the ConvNet only; norm applies to all. norm=None
    picks the reference's norm for that architecture: "instance", except AlexNet's "none".
    """
    key = name.lower() if isinstance(name, str) else name
    check_choice("model", key, MODELS)
    norm = _REFERENCE_NORM[key] if norm is None else norm
    check_choice("norm", norm, NORMS)
    check_choice("conv impl", conv_impl, IMPLS)
    if key == "convnet":
        check_choice("activation", act, ACTS)
        check_choice("pooling", pool, POOLS)
        return ConvNet(num_classes, width, depth, norm, act, pool, conv_impl, int(microbatch))
    cls = {"alexnet": AlexNet, "vgg11": VGG11, "resnet18": ResNet18}[key]
    return cls(num_classes, norm=norm, conv_impl=conv_impl)


def apply_in_chunks(
    model: nn.Module, variables: Any, x: jax.Array, chunk: int, **kwargs: Any
) -> Any:
    """``model.apply(variables, x, **kwargs)`` computed ``chunk`` images at a time.

    x: [N, H, W, C]; returns what ``model.apply`` returns (logits [N, K] or a ModelOutput with
    leading axis N). The chunks run one after another in a ``lax.map`` whose body is
    rematerialised (``jax.checkpoint``), so a backward pass recomputes each chunk's forward
    instead of keeping every activation: on a 2-core CPU the working set of a few images stays
    in cache, where the whole batch's im2col patches and activations (hundreds of MB) go to
    memory (BENCHMARKS.md, "Micro-batched training step"). Exact only for a network that treats
    every image alone: so ``chunk <= 0``, ``chunk >= N`` or ``batch_stats`` (batch norm) in
    ``variables`` is the plain call. Padding images (zeros) complete the last chunk and are
    dropped from the output, so they contribute nothing to any gradient.
    """
    n = x.shape[0]
    if chunk <= 0 or n <= chunk or "batch_stats" in variables:
        return model.apply(variables, x, **kwargs)
    pad = -n % chunk
    xs = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x
    xs = xs.reshape(-1, chunk, *x.shape[1:])
    run = jax.checkpoint(lambda v, xb: model.apply(v, xb, **kwargs))
    out = lax.map(lambda xb: run(variables, xb), xs)
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:n], out)


def _abstract_features(model: nn.Module, image_shape: Sequence[int]) -> ModelOutput:
    """The shapes of ``model``'s ModelOutput on a batch of one, without allocating anything."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

    def run(x: jax.Array) -> ModelOutput:
        out, _ = model.init_with_output(jax.random.key(0), x, train=False, features=True)
        return out

    return jax.eval_shape(run, x)


def embedding_dim(model: nn.Module, image_shape: Sequence[int]) -> int:
    """D of the embedding [N, D] that ``model`` gives for images of shape (H, W, C)."""
    return int(_abstract_features(model, image_shape).embedding.shape[-1])


def block_shapes(model: nn.Module, image_shape: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """(h, w, c) of each per-block feature map of ``model`` for images of shape (H, W, C)."""
    return tuple(tuple(b.shape[1:]) for b in _abstract_features(model, image_shape).blocks)


# ----------------------------------------------------------------------------------------------
# Models from a config.
# ----------------------------------------------------------------------------------------------


def build_model(config: Any, num_classes: int, name: str | None = None) -> nn.Module:
    """``config.model`` (or, for another architecture ``name``, its reference variant)."""
    m = config.model
    if name is None or name.lower() == m.name.lower():
        return get_model(
            m.name,
            num_classes=num_classes,
            width=m.width,
            depth=m.depth,
            norm=m.norm,
            act=m.act,
            pool=m.pool,
            conv_impl=config.conv_impl,
            microbatch=config.get("microbatch", 0),
        )
    # Cross-architecture models keep the reference's own norm, not the distillation model's.
    return get_model(name, num_classes=num_classes, conv_impl=config.conv_impl)


def prefer_conv(model: nn.Module, config: Any, impl: str) -> nn.Module:
    """``model`` with conv ``impl`` when ``config.conv_impl`` is "auto" and the backend is CPU
    (a choice measured per use, BENCHMARKS.md); otherwise ``model`` unchanged."""
    if config.conv_impl == "auto" and jax.default_backend() == "cpu":
        return model.clone(conv_impl=impl)
    return model
