"""Pipelines for models bigger than one device: a GPT whose replicated train state is three
times a per-device budget trains, evaluates and restores on 4 stages x 2 devices within it,
moving nothing through the host and issuing 2 S M programs per step plus a few per stage.

One pipeline (compiled once, module fixture) serves every test here. (Host-free transfers
between stages laid out differently: tests/test_pipeline.py.)"""
import collections
import functools

import jax
import numpy as np
import pytest

import parallel
from parallel.pipeline._runtime import StageRunner
from tests import _pipeline_setups as setups
from tests.test_pipeline_runtime import Executions, HostReads

WIDTH, MICRO_BATCHES, STAGES = 128, 8, 4


def _live_bytes() -> dict[int, int]:
    """Bytes of live arrays on each device (what the devices hold right now). A buffer is
    counted once: ``jax.live_arrays`` also lists the single-device arrays of an array's
    shards once they have been looked at."""
    per_device, seen = collections.Counter(), set()
    for x in jax.live_arrays():
        if not x.is_deleted():
            for shard in x.addressable_shards:
                buffer = (shard.device.id, shard.data.unsafe_buffer_pointer())
                if buffer not in seen:
                    seen.add(buffer)
                    per_device[shard.device.id] += shard.data.nbytes
    return per_device


def _program_bytes(compiled) -> int:
    """What running a program adds on a device (XLA's memory analysis): its temporaries and
    the outputs it does not write over a donated input."""
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes + max(
        0, stats.output_size_in_bytes - stats.alias_size_in_bytes))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    init = functools.partial(setups.gpt_state, width=WIDTH)
    key = jax.random.key(0)
    abstract = jax.eval_shape(init, key)
    replicated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    budget = replicated // 3
    batches = setups.gpt_batches(3)
    before = _live_bytes()
    peaks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    phase = ["init"]

    def sample():
        for device, n in _live_bytes().items():
            peaks[phase[0]][device] = max(peaks[phase[0]][device], n - before.get(device, 0))

    out = {"budget": budget, "replicated": replicated, "peaks": peaks}
    with pytest.MonkeyPatch.context() as patch:
        executions, host = Executions(patch), HostReads(patch)
        patch.setattr(StageRunner, "after_program", staticmethod(sample))
        method = parallel.PipeshardParallel(MICRO_BATCHES, stage_option=STAGES, remat=True,
                                            profile=setups.PROFILE, memory_budget_bytes=budget)
        step = parallel.parallelize(setups.gpt_step(markers=True), method=method)
        state = step.init_state(init, key, batches[0])
        sample()
        pipelined = step.compile(state, batches[0])
        placed = [jax.device_put(b, step.input_shardings(state, b)[1]) for b in batches]
        losses = []
        phase[0] = "step"
        for batch in placed[:2]:
            executions.count, host.active = 0, True
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            host.active = False
            losses.append(float(metrics["loss"]))
        out.update(executions=executions.count, host_reads=host.reads,
                   last_step=dict(pipelined.runner.last_step),
                   counts=pipelined.runner.programs_per_step())

        def eval_step(state, batch):
            return {"loss": setups.gpt_loss(state["weights"], batch, True)}

        phase[0] = "eval"
        evaluate = parallel.parallelize(eval_step, method=parallel.FollowPlan(step),
                                        donate_argnums=())
        out["eval_loss"] = float(evaluate(state, batches[2])["loss"])
        forward = evaluate.compile(state, batches[2]).runner
        phase[0] = "restore"
        checkpoints = parallel.Checkpointer(tmp_path_factory.mktemp("checkpoints"))
        checkpoints.save(2, state)
        checkpoints.wait()
        del state
        target = step.abstract_inputs(abstract, batches[0])[0]
        state, _ = checkpoints.restore(2, target)
        sample()
        # Restored directly onto each stage's devices in the stage's layout.
        out["restored_shardings"] = [(x.sharding, t.sharding) for x, t in
                                     zip(jax.tree.leaves(state), jax.tree.leaves(target))]
        checkpoints.close()
        phase[0] = "step"
        state, metrics = step(state, batches[2])
        losses.append(float(metrics["loss"]))
    programs = collections.Counter()
    for runner, compiled in ((pipelined.runner, pipelined.compile_all()), (forward, {
            key: forward.jitted(key).lower(*forward.abstract_inputs(key)).compile()
            for key in forward.tasks})):
        for key, program in compiled.items():
            for device in runner.meshes[runner.tasks[key].stage].devices.flat:
                programs[device.id] = max(programs[device.id], _program_bytes(program))
    out.update(losses=losses, programs=programs, step=step, state=state, abstract=abstract,
               report=step.analyze(state, batches[0]),
               stages=step.plan(state, batches[0]).extras["stages"])
    return out


