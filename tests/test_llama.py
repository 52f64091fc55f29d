"""Llama: parameter and FLOP counts, axis names, causality, sliding window, rotary frequencies.

Logits against Hugging Face's Llama, Mistral, Qwen2 and Qwen3 are in tests/test_hf_models.py.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import _layers

SMALL = dict(vocab_size=50, block_size=16, num_layers=2, hidden_size=16, num_heads=4,
             num_kv_heads=2, intermediate_size=24)
call = nnx.jit(lambda model, x: model(x))


def param_count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(options):
    return nnx.eval_shape(lambda: models.create_model("llama", options, rngs=nnx.Rngs(0)))


def random_model(options, seed=0):
    """A Llama with normal(0, 0.3) weights drawn by numpy (no initializer to compile)."""
    graphdef, state = nnx.split(abstract_model(options))
    rng = np.random.default_rng(seed)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("extra, expected", [
    # V=50, E=16, N=4, K=2, D=4, M=24, L=2, untied:
    #   embed 800 + head 800 + final norm 16 = 1616
    #   per block: q 256 + k 128 + v 128 + o 256 = 768; mlp 3*16*24 = 1152; norms 32 -> 1952
    #   total 1616 + 2*1952 = 5520
    ({}, 5520),
    # tied head (-800), q/k/v biases (4+2+2)*4 = 32 and out bias 16 per block, q/k norms 2*4
    #   per block: 1952 + 32 + 16 + 8 = 2008 -> 816 + 4016 = 4832
    ({"tie_embeddings": True, "qkv_bias": True, "out_bias": True, "qk_norm": True}, 4832),
])
def test_param_count(extra, expected):
    options = dict(SMALL, **extra)
    model = abstract_model(options)
    assert models.get_spec("llama").num_params(models.make_config("llama", options)) == expected
    assert param_count(model) == expected


def test_flops_closed_form_and_xla():
    options = dict(vocab_size=512, block_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   hidden_size=128, intermediate_size=384)
    # per layer: q and o 2*128*128 = 32,768, k and v 2*128*64 = 16,384, mlp 3*128*384 = 147,456
    #   -> 196,608; two layers 393,216 + head 128*512 = 65,536 -> 458,752 matmul params;
    #   6*128*458,752 = 352,321,536 plus attention 12*2*128^2*128 = 50,331,648.
    config = models.make_config("llama", options)
    closed_form = models.get_spec("llama").flops_per_example(config, 128)
    assert closed_form == 402_653_184
    graphdef, params = nnx.split(abstract_model(options))
    loss = lambda params, tokens: nnx.merge(graphdef, params)(tokens).sum()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(nnx.to_pure_dict(params),
                                                      jax.ShapeDtypeStruct((1, 128), jnp.int32))
    # XLA also counts norms, rotations and the softmax: within 2.5%.
    assert abs(lowered.cost_analysis()["flops"] / closed_form - 1) < 0.025


def test_logical_axis_names():
    model = abstract_model(dict(SMALL, qkv_bias=True, qk_norm=True))
    is_var = lambda v: isinstance(v, nnx.Variable)
    names = nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(v.get_metadata().get("out_sharding")),
                                          nnx.state(model, nnx.Param), is_leaf=is_var))
    assert names["embed"] == ("vocab", "embed")
    assert names["lm_head"] == ("embed", "vocab")
    assert names["norm"] == {"scale": ("embed",)}
    block = names["blocks"][1]
    assert block["attn"] == {
        "q_kernel": ("embed", "heads", "kv"), "k_kernel": ("embed", "heads", "kv"),
        "v_kernel": ("embed", "heads", "kv"), "o_kernel": ("heads", "kv", "embed"),
        "q_bias": ("heads", "kv"), "k_bias": ("heads", "kv"), "v_bias": ("heads", "kv"),
        "q_norm": {"scale": ("kv",)}, "k_norm": {"scale": ("kv",)}}
    assert block["mlp"] == {"gate_kernel": ("embed", "mlp"), "up_kernel": ("embed", "mlp"),
                            "down_kernel": ("mlp", "embed")}


@pytest.mark.parametrize("window", [None, 4])
def test_causal_and_sliding_window(window):
    # One layer: the output at position q sees tokens max(0, q - window + 1) .. q and no others.
    options = dict(SMALL, num_layers=1, sliding_window=window)
    model = random_model(options)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 7) % 50)
    diff = np.abs(np.asarray(call(model, tokens) - call(model, changed))).max(axis=(0, 2))  # (T,)
    sees = np.array([q >= 5 and (window is None or q - 5 < window) for q in range(16)])
    assert (diff[sees] > 1e-4).all(), diff
    assert (diff[~sees] <= 1e-6).all(), diff


def test_sliding_window_start_layer():
    # Window 2 from layer 1 on: with two layers, position 10 sees token 5 only through layer
    # 0's full attention; with the window on both layers (start 0) it does not see it at all.
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 50)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 7) % 50)
    for start, sees in ((1, True), (0, False)):
        model = random_model(dict(SMALL, sliding_window=2, sliding_window_start=start))
        diff = float(jnp.abs(call(model, tokens) - call(model, changed))[0, 10].max())
        assert (diff > 1e-4) == sees, (start, diff)


def test_rope_frequencies():
    # head_dim 8, theta 10000: 1, 0.1, 0.01, 0.001
    np.testing.assert_allclose(_layers.rope_inverse_frequencies(8, 10000.0), [1, 0.1, 0.01, 0.001],
                               rtol=1e-6)
    np.testing.assert_allclose(_layers.rope_inverse_frequencies(8, 10000.0, "linear", 4.0),
                               [0.25, 0.025, 0.0025, 0.00025], rtol=1e-6)
    # llama3, factor 8, original context 1024, low/high frequency factors 1/4: wavelengths
    # 2*pi*(1, 10, 100, 1000) = 6.3, 62.8, 628.3, 6283.2; below 1024/4 = 256 kept, above 1024/1
    # divided by 8, 628.3 in between: s = (1024/628.3 - 1)/3, (1 - s) * 0.01/8 + s * 0.01.
    s = (1024 / (2 * math.pi * 100) - 1) / 3
    np.testing.assert_allclose(
        _layers.rope_inverse_frequencies(8, 10000.0, "llama3", 8.0, 1.0, 4.0, 1024),
        [1, 0.1, (1 - s) * 0.01 / 8 + s * 0.01, 0.001 / 8], rtol=1e-5)


def test_bfloat16_compute():
    model = random_model(dict(SMALL, dtype="bfloat16"))
    reference = random_model(SMALL)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    logits = call(model, tokens)
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(logits.astype(jnp.float32), call(reference, tokens), atol=0.05)


def test_config_errors():
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        models.make_config("llama", dict(SMALL, num_kv_heads=3))
    with pytest.raises(ValueError, match="rope_type must be one of default, linear, llama3; got 'yarn'"):
        models.make_config("llama", dict(SMALL, rope_type="yarn"))
    with pytest.raises(ValueError, match="family must be one of llama, mistral, qwen2, qwen3"):
        models.make_config("llama", dict(SMALL, family="gemma"))
    model = abstract_model(SMALL)
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        nnx.eval_shape(lambda: model(jnp.zeros((1, 17), jnp.int32)))
