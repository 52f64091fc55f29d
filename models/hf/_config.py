"""Hugging Face ``config.json`` <-> shardax registry model options.

Files written by transformers 4.x keep RoPE settings in top-level ``rope_theta`` and
``rope_scaling``; 5.x writes ``rope_parameters`` (``rope_theta`` inside). Both are read. Keys a
file leaves out take the defaults of the transformers class of its ``model_type`` (``save_pretrained``
may drop keys equal to them), listed in ``_DEFAULTS``.
"""
from __future__ import annotations

import json
from pathlib import Path


class HFError(ValueError):
    """A Hugging Face directory or config shardax cannot read; the message says why and the fix."""


LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = (*LLAMA_FAMILIES, "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}

# transformers' class defaults for the keys that change the math (identical in 4.x and 5.x).
_COMMON = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=None, head_dim=None,
               hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
               tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
               mlp_bias=False, sliding_window=None, use_sliding_window=False,
               max_window_layers=0)
_DEFAULTS = {
    "llama": _COMMON,
    "mistral": {**_COMMON, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016,
              "max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016, "head_dim": 128,
              "max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28},
}
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                     "relu": "relu", "silu": "silu", "swish": "silu"}


def read_json(directory) -> dict:
    """``directory/config.json`` as a dict.

    Raises:
      HFError: the directory or its ``config.json`` is missing or not JSON.
    """
    path = Path(directory)
    if not path.is_dir():
        raise HFError(f"{path} is not a directory; point model.from_pretrained at a Hugging Face "
                      "model directory (config.json and *.safetensors)")
    file = path / "config.json"
    if not file.is_file():
        raise HFError(f"{path} has no config.json; a Hugging Face model directory holds config.json "
                      "and *.safetensors (save one with model.save_pretrained(DIR))")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{file} is not valid JSON: {e}") from None


def model_type(config: dict) -> str:
    """The config's ``model_type`` if shardax supports it.

    Raises:
      HFError: naming the architecture and the supported ones.
    """
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        archs = config.get("architectures") or []
        named = f"{kind!r}" + (f" ({', '.join(archs)})" if archs else "")
        raise HFError(f"model_type {named} is not supported; shardax reads "
                      f"{', '.join(SUPPORTED)} ({', '.join(ARCHITECTURES[k] for k in SUPPORTED)})")
    return kind


def to_options(config: dict) -> tuple[str, dict]:
    """The registry ``(name, options)`` of the model a ``config.json`` describes.

    Raises:
      HFError: an unsupported architecture or setting (named, with what is supported).
    """
    kind = model_type(config)
    return ("gpt", _gpt2_options(config)) if kind == "gpt2" else ("llama", _llama_options(config, kind))


def _llama_options(config: dict, kind: str) -> dict:
    defaults = _DEFAULTS[kind]
    get = lambda key: config[key] if config.get(key) is not None else defaults[key]
    act = get("hidden_act")
    if act not in ("silu", "swish"):
        raise HFError(f"{kind} hidden_act {act!r} is not supported; shardax's Llama uses silu")
    if get("mlp_bias"):
        raise HFError(f"{kind} mlp_bias=true is not supported (biases on the MLP); shardax's "
                      "Llama has none")
    heads = get("num_attention_heads")
    options = dict(vocab_size=get("vocab_size"), block_size=get("max_position_embeddings"),
                   num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
                   num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or
                   defaults["num_key_value_heads"] or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads,
                   intermediate_size=get("intermediate_size"), norm_eps=float(get("rms_norm_eps")),
                   tie_embeddings=bool(get("tie_word_embeddings")), family=kind)
    options.update(_rope_options(config, kind, defaults))
    bias = bool(get("attention_bias")) and kind in ("llama", "qwen3")  # the others ignore it
    options.update(qkv_bias=bias or kind == "qwen2", out_bias=bias and kind != "qwen2",
                   qk_norm=kind == "qwen3")
    options.update(_sliding(config, kind, defaults, options["num_layers"]))
    return options


