import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import ConfigError, load_config
from trainer.config import OptimizerConfig
from trainer.optim import build_optimizer, learning_rate_schedule, muon_dimensions


@pytest.mark.parametrize("schedule, expected", [
    # warmup 10 steps to 1.0, then 100 decay steps to 0.1.
    # cosine at 60: 0.1 + 0.9 * 0.5 * (1 + cos(pi * 50/100)) = 0.55; linear at 35: 1 - 0.9 * 25/100.
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.775, 110: 0.1}),
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
])
def test_schedule_values(schedule, expected):
    opt = OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule)
    lr = learning_rate_schedule(opt, total_steps=110)
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, atol=1e-7)


def test_weight_decay_skips_biases_and_norms():
    opt = OptimizerConfig(name="adamw", learning_rate=0.5, warmup_steps=0, schedule="constant",
                          weight_decay=0.1, grad_clip=None)
    tx = build_optimizer(opt, total_steps=10)
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradient: adam's part is 0; decay moves kernels by -lr * wd * w = -0.5 * 0.1 * 2.
    np.testing.assert_allclose(updates["kernel"], np.full((2, 2), -0.1), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], np.zeros(2), atol=0)


@pytest.mark.parametrize("name, expected", [
    ("sgd", -0.5 * 4.0),           # -lr * g
    ("momentum", -0.5 * 4.0),      # first step of trace: g
    ("adam", -0.5 * 1.0),          # adam's first step is sign(g) (bias-corrected, eps tiny)
])
def test_first_update(name, expected):
    opt = OptimizerConfig(name=name, learning_rate=0.5, warmup_steps=0, schedule="constant",
                          weight_decay=0.0, grad_clip=None)
    tx = build_optimizer(opt, total_steps=10)
    params = {"w": jnp.ones((3,))}
    grads = {"w": jnp.full((3,), 4.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], np.full(3, expected), rtol=1e-5)


def test_gradient_clipping():
    opt = OptimizerConfig(name="sgd", learning_rate=1.0, warmup_steps=0, schedule="constant",
                          weight_decay=0.0, grad_clip=1.0)
    tx = build_optimizer(opt, total_steps=10)
    params = {"w": jnp.zeros((2,))}
    updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)  # norm 5 -> 1


@pytest.mark.parametrize("names, expected", [
    (("embed", None, "heads", "kv"), ((0,), (2, 3))),  # GPT qkv: q, k, v separate matrices
    (("heads", "kv", "embed"), ((0, 1), (2,))),  # attention output
    (("embed", "heads", "kv"), ((0,), (1, 2))),  # Llama q/k/v
    (("embed", "mlp"), ((0,), (1,))),
    (("mlp", "embed"), ((0,), (1,))),
    (("expert", "embed", "mlp"), ((1,), (2,))),  # MoE: one matrix per expert
    (("expert", "mlp", "embed"), ((1,), (2,))),
    (("vocab", "embed"), None),  # embeddings and heads stay on AdamW
    (("embed", "vocab"), None),
    (("embed",), None),  # norms
    (("heads", "kv"), None),  # a q bias
    (("embed", "expert"), None),  # a router
    ((None, None), ((0,), (1,))),  # unnamed 2-D: optax's rule
    (None, ((0,), (1,))),
])
def test_muon_matrices_from_logical_axes(names, expected):
    dims = muon_dimensions(names, 2 if names is None else len(names))
    if expected is None:
        assert dims is None
    else:
        assert (tuple(np.atleast_1d(dims.reduction_axis)), tuple(np.atleast_1d(dims.output_axis))) == expected


def test_muon_orthogonalizes_matrices_and_adams_the_rest():
    opt = OptimizerConfig(name="muon", learning_rate=0.05, adam_learning_rate=0.01, warmup_steps=0,
                          schedule="constant", weight_decay=0.0, grad_clip=None, momentum=0.95)
    axes = {"w": ("embed", "mlp"), "wte": ("vocab", "embed"), "scale": ("embed",)}
    tx = build_optimizer(opt, total_steps=10, param_axes=axes)
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((16, 32)), "wte": jnp.zeros((8, 16)), "scale": jnp.ones(16)}
    # a gradient of spread singular values (1 ... 1e-2)
    u, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    v, _ = np.linalg.qr(rng.normal(size=(32, 16)))
    g = (u * np.logspace(0, -2, 16)) @ v.T
    grads = {"w": jnp.asarray(g, jnp.float32), "wte": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
             "scale": jnp.asarray(rng.normal(size=16), jnp.float32)}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    s = np.linalg.svd(np.asarray(updates["w"]), compute_uv=False)
    # Newton-Schulz flattens the spectrum (to about 0.7..1.2), scaled by lr * sqrt(32 / 16)
    assert s.max() / s.min() < 2.5 and 0.5 < s.mean() / (0.05 * np.sqrt(2)) < 1.5
    assert float(jnp.sum(updates["w"] * grads["w"])) < 0  # a descent direction
    # NAdam on the rest: elementwise, against the gradient's sign, about adam_learning_rate
    for name in ("wte", "scale"):
        u = np.asarray(updates[name])
        assert np.all(np.sign(u) == -np.sign(np.asarray(grads[name])))
        assert 0.005 < np.abs(u).max() < 0.03


def test_adam_learning_rate_needs_muon():
    with pytest.raises(ConfigError, match="optimizer.adam_learning_rate only applies to "
                                          "optimizer.name=muon \\(got adamw\\)"):
        load_config("tiny/gpt.yaml", ["optimizer.adam_learning_rate=0.01"])


def test_muon_takes_the_gpts_projections_and_adamw_the_rest():
    import models
    from trainer import _steps

    options = dict(num_layers=1, hidden_size=16, num_heads=2, use_bias=False)
    axes = _steps.param_axes(lambda rngs: models.create_model("gpt", options, rngs=rngs), None, None)
    flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    muon = {jax.tree_util.keystr(path): muon_dimensions(names, len(names)) for path, names in flat}
    assert {k for k, v in muon.items() if v is not None} == {
        "['blocks'][0]['attn']['qkv_kernel']", "['blocks'][0]['attn']['out_kernel']",
        "['blocks'][0]['ffn']['fc_kernel']", "['blocks'][0]['ffn']['proj_kernel']"}
    assert muon["['wte']"] is None and muon["['wpe']"] is None and muon["['ln_f']['scale']"] is None
