"""Llama: the decoder of Llama 2/3, Mistral, Qwen2 and Qwen3 (``model.name: llama``).

Pre-norm blocks with RMSNorm, rotary position embeddings (with Llama 3's frequency scaling),
grouped-query attention through ``jax.nn.dot_product_attention`` (optionally with a sliding
window, Mistral's), a SwiGLU MLP, and an output head tied to the embedding or not. Qwen2 adds
biases to q/k/v (``qkv_bias``); Qwen3 normalizes each query and key head (``qk_norm``).
With the matching options the logits equal Hugging Face's for the same weights
(``models.hf`` reads and writes them).

Logical axis names on the params (what ``parallel`` rules refer to):
  embed (vocab, embed); norms (embed,); q kernel (embed, heads, kv); k and v kernels
  (embed, heads, kv) over the key/value heads; out kernel (heads, kv, embed); q/k/v biases
  (heads, kv); out bias (embed,); q/k norms (kv,); mlp gate and up (embed, mlp), down
  (mlp, embed); untied head (embed, vocab).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax.numpy as jnp
from flax import nnx

from models import _layers
from models._layers import RMSNorm, SwiGLU, param, value
from models._registry import ModelSpec, register

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Options of ``model.name: llama``.

    Attributes:
      vocab_size: number of token ids (rows of the embedding).
      block_size: longest sequence (Hugging Face's ``max_position_embeddings``).
      num_layers: transformer blocks.
      hidden_size: width of the residual stream.
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention); must divide ``num_heads``.
        None: as many as ``num_heads``.
      head_dim: width of one head; None: ``hidden_size // num_heads``.
      intermediate_size: width of the SwiGLU hidden layer.
      rope_theta: base of the rotary frequencies.
      rope_type: ``default``, ``linear`` or ``llama3`` (Llama 3.1's frequency scaling).
      rope_factor: the scaling factor of ``linear`` and ``llama3``.
      rope_low_freq_factor, rope_high_freq_factor: ``llama3``'s wavelength bounds.
      rope_original_max_position: ``llama3``'s pretraining context length; None: block_size.
      norm_eps: added to the mean square in RMSNorm.
      tie_embeddings: the output head reuses the embedding.
      qkv_bias: biases on the q, k and v projections (Qwen2).
      out_bias: a bias on the attention's output projection.
      qk_norm: RMSNorm over each query and key head before the rotation (Qwen3).
      sliding_window: each position attends to the last ``sliding_window`` positions
        (itself included) in layers ``sliding_window_start`` and later; None: all earlier ones.
      sliding_window_start: the first layer with the sliding window (Qwen's
        ``max_window_layers``; Mistral's is 0).
      attention: ``auto`` (cuDNN's fused kernel on GPUs when it applies, else XLA), ``xla``
        or ``cudnn``.
      family: the Hugging Face architecture this model is written as on export: llama,
        mistral, qwen2 or qwen3 (set by import; it changes nothing in the math).
      param_dtype: dtype the params are created in.
      dtype: compute dtype; None computes in the params' dtype (what the Trainer uses).
      init_std: standard deviation of the normal initializers; output projections use
        ``init_std / sqrt(2 * num_layers)``.
    """

    vocab_size: int = 256
    block_size: int = 128
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: int = 768
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: Optional[int] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    sliding_window_start: int = 0
    attention: str = "auto"
    family: str = "llama"
    param_dtype: str = "float32"
    dtype: Optional[str] = None
    init_std: float = 0.02

    def __post_init__(self):
        _layers.check_positive(
            vocab_size=self.vocab_size, block_size=self.block_size, num_layers=self.num_layers,
            hidden_size=self.hidden_size, num_heads=self.num_heads,
            intermediate_size=self.intermediate_size, rope_theta=self.rope_theta,
            rope_factor=self.rope_factor, norm_eps=self.norm_eps, init_std=self.init_std)
        for name in ("num_kv_heads", "head_dim", "rope_original_max_position", "sliding_window"):
            if getattr(self, name) is not None:
                _layers.check_positive(**{name: getattr(self, name)})
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads}), or set head_dim")
        if self.heads_dim % 2:
            raise ValueError(f"the head width ({self.heads_dim}) must be even for rotary "
                             "embeddings; change head_dim or num_heads")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads ({self.kv_heads}) must divide num_heads "
                             f"({self.num_heads}); change one of them")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                             f"rope_low_freq_factor ({self.rope_low_freq_factor})")
        if not 0 <= self.sliding_window_start:
            raise ValueError(f"sliding_window_start must be >= 0, got {self.sliding_window_start}")
        _layers.check_choice("rope_type", self.rope_type, _layers.ROPE_TYPES)
        _layers.check_choice("attention", self.attention, _layers.ATTENTION_IMPLEMENTATIONS)
        _layers.check_choice("family", self.family, FAMILIES)
        _layers.check_choice("param_dtype", self.param_dtype, _layers.DTYPES)
        if self.dtype is not None:
            _layers.check_choice("dtype", self.dtype, _layers.DTYPES)

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads (``num_kv_heads`` or ``num_heads``)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def heads_dim(self) -> int:
        """The width of one head (``head_dim`` or ``hidden_size // num_heads``)."""
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    def inverse_frequencies(self):
        """The rotary embedding's inverse frequencies (numpy float32, ``head_dim / 2``)."""
        return _layers.rope_inverse_frequencies(
            self.heads_dim, self.rope_theta, self.rope_type, self.rope_factor,
            self.rope_low_freq_factor, self.rope_high_freq_factor,
            self.rope_original_max_position or self.block_size)

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of block ``layer`` (None: full causal attention)."""
        return self.sliding_window if layer >= self.sliding_window_start else None


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig, layer: int, rngs: nnx.Rngs):
        e, n, k, d = config.hidden_size, config.num_heads, config.kv_heads, config.heads_dim
        pd = _layers.DTYPES[config.param_dtype]
        normal = _layers.normal(config.init_std)
        out_normal = _layers.normal(config.init_std / math.sqrt(2 * config.num_layers))
        zeros = nnx.initializers.zeros
        self.dtype = _layers.to_dtype(config.dtype)
        self.window = config.window(layer)
        self.implementation = config.attention
        self.inv_freq = tuple(float(f) for f in config.inverse_frequencies())  # static, hashable
        self.q_kernel = param(rngs, normal, (e, n, d), ("embed", "heads", "kv"), pd)
        self.k_kernel = param(rngs, normal, (e, k, d), ("embed", "heads", "kv"), pd)
        self.v_kernel = param(rngs, normal, (e, k, d), ("embed", "heads", "kv"), pd)
        self.o_kernel = param(rngs, out_normal, (n, d, e), ("heads", "kv", "embed"), pd)
        bias = config.qkv_bias
        self.q_bias = param(rngs, zeros, (n, d), ("heads", "kv"), pd) if bias else None
        self.k_bias = param(rngs, zeros, (k, d), ("heads", "kv"), pd) if bias else None
        self.v_bias = param(rngs, zeros, (k, d), ("heads", "kv"), pd) if bias else None
        self.o_bias = param(rngs, zeros, (e,), ("embed",), pd) if config.out_bias else None
        norm = config.qk_norm
        self.q_norm = RMSNorm(d, config.norm_eps, pd, rngs, names=("kv",)) if norm else None
        self.k_norm = RMSNorm(d, config.norm_eps, pd, rngs, names=("kv",)) if norm else None

    def __call__(self, x):
        q = self._heads(x, self.q_kernel, self.q_bias, self.q_norm)  # (B, T, N, D)
        k = self._heads(x, self.k_kernel, self.k_bias, self.k_norm)  # (B, T, K, D)
        v = self._heads(x, self.v_kernel, self.v_bias, None)  # (B, T, K, D)
        q, k = _layers.apply_rotary(q, self.inv_freq), _layers.apply_rotary(k, self.inv_freq)
        y = _layers.causal_attention(q, k, v, self.window, self.implementation)  # (B, T, N, D)
        y = jnp.einsum("btnd,nde->bte", y, value(self.o_kernel, self.dtype))  # (B, T, E)
        if self.o_bias is not None:
            y = y + value(self.o_bias, self.dtype)
        return y

    def _heads(self, x, kernel, bias, norm):
        y = jnp.einsum("bte,end->btnd", x, value(kernel, self.dtype))
        if bias is not None:
            y = y + value(bias, self.dtype)
        return y if norm is None else norm(y)


class Block(nnx.Module):
    """``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, config: LlamaConfig, layer: int, rngs: nnx.Rngs):
        pd = _layers.DTYPES[config.param_dtype]
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps, pd, rngs)
        self.attn = Attention(config, layer, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps, pd, rngs)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, pd,
                          _layers.to_dtype(config.dtype), config.init_std,
                          config.init_std / math.sqrt(2 * config.num_layers), rngs)

    def __call__(self, x, train: bool = False):
        x = x + self.attn(self.attn_norm(x))
        y, aux = self.mlp(self.mlp_norm(x), train=train)
        return x + y, aux


