"""Hugging Face GPT-2 -> shardax GPT: config translation and weight layout conversion.

Hugging Face's GPT-2 stores its linear layers as ``Conv1D`` (``y = x @ W + b``, ``W`` is
``[in, out]``), fuses q, k, v into one ``[E, 3E]`` matrix with each of q/k/v split into heads of
``E / heads`` consecutive columns. Reshaping gives shardax's ``[E, 3, heads, head_dim]``.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import _layers
from models.gpt import GPT, GPTConfig

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}


def config_from_hf(hf_config) -> GPTConfig:
    """The ``GPTConfig`` equivalent to a ``transformers.GPT2Config``; raises on what GPT lacks."""
    e = hf_config.n_embd
    inner = hf_config.n_inner if hf_config.n_inner is not None else 4 * e
    if inner % e:
        raise ValueError(f"GPT2Config.n_inner ({inner}) must be a multiple of n_embd ({e}): "
                         f"shardax's GPT sets the MLP width as hidden_size * mlp_ratio")
    act = hf_config.activation_function
    if act not in _ACTIVATIONS:
        raise ValueError(f"GPT2Config.activation_function {act!r} is not supported; "
                         f"supported: {', '.join(_ACTIVATIONS)}")
    unsupported = {"scale_attn_weights": (getattr(hf_config, "scale_attn_weights", True), True),
                   "scale_attn_by_inverse_layer_idx":
                       (getattr(hf_config, "scale_attn_by_inverse_layer_idx", False), False)}
    for name, (got, wanted) in unsupported.items():
        if got != wanted:
            raise ValueError(f"GPT2Config.{name}={got} is not supported; only {name}={wanted} "
                             f"(GPT-2's own setting) converts exactly")
    return GPTConfig(vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
                     num_layers=hf_config.n_layer, num_heads=hf_config.n_head, hidden_size=e,
                     mlp_ratio=inner // e,
                     tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
                     use_bias=True, activation=_ACTIVATIONS[act],
                     layer_norm_epsilon=float(hf_config.layer_norm_epsilon))


def _to_numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch tensor
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor)


def convert(state_dict, hf_config) -> GPT:
    """See ``models.gpt.from_hf_gpt2``."""
    config = config_from_hf(hf_config)
    weights = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    e, n = config.hidden_size, config.num_heads
    dtype = _layers.DTYPES[config.param_dtype]

    def get(key, shape):
        if key not in weights:
            raise ValueError(f"state_dict has no {key!r} (nor 'transformer.{key}'); pass the "
                             f"state_dict of a GPT2LMHeadModel built from this config")
        array = _to_numpy(weights[key])
        if array.size != int(np.prod(shape)):
            raise ValueError(f"state_dict[{key!r}] has shape {array.shape}, which does not fit "
                             f"{shape} from the config; check that hf_config matches the weights")
        return jnp.asarray(array.reshape(shape), dtype)

    def norm(prefix):
        return {"scale": get(f"{prefix}.weight", (e,)), "bias": get(f"{prefix}.bias", (e,))}

    def block(i):
        p, m = f"h.{i}", e * config.mlp_ratio
        return {
            "ln_1": norm(f"{p}.ln_1"),
            "attn": {"qkv_kernel": get(f"{p}.attn.c_attn.weight", (e, 3, n, e // n)),
                     "qkv_bias": get(f"{p}.attn.c_attn.bias", (3, n, e // n)),
                     "out_kernel": get(f"{p}.attn.c_proj.weight", (n, e // n, e)),
                     "out_bias": get(f"{p}.attn.c_proj.bias", (e,))},
            "ln_2": norm(f"{p}.ln_2"),
            "ffn": {"fc_kernel": get(f"{p}.mlp.c_fc.weight", (e, m)),
                    "fc_bias": get(f"{p}.mlp.c_fc.bias", (m,)),
                    "proj_kernel": get(f"{p}.mlp.c_proj.weight", (m, e)),
                    "proj_bias": get(f"{p}.mlp.c_proj.bias", (e,))},
        }

    params = {"wte": get("wte.weight", (config.vocab_size, e)),
              "wpe": get("wpe.weight", (config.block_size, e)),
              "blocks": {i: block(i) for i in range(config.num_layers)},
              "ln_f": norm("ln_f")}
    if not config.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", (config.vocab_size, e)).T  # (E, V)

    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(config, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
