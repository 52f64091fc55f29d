"""Automatic stages: uneven layers for uneven widths, priced lower than an equal split; the
schedule's memory: 1F1B keeps fewer micro-batches of activations alive than GPipe."""
import jax
import numpy as np
import pytest

import parallel
from tests import _pipeline_setups as setups


def test_auto_stages_follow_the_cost_of_uneven_layers():
    method = parallel.PipeshardParallel(num_micro_batches=4, stage_option="auto", profile=setups.PROFILE)
    step = parallel.parallelize(setups.wide_step, method=method)
    batches = setups.wide_batches(3)
    state = step.init_state(setups.wide_state, jax.random.key(0), batches[0])
    plan = step.plan(state, batches[0])
    stages = plan.extras["stages"]
    search = plan.extras["search"]
    # 8 hand-cut layers; the two wide ones (4, 5) weigh most: the first stage takes layers 0-4,
    # the second 5-7, rather than four layers each.
    assert [s["layers"] for s in stages] == [[0, 4], [5, 7]]
    assert [len(s["devices"]) for s in stages] == [4, 4]
    assert search["equal_layers_starts"] == [0, 4]
    assert search["cost_s"] < 0.9 * search["equal_layers_cost_s"]
    # ... and it trains like the unpipelined step.
    reference = jax.jit(setups.wide_step)
    expected = setups.wide_state(jax.random.key(0))
    for batch in batches:
        state, metrics = step(state, batch)
        expected, want = reference(expected, batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(want["loss"]), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_one_f_one_b_keeps_fewer_activations_than_gpipe():
    num_stages, micro_batches = 4, 8
    batch = setups.gpt_batches(1)[0]
    predicted, measured = {}, {}
    for schedule in ("gpipe", "1f1b"):
        method = parallel.PipeshardParallel(micro_batches, stage_option=num_stages,
                                            schedule=schedule, profile=setups.PROFILE)
        step = parallel.parallelize(setups.gpt_step(markers=True), method=method)
        state = step.init_state(setups.gpt_state, jax.random.key(0), batch)
        report = step.analyze(state, batch)
        stages = report.stages["stages"]
        assert report.stages["bubble_fraction"] == pytest.approx(3 / 11)  # 4 stages, 8 micro
        in_flight = [s["max_micro_batches_in_flight"] for s in stages]
        assert in_flight == ([8, 8, 8, 8] if schedule == "gpipe" else [4, 3, 2, 1])
        # Predicted: XLA's memory analysis of each stage's forward program (the bytes it hands
        # on per micro-batch, kept until that micro-batch's backward) for the micro-batches in
        # flight.
        assert all(s["activation_bytes_per_micro_batch"] > 0 for s in stages)
        predicted[schedule] = [s["peak_activation_bytes"] for s in stages]
        # Measured: the per-micro-batch arrays alive on each stage's devices during a step,
        # summed from the arrays themselves after every program the runtime issued.
        runner = step.compile(state, batch).runner
        runner.peak_live_bytes = [0] * num_stages
        step(state, batch)
        measured[schedule] = runner.peak_live_bytes
        # The prediction holds what a step keeps alive, within 5% (seen: 0-3% more measured,
        # the arriving copy of a stage's input).
        np.testing.assert_allclose(measured[schedule], predicted[schedule], rtol=0.05)
    # Stage s: GPipe keeps all 8 micro-batches alive, 1F1B at most S - s; the live bytes counted
    # in the two steps keep those ratios (seen 1.98, 2.64, 3.92, 7.91).
    ratios = [g / o for g, o in zip(measured["gpipe"], measured["1f1b"])]
    np.testing.assert_allclose(ratios, [8 / 4, 8 / 3, 8 / 2, 8 / 1], rtol=0.03)


def test_remat_keeps_only_stage_inputs_and_trains_the_same():
    batch = setups.gpt_batches(1)[0]
    kept, states = {}, {}
    for remat in (False, True):
        method = parallel.PipeshardParallel(8, stage_option=4, remat=remat,
                                            profile=setups.PROFILE)
        step = parallel.parallelize(setups.gpt_step(markers=True), method=method)
        state = step.init_state(setups.gpt_state, jax.random.key(0), batch)
        report = step.analyze(state, batch)
        kept[remat] = [s["activation_bytes_per_micro_batch"] for s in report.stages["stages"]]
        states[remat], _ = step(state, batch)
    # Without remat a stage hands its backward every residual of its block; with remat only
    # what it receives (the residual stream, plus the tokens on the first stage).
    for s in range(3):
        assert kept[True][s] * 10 < kept[False][s]
    for got, want in zip(jax.tree.leaves(states[True]), jax.tree.leaves(states[False])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
