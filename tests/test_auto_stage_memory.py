"""Memory inside a pipeline stage: a stage whose fastest intra-op plan keeps its parameters (and
their optimizer state) whole on every device, and does not fit so, is priced and run with them
split over its sub-mesh; the runtime plans the stage as the search priced it.

On 8 simulated CPU devices, abstract shapes for the search: a 4-layer residual MLP whose
micro-batch (1024 examples) makes the batch-split plan fastest on every stage sub-mesh.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import parallel
from parallel.auto._layers import LayerPricer, pipeline_program
from parallel.auto._pipelines import PipelineSearch
from parallel.pipeline._dp import StageLayout
from parallel.pipeline._method import PipeshardParallel

from _auto_steps import DEPTH, abstract, init, make_batch, train_step

BATCH, MICRO_BATCHES = 2048, 2


@pytest.fixture(scope="module")
def search():
    state = init(jax.random.key(0))
    batch = make_batch(BATCH)
    profile = parallel.get_profile("cpu", 8)
    pp = pipeline_program(train_step, abstract(state, batch), (1,), (0,), MICRO_BATCHES, DEPTH)
    pricer = LayerPricer(pp, profile)
    return state, batch, pp, pricer, profile


# Below what any 2-stage layout needs with each stage's fastest plans (3,440,644 bytes), above
# what it needs with the state split (2,998,276).
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
    assert whole_only.smallest_memory == 3440644.0
    chosen = PipelineSearch(pp, pricer, profile, 8, BUDGET).best(2)
    assert chosen.describe() == ("2 stages x 2 micro-batches: layers 0-0 on 4 (data 4 x model "
                                 "1); layers 1-3 on 4 (data 4 x model 1, state split)")
    assert chosen.memory_bytes == 2998276.0 <= BUDGET

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


def _held_bytes(runner) -> dict[int, list[int]]:
    """Per stage, per micro-batch: the bytes per device of the forward values each backward
    program is handed (what the micro-batch kept on the stage since its forward), read from
    the arrays the runtime passes it. Wraps ``runner.jitted``."""
    from_backward = {v for k, t in runner.tasks.items() if k[0] == "B" for v in t.outputs}
    held: dict[int, list[int]] = {}
    jitted = runner.jitted

    def wrapped(key):
        program = jitted(key)
        if key[0] != "B":
            return program
        task = runner.tasks[key]

        def run(*args):
            held.setdefault(key[1], []).append(sum(
                x.addressable_shards[0].data.nbytes for v, x in zip(task.inputs, args)
                if v in runner.per_micro_batch and v not in from_backward
                and v != runner.index_value))
            return program(*args)
        return run

    runner.jitted = wrapped
    return held


@pytest.mark.parametrize("mesh, priced", [
    # A micro-batch (64 examples) keeps per layer its input (64 x 32) and two (64 x 256)
    # values of its tanh, float32; the last stage also the loss's (64 x 32) difference. On
    # data 2 x model 2: the input split over data (4,096 bytes), the hidden ones over both
    # (16,384 each): 36,864 per layer.
    ((2, 2), [73728.0, 77824.0]),
    # On data 1 x model 4: the input whole (8,192), the hidden ones split 4 ways.
    ((1, 4), [81920.0, 90112.0]),
])
def test_a_stage_holds_its_residuals_as_its_plan_lays_them_out_and_as_priced(mesh, priced):
    state, batch = init(jax.random.key(0)), make_batch(128)
    profile = parallel.get_profile("cpu", 8)
    pp = pipeline_program(train_step, abstract(state, batch), (1,), (0,), 2, DEPTH)
    pricer = LayerPricer(pp, profile)
    chosen = PipelineSearch(pp, pricer, profile, 8, profile.memory_bytes).best(
        2, meshes=mesh, starts=[0, 2], split_state=False)
    assert [sum(pricer.prices(layer, 4, 4 * k)[mesh].residual_bytes
                for layer in range(s.first, s.last + 1))
            for k, s in enumerate(chosen.stages)] == priced

    layout = StageLayout(pp.num_layers, (0, 2), (4, 4), ({"data": mesh[0], "model": mesh[1]},) * 2,
                         tuple(s.time_s for s in chosen.stages), chosen.step_time_s, (False,) * 2)
    step = parallel.parallelize(train_step, method=PipeshardParallel(2, stage_option=layout,
                                                                     profile=profile))
    runner = step.compile(state, batch).runner
    held = _held_bytes(runner)
    got, have = step(jax.tree.map(jnp.copy, state), batch)
    assert held == {0: [priced[0]] * 2, 1: [priced[1]] * 2}
    want_state, want = jax.jit(train_step)(state, batch)
    np.testing.assert_allclose(float(have["loss"]), float(want["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 got, want_state)


class _NamesTheMaker:
    """A stand-in for the solver's result: the layout it gives a value names the primitive of
    the equation that makes it."""

    def __init__(self, closed):
        self.eqns, self.input_specs = closed.jaxpr.eqns, []

    def spec_at(self, where, j):
        return P(self.eqns[where[0]].primitive.name, None)


def test_held_values_find_the_equation_that_makes_them_wherever_it_sits(search):
    from parallel._roles import trace
    from parallel.pipeline._intra import held_specs

    _, _, pp, pricer, _ = search
    work, _ = pricer._layer_work(1)
    maker = {v: op.prim.name for op in work.ops if not op.is_marker for v in op.outputs}
    assert work.planned and all(v in maker for v in work.planned)

    def shifted(state, batch):  # two equations ahead of the work's own
        jnp.cos(jnp.sin(jnp.zeros(3)))
        return work.fn(state, batch)

    for fn in (work.fn, shifted):
        closed = trace(fn, work.args)[0]
        held = held_specs(pp.program, pp.regions, work, closed, _NamesTheMaker(closed), 2)
        assert {v: held[v] for v in work.planned} == {v: P(maker[v], None)
                                                      for v in work.planned}
    assert sorted(set(maker[v] for v in work.planned)) == ["sub", "tanh"]
