"""Wide-ResNet (``model.name: wide_resnet``): bottleneck ResNet with a width factor, batch norm.

The layout follows the one Alpa benchmarked, so the benchmark sizes match its parameter
counts: a 7x7/2 stem and 3x3/2 max pool, then four stages of bottleneck blocks whose stage-i
block maps ``c_in -> f`` (1x1), ``f -> f * width_factor`` (3x3, stride 2 in the first block of
stages 1-3), ``f * width_factor -> 4f`` (1x1) with ``f = base_channels * 2**i``, plus a
projection shortcut where the shape changes; global average pooling and a dense classifier.

Batch norm keeps running statistics as ``nnx.BatchStat`` variables (the Trainer carries them
in ``state["model_state"]``); ``train=True`` normalizes with the batch's statistics and
updates the running ones, ``train=False`` uses the running ones.

Logical axis names: conv kernels (None, None, conv_in, conv_out); batch-norm scale and bias
(conv_out,); classifier kernel (embed, classes), bias (classes,).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models import _layers
from models._layers import param, value
from models._registry import ModelSpec, register

STAGE_SIZES = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
               152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


@dataclasses.dataclass(frozen=True)
class WideResNetConfig:
    """Options of ``model.name: wide_resnet``.

    Attributes:
      depth: 14, 26, 50, 101, 152 or 200 (blocks per stage from ``STAGE_SIZES``).
      base_channels: ``f`` of the first stage; doubles every stage.
      width_factor: widening of the 3x3 convolution in every block.
      num_classes: classifier outputs.
      image_size: input height and width; the model accepts any size, this one is used for
        the FLOP count (XLA's count of one training example).
      in_channels: input channels.
      bn_momentum: running statistics keep this fraction of their old value per step.
      bn_epsilon: added to the variance in batch norm.
      param_dtype: dtype the params are created in.
      dtype: compute dtype; None computes in the params' dtype.
    """

    depth: int = 50
    base_channels: int = 64
    width_factor: int = 2
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    param_dtype: str = "float32"
    dtype: Optional[str] = None

    def __post_init__(self):
        _layers.check_choice("depth", self.depth, STAGE_SIZES)
        _layers.check_positive(base_channels=self.base_channels, width_factor=self.width_factor,
                               num_classes=self.num_classes, image_size=self.image_size,
                               in_channels=self.in_channels, bn_epsilon=self.bn_epsilon)
        if not 0 <= self.bn_momentum < 1:
            raise ValueError(f"bn_momentum must be in [0, 1), got {self.bn_momentum}")
        _layers.check_choice("param_dtype", self.param_dtype, _layers.DTYPES)
        if self.dtype is not None:
            _layers.check_choice("dtype", self.dtype, _layers.DTYPES)


def he_normal_fan_out(key, shape, dtype=jnp.float32):
    """``variance_scaling(2.0, "fan_out", "normal")`` of a kernel ``(kh, kw, c_in, c_out)``: normal
    with variance ``2 / (kh * kw * c_out)``, the same values drawn as one flat vector and reshaped
    (see ``_layers.normal``: the tiny Wide-ResNet's initialization compiled in 30 s of CPU with
    4-D draws, 10 s flat)."""
    fan_out = math.prod(shape[:-2]) * shape[-1]
    std = jnp.sqrt(jnp.array(2.0 / fan_out, dtype))  # as variance_scaling computes it
    return (jax.random.normal(key, (math.prod(shape),), dtype) * std).reshape(shape)


class Conv(nnx.Module):
    """2-D convolution without bias, NHWC, 'SAME'-style symmetric padding."""

    def __init__(self, c_in: int, c_out: int, size: int, stride: int, config, rngs: nnx.Rngs):
        self.stride, self.dtype = stride, _layers.to_dtype(config.dtype)
        self.kernel = param(rngs, he_normal_fan_out, (size, size, c_in, c_out),
                            (None, None, "conv_in", "conv_out"), _layers.DTYPES[config.param_dtype])

    def __call__(self, x):
        pad = (self.kernel.shape[0] - 1) // 2
        return jax.lax.conv_general_dilated(
            x, value(self.kernel, self.dtype), (self.stride, self.stride), [(pad, pad), (pad, pad)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (B, H/stride, W/stride, C_out)


class BatchNorm(nnx.Module):
    """Batch norm over (batch, height, width); statistics in float32."""

    def __init__(self, channels: int, config, rngs: nnx.Rngs, zero_scale: bool = False):
        pd = _layers.DTYPES[config.param_dtype]
        self.momentum, self.eps = config.bn_momentum, config.bn_epsilon
        scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
        self.scale = param(rngs, scale_init, (channels,), ("conv_out",), pd)
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), ("conv_out",), pd)
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def __call__(self, x, train: bool):
        x32 = x.astype(jnp.float32)
        if train:
            mean, var = x32.mean((0, 1, 2)), x32.var((0, 1, 2))
            self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
            self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        else:
            mean, var = self.mean[...], self.var[...]
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return (y + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (widened, strided) -> 1x1 with a residual; relu after each norm and the sum."""

    def __init__(self, c_in: int, filters: int, stride: int, config: WideResNetConfig, rngs: nnx.Rngs):
        wide, c_out = filters * config.width_factor, 4 * filters
        self.conv1, self.bn1 = Conv(c_in, filters, 1, 1, config, rngs), BatchNorm(filters, config, rngs)
        self.conv2, self.bn2 = Conv(filters, wide, 3, stride, config, rngs), BatchNorm(wide, config, rngs)
        self.conv3 = Conv(wide, c_out, 1, 1, config, rngs)
        self.bn3 = BatchNorm(c_out, config, rngs, zero_scale=True)  # each block starts as identity
        needs_projection = stride != 1 or c_in != c_out
        self.proj = Conv(c_in, c_out, 1, stride, config, rngs) if needs_projection else None
        self.proj_bn = BatchNorm(c_out, config, rngs) if needs_projection else None

    def __call__(self, x, train: bool):
        y = jax.nn.relu(self.bn1(self.conv1(x), train))
        y = jax.nn.relu(self.bn2(self.conv2(y), train))  # (B, H/stride, W/stride, wide)
        y = self.bn3(self.conv3(y), train)  # (B, H/stride, W/stride, 4 * filters)
        shortcut = x if self.proj is None else self.proj_bn(self.proj(x), train)
        return jax.nn.relu(shortcut + y)


class WideResNet(nnx.Module):
    """Images ``float[B, H, W, in_channels]`` -> logits ``[B, num_classes]``."""

    def __init__(self, config: WideResNetConfig, rngs: nnx.Rngs):
        pd = _layers.DTYPES[config.param_dtype]
        base = config.base_channels
        self.config = config
        self.dtype = _layers.to_dtype(config.dtype)
        self.stem = Conv(config.in_channels, base, 7, 2, config, rngs)
        self.stem_bn = BatchNorm(base, config, rngs)
        blocks, c_in = [], base
        for stage, num_blocks in enumerate(STAGE_SIZES[config.depth]):
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Bottleneck(c_in, base * 2 ** stage, stride, config, rngs))
                c_in = 4 * base * 2 ** stage
        self.blocks = nnx.List(blocks)
        self.head_kernel = param(rngs, nnx.initializers.lecun_normal(), (c_in, config.num_classes),
                                 ("embed", "classes"), pd)
        self.head_bias = param(rngs, nnx.initializers.zeros, (config.num_classes,), ("classes",), pd)

    def forward(self, images, train: bool = False):
        """Returns ``(logits [B, num_classes], {})``; ``train`` selects batch statistics."""
        x = images.astype(self.dtype or self.stem.kernel.dtype)  # the compute dtype
        x = jax.nn.relu(self.stem_bn(self.stem(x), train))  # (B, H/2, W/2, base)
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  [(0, 0), (1, 1), (1, 1), (0, 0)])  # (B, H/4, W/4, base)
        for block in self.blocks:
            x = block(x, train)
        x = x.mean((1, 2))  # (B, C)
        return x @ value(self.head_kernel, self.dtype) + value(self.head_bias, self.dtype), {}

    def __call__(self, images, train: bool = False):
        return self.forward(images, train=train)[0]


