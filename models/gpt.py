"""GPT: a decoder-only transformer; with the defaults it is GPT-2's architecture exactly.

GPT-2: learned position embeddings, pre-norm blocks (layer norm before attention and MLP, one
more after the last block), GELU with the tanh approximation, biases everywhere, and an output
head tied to the token embedding. Options turn it into a current design: rotary positions
(``position: rotary``), RMSNorm (``norm: rmsnorm``), a SwiGLU MLP (``activation: swiglu``), no
biases (``use_bias: false``). Attention runs through ``jax.nn.dot_product_attention``
(``models._layers.causal_attention``: XLA's implementation on CPUs, cuDNN's fused kernel on GPUs
for bfloat16/float16 when it takes the shapes).

Logical axis names on the params (what ``parallel`` rules refer to):
  wte (vocab, embed); wpe (None, embed) (learned positions only); norms (embed,);
  attention qkv kernel (embed, None, heads, kv) with the None dim = q/k/v, bias (None, heads, kv);
  attention out kernel (heads, kv, embed), bias (embed,);
  mlp in kernel (embed, mlp), bias (mlp,); mlp out kernel (mlp, embed), bias (embed,);
  SwiGLU gate and up kernels (embed, mlp), down kernel (mlp, embed);
  untied head kernel (embed, vocab).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax.numpy as jnp
from flax import nnx

from models import _layers
from models._layers import LayerNorm, RMSNorm, SwiGLU, param, value
from models._registry import ModelSpec, register


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Options of ``model.name: gpt``.

    Attributes:
      vocab_size: number of token ids.
      block_size: longest sequence (rows of the position embedding).
      num_layers: transformer blocks.
      num_heads: attention heads; must divide ``hidden_size``.
      hidden_size: width of the residual stream.
      mlp_ratio: MLP width as a multiple of ``hidden_size``.
      tie_embeddings: the output head reuses the token embedding (GPT-2 does).
      use_bias: biases in the linear layers and layer norms (GPT-2 has them; RMSNorm and
        SwiGLU have none either way).
      activation: MLP nonlinearity: gelu_tanh (GPT-2), gelu, relu or silu; or swiglu, the gated
        MLP ``down(silu(x @ gate) * (x @ up))`` (three matrices of width
        ``mlp_ratio * hidden_size``).
      position: learned (GPT-2's position embedding, ``block_size`` rows) or rotary (rotary
        embeddings on queries and keys, no parameters).
      rope_theta: base of the rotary frequencies.
      norm: layernorm (GPT-2) or rmsnorm.
      layer_norm_epsilon: added to the variance (mean square) in the norms.
      param_dtype: dtype the params are created in.
      dtype: compute dtype; None computes in the params' dtype (the Trainer casts the params
        to ``train.compute_dtype`` before the forward pass, so None is what it uses).
      init_std: standard deviation of the normal initializers; residual output projections use
        ``init_std / sqrt(2 * num_layers)`` as in GPT-2.
    """

    vocab_size: int = 256
    block_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    hidden_size: int = 256
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    use_bias: bool = True
    activation: str = "gelu_tanh"
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    layer_norm_epsilon: float = 1e-5
    param_dtype: str = "float32"
    dtype: Optional[str] = None
    init_std: float = 0.02

    def __post_init__(self):
        _layers.check_positive(vocab_size=self.vocab_size, block_size=self.block_size,
                               num_layers=self.num_layers, num_heads=self.num_heads,
                               hidden_size=self.hidden_size, mlp_ratio=self.mlp_ratio,
                               layer_norm_epsilon=self.layer_norm_epsilon, init_std=self.init_std,
                               rope_theta=self.rope_theta)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads}); change one of them")
        _layers.check_choice("activation", self.activation, (*_layers.ACTIVATIONS, "swiglu"))
        _layers.check_choice("position", self.position, POSITIONS)
        _layers.check_choice("norm", self.norm, NORMS)
        if self.position == "rotary" and (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"rotary positions need an even head size; hidden_size / num_heads "
                             f"is {self.hidden_size // self.num_heads}")
        _layers.check_choice("param_dtype", self.param_dtype, _layers.DTYPES)
        if self.dtype is not None:
            _layers.check_choice("dtype", self.dtype, _layers.DTYPES)


POSITIONS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")


