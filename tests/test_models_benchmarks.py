"""The Alpa benchmark-size configs: they parse, their parameter counts match their names, and a
train step over them is planned on 8 devices from abstract shapes alone."""
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import models
import parallel
from trainer import _steps, load_config
from trainer.optim import build_optimizer, learning_rate_schedule

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "benchmarks"
NAMES = sorted(p.stem for p in BENCHMARKS.glob("*.yaml"))


def size_in_name(name: str) -> float:
    number, unit = re.fullmatch(r"[a-z_]+-([0-9.]+)([mb])", name).groups()
    return float(number) * (1e6 if unit == "m" else 1e9)


def test_all_alpa_sizes_are_shipped():
    assert NAMES == sorted(
        [f"gpt-{s}" for s in ("125m", "350m", "760m", "1.3b", "2.6b", "6.7b", "15b", "39b", "76b")]
        + [f"moe-{s}" for s in ("380m", "690m", "1.3b", "2.4b", "10b", "27b", "70b")]
        + [f"wide_resnet-{s}" for s in ("250m", "500m", "1b", "2b", "4b", "6.8b", "13b")])


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_name(name):
    config = load_config(f"benchmarks/{name}.yaml")
    spec = models.get_spec(config.model.name)
    count = spec.num_params(models.make_config(spec.name, dict(config.model.options)))
    tolerance = 0.03 if spec.name == "gpt" else 0.07  # MoE and Wide-ResNet names are rougher
    assert abs(count / size_in_name(name) - 1) <= tolerance, count


@pytest.mark.parametrize("name", ["gpt-125m", "moe-380m", "wide_resnet-250m"])
def test_closed_form_count_equals_abstract_model(name):
    # exact counts: 125,164,032; 384,299,520; 254,123,104 (as the YAML headers say)
    config = load_config(f"benchmarks/{name}.yaml")
    spec = models.get_spec(config.model.name)
    options = dict(config.model.options)
    abstract = nnx.eval_shape(lambda: models.create_model(spec.name, options, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == spec.num_params(models.make_config(spec.name, options))
    assert count == {"gpt-125m": 125_164_032, "moe-380m": 384_299_520, "wide_resnet-250m": 254_123_104}[name]


def abstract_train_step(name: str, batch_size: int):
    """The Trainer's pure train step and abstract state for a benchmark config."""
    config = load_config(f"benchmarks/{name}.yaml")
    spec = models.get_spec(config.model.name)
    if spec.task == "lm":
        tokens = jax.ShapeDtypeStruct((batch_size, config.data.seq_len), jnp.int32)
        batch = {"inputs": tokens, "targets": tokens}
    else:
        size = config.data.image_size
        batch = {"inputs": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
                 "targets": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    fns = _steps.make_step_functions(
        lambda rngs: models.create_model(spec.name, dict(config.model.options), rngs=rngs),
        _steps.TASK_LOSSES[spec.task], None, build_optimizer(config.optimizer, config.train.steps),
        learning_rate_schedule(config.optimizer, config.train.steps), None,
        jnp.dtype(config.train.compute_dtype), 1)
    return fns, jax.eval_shape(fns.init, jax.random.key(0)), batch


# The largest MoE and Wide-ResNet, and a 24-layer GPT (tracing the 60-layer 76B one takes a
# minute on a 2-core CI machine and plans the same way).
@pytest.mark.parametrize("name", ["gpt-1.3b", "moe-70b", "wide_resnet-13b"])
def test_large_configs_plan_on_8_devices_without_allocating(name):
    fns, state, batch = abstract_train_step(name, batch_size=8)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    step = parallel.parallelize(fns.train_step, method=parallel.make_method("zero3"),
                                batch_argnums=(1,), donate_argnums=(0,))
    plan = step.plan(state, batch)
    assert plan.mesh_shape == {"data": 8}
    specs = step.abstract_inputs(state, batch)
    assert specs[1]["inputs"].sharding.spec == jax.sharding.PartitionSpec("data")
    # ZeRO-3 splits the largest parameter over the 8 devices
    params = jax.tree.leaves(specs[0]["params"])
    largest = max(params, key=lambda x: x.size)
    assert math.prod(largest.sharding.shard_shape(largest.shape)) * 8 == largest.size
