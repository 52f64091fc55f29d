"""Building blocks shared by the models: named params, norms, rotary embeddings, attention, dtypes."""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
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


def normal(stddev: float):
    """``nnx.initializers.normal(stddev)`` with the same values, drawn as one flat vector and
    reshaped: XLA's CPU compiler takes seconds for a random draw of a few hundred elements in
    3 or 4 dimensions (a GPT's q/k/v kernel), well under one for the flat draw (JAX's threefry
    numbers the bits by flat index, so the values are equal)."""
    def init(key, shape, dtype=jnp.float32):
        flat = jax.random.normal(key, (math.prod(shape),), dtype) * jnp.asarray(stddev, dtype)
        return flat.reshape(shape)

    return init


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


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis (Llama's): ``x / rms(x) * scale``, no bias.

    The statistics are taken in float32; the normalized value is cast back to the input's dtype
    before the scale multiplies it, as Hugging Face's Llama does.

    Args:
      size: length of the last axis.
      eps: added to the mean square.
      param_dtype: dtype of ``scale``.
      rngs: unused by the ones initializer, taken for a uniform signature.
      names: logical axis name of the last axis (``("embed",)``; ``("kv",)`` on heads).
    """

    def __init__(self, size: int, eps: float, param_dtype, rngs: nnx.Rngs, names=("embed",)):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (size,), names, param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                             factor: float = 1.0, low_freq_factor: float = 1.0,
                             high_freq_factor: float = 4.0,
                             original_max_position: int = 8192) -> np.ndarray:
    """The rotary embedding's ``head_dim / 2`` inverse frequencies (float32, numpy).

    ``theta ** (-2i / head_dim)``, then scaled by ``rope_type``:
      - ``"default"``: unscaled.
      - ``"linear"``: all divided by ``factor`` (positions interpolated).
      - ``"llama3"``: Llama 3.1's scaling: wavelengths longer than
        ``original_max_position / low_freq_factor`` are divided by ``factor``, those shorter
        than ``original_max_position / high_freq_factor`` kept, the ones between interpolated.

    Computed in float32 as Hugging Face's ``modeling_rope_utils`` computes them.
    """
    check_choice("rope_type", rope_type, ROPE_TYPES)
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(factor)
    elif rope_type == "llama3":
        low_wavelen = original_max_position / low_freq_factor
        high_wavelen = original_max_position / high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = ((original_max_position / wavelen - low_freq_factor)
                  / (high_freq_factor - low_freq_factor)).astype(np.float32)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


ROPE_TYPES = ("default", "linear", "llama3")


def apply_rotary(x, inv_freq, offset: int = 0):
    """Rotates ``x`` ``[B, T, heads, head_dim]`` by its positions ``offset .. offset + T - 1``.

    Hugging Face's layout ("rotate half"): dimension ``i`` pairs with ``i + head_dim / 2``.
    The rotation is computed in float32; the result has ``x``'s dtype. The angles
    (``position * inv_freq`` in float32, as Hugging Face computes them) and their cosines and
    sines are constants of the program when ``inv_freq`` is (a tuple, a numpy array or a concrete
    JAX array): computed once on the host, not per element and per step on the device.
    """
    t, half = x.shape[1], x.shape[-1] // 2
    if isinstance(inv_freq, jax.core.Tracer):  # frequencies computed inside the program
        positions = jnp.arange(offset, offset + t, dtype=jnp.float32)
        angles = positions[:, None] * inv_freq.astype(jnp.float32)[None, :]  # (T, D/2)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
    else:
        positions = np.arange(offset, offset + t, dtype=np.float32)
        angles = positions[:, None] * np.asarray(inv_freq, np.float32)[None, :]  # (T, D/2)
        cos = jnp.asarray(np.cos(angles.astype(np.float64)), jnp.float32)
        sin = jnp.asarray(np.sin(angles.astype(np.float64)), jnp.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_attention(q, k, v, window: Optional[int] = None, implementation: str = "auto"):
    """Causal (optionally sliding-window) attention through ``jax.nn.dot_product_attention``.

    Args:
      q: queries ``[B, T, heads, head_dim]``.
      k, v: keys and values ``[B, T, kv_heads, head_dim]``; ``heads`` a multiple of
        ``kv_heads`` (grouped-query attention: query head ``h`` reads key/value head
        ``h // (heads / kv_heads)``).
      window: each position attends to itself and the ``window - 1`` before it (Mistral's
        ``sliding_window``); None: to every earlier position.
      implementation: ``"xla"`` (any device), ``"cudnn"`` (cuDNN's fused flash attention:
        NVIDIA GPUs, bfloat16/float16), or ``"auto"``: cuDNN on a GPU when it takes these
        shapes and dtype, else XLA.

    Returns:
      ``[B, T, heads, head_dim]``; the softmax is taken in float32.
    """
    check_choice("attention implementation", implementation, ATTENTION_IMPLEMENTATIONS)
    local = None if window is None else (window - 1, 0)
    run = lambda impl: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                    local_window_size=local, implementation=impl)
    if implementation == "auto":
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return run("cudnn")
            except (ValueError, NotImplementedError, RuntimeError):  # shapes cuDNN does not take
                pass
        return run("xla")
    return run(implementation)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


class SwiGLU(nnx.Module):
    """Llama's MLP: ``down(silu(x @ gate) * (x @ up))``; returns ``(y, {})`` like the MoE layer.

    Params: ``gate_kernel`` and ``up_kernel`` ``(embed, mlp)``, ``down_kernel`` ``(mlp, embed)``.

    Args:
      size: width of the input and output.
      hidden: width of the gated hidden layer (Hugging Face's ``intermediate_size``).
      param_dtype: dtype the params are created in.
      dtype: compute dtype (None: the params' dtype).
      init_std: standard deviation of ``gate`` and ``up``; ``out_std`` that of ``down``.
    """

    def __init__(self, size: int, hidden: int, param_dtype, dtype, init_std: float,
                 out_std: float, rngs: nnx.Rngs):
        normal_, out_normal = normal(init_std), normal(out_std)
        self.dtype = dtype
        self.gate_kernel = param(rngs, normal_, (size, hidden), ("embed", "mlp"), param_dtype)
        self.up_kernel = param(rngs, normal_, (size, hidden), ("embed", "mlp"), param_dtype)
        self.down_kernel = param(rngs, out_normal, (hidden, size), ("mlp", "embed"), param_dtype)

    def __call__(self, x, train: bool = False):
        gate = x @ value(self.gate_kernel, self.dtype)  # (B, T, M)
        up = x @ value(self.up_kernel, self.dtype)  # (B, T, M)
        return (jax.nn.silu(gate) * up) @ value(self.down_kernel, self.dtype), {}  # (B, T, E)
