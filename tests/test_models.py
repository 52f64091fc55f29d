"""GPT and MLP: shapes, causality, parameter counts, axis names, registry errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models

SMALL_GPT = dict(vocab_size=50, block_size=16, num_layers=2, num_heads=2, hidden_size=8)

# One compiled program per call instead of one per operation (eager mode is slow to compile).
forward = nnx.jit(lambda model, x: model.forward(x))
call = nnx.jit(lambda model, x: model(x))


def param_count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def axis_names(model) -> dict:
    is_var = lambda v: isinstance(v, nnx.Variable)
    state = jax.tree.map(lambda v: v.replace(v.get_metadata().get("out_sharding")),
                         nnx.state(model, nnx.Param), is_leaf=is_var)
    return nnx.to_pure_dict(state)


def test_gpt_logits_shape_and_no_aux():
    model = models.create_model("gpt", SMALL_GPT, rngs=nnx.Rngs(0))
    tokens = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % 50
    logits, aux = forward(model, tokens)
    assert logits.shape == (2, 16, 50) and logits.dtype == jnp.float32
    assert aux == {}
    np.testing.assert_array_equal(call(model, tokens), logits)


def test_gpt_is_causal():
    model = models.create_model("gpt", SMALL_GPT, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 7) % 50)
    a, b = call(model, tokens), call(model, changed)
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert float(jnp.abs(a[:, 9:] - b[:, 9:]).max()) > 1e-3  # later positions do see the change


def test_gpt_param_count_small():
    # V=50, S=16, E=8, L=2, tied head, biases:
    #   embeddings 50*8 + 16*8 = 528; final layer norm 2*8 = 16
    #   per block: qkv 8*24+24 = 216, attn out 8*8+8 = 72, two layer norms 32,
    #              mlp 8*32+32 + 32*8+8 = 552  -> 872;  two blocks 1744
    #   total 528 + 16 + 1744 = 2288
    config = models.make_config("gpt", SMALL_GPT)
    model = models.create_model("gpt", SMALL_GPT, rngs=nnx.Rngs(0))
    assert models.get_spec("gpt").num_params(config) == 2288
    assert param_count(model) == 2288


def test_gpt_param_count_untied_no_bias():
    # as above without biases: embeddings 528, final norm 8, per block 8*24 + 64 + 16 + 512 = 784,
    # untied head 8*50 = 400 -> 528 + 8 + 1568 + 400 = 2504
    options = dict(SMALL_GPT, use_bias=False, tie_embeddings=False)
    model = models.create_model("gpt", options, rngs=nnx.Rngs(0))
    assert models.get_spec("gpt").num_params(models.make_config("gpt", options)) == 2504
    assert param_count(model) == 2504


def test_gpt_logical_axis_names():
    names = axis_names(models.create_model("gpt", SMALL_GPT, rngs=nnx.Rngs(0)))
    assert names["wte"] == ("vocab", "embed")
    assert names["wpe"] == (None, "embed")
    block = names["blocks"][0]
    assert block["attn"] == {"qkv_kernel": ("embed", None, "heads", "kv"), "qkv_bias": (None, "heads", "kv"),
                             "out_kernel": ("heads", "kv", "embed"), "out_bias": ("embed",)}
    assert block["ffn"] == {"fc_kernel": ("embed", "mlp"), "fc_bias": ("mlp",),
                            "proj_kernel": ("mlp", "embed"), "proj_bias": ("embed",)}
    assert block["ln_1"] == {"scale": ("embed",), "bias": ("embed",)}


def test_gpt_flops_formula():
    # E=8, L=2, V=50, T=16: matmul params 2*(4*64 + 2*8*32) + 8*50 = 2*768 + 400 = 1936
    # 6*16*1936 = 185856; attention 12*2*16*16*8 = 49152 -> 235008
    config = models.make_config("gpt", SMALL_GPT)
    assert models.get_spec("gpt").flops_per_example(config, 16) == 235008.0
    assert models.get_spec("gpt").flops_per_example(config, None) == 235008.0  # block_size


def test_gpt_bfloat16_compute_dtype():
    options = dict(SMALL_GPT, dtype="bfloat16")
    model = models.create_model("gpt", options, rngs=nnx.Rngs(0))
    reference = models.create_model("gpt", SMALL_GPT, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    logits = call(model, tokens)
    assert logits.dtype == jnp.bfloat16
    assert nnx.state(model, nnx.Param)["wte"][...].dtype == jnp.float32
    np.testing.assert_allclose(logits.astype(jnp.float32), call(reference, tokens), atol=0.05)


def test_gpt_rejects_long_sequence():
    model = models.create_model("gpt", SMALL_GPT, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(jnp.zeros((1, 17), jnp.int32))


def test_registry_errors_name_key_and_fix():
    with pytest.raises(ValueError, match="unknown option 'hiden_size'.*did you mean 'hidden_size'"):
        models.create_model("gpt", {"hiden_size": 8}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="'num_heads' must be int, got '2' of type str"):
        models.create_model("gpt", {"num_heads": "2"}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be divisible by num_heads \(4\)"):
        models.make_config("gpt", {"hidden_size": 10, "num_heads": 4})
    with pytest.raises(ValueError, match="unknown model 'gtp'.*did you mean 'gpt'"):
        models.get_spec("gtp")
    assert {"gpt", "mlp"} <= set(models.available_models())


def test_mlp_known_weights_and_count():
    # 4 -> 3 -> 2 with relu; weights set by hand
    model = models.create_model("mlp", dict(in_features=4, out_features=2, hidden_size=3, num_layers=1),
                                rngs=nnx.Rngs(0))
    assert param_count(model) == 4 * 3 + 3 + 3 * 2 + 2 == 23
    assert models.get_spec("mlp").num_params(model_config := models.make_config(
        "mlp", dict(in_features=4, out_features=2, hidden_size=3, num_layers=1))) == 23
    assert models.get_spec("mlp").flops_per_example(model_config, None) == 6.0 * (12 + 6)
    model.kernels[0][...] = jnp.array([[1., 0, -1], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    model.biases[0][...] = jnp.array([0., -1, 0])
    model.kernels[1][...] = jnp.array([[1., 2], [3, 4], [5, 6]])
    model.biases[1][...] = jnp.array([0.5, -0.5])
    # x = [1, 2, 3, 4]: hidden = [1+4, 2+4-1, -1+3+4] = [5, 5, 6] (all positive after relu)
    # out = [5 + 15 + 30 + 0.5, 10 + 20 + 36 - 0.5] = [50.5, 65.5]
    out, aux = model.forward(jnp.array([[1., 2, 3, 4]]))
    np.testing.assert_allclose(out, [[50.5, 65.5]])
    assert aux == {}
    assert axis_names(model) == {"kernels": {0: ("embed", "mlp"), 1: ("mlp", "embed")},
                                 "biases": {0: ("mlp",), 1: ("embed",)}}
