"""Memory inside a pipeline stage: a stage whose fastest intra-op plan keeps its parameters (and
their optimizer state) whole on every device, and does not fit so, is priced and run with them
split over its sub-mesh; the runtime plans the stage as the search priced it.

On 8 simulated CPU devices, abstract shapes for the search: a 4-layer residual MLP whose
micro-batch (1024 examples) makes the batch-split plan fastest on every stage sub-mesh.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import parallel
from parallel.auto._layers import LayerPricer, pipeline_program
from parallel.auto._pipelines import PipelineSearch
from parallel.pipeline._dp import StageLayout
from parallel.pipeline._method import PipeshardParallel

WIDTH, HIDDEN, DEPTH, BATCH, MICRO_BATCHES = 32, 256, 4, 2048, 2
OPTIMIZER = optax.adam(1e-3, eps=1e-3)  # a large eps: comparable across summation orders


def loss_fn(params, batch):
    x = batch["x"]
    for layer in params:
        x = x + jnp.tanh(x @ layer["up"]) @ layer["down"]
    return jnp.mean((x - batch["y"]) ** 2)


def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt_state = OPTIMIZER.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}, \
        {"loss": loss}


def init(key):
    params = [{"up": jax.random.normal(jax.random.fold_in(key, i), (WIDTH, HIDDEN)) * 0.1,
               "down": jax.random.normal(jax.random.fold_in(key, 100 + i), (HIDDEN, WIDTH)) * 0.1}
              for i in range(DEPTH)]
    return {"params": params, "opt": OPTIMIZER.init(params)}


@pytest.fixture(scope="module")
def search():
    state = init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(BATCH, WIDTH)).astype(np.float32),
             "y": rng.normal(size=(BATCH, WIDTH)).astype(np.float32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    profile = parallel.get_profile("cpu", 8)
    pp = pipeline_program(train_step, abstract, (1,), (0,), MICRO_BATCHES, DEPTH)
    pricer = LayerPricer(pp, profile)
    return state, batch, pp, pricer, profile


# Below what any 2-stage layout needs with each stage's fastest plans (3,407,876 bytes), above
# what it needs with the state split (2,965,508).
BUDGET = 3.2e6


def test_the_fastest_plan_keeps_a_stage_state_whole_and_the_lean_one_splits_it(search):
    *_, pricer, _ = search
    fast = pricer.prices(1, 4, 4)[(4, 1)]
    lean = pricer.lean(1, 4, 4, (4, 1))
    # Layer 1 holds up (32 x 256) and down (256 x 32), float32, and Adam's two moments of
    # each: 196,608 bytes. Its work reads three per-step arrays (a 256 x 32 one twice).
    assert fast.param_specs == (P(), P(), P()) and fast.state_bytes == 196608.0
    assert not fast.split_state and lean.split_state
    assert lean.param_specs == (P("data"), P("data"), P("data"))
    assert lean.state_bytes == 196608.0 / 4 and lean.time_s > fast.time_s


def test_a_stage_that_does_not_fit_whole_is_split_and_runs_as_priced(search):
    state, batch, pp, pricer, profile = search
    whole_only = PipelineSearch(pp, pricer, profile, 8, BUDGET)
    assert whole_only.best(2, split_state=False) is None
    assert whole_only.smallest_memory == 3407876.0
    chosen = PipelineSearch(pp, pricer, profile, 8, BUDGET).best(2)
    assert chosen.describe() == ("2 stages x 2 micro-batches: layers 0-0 on 4 (data 4 x model "
                                 "1); layers 1-3 on 4 (data 4 x model 1, state split)")
    assert chosen.memory_bytes == 2965508.0 <= BUDGET

    layout = StageLayout(pp.num_layers, tuple(s.first for s in chosen.stages),
                         tuple(s.devices for s in chosen.stages),
                         tuple({"data": s.mesh[0], "model": s.mesh[1]} for s in chosen.stages),
                         tuple(s.time_s for s in chosen.stages), chosen.step_time_s,
                         tuple(s.split_state for s in chosen.stages))
    method = PipeshardParallel(MICRO_BATCHES, stage_option=layout, profile=profile)
    step = parallel.parallelize(train_step, method=method)
    specs = jax.tree.map(lambda sh: sh.spec, step.input_shardings(state, batch)[0])
    # Stage 0 (fastest plan, fits): whole; stage 1 (split): as the search priced it, the
    # optimizer moments alike.
    assert specs["params"][0]["up"] == P() and specs["params"][0]["down"] == P()
    for layer in (1, 2, 3):
        assert specs["params"][layer]["up"] == P("data") == specs["params"][layer]["down"]
        assert specs["opt"][0].mu[layer]["up"] == P("data") == specs["opt"][0].nu[layer]["up"]

    reference = jax.jit(train_step)
    expected, got = state, jax.tree.map(jnp.copy, state)
    for _ in range(2):
        expected, want = reference(expected, batch)
        got, have = step(got, batch)
        np.testing.assert_allclose(float(have["loss"]), float(want["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 got, expected)
