"""Building blocks shared by the models: named params, layer norm, activations, dtypes."""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

ACTIVATIONS: dict[str, Callable] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's "gelu_new"
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def check_choice(field: str, value, choices) -> None:
    """Raises ValueError if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_positive(**values) -> None:
    """Raises ValueError naming the first argument that is not a positive number."""
    for field, value in values.items():
        if value <= 0:
            raise ValueError(f"{field} must be positive, got {value!r}")


def to_dtype(name: Optional[str]):
    """``"bfloat16"`` -> ``jnp.bfloat16``; ``None`` stays ``None``."""
    return None if name is None else DTYPES[name]


def param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    """A parameter initialized by ``init`` whose dims carry the logical axis ``names``.

    The names are metadata only (``out_sharding``; eager sharding off): ``parallel`` maps them
    to mesh axes and places the params, so a model can be built with or without a mesh.
    """
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, dtype))


def value(p: nnx.Param, dtype):
    """The array of ``p``, cast to the compute ``dtype`` when one is set."""
    x = p[...]
    return x if dtype is None else x.astype(dtype)


class LayerNorm(nnx.Module):
    """Layer norm over the last axis; statistics in float32, output in the input's dtype."""

    def __init__(self, size: int, eps: float, use_bias: bool, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (size,), ("embed",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (size,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)