def make_norm(config: GPTConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The norm ``config.norm`` names over ``hidden_size``."""
    pd = _layers.DTYPES[config.param_dtype]
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.layer_norm_epsilon, pd, rngs)
    return LayerNorm(config.hidden_size, config.layer_norm_epsilon, config.use_bias, pd, rngs)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention through ``jax.nn.dot_product_attention``; softmax in
    float32; rotary positions on queries and keys if the config says so."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        e, n = config.hidden_size, config.num_heads
        d = e // n
        pd = _layers.DTYPES[config.param_dtype]
        normal = _layers.normal(config.init_std)
        out_normal = _layers.normal(config.init_std / math.sqrt(2 * config.num_layers))
        self.dtype = _layers.to_dtype(config.dtype)
        self.qkv_kernel = param(rngs, normal, (e, 3, n, d), ("embed", None, "heads", "kv"), pd)
        self.out_kernel = param(rngs, out_normal, (n, d, e), ("heads", "kv", "embed"), pd)
        bias = config.use_bias
        zeros = nnx.initializers.zeros
        self.qkv_bias = param(rngs, zeros, (3, n, d), (None, "heads", "kv"), pd) if bias else None
        self.out_bias = param(rngs, zeros, (e,), ("embed",), pd) if bias else None
        self.inv_freq = (tuple(float(f) for f in _layers.rope_inverse_frequencies(d, config.rope_theta))
                         if config.position == "rotary" else None)  # static, hashable

    def __call__(self, x):
        qkv = jnp.einsum("bte,ecnd->cbtnd", x, value(self.qkv_kernel, self.dtype))  # (3, B, T, N, D)
        if self.qkv_bias is not None:
            qkv = qkv + value(self.qkv_bias, self.dtype)[:, None, None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.inv_freq is not None:
            q, k = _layers.apply_rotary(q, self.inv_freq), _layers.apply_rotary(k, self.inv_freq)
        y = _layers.causal_attention(q, k, v)  # (B, T, N, D)
        y = jnp.einsum("btnd,nde->bte", y, value(self.out_kernel, self.dtype))  # (B, T, E)
        if self.out_bias is not None:
            y = y + value(self.out_bias, self.dtype)
        return y


class Mlp(nnx.Module):
    """Position-wise two-layer MLP; returns ``(y, {})`` like the MoE layer."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.hidden_size * config.mlp_ratio
        pd = _layers.DTYPES[config.param_dtype]
        self.dtype = _layers.to_dtype(config.dtype)
        self.act = _layers.ACTIVATIONS[config.activation]
        normal = _layers.normal(config.init_std)
        out_normal = _layers.normal(config.init_std / math.sqrt(2 * config.num_layers))
        self.fc_kernel = param(rngs, normal, (e, m), ("embed", "mlp"), pd)
        self.proj_kernel = param(rngs, out_normal, (m, e), ("mlp", "embed"), pd)
        bias = config.use_bias
        self.fc_bias = param(rngs, nnx.initializers.zeros, (m,), ("mlp",), pd) if bias else None
        self.proj_bias = param(rngs, nnx.initializers.zeros, (e,), ("embed",), pd) if bias else None

    def __call__(self, x, train: bool = False):
        h = x @ value(self.fc_kernel, self.dtype)  # (B, T, M)
        if self.fc_bias is not None:
            h = h + value(self.fc_bias, self.dtype)
        y = self.act(h) @ value(self.proj_kernel, self.dtype)  # (B, T, E)
        if self.proj_bias is not None:
            y = y + value(self.proj_bias, self.dtype)
        return y, {}


def make_mlp(config: GPTConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The dense feed-forward layer: ``Mlp``, or ``SwiGLU`` for ``activation: swiglu``."""
    if config.activation != "swiglu":
        return Mlp(config, rngs)
    e = config.hidden_size
    return SwiGLU(e, e * config.mlp_ratio, _layers.DTYPES[config.param_dtype],
                  _layers.to_dtype(config.dtype), config.init_std,
                  config.init_std / math.sqrt(2 * config.num_layers), rngs)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + ffn(ln_2(x))``."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs, ffn: Optional[nnx.Module] = None):
        self.ln_1 = make_norm(config, rngs)
        self.attn = CausalSelfAttention(config, rngs)
        self.ln_2 = make_norm(config, rngs)
        self.ffn = ffn if ffn is not None else make_mlp(config, rngs)

    def __call__(self, x, train: bool = False):
        x = x + self.attn(self.ln_1(x))
        y, aux = self.ffn(self.ln_2(x), train=train)
        return x + y, aux


class GPT(nnx.Module):
    """Tokens ``int32[B, T]`` -> logits ``[B, T, vocab_size]``."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs, blocks: Optional[list] = None):
        pd = _layers.DTYPES[config.param_dtype]
        e = config.hidden_size
        self.config = config
        self.dtype = _layers.to_dtype(config.dtype)
        normal = _layers.normal(config.init_std)
        self.wte = param(rngs, normal, (config.vocab_size, e), ("vocab", "embed"), pd)
        self.wpe = (param(rngs, normal, (config.block_size, e), (None, "embed"), pd)
                    if config.position == "learned" else None)
        self.blocks = nnx.List(blocks if blocks is not None
                               else [Block(config, rngs) for _ in range(config.num_layers)])
        self.ln_f = make_norm(config, rngs)
        self.lm_head = None if config.tie_embeddings else param(
            rngs, normal, (e, config.vocab_size), ("embed", "vocab"), pd)

    def forward(self, tokens, train: bool = False):
        """Runs the model.

        Args:
          tokens: int array ``[B, T]`` with ``T <= block_size``.
          train: training mode; GPT and MoE compute the same in both (no dropout, and MoE
            routing is deterministic), it is passed on for feed-forward layers that differ.

        Returns:
          ``(logits [B, T, vocab_size], aux_losses)``; ``aux_losses`` is a dict of scalars
          (summed over layers) that the Trainer adds to the loss, ``{}`` for a plain GPT.
        """
        t = tokens.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}; "
                             f"use shorter sequences or a model with a larger block_size")
        wte = value(self.wte, self.dtype)
        x = wte[tokens]  # (B, T, E)
        if self.wpe is not None:
            x = x + value(self.wpe, self.dtype)[:t]
        aux_losses: dict = {}
        for block in self.blocks:
            x, aux = block(x, train=train)
            for name, loss in aux.items():
                aux_losses[name] = aux_losses.get(name, 0.0) + loss
        x = self.ln_f(x)
        if self.lm_head is None:
            logits = jnp.einsum("bte,ve->btv", x, wte)  # (B, T, V)
        else:
            logits = x @ value(self.lm_head, self.dtype)  # (B, T, V)
        return logits, aux_losses

    def __call__(self, tokens, train: bool = False):
        return self.forward(tokens, train=train)[0]