def num_params(config: WideResNetConfig) -> int:
    """Exact parameter count (batch-norm running statistics are not parameters)."""
    base, w = config.base_channels, config.width_factor
    total = 49 * config.in_channels * base + 2 * base
    c_in = base
    for stage, num_blocks in enumerate(STAGE_SIZES[config.depth]):
        f = base * 2 ** stage
        for i in range(num_blocks):
            total += c_in * f + 9 * f * f * w + f * w * 4 * f + 2 * (f + f * w + 4 * f)
            if (stage > 0 and i == 0) or c_in != 4 * f:
                total += c_in * 4 * f + 2 * 4 * f
            c_in = 4 * f
    return total + c_in * config.num_classes + config.num_classes


@functools.lru_cache(maxsize=32)
def flops_per_example(config: WideResNetConfig, seq_len: Optional[int] = None) -> float:
    """Training FLOPs of one ``image_size`` image, as XLA counts the lowered forward+backward.

    Nothing is allocated: the model and the image are abstract. ``seq_len`` is ignored.
    """
    abstract = nnx.eval_shape(lambda: WideResNet(config, nnx.Rngs(0)))
    graphdef, params, stats = nnx.split(abstract, nnx.Param, ...)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def loss(params, stats, images):
        return nnx.merge(graphdef, params, stats)(images, train=True).sum()

    image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.in_channels),
                                 jnp.float32)
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, stats, image)
    return float(lowered.cost_analysis()["flops"])


SPEC = register(ModelSpec(name="wide_resnet", config_cls=WideResNetConfig, task="classify",
                          build=lambda config, rngs: WideResNet(config, rngs),
                          num_params=num_params, flops_per_example=flops_per_example))
