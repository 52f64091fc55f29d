"""MoE: GShard top-2 routing on known logits, expert axis names, counts, dense equivalence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import moe

SMALL_MOE = dict(vocab_size=50, block_size=16, num_layers=2, num_heads=2, hidden_size=8,
                 num_experts=4, expert_group_size=8)


def test_route_top2_known_logits():
    # Three experts, capacity 2. First/second choices: t0 e0/e1, t1 e0/e2, t2 e1/e2, t3 e0/e1.
    # First choices fill slots in token order: e0 <- t0 (slot 0), t1 (slot 1); t3 overflows.
    # e1 <- t2 (slot 0). Second choices queue behind first ones: e1 <- t0 (slot 1), t3 overflows;
    # e2 <- t1 (slot 0), t2 (slot 1). Each token's two gates are softmax values e^2 and e^1
    # (times the same factor), normalized: sigmoid(1) = 0.7310586 and 0.2689414.
    logits = jnp.array([[[2., 1, 0], [2, 0, 1], [0, 2, 1], [3, 1, 0]]])
    combine, aux = moe.route_top2(logits, capacity=2)
    hi, lo = 0.7310586, 0.2689414
    expected = np.zeros((1, 4, 3, 2))
    expected[0, 0, 0, 0], expected[0, 0, 1, 1] = hi, lo
    expected[0, 1, 0, 1], expected[0, 1, 2, 0] = hi, lo
    expected[0, 2, 1, 0], expected[0, 2, 2, 1] = hi, lo
    np.testing.assert_allclose(combine, expected, atol=1e-6)
    # aux = 3 * sum_e(mean gate_e * fraction first-routed_e) with mean gates
    # [0.5660768, 0.2785488, 0.1553744] and fractions [3/4, 1/4, 0]
    np.testing.assert_allclose(aux, 1.4825844, rtol=1e-6)


def test_balanced_routing_has_aux_loss_one():
    # Two tokens each strongly preferring a different one of two experts: fractions [1/2, 1/2]
    # and mean gates [1/2, 1/2] by symmetry -> 2 * (1/4 + 1/4) = 1.
    _, aux = moe.route_top2(jnp.array([[[5., -5], [-5, 5]]]), capacity=2)
    np.testing.assert_allclose(aux, 1.0, rtol=1e-6)


def test_group_size_and_capacity():
    config = models.make_config("moe", dict(SMALL_MOE, expert_group_size=2048))
    assert moe.group_size_for(config, 4096) == 2048
    assert moe.group_size_for(config, 1000) == 1000
    assert moe.group_size_for(config, 3 * 1031) == 1031  # largest divisor below 2048
    assert moe.capacity_for(config, 2048) == 1280  # ceil(1.25 * 2 * 2048 / 4)


def test_identical_experts_equal_the_dense_mlp():
    # With every expert holding the same weights and room for every token, the normalized
    # top-2 mixture is exactly the dense MLP.
    config = models.make_config("moe", dict(SMALL_MOE, capacity_factor=2.0))
    layer = moe.MoEMlp(config, nnx.Rngs(0))
    dense = models.gpt.Mlp(config, nnx.Rngs(1))
    rng = np.random.default_rng(0)
    dense.fc_bias[...] = jnp.asarray(rng.normal(size=32), jnp.float32)
    dense.proj_bias[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
    layer.router[...] = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    for name, src in [("wi", dense.fc_kernel), ("bi", dense.fc_bias), ("wo", dense.proj_kernel), ("bo", dense.proj_bias)]:
        getattr(layer, name)[...] = jnp.broadcast_to(src[...], getattr(layer, name).shape)
    x = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)
    y, aux = nnx.jit(lambda layer, x: layer(x))(layer, x)
    np.testing.assert_allclose(y, nnx.jit(lambda dense, x: dense(x)[0])(dense, x), atol=1e-5)
    assert set(aux) == {"moe_aux_loss"} and float(aux["moe_aux_loss"]) > 0


def test_moe_model_shapes_count_and_axes():
    # GPT part as in test_models (V=50, S=16, E=8, L=2): 2288 with two dense MLPs (552 each).
    # Block 1's MLP becomes 4 experts: 4 * 552 + router 8*4 = 2240 -> 2288 - 552 + 2240 = 3976.
    model = models.create_model("moe", SMALL_MOE, rngs=nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 3976
    assert models.get_spec("moe").num_params(models.make_config("moe", SMALL_MOE)) == 3976
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
    logits, aux = nnx.jit(lambda model, x: model.forward(x, train=True))(model, tokens)
    assert logits.shape == (2, 16, 50)
    assert set(aux) == {"moe_aux_loss"}
    assert 0.01 <= float(aux["moe_aux_loss"]) <= 0.04  # weight 0.01 * balance loss in [1, num_experts]
    is_var = lambda v: isinstance(v, nnx.Variable)
    names = nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(v.get_metadata()["out_sharding"]),
                                          nnx.state(model, nnx.Param), is_leaf=is_var))
    assert names["blocks"][1]["ffn"] == {"router": ("embed", None), "wi": ("expert", "embed", "mlp"),
                                         "bi": ("expert", "mlp"), "wo": ("expert", "mlp", "embed"),
                                         "bo": ("expert", "embed")}
    assert names["blocks"][0]["ffn"]["fc_kernel"] == ("embed", "mlp")


def test_moe_config_errors():
    with pytest.raises(ValueError, match="num_experts must be at least 2 for top-2 routing, got 1"):
        models.make_config("moe", dict(SMALL_MOE, num_experts=1))
    with pytest.raises(ValueError, match="unknown option 'num_expert'.*did you mean 'num_experts'"):
        models.make_config("moe", {"num_expert": 4})


@pytest.mark.parametrize("name", ["gpt", "moe"])
def test_closed_form_flops_match_xla(name):
    # XLA's count of the lowered forward + backward of one 128-token sequence (nothing runs);
    # the closed forms leave out norms, softmax and routing bookkeeping: within 2.5%.
    options = dict(vocab_size=512, block_size=128, num_layers=2, num_heads=4, hidden_size=128)
    if name == "moe":
        options.update(num_experts=4, expert_group_size=128)
    abstract = nnx.eval_shape(lambda: models.create_model(name, options, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    loss = lambda params, tokens: nnx.merge(graphdef, params)(tokens).sum()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(nnx.to_pure_dict(params),
                                                      jax.ShapeDtypeStruct((1, 128), jnp.int32))
    closed_form = models.get_spec(name).flops_per_example(models.make_config(name, options), 128)
    # GPT, E=128, L=2, V=512, T=128: matmul params 2*(4*128^2 + 2*128*512) + 128*512 = 458,752;
    #   6*128*458,752 = 352,321,536 plus attention 12*2*128^2*128 = 50,331,648.
    # MoE: block 1's MLP is 4 experts with capacity ceil(1.25*2*128/4) = 80; forward per token
    #   2*(2*4*128^2 + 2*128*512 + 128*512) = 655,360 (both attentions, block 0's MLP, head)
    #   + router 2*128*4 + dispatch/combine 4*4*80*128 + experts 4*(4*80/128)*128*512 = 820,224;
    #   3*128*1,475,584 + 50,331,648 = 616,955,904.
    assert closed_form == {"gpt": 402_653_184, "moe": 616_955_904}[name]
    assert abs(lowered.cost_analysis()["flops"] / closed_form - 1) < 0.025