def _rope_options(config: dict, kind: str, defaults: dict) -> dict:
    """``rope_*`` options from 5.x ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params and any(
                isinstance(v, dict) for v in params.values()):
            raise HFError(f"{kind} rope_parameters per layer type ({params}) are not supported; "
                          "shardax's Llama uses one RoPE setting for every layer")
        theta = params.get("rope_theta", config.get("rope_theta", defaults["rope_theta"]))
        scaling = params
    else:
        theta = config.get("rope_theta", defaults["rope_theta"])
        scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if config.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFError(f"{kind} partial_rotary_factor != 1 is not supported")
    options = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type == "default":
        return options
    if rope_type not in ("linear", "llama3"):
        raise HFError(f"{kind} RoPE scaling {rope_type!r} is not supported; shardax reads "
                      "default, linear and llama3")
    options["rope_factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        options.update(
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_position=int(scaling.get("original_max_position_embeddings")
                                            or config.get("max_position_embeddings")
                                            or defaults["max_position_embeddings"]))
    return options


def _sliding(config: dict, kind: str, defaults: dict, num_layers: int) -> dict:
    """``sliding_window``/``sliding_window_start`` from Mistral's window or Qwen's layer types."""
    window = config.get("sliding_window", defaults["sliding_window"])
    if kind == "llama" or window is None:
        return {}
    if kind == "mistral":
        return dict(sliding_window=int(window))
    types = config.get("layer_types")
    if types is None:  # 4.x: the window applies from max_window_layers on, when enabled
        if not config.get("use_sliding_window", defaults["use_sliding_window"]):
            return {}
        start = config.get("max_window_layers", defaults["max_window_layers"])
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return {}
    if sliding != list(range(sliding[0], num_layers)):
        raise HFError(f"{kind} layer_types {types} put sliding-window layers between full ones; "
                      "shardax's Llama supports a window on every layer from one layer on")
    return dict(sliding_window=int(window), sliding_window_start=sliding[0])


def _gpt2_options(config: dict) -> dict:
    e = config.get("n_embd", 768)
    inner = config.get("n_inner") or 4 * e
    if inner % e:
        raise HFError(f"gpt2 n_inner ({inner}) must be a multiple of n_embd ({e}): shardax's GPT "
                      "sets the MLP width as hidden_size * mlp_ratio")
    act = config.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise HFError(f"gpt2 activation_function {act!r} is not supported; supported: "
                      f"{', '.join(_GPT2_ACTIVATIONS)}")
    for key, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
        if config.get(key, wanted) != wanted:
            raise HFError(f"gpt2 {key}={config[key]} is not supported; only {key}={wanted} "
                          "(GPT-2's own setting) converts exactly")
    return dict(vocab_size=config.get("vocab_size", 50257), block_size=config.get("n_positions", 1024),
                num_layers=config.get("n_layer", 12), num_heads=config.get("n_head", 12),
                hidden_size=e, mlp_ratio=inner // e,
                tie_embeddings=bool(config.get("tie_word_embeddings", True)), use_bias=True,
                activation=_GPT2_ACTIVATIONS[act],
                layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)))


def from_options(name: str, config, dtype: str = "float32") -> dict:
    """The ``config.json`` (transformers 5.x style) of registry model ``name`` with ``config``.

    Args:
      name: ``"llama"`` or ``"gpt"``.
      config: the model's config dataclass (``LlamaConfig`` or ``GPTConfig``).
      dtype: the dtype the weights are written in.

    Raises:
      HFError: the model uses something its Hugging Face class cannot express.
    """
    if name == "gpt":
        return _gpt2_json(config, dtype)
    if name != "llama":
        raise HFError(f"model {name!r} has no Hugging Face equivalent; export supports llama and gpt")
    kind = config.family
    problems = []
    if config.qk_norm != (kind == "qwen3"):
        problems.append(f"qk_norm={config.qk_norm}")
    if kind == "qwen2" and (not config.qkv_bias or config.out_bias):
        problems.append(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias} (qwen2 has "
                        "q/k/v biases and no output bias)")
    if kind in ("llama", "qwen3") and config.qkv_bias != config.out_bias:
        problems.append(f"qkv_bias={config.qkv_bias} with out_bias={config.out_bias} ({kind}'s "
                        "attention_bias sets both)")
    if kind == "mistral" and (config.qkv_bias or config.out_bias):
        problems.append("attention biases (mistral has none)")
    if kind == "llama" and config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window} (llama has none)")
    if kind == "mistral" and config.sliding_window is not None and config.sliding_window_start:
        problems.append(f"sliding_window_start={config.sliding_window_start} (mistral's window "
                        "covers every layer)")
    if problems:
        raise HFError(f"a {kind} model cannot have {'; '.join(problems)}; set model.family to "
                      f"the Hugging Face architecture that has them ({', '.join(LLAMA_FAMILIES)})")
    rope = {"rope_theta": config.rope_theta, "rope_type": config.rope_type}
    if config.rope_type != "default":
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_position
                    or config.block_size)
    out = dict(architectures=[ARCHITECTURES[kind]], model_type=kind,
               vocab_size=config.vocab_size, hidden_size=config.hidden_size,
               intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
               num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
               head_dim=config.heads_dim, hidden_act="silu",
               max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
               tie_word_embeddings=config.tie_embeddings, rope_parameters=rope, dtype=dtype)
    if kind in ("llama", "qwen3"):
        out["attention_bias"] = config.qkv_bias
    if kind == "llama":
        out["mlp_bias"] = False
    if kind == "mistral":
        out["sliding_window"] = config.sliding_window
    if kind in ("qwen2", "qwen3"):
        window = config.sliding_window
        start = config.sliding_window_start if window is not None else config.num_layers
        out.update(use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=start,
                   layer_types=["sliding_attention" if window is not None and i >= start
                                else "full_attention" for i in range(config.num_layers)])
    return out


def _gpt2_json(config, dtype: str) -> dict:
    inverse = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
    if not config.use_bias:
        raise HFError("a GPT without biases (use_bias=false) has no Hugging Face GPT-2 equivalent")
    for key, gpt2 in (("position", "learned"), ("norm", "layernorm")):
        if getattr(config, key) != gpt2:
            raise HFError(f"a GPT with {key}={getattr(config, key)} has no Hugging Face GPT-2 "
                          f"equivalent (GPT-2 has {key}={gpt2})")
    if config.activation not in inverse:
        raise HFError(f"a GPT with activation={config.activation} has no Hugging Face GPT-2 "
                      f"equivalent (GPT-2's are {', '.join(inverse)})")
    return dict(architectures=[ARCHITECTURES["gpt2"]], model_type="gpt2",
                vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.hidden_size,
                n_layer=config.num_layers, n_head=config.num_heads,
                n_inner=config.hidden_size * config.mlp_ratio,
                activation_function=inverse[config.activation],
                layer_norm_epsilon=config.layer_norm_epsilon,
                tie_word_embeddings=config.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, dtype=dtype)
