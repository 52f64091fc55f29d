"""Where each shardax parameter lives in a Hugging Face checkpoint, and in which layout.

A ``Tensor`` says: shardax's leaf at ``path`` equals the Hugging Face tensor ``name`` (shape
``hf_shape``) reshaped to ``view`` and transposed by ``perm``. Torch's ``nn.Linear`` stores
``[out, in]``, so a Llama q projection ``[heads * head_dim, embed]`` is viewed as
``[heads, head_dim, embed]`` and transposed to shardax's ``[embed, heads, head_dim]``. GPT-2's
``Conv1D`` stores ``[in, out]``: only reshapes.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Tensor:
    path: tuple  # keys into the params pure dict
    name: str  # the Hugging Face tensor name (with the usual "model." / "transformer." prefix)
    hf_shape: tuple
    view: tuple
    perm: tuple

    def groups(self) -> list[tuple[int, ...]]:
        """For each dim of ``hf_shape``, the dims of ``view`` it splits into."""
        out, v = [], 0
        for size in self.hf_shape:
            start, prod = v, 1
            while v == start or prod < size:
                prod *= self.view[v]
                v += 1
            if prod != size:
                raise AssertionError(f"{self.name}: view {self.view} does not split {self.hf_shape}")
            out.append(tuple(range(start, v)))
        return out

    def to_shardax(self, array):
        return array.reshape(self.view).transpose(self.perm)

    def to_hf(self, array):
        inverse = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
        return array.transpose(inverse).reshape(self.hf_shape)


def layout(name: str, config) -> list[Tensor]:
    """The tensors of registry model ``name`` (``"llama"`` or ``"gpt"``) with ``config``."""
    return _llama(config) if name == "llama" else _gpt2(config)


def _same(path, name, shape) -> Tensor:
    return Tensor(tuple(path), name, tuple(shape), tuple(shape), tuple(range(len(shape))))


def _transposed(path, name, shape) -> Tensor:  # shardax (a, b) <- torch Linear (b, a)
    return Tensor(tuple(path), name, (shape[1], shape[0]), (shape[1], shape[0]), (1, 0))


def _llama(c) -> list[Tensor]:
    e, n, k, d, m, v = (c.hidden_size, c.num_heads, c.kv_heads, c.heads_dim, c.intermediate_size,
                        c.vocab_size)
    out = [_same(["embed"], "model.embed_tokens.weight", (v, e)),
           _same(["norm", "scale"], "model.norm.weight", (e,))]
    if not c.tie_embeddings:
        out.append(_transposed(["lm_head"], "lm_head.weight", (e, v)))
    for i in range(c.num_layers):
        p, a = f"model.layers.{i}.", ["blocks", i, "attn"]
        out += [_same(["blocks", i, "attn_norm", "scale"], p + "input_layernorm.weight", (e,)),
                _same(["blocks", i, "mlp_norm", "scale"], p + "post_attention_layernorm.weight", (e,))]
        for proj, heads in (("q", n), ("k", k), ("v", k)):
            out.append(Tensor((*a, f"{proj}_kernel"), f"{p}self_attn.{proj}_proj.weight",
                              (heads * d, e), (heads, d, e), (2, 0, 1)))
            if c.qkv_bias:
                out.append(Tensor((*a, f"{proj}_bias"), f"{p}self_attn.{proj}_proj.bias",
                                  (heads * d,), (heads, d), (0, 1)))
        out.append(Tensor((*a, "o_kernel"), f"{p}self_attn.o_proj.weight", (e, n * d), (e, n, d),
                          (1, 2, 0)))
        if c.out_bias:
            out.append(_same((*a, "o_bias"), f"{p}self_attn.o_proj.bias", (e,)))
        if c.qk_norm:
            out += [_same((*a, "q_norm", "scale"), f"{p}self_attn.q_norm.weight", (d,)),
                    _same((*a, "k_norm", "scale"), f"{p}self_attn.k_norm.weight", (d,))]
        mlp = ["blocks", i, "mlp"]
        out += [_transposed((*mlp, "gate_kernel"), f"{p}mlp.gate_proj.weight", (e, m)),
                _transposed((*mlp, "up_kernel"), f"{p}mlp.up_proj.weight", (e, m)),
                _transposed((*mlp, "down_kernel"), f"{p}mlp.down_proj.weight", (m, e))]
    return out


def _gpt2(c) -> list[Tensor]:
    e, n, v = c.hidden_size, c.num_heads, c.vocab_size
    d, m = e // n, e * c.mlp_ratio
    t = "transformer."
    out = [_same(["wte"], t + "wte.weight", (v, e)), _same(["wpe"], t + "wpe.weight", (c.block_size, e)),
           _same(["ln_f", "scale"], t + "ln_f.weight", (e,)), _same(["ln_f", "bias"], t + "ln_f.bias", (e,))]
    if not c.tie_embeddings:
        out.append(_transposed(["lm_head"], "lm_head.weight", (e, v)))
    for i in range(c.num_layers):
        p, b = f"{t}h.{i}.", ["blocks", i]
        for ln in ("ln_1", "ln_2"):
            out += [_same((*b, ln, "scale"), f"{p}{ln}.weight", (e,)),
                    _same((*b, ln, "bias"), f"{p}{ln}.bias", (e,))]
        out += [Tensor((*b, "attn", "qkv_kernel"), p + "attn.c_attn.weight", (e, 3 * e), (e, 3, n, d),
                       (0, 1, 2, 3)),
                Tensor((*b, "attn", "qkv_bias"), p + "attn.c_attn.bias", (3 * e,), (3, n, d), (0, 1, 2)),
                Tensor((*b, "attn", "out_kernel"), p + "attn.c_proj.weight", (e, e), (n, d, e), (0, 1, 2)),
                _same((*b, "attn", "out_bias"), p + "attn.c_proj.bias", (e,)),
                _same((*b, "ffn", "fc_kernel"), p + "mlp.c_fc.weight", (e, m)),
                _same((*b, "ffn", "fc_bias"), p + "mlp.c_fc.bias", (m,)),
                _same((*b, "ffn", "proj_kernel"), p + "mlp.c_proj.weight", (m, e)),
                _same((*b, "ffn", "proj_bias"), p + "mlp.c_proj.bias", (e,))]
    return out


# Tensors some checkpoints carry that hold no parameter (buffers saved by older versions).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def prefixes(name: str) -> list[str]:
    """``name`` and the same name without its base-model prefix (checkpoints of a base model)."""
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix):
            return [name, name[len(prefix):]]
    return [name]


def nbytes(tensor: Tensor, itemsize: int) -> int:
    return math.prod(tensor.hf_shape) * itemsize