class Llama(nnx.Module):
    """Tokens ``int32[B, T]`` -> logits ``[B, T, vocab_size]``."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        pd = _layers.DTYPES[config.param_dtype]
        e = config.hidden_size
        self.config = config
        self.dtype = _layers.to_dtype(config.dtype)
        normal = _layers.normal(config.init_std)
        self.embed = param(rngs, normal, (config.vocab_size, e), ("vocab", "embed"), pd)
        self.blocks = nnx.List([Block(config, i, rngs) for i in range(config.num_layers)])
        self.norm = RMSNorm(e, config.norm_eps, pd, rngs)
        self.lm_head = None if config.tie_embeddings else param(
            rngs, normal, (e, config.vocab_size), ("embed", "vocab"), pd)

    def forward(self, tokens, train: bool = False):
        """Runs the model.

        Args:
          tokens: int array ``[B, T]`` with ``T <= block_size``.
          train: training mode (the model computes the same in both: no dropout).

        Returns:
          ``(logits [B, T, vocab_size], {})``.
        """
        t = tokens.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}; "
                             f"use shorter sequences or a model with a larger block_size")
        embed = value(self.embed, self.dtype)
        x = embed[tokens]  # (B, T, E)
        for block in self.blocks:
            x, _ = block(x, train=train)
        x = self.norm(x)
        if self.lm_head is None:
            return jnp.einsum("bte,ve->btv", x, embed), {}  # (B, T, V)
        return x @ value(self.lm_head, self.dtype), {}  # (B, T, V)

    def __call__(self, tokens, train: bool = False):
        return self.forward(tokens, train=train)[0]


def block_params(config: LlamaConfig) -> int:
    """Parameters of one block: attention (with biases and q/k norms), MLP, two norms."""
    e, n, k, d = config.hidden_size, config.num_heads, config.kv_heads, config.heads_dim
    attn = 2 * e * n * d + 2 * e * k * d
    attn += int(config.qkv_bias) * (n + 2 * k) * d + int(config.out_bias) * e
    attn += int(config.qk_norm) * 2 * d
    return attn + 3 * e * config.intermediate_size + 2 * e


def num_params(config: LlamaConfig) -> int:
    """Exact parameter count of a Llama with ``config``."""
    e, v = config.hidden_size, config.vocab_size
    head = 0 if config.tie_embeddings else e * v
    return v * e + head + e + config.num_layers * block_params(config)


def flops_per_example(config: LlamaConfig, seq_len: Optional[int] = None) -> float:
    """Training FLOPs (forward + backward = 3x forward) for one sequence of ``seq_len`` tokens.

    ``6 * T * (matmul params)`` for the projections, the MLP and the output head, plus the
    attention scores and weighted sum over the full ``T x T`` matrix (what XLA computes; a
    sliding window masks it): ``3 * 2 * 2 * L * T^2 * heads * head_dim``. Norms, rotations,
    biases and the embedding lookup are not counted.
    """
    t = config.block_size if seq_len is None else seq_len
    e, n, k, d = config.hidden_size, config.num_heads, config.kv_heads, config.heads_dim
    per_layer = 2 * e * n * d + 2 * e * k * d + 3 * e * config.intermediate_size
    matmul_params = config.num_layers * per_layer + e * config.vocab_size
    return 6.0 * t * matmul_params + 12.0 * config.num_layers * t * t * n * d


SPEC = register(ModelSpec(name="llama", config_cls=LlamaConfig, task="lm",
                          build=lambda config, rngs: Llama(config, rngs),
                          num_params=num_params, flops_per_example=flops_per_example))
