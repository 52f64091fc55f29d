"""MoE: a GPT whose MLP is a GShard-style mixture of experts every ``moe_every``-th layer.

Routing follows GShard (Lepikhin et al. 2020), made deterministic: tokens are split into
groups of ``expert_group_size``; within a group each token goes to its top-2 experts, each
expert takes at most ``capacity = ceil(capacity_factor * 2 * group_size / num_experts)``
tokens (in token order, first choices before second choices), and overflowing tokens are
dropped from that expert (the residual connection carries them). The load-balancing loss
``num_experts * sum_e(mean_gate_e * fraction_routed_first_e)`` (1.0 when balanced) is scaled
by ``aux_loss_weight``, summed over MoE layers, and returned as ``aux["moe_aux_loss"]``.

Expert weights are single batched arrays ``[experts, ...]`` with the logical axis ``expert``
first, so a sharding solver can split them over devices (expert parallelism):
  experts wi (expert, embed, mlp), bi (expert, mlp), wo (expert, mlp, embed), bo (expert, embed);
  router kernel (embed, None). Everything else is named as in ``models.gpt``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models import _layers, gpt
from models._layers import param, value
from models._registry import ModelSpec, register


@dataclasses.dataclass(frozen=True)
class MoEConfig(gpt.GPTConfig):
    """Options of ``model.name: moe``: every ``GPTConfig`` option plus the expert layers'.

    Attributes:
      num_experts: experts per MoE layer.
      expert_group_size: tokens routed together (GShard's group size S); capacity is per group.
        When ``batch * seq_len`` is not a multiple, the largest divisor below it is used.
      capacity_factor: slack on the even share ``2 * group_size / num_experts`` of each expert.
      moe_every: every ``moe_every``-th block (the 2nd, 4th, ... for 2) has an MoE MLP.
      aux_loss_weight: weight of the load-balancing loss of each MoE layer.
    """

    num_experts: int = 8
    expert_group_size: int = 2048
    capacity_factor: float = 1.25
    moe_every: int = 2
    aux_loss_weight: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if self.activation == "swiglu":
            raise ValueError("activation must be one of " + ", ".join(_layers.ACTIVATIONS)
                             + " for moe (its experts are two-matrix MLPs); got 'swiglu'")
        _layers.check_positive(num_experts=self.num_experts, expert_group_size=self.expert_group_size,
                               capacity_factor=self.capacity_factor, moe_every=self.moe_every)
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be at least 2 for top-2 routing, got {self.num_experts}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be zero or positive, got {self.aux_loss_weight}")

    @property
    def num_moe_layers(self) -> int:
        """How many blocks have an MoE MLP."""
        return self.num_layers // self.moe_every

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` (0-based) has an MoE MLP."""
        return index % self.moe_every == self.moe_every - 1


def group_size_for(config: MoEConfig, num_tokens: int) -> int:
    """The routing group size for ``num_tokens`` tokens: the largest divisor <= expert_group_size."""
    limit = min(config.expert_group_size, num_tokens)
    return next(g for g in range(limit, 0, -1) if num_tokens % g == 0)


def capacity_for(config: MoEConfig, group_size: int) -> int:
    """Tokens each expert takes per group: ``ceil(capacity_factor * 2 * group_size / experts)``."""
    return max(1, math.ceil(config.capacity_factor * 2 * group_size / config.num_experts))


def route_top2(logits, capacity: int):
    """GShard top-2 routing within groups.

    Args:
      logits: router logits ``[groups, S, experts]``.
      capacity: tokens each expert accepts per group.

    Returns:
      ``(combine [groups, S, experts, capacity] float32, aux_loss scalar)``: ``combine`` holds
      each token's normalized gate weight at its (expert, slot), zero where it was not routed.
    """
    num_experts = logits.shape[-1]
    gates = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # (G, S, X)
    first = jax.nn.one_hot(jnp.argmax(gates, -1), num_experts)  # (G, S, X)
    second = jax.nn.one_hot(jnp.argmax(gates * (1 - first), -1), num_experts)
    aux_loss = num_experts * jnp.mean(jnp.sum(gates.mean(1) * first.mean(1), -1))
    gate_1, gate_2 = jnp.sum(gates * first, -1), jnp.sum(gates * second, -1)  # (G, S)
    norm = gate_1 + gate_2
    gate_1, gate_2 = gate_1 / norm, gate_2 / norm
    # Slots in arrival order; second choices queue behind all first choices of the group.
    slot_1 = jnp.cumsum(first, 1) - first  # (G, S, X)
    first = first * (slot_1 < capacity)
    slot_2 = jnp.cumsum(second, 1) - second + jnp.sum(first, 1, keepdims=True)
    second = second * (slot_2 < capacity)
    slot_1 = jax.nn.one_hot(jnp.sum(slot_1 * first, -1).astype(jnp.int32), capacity)  # (G, S, C)
    slot_2 = jax.nn.one_hot(jnp.sum(slot_2 * second, -1).astype(jnp.int32), capacity)
    combine = (gate_1[..., None, None] * first[..., None] * slot_1[:, :, None]
               + gate_2[..., None, None] * second[..., None] * slot_2[:, :, None])  # (G, S, X, C)
    return combine, aux_loss


class MoEMlp(nnx.Module):
    """Mixture of expert MLPs with top-2 routing; returns ``(y, {"moe_aux_loss": ...})``."""

    def __init__(self, config: MoEConfig, rngs: nnx.Rngs):
        e, m, x = config.hidden_size, config.hidden_size * config.mlp_ratio, config.num_experts
        pd = _layers.DTYPES[config.param_dtype]
        self.config = config
        self.dtype = _layers.to_dtype(config.dtype)
        self.act = _layers.ACTIVATIONS[config.activation]
        normal = _layers.normal(config.init_std)
        out_normal = _layers.normal(config.init_std / math.sqrt(2 * config.num_layers))
        zeros = nnx.initializers.zeros
        self.router = param(rngs, normal, (e, x), ("embed", None), pd)
        self.wi = param(rngs, normal, (x, e, m), ("expert", "embed", "mlp"), pd)
        self.wo = param(rngs, out_normal, (x, m, e), ("expert", "mlp", "embed"), pd)
        bias = config.use_bias
        self.bi = param(rngs, zeros, (x, m), ("expert", "mlp"), pd) if bias else None
        self.bo = param(rngs, zeros, (x, e), ("expert", "embed"), pd) if bias else None

    def __call__(self, x, train: bool = False):
        b, t, e = x.shape
        group = group_size_for(self.config, b * t)
        tokens = x.reshape(-1, group, e)  # (G, S, E)
        logits = tokens.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # (G, S, X)
        combine, aux_loss = route_top2(logits, capacity_for(self.config, group))
        combine = combine.astype(x.dtype)
        dispatch = (combine > 0).astype(x.dtype)
        expert_in = jnp.einsum("gsxc,gse->xgce", dispatch, tokens)  # (X, G, C, E)
        h = jnp.einsum("xgce,xem->xgcm", expert_in, value(self.wi, self.dtype))  # (X, G, C, M)
        if self.bi is not None:
            h = h + value(self.bi, self.dtype)[:, None, None]
        out = jnp.einsum("xgcm,xme->xgce", self.act(h), value(self.wo, self.dtype))  # (X, G, C, E)
        if self.bo is not None:
            out = out + value(self.bo, self.dtype)[:, None, None]
        y = jnp.einsum("gsxc,xgce->gse", combine, out).reshape(b, t, e)  # (B, T, E)
        return y, {"moe_aux_loss": self.config.aux_loss_weight * aux_loss}


def build(config: MoEConfig, rngs: nnx.Rngs) -> gpt.GPT:
    """A GPT whose blocks ``moe_every - 1, 2 * moe_every - 1, ...`` have an ``MoEMlp``."""
    blocks = [gpt.Block(config, rngs, ffn=MoEMlp(config, rngs) if config.is_moe_layer(i) else None)
              for i in range(config.num_layers)]
    return gpt.GPT(config, rngs, blocks=blocks)


def num_params(config: MoEConfig) -> int:
    """Exact parameter count: a GPT's, with every MoE layer's MLP replaced by experts + router."""
    dense_mlp = gpt.block_params(config) - gpt.block_params(config, with_mlp=False)
    moe_mlp = config.num_experts * dense_mlp + config.hidden_size * config.num_experts
    return gpt.num_params(config) + config.num_moe_layers * (moe_mlp - dense_mlp)


def flops_per_example(config: MoEConfig, seq_len: Optional[int] = None) -> float:
    """Training FLOPs (3x forward) of one sequence, counting what the layers compute.

    Per token, forward: dense blocks and the head as in ``models.gpt``; an MoE layer adds the
    router ``2 E X``, the dispatch and combine einsums ``2 * 2 X C E`` (each contracts a group
    of S tokens into X * C expert slots of width E) and the experts ``X C / S * 4 E M`` (every
    slot is computed, filled or not), C being the capacity for groups of ``expert_group_size``.
    """
    t = config.block_size if seq_len is None else seq_len
    e, m, x = config.hidden_size, config.hidden_size * config.mlp_ratio, config.num_experts
    group = config.expert_group_size  # groups span sequences when batch * T >= group size
    capacity = capacity_for(config, group)
    slots_per_token = x * capacity / group
    dense = config.num_layers - config.num_moe_layers
    per_token = (2 * (config.num_layers * 4 * e * e + dense * 2 * e * m + e * config.vocab_size)
                 + config.num_moe_layers * (2 * e * x + 4 * x * capacity * e + 4 * slots_per_token * e * m))
    return 3.0 * t * per_token + gpt.attention_flops(config, t)


SPEC = register(ModelSpec(name="moe", config_cls=MoEConfig, task="lm", build=build,
                          num_params=num_params, flops_per_example=flops_per_example))
