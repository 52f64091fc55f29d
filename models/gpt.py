"""GPT: a decoder-only transformer; with the defaults it is GPT-2's architecture exactly.

GPT-2: learned position embeddings, pre-norm blocks (layer norm before attention and MLP, one
more after the last block), GELU with the tanh approximation, biases everywhere, and an output
head tied to the token embedding.

Logical axis names on the params (what ``parallel`` rules refer to):
  wte (vocab, embed); wpe (None, embed); layer norms (embed,);
  attention qkv kernel (embed, None, heads, kv) with the None dim = q/k/v, bias (None, heads, kv);
  attention out kernel (heads, kv, embed), bias (embed,);
  mlp in kernel (embed, mlp), bias (mlp,); mlp out kernel (mlp, embed), bias (embed,);
  untied head kernel (embed, vocab).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models import _layers
from models._layers import LayerNorm, param, value
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
      use_bias: biases in the linear layers and layer norms (GPT-2 has them).
      activation: MLP nonlinearity: gelu_tanh (GPT-2), gelu, relu or silu.
      layer_norm_epsilon: added to the variance in layer norms.
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
    layer_norm_epsilon: float = 1e-5
    param_dtype: str = "float32"
    dtype: Optional[str] = None
    init_std: float = 0.02

    def __post_init__(self):
        _layers.check_positive(vocab_size=self.vocab_size, block_size=self.block_size,
                               num_layers=self.num_layers, num_heads=self.num_heads,
                               hidden_size=self.hidden_size, mlp_ratio=self.mlp_ratio,
                               layer_norm_epsilon=self.layer_norm_epsilon, init_std=self.init_std)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads}); change one of them")
        _layers.check_choice("activation", self.activation, _layers.ACTIVATIONS)
        _layers.check_choice("param_dtype", self.param_dtype, _layers.DTYPES)
        if self.dtype is not None:
            _layers.check_choice("dtype", self.dtype, _layers.DTYPES)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention; softmax in float32."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        e, n = config.hidden_size, config.num_heads
        d = e // n
        pd = _layers.DTYPES[config.param_dtype]
        normal = nnx.initializers.normal(config.init_std)
        out_normal = nnx.initializers.normal(config.init_std / math.sqrt(2 * config.num_layers))
        self.dtype = _layers.to_dtype(config.dtype)
        self.qkv_kernel = param(rngs, normal, (e, 3, n, d), ("embed", None, "heads", "kv"), pd)
        self.out_kernel = param(rngs, out_normal, (n, d, e), ("heads", "kv", "embed"), pd)
        bias = config.use_bias
        zeros = nnx.initializers.zeros
        self.qkv_bias = param(rngs, zeros, (3, n, d), (None, "heads", "kv"), pd) if bias else None
        self.out_bias = param(rngs, zeros, (e,), ("embed",), pd) if bias else None

    def __call__(self, x):
        t, d = x.shape[1], self.qkv_kernel.shape[-1]
        qkv = jnp.einsum("bte,ecnd->cbtnd", x, value(self.qkv_kernel, self.dtype))  # (3, B, T, N, D)
        if self.qkv_bias is not None:
            qkv = qkv + value(self.qkv_bias, self.dtype)[:, None, None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / math.sqrt(d)  # (B, N, T, T)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        y = jnp.einsum("bnqk,bknd->bqnd", probs, v)  # (B, T, N, D)
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
        normal = nnx.initializers.normal(config.init_std)
        out_normal = nnx.initializers.normal(config.init_std / math.sqrt(2 * config.num_layers))
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


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + ffn(ln_2(x))``."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs, ffn: Optional[nnx.Module] = None):
        pd = _layers.DTYPES[config.param_dtype]
        eps, bias = config.layer_norm_epsilon, config.use_bias
        self.ln_1 = LayerNorm(config.hidden_size, eps, bias, pd, rngs)
        self.attn = CausalSelfAttention(config, rngs)
        self.ln_2 = LayerNorm(config.hidden_size, eps, bias, pd, rngs)
        self.ffn = ffn if ffn is not None else Mlp(config, rngs)

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
        normal = nnx.initializers.normal(config.init_std)
        self.wte = param(rngs, normal, (config.vocab_size, e), ("vocab", "embed"), pd)
        self.wpe = param(rngs, normal, (config.block_size, e), (None, "embed"), pd)
        self.blocks = nnx.List(blocks if blocks is not None
                               else [Block(config, rngs) for _ in range(config.num_layers)])
        self.ln_f = LayerNorm(e, config.layer_norm_epsilon, config.use_bias, pd, rngs)
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
        x = wte[tokens] + value(self.wpe, self.dtype)[:t]  # (B, T, E)
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


def block_params(config: GPTConfig, with_mlp: bool = True) -> int:
    """Parameters of one block (attention, layer norms, and the dense MLP if ``with_mlp``)."""
    e, m, b = config.hidden_size, config.hidden_size * config.mlp_ratio, int(config.use_bias)
    attn = 4 * e * e + b * 4 * e
    norms = 2 * e * (1 + b)
    mlp = 2 * e * m + b * (m + e)
    return attn + norms + (mlp if with_mlp else 0)


def embedding_params(config: GPTConfig) -> int:
    """Token and position embeddings, final layer norm, and the untied head if any."""
    e = config.hidden_size
    head = 0 if config.tie_embeddings else e * config.vocab_size
    return config.vocab_size * e + config.block_size * e + e * (1 + int(config.use_bias)) + head


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
    matmul_params = config.num_layers * (4 * e * e + 2 * e * m) + e * config.vocab_size
    return 6.0 * t * matmul_params + attention_flops(config, t)


SPEC = register(ModelSpec(name="gpt", config_cls=GPTConfig, task="lm",
                          build=lambda config, rngs: GPT(config, rngs),
                          num_params=num_params, flops_per_example=flops_per_example))