def mlp_params(config: GPTConfig) -> int:
    """Parameters of the dense feed-forward layer (MLP with biases if any, or SwiGLU)."""
    e, m, b = config.hidden_size, config.hidden_size * config.mlp_ratio, int(config.use_bias)
    return 3 * e * m if config.activation == "swiglu" else 2 * e * m + b * (m + e)


def norm_params(config: GPTConfig) -> int:
    """Parameters of one norm: scale, and a bias for a layer norm with ``use_bias``."""
    has_bias = config.norm == "layernorm" and config.use_bias
    return config.hidden_size * (1 + int(has_bias))


def block_params(config: GPTConfig, with_mlp: bool = True) -> int:
    """Parameters of one block (attention, norms, and the dense MLP if ``with_mlp``)."""
    e, b = config.hidden_size, int(config.use_bias)
    attn = 4 * e * e + b * 4 * e
    return attn + 2 * norm_params(config) + (mlp_params(config) if with_mlp else 0)


def embedding_params(config: GPTConfig) -> int:
    """Token (and learned position) embeddings, final norm, and the untied head if any."""
    e = config.hidden_size
    head = 0 if config.tie_embeddings else e * config.vocab_size
    positions = config.block_size * e if config.position == "learned" else 0
    return config.vocab_size * e + positions + norm_params(config) + head


def num_params(config: GPTConfig) -> int:
    """Exact parameter count of a GPT with ``config``."""
    return embedding_params(config) + config.num_layers * block_params(config)


def attention_flops(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs of the attention scores and weighted sum for one sequence, all layers.

    Counted over the full ``T x T`` score matrix (as Megatron/Alpa count), times 3 for
    forward + backward: ``3 * 2 * 2 * L * T^2 * E``.
    """
    return 12.0 * config.num_layers * seq_len * seq_len * config.hidden_size


def flops_per_example(config: GPTConfig, seq_len: Optional[int] = None) -> float:
    """Training FLOPs (forward + backward = 3x forward) for one sequence of ``seq_len`` tokens.

    ``6 * T * (matmul params)`` for the dense layers (including the output head), plus
    attention; embedding lookups, norms and biases are not counted. For GPT-2 sizes this is
    ``72 B T L E^2 (1 + T / (6E)) + 6 B T E V`` per batch, the formula Alpa reports.
    """
    t = config.block_size if seq_len is None else seq_len
    e, m = config.hidden_size, config.hidden_size * config.mlp_ratio
    mlp = (3 if config.activation == "swiglu" else 2) * e * m
    matmul_params = config.num_layers * (4 * e * e + mlp) + e * config.vocab_size
    return 6.0 * t * matmul_params + attention_flops(config, t)


SPEC = register(ModelSpec(name="gpt", config_cls=GPTConfig, task="lm",
                          build=lambda config, rngs: GPT(config, rngs),
                          num_params=num_params, flops_per_example=flops_per_example))
