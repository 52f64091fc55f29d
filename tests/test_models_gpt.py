"""The GPT's attention through jax.nn.dot_product_attention equals the explicit softmax formula it
replaced; its current-design options (rotary, RMSNorm, SwiGLU, no biases) compute what a Llama
with the same weights computes, with exact closed-form counts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models

MODERN = dict(vocab_size=50, block_size=16, num_layers=2, num_heads=2, hidden_size=8,
              position="rotary", norm="rmsnorm", activation="swiglu", mlp_ratio=3, use_bias=False)
call = nnx.jit(lambda model, x: model(x))


def random_model(name, options, seed=1):
    """A registry model with every parameter (norm scales and biases too) drawn with numpy: no
    per-shape initializer is compiled."""
    abstract = nnx.eval_shape(lambda: models.create_model(name, options, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    drawn = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape) + (x.ndim == 1)).astype(x.dtype),
                         nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, drawn)
    return nnx.merge(graphdef, params, rest)


def explicit_attention(attn, x):
    """The GPT's attention before it used jax.nn.dot_product_attention (GPT-2, learned positions):
    scores in full, a causal mask of float32's minimum, softmax in float32."""
    t, d = x.shape[1], attn.qkv_kernel.shape[-1]
    qkv = jnp.einsum("bte,ecnd->cbtnd", x, attn.qkv_kernel[...]) + attn.qkv_bias[...][:, None, None]
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / math.sqrt(d)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), dtype=bool)), scores, jnp.finfo(jnp.float32).min)
    y = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
    return jnp.einsum("btnd,nde->bte", y, attn.out_kernel[...]) + attn.out_bias[...]


def test_attention_equals_the_explicit_formula():
    model = random_model("gpt", dict(MODERN, position="learned", norm="layernorm",
                                     activation="gelu_tanh", use_bias=True))
    attn = model.blocks[0].attn
    x = np.random.default_rng(2).normal(size=(3, 16, 8)).astype(np.float32)
    expected = np.asarray(nnx.jit(explicit_attention)(attn, x))
    got = np.asarray(nnx.jit(lambda attn, x: attn(x))(attn, x))
    assert np.abs(expected).max() > 0.5  # not a comparison of near-zero arrays
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


def llama_with_the_weights_of(gpt):
    """A Llama (full multi-head attention) holding ``gpt``'s weights under Llama's names."""
    c = gpt.config
    llama = random_model("llama", dict(
        vocab_size=c.vocab_size, block_size=c.block_size, num_layers=c.num_layers,
        hidden_size=c.hidden_size, num_heads=c.num_heads,
        intermediate_size=c.hidden_size * c.mlp_ratio, rope_theta=c.rope_theta,
        norm_eps=c.layer_norm_epsilon, tie_embeddings=c.tie_embeddings))
    p = nnx.to_pure_dict(nnx.state(gpt, nnx.Param))

    def block(b):
        qkv = b["attn"]["qkv_kernel"]
        return {"attn_norm": b["ln_1"], "mlp_norm": b["ln_2"], "mlp": b["ffn"],
                "attn": {"q_kernel": qkv[:, 0], "k_kernel": qkv[:, 1], "v_kernel": qkv[:, 2],
                         "o_kernel": b["attn"]["out_kernel"]}}

    weights = {"embed": p["wte"], "norm": p["ln_f"],
               "blocks": {i: block(b) for i, b in p["blocks"].items()}}
    if "lm_head" in p:
        weights["lm_head"] = p["lm_head"]
    graphdef, params, rest = nnx.split(llama, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, weights)
    return nnx.merge(graphdef, params, rest)