def test_a_gpt_three_times_the_budget_trains_evaluates_and_restores_within_it(run):
    budget = run["budget"]
    assert run["replicated"] >= 3 * budget
    assert set(run["peaks"]) == {"init", "step", "eval", "restore"}
    for phase, peaks in run["peaks"].items():
        assert sorted(peaks) == list(range(8)), phase  # every device holds a part
        for device, live in peaks.items():
            # What lives on the device, plus the most any of its stage programs adds.
            assert live + run["programs"][device] <= budget, (phase, device, live, budget)
    # No device ever holds a whole copy of the state, nor a stage another stage's leaves.
    assert max(max(p.values()) for p in run["peaks"].values()) < run["replicated"] / 3
    state, stages = run["state"], run["stages"]
    assert all(got == want for got, want in run["restored_shardings"])
    for k, block in enumerate(state["weights"]["blocks"]):
        assert sorted(d.id for d in block["up"].sharding.device_set) == stages[k]["devices"]
    # ... and the step is the unpipelined one's.
    reference = jax.jit(setups.gpt_step(markers=False))
    expected = setups.gpt_state(jax.random.key(0), WIDTH)
    want = []
    for k, batch in enumerate(setups.gpt_batches(3)):
        if k == 2:  # evaluated after two steps, on the pipeline's stages
            np.testing.assert_allclose(
                run["eval_loss"], float(setups.gpt_loss(expected["weights"], batch, False)),
                rtol=1e-5)
        expected, metrics = reference(expected, batch)
        want.append(float(metrics["loss"]))
    np.testing.assert_allclose(run["losses"], want, rtol=1e-5)
    # Adam divides each gradient by its own running scale: round-off in a near-zero gradient
    # (micro-batch sums add in another order) moves that weight by a share of the learning
    # rate (1e-3); the losses above match to 1e-5.
    for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)


def test_a_step_issues_2SM_programs_and_nothing_through_the_host(run):
    assert run["host_reads"] == []
    # Every stage runs a forward and a backward per micro-batch: 2 S M programs, plus per step
    # the stages' per-step work, the batch splits, the accumulators' creation and finish and
    # the update: fewer than the state's leaves (gradients are summed inside the backward
    # programs), and none per transfer (copies between sub-meshes run no program).
    counts = run["counts"]
    assert counts["per_micro_batch"] == 2 * STAGES
    assert counts["per_step"] < len(jax.tree.leaves(run["state"]))
    assert run["executions"] == 2 * STAGES * MICRO_BATCHES + counts["per_step"]
    assert run["last_step"]["programs"] == run["executions"]
    assert run["last_step"]["transfers"] >= 6 * MICRO_BATCHES  # 3 cuts, there and back


def test_the_budget_refuses_what_does_not_fit(run):
    budget, abstract = run["budget"], run["abstract"]
    batch = setups.gpt_batches(1)[0]
    data = parallel.parallelize(setups.gpt_step(markers=True),
                                method=parallel.make_method("data", memory_budget_bytes=budget))
    with pytest.raises(parallel.PlanError, match=r"method 'data' needs [\d,]+ bytes per device"
                       rf" .* over parallel.memory_budget_bytes={budget:,}"):
        data.plan(abstract, batch)
    # Two stages of four devices hold twice the layers per device: refused with one line naming
    # the bytes reached and the budget.
    method = parallel.PipeshardParallel(MICRO_BATCHES, stage_option=2, remat=True,
                                        intra_op="data", profile=setups.PROFILE,
                                        memory_budget_bytes=budget)
    with pytest.raises(parallel.PlanError) as refused:
        parallel.parallelize(setups.gpt_step(markers=True), method=method).plan(abstract, batch)
    message = str(refused.value)
    assert "\n" not in message
    assert f"memory_budget_bytes={budget:,}" in message
    assert "smallest per-device peak it reaches is" in message


def test_the_memory_model_bounds_what_the_devices_hold(run):
    """The report's per-stage bytes (parallel.pipeline._memory, which the budget check uses)
    against the bytes measured on each stage's devices during the steps (live arrays at their
    peak plus the largest program's temporaries): within 10% below and 25% above."""
    stages = run["report"].stages["stages"]
    measured = run["peaks"]["step"]
    for s in stages:
        held = max(measured[d] + run["programs"][d] for d in s["devices"])
        assert 0.9 * held <= s["memory_bytes"] <= 1.25 * held, (s["stage"], held, s["memory"])
    # 1F1B keeps S - s micro-batches in flight on stage s.
    assert [s["max_micro_batches_in_flight"] for s in stages] == [4, 3, 2, 1]


