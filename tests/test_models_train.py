"""Each model's tiny config trains: a few optimizer steps on a fixed batch lower the loss."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

import models

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny"


def tiny_model(name: str):
    options = yaml.safe_load((TINY / f"{name}.yaml").read_text())["model"]
    return options.pop("name"), options


def numpy_params(abstract_params, seed: int = 0) -> dict:
    """Params drawn with numpy, so the test spends no time compiling dozens of per-shape
    initializers (the models' own initializers are exercised by the other model tests):
    norm scales 1, biases 0, embeddings and router N(0, 0.02), other kernels N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name, shape = str(path[-1].key), leaf.shape
        if name == "scale":
            return jnp.ones(shape, leaf.dtype)
        if "bias" in name or name in ("bi", "bo"):
            return jnp.zeros(shape, leaf.dtype)
        if name in ("wte", "wpe", "router"):
            return jnp.asarray(0.02 * rng.normal(size=shape), leaf.dtype)
        fan_in = shape[1] if name in ("wi", "wo") else int(np.prod(shape[:-1]))
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(abstract_params))


def fixed_batch(task: str, config, rng: np.random.Generator) -> dict:
    if task == "lm":
        tokens = rng.integers(0, config.vocab_size, size=(8, config.block_size + 1))
        return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
    if task == "classify":
        images = rng.normal(size=(8, config.image_size, config.image_size, config.in_channels))
        return {"inputs": images.astype(np.float32), "targets": rng.integers(0, config.num_classes, 8).astype(np.int32)}
    x = rng.normal(size=(16, config.in_features)).astype(np.float32)
    return {"inputs": x, "targets": np.tanh(x[:, :config.outputs] * 2).astype(np.float32)}


def task_loss(task: str, out, targets):
    if task == "regress":
        return jnp.mean((out - targets) ** 2)
    return optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()


@pytest.mark.parametrize("config_name", ["gpt", "moe", "wide_resnet", "mlp"])
def test_tiny_config_loss_falls(config_name):
    name, options = tiny_model(config_name)
    spec = models.get_spec(name)
    abstract = nnx.eval_shape(lambda: models.create_model(name, options, rngs=nnx.Rngs(0)))
    batch = fixed_batch(spec.task, models.make_config(name, options), np.random.default_rng(0))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params = numpy_params(params)
    rest = jax.tree_util.tree_map_with_path(  # batch-norm running statistics: mean 0, var 1
        lambda path, x: jnp.full(x.shape, float(path[-1].key == "var"), x.dtype), nnx.to_pure_dict(rest))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    def loss_fn(params, rest):
        model = nnx.merge(graphdef, params, rest)
        out, aux = model.forward(batch["inputs"], train=True)
        loss = task_loss(spec.task, out, batch["targets"])
        return loss + sum(aux.values()), (aux, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2]))

    @jax.jit
    def step(params, rest, opt_state):
        (loss, (aux, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss, aux

    losses = []
    for _ in range(15):
        params, new_rest, opt_state, loss, aux = step(params, rest, opt_state)
        losses.append(float(loss))
        if name == "wide_resnet":  # batch-norm running statistics move every step
            assert float(jnp.abs(new_rest["stem_bn"]["mean"] - rest["stem_bn"]["mean"]).max()) > 0
        rest = new_rest
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    if name == "moe":  # the load-balancing loss is reported and part of the loss
        assert set(aux) == {"moe_aux_loss"}
        assert 0.01 <= float(aux["moe_aux_loss"]) <= 0.04  # weight 0.01, balance loss in [1, 4]