def test_rotary_rmsnorm_swiglu_gpt_equals_llama_with_its_weights():
    gpt = random_model("gpt", dict(MODERN, tie_embeddings=False))  # untied: the head maps too
    tokens = np.random.default_rng(3).integers(0, 50, size=(2, 16)).astype(np.int32)
    expected = np.asarray(call(llama_with_the_weights_of(gpt), tokens))
    logits = np.asarray(call(gpt, tokens))
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    # causal, and rotary positions make the order of earlier tokens matter
    swapped = tokens.copy()
    swapped[:, [3, 5]] = tokens[:, [5, 3]]
    other = np.asarray(call(gpt, swapped))
    np.testing.assert_allclose(other[:, :3], logits[:, :3], atol=1e-6, rtol=0)
    assert np.abs(other[:, 6:] - logits[:, 6:]).max() > 1e-3


def test_modern_counts_and_names():
    # V=50, E=8, L=2, M=3*8=24, no position embedding, no biases:
    #   embedding 50*8 = 400; final RMSNorm 8
    #   per block: qkv 8*24 = 192, out 64, two RMSNorms 16, SwiGLU 3*8*24 = 576 -> 848
    #   total 400 + 8 + 2*848 = 2104
    # FLOPs (T=16): matmul params 2*(4*64 + 576) + 8*50 = 2064 -> 6*16*2064 = 198144,
    #   attention 12*2*16*16*8 = 49152 -> 247296
    spec = models.get_spec("gpt")
    model = nnx.eval_shape(lambda: models.create_model("gpt", MODERN, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == 2104
    assert spec.num_params(models.make_config("gpt", MODERN)) == 2104
    assert spec.flops_per_example(models.make_config("gpt", MODERN), 16) == 247296.0
    names = nnx.to_pure_dict(jax.tree.map(
        lambda v: v.replace(v.get_metadata().get("out_sharding")), params,
        is_leaf=lambda v: isinstance(v, nnx.Variable)))
    assert "wpe" not in names and names["ln_f"] == {"scale": ("embed",)}
    assert names["blocks"][0]["ffn"] == {"gate_kernel": ("embed", "mlp"), "up_kernel": ("embed", "mlp"),
                                         "down_kernel": ("mlp", "embed")}
    # every mix of the options: the closed form equals the model
    for options in [dict(MODERN, use_bias=True, tie_embeddings=False),
                    dict(MODERN, norm="layernorm", activation="relu"),
                    dict(MODERN, norm="layernorm", use_bias=True, position="learned"),
                    dict(MODERN, activation="gelu", use_bias=True)]:
        abstract = nnx.eval_shape(lambda: models.create_model("gpt", options, rngs=nnx.Rngs(0)))
        count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert count == spec.num_params(models.make_config("gpt", options)), options


@pytest.mark.parametrize("options, message", [
    (dict(position="absolute"), "position must be one of learned, rotary; got 'absolute'"),
    (dict(norm="batchnorm"), "norm must be one of layernorm, rmsnorm; got 'batchnorm'"),
    (dict(activation="geglu"), "activation must be one of gelu_tanh, gelu, relu, silu, swiglu"),
    (dict(hidden_size=6, num_heads=2), "rotary positions need an even head size; "
                                       "hidden_size / num_heads is 3"),
])
def test_bad_options_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        models.make_config("gpt", dict(MODERN, **options))


def test_moe_refuses_swiglu_experts():
    with pytest.raises(ValueError, match="activation must be one of gelu_tanh, gelu, relu, silu for "
                                         "moe .its experts are two-matrix MLPs.; got 'swiglu'"):
        models.make_config("moe", dict(activation="swiglu"))


@pytest.mark.parametrize("options, message", [
    (dict(MODERN, use_bias=True), "a GPT with position=rotary has no Hugging Face GPT-2 equivalent"),
    (dict(MODERN, use_bias=True, position="learned"),
     "a GPT with norm=rmsnorm has no Hugging Face GPT-2 equivalent"),
    (dict(MODERN, use_bias=True, position="learned", norm="layernorm"),
     "a GPT with activation=swiglu has no Hugging Face GPT-2 equivalent"),
])
def test_export_refuses_what_gpt2_cannot_express(options, message):
    import models.hf

    with pytest.raises(models.hf.HFError, match=message):
        models.hf.hf_config("gpt", models.make_config("gpt", options))
