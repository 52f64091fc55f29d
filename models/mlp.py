"""MLP: the simplest model, a stack of dense layers for regression (``model.name: mlp``).

Logical axis names alternate (embed, mlp), (mlp, embed), ... over the dense layers.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from flax import nnx

from models import _layers
from models._layers import param, value
from models._registry import ModelSpec, register


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Options of ``model.name: mlp``.

    Attributes:
      in_features: width of the input ``x [B, in_features]``.
      out_features: width of the output; None means ``in_features``.
      hidden_size: width of every hidden layer.
      num_layers: hidden layers (so ``num_layers + 1`` dense layers in all).
      activation: gelu_tanh, gelu, relu or silu.
      param_dtype: dtype the params are created in.
      dtype: compute dtype; None computes in the params' dtype.
    """

    in_features: int = 16
    out_features: Optional[int] = None
    hidden_size: int = 64
    num_layers: int = 2
    activation: str = "relu"
    param_dtype: str = "float32"
    dtype: Optional[str] = None

    def __post_init__(self):
        _layers.check_positive(in_features=self.in_features, hidden_size=self.hidden_size,
                               num_layers=self.num_layers, out_features=self.outputs)
        _layers.check_choice("activation", self.activation, _layers.ACTIVATIONS)
        _layers.check_choice("param_dtype", self.param_dtype, _layers.DTYPES)
        if self.dtype is not None:
            _layers.check_choice("dtype", self.dtype, _layers.DTYPES)

    @property
    def outputs(self) -> int:
        """The output width (``out_features`` or, when None, ``in_features``)."""
        return self.in_features if self.out_features is None else self.out_features


class MLP(nnx.Module):
    """``x [B, in_features]`` -> ``[B, out_features]``.

    Kernels alternate their logical names so consecutive layers can be sharded Megatron-style:
    layer 0 (embed, mlp), layer 1 (mlp, embed), layer 2 (embed, mlp), ...; biases follow
    their kernel's output axis.
    """

    def __init__(self, config: MLPConfig, rngs: nnx.Rngs):
        pd = _layers.DTYPES[config.param_dtype]
        self.dtype = _layers.to_dtype(config.dtype)
        self.act = _layers.ACTIVATIONS[config.activation]
        widths = [config.in_features] + [config.hidden_size] * config.num_layers + [config.outputs]
        kernels, biases = [], []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            names = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
            kernels.append(param(rngs, nnx.initializers.lecun_normal(), (fan_in, fan_out), names, pd))
            biases.append(param(rngs, nnx.initializers.zeros, (fan_out,), names[1:], pd))
        self.kernels, self.biases = nnx.List(kernels), nnx.List(biases)

    def forward(self, x, train: bool = False):
        """Returns ``(y [B, out_features], {})``."""
        x = x.astype(self.dtype or self.kernels[0].dtype)  # the compute dtype
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            x = x @ value(kernel, self.dtype) + value(bias, self.dtype)
            if i < len(self.kernels) - 1:
                x = self.act(x)
        return x, {}

    def __call__(self, x, train: bool = False):
        return self.forward(x, train=train)[0]


def num_params(config: MLPConfig) -> int:
    """Exact parameter count."""
    widths = [config.in_features] + [config.hidden_size] * config.num_layers + [config.outputs]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def flops_per_example(config: MLPConfig, seq_len: Optional[int] = None) -> float:
    """Training FLOPs for one example: 6 per kernel weight (forward 2, backward 4)."""
    widths = [config.in_features] + [config.hidden_size] * config.num_layers + [config.outputs]
    return 6.0 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


SPEC = register(ModelSpec(name="mlp", config_cls=MLPConfig, task="regress",
                          build=lambda config, rngs: MLP(config, rngs),
                          num_params=num_params, flops_per_example=flops_per_example))
