"""``method="auto"`` searches SPMD plans and pipelines together, on one cost model.

On 8 simulated CPU devices: with a memory budget no SPMD plan meets, it picks a plan that fits
(micro-batches, stages, rematerialization as memory needs), says which and why, and trains like
the unpipelined step; without the budget it picks no pipeline (the devices share the host's
cores, so stages cannot overlap). Bad input is refused in one line.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import parallel
from parallel import auto
from trainer import cli

from _auto_steps import OPTIMIZER, init, make_batch, train_step

BATCH = 128


@pytest.fixture(scope="module")
def setup():
    state = init(jax.random.key(0))
    batch = make_batch(BATCH)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    with pytest.raises(auto.MemoryBudgetError) as error:
        auto.solve(train_step, abstract, num_devices=8, memory_budget_bytes=1.0)
    return state, batch, error.value.smallest_bytes


def test_without_a_budget_no_pipeline_is_chosen_on_cpu_devices(setup):
    state, batch, _ = setup
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    profile = parallel.get_profile("cpu", 8)
    decision = auto.search(train_step, abstract, num_devices=8, profile=profile,
                           memory_budget_bytes=profile.memory_bytes, tiny_step_s=0)
    assert decision.pipeline is None and decision.pipelines == [] and decision.spmd is not None
    assert decision.explanation.splitlines()[2] == (
        "why: pipelines were not searched: the devices share one host, so stages cannot overlap")
    assert isinstance(parallel.make_method("auto"), parallel.AutoParallel)


def test_a_budget_no_spmd_plan_meets_gets_a_plan_that_fits_and_trains_the_same(setup):
    state, batch, smallest_spmd = setup
    budget = 0.9 * smallest_spmd  # below what any SPMD plan needs at the full batch
    step = parallel.parallelize(train_step,
                                method=parallel.make_method("auto", memory_budget_bytes=budget))
    plan = step.plan(state, batch)
    explanation = plan.extras["explanation"]
    planner = plan.extras["planner"]
    assert planner["chosen"] == "pipeline" and planner["spmd_step_time_s"] is None
    assert "why: no SPMD plan fits the budget at the full batch" in explanation
    chosen = min((p for p in planner["pipelines"] if p["memory_bytes"] <= budget),
                 key=lambda p: (p["step_time_s"], p["stages"]))
    what = ("micro-batches in an SPMD plan (gradient accumulation)" if chosen["stages"] == 1
            else "pipeline")
    assert f"chosen: {what}, " in explanation
    assert f"x {chosen['num_micro_batches']} micro-batches" in explanation
    assert plan.extras["num_micro_batches"] == chosen["num_micro_batches"] > 1
    assert len(plan.extras["stages"]) == chosen["stages"]
    # What runs fits: XLA's memory analysis of every stage program, in-flight activations added.
    assert step.analyze(state, batch).per_device_memory_bytes <= budget

    reference = jax.jit(train_step)
    expected, got = state, jax.tree.map(jnp.copy, state)
    for _ in range(2):
        expected, want = reference(expected, batch)
        got, have = step(got, batch)
        np.testing.assert_allclose(float(have["loss"]), float(want["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 got, expected)


def test_one_host_of_h100s_gets_no_pipeline_when_memory_does_not_force_one():
    # A GPT (2 blocks of width 256, vocabulary 8192, 32 x 128 tokens, bfloat16 compute) on
    # one host of 8 H100s: the 2-stage pipelines are priced, none is cheaper than the SPMD
    # plan. It used to get a 2-stage pipeline: zeros broadcast into attention- and
    # logits-sized arrays were priced as replicated arrays written to memory (the full-batch
    # SPMD plan paid for them, the layers priced alone did not), and the pipeline's launches,
    # a forward and a backward program per stage and micro-batch, were free.
    from trainer import Trainer, load_config

    trainer = Trainer(load_config("benchmarks/gpt-350m.yaml", [
        "parallel.method=data", "model.num_layers=2", "model.hidden_size=256",
        "model.num_heads=4", "model.vocab_size=8192", "model.block_size=128",
        "data.seq_len=128", "train.batch_size=32"])).build()
    profile = parallel.get_profile("h100", 8)
    decision = auto.search(trainer.fns.train_step, (trainer.abstract_state, trainer.batch_spec),
                           num_devices=8, profile=profile, memory_budget_bytes=profile.memory_bytes,
                           max_stages=2)
    assert decision.pipeline is None and decision.spmd is not None
    assert [p.num_stages for p in decision.pipelines] == [2]  # priced, not skipped
    assert all(p.step_time_s > decision.spmd.best.step_time_s for p in decision.pipelines)
    assert decision.explanation.splitlines()[2] == "why: no pipeline is cheaper"


def test_a_tiny_step_is_data_parallel_without_a_search(monkeypatch):
    # Widths 8 and 16, batch 32: the whole step unsplit costs less than launching a program on
    # 8 simulated devices (15 us each); no split can save more, so nothing is searched.
    params = [{"up": jax.ShapeDtypeStruct((8, 16), jnp.float32),
               "down": jax.ShapeDtypeStruct((16, 8), jnp.float32)}]
    x = jax.ShapeDtypeStruct((32, 8), jnp.float32)
    args = ({"params": params, "opt": jax.eval_shape(OPTIMIZER.init, params)}, {"x": x, "y": x})
    profile = parallel.get_profile("cpu", 8)
    searched = auto.search(train_step, args, num_devices=8, profile=profile,
                           memory_budget_bytes=profile.memory_bytes, tiny_step_s=0)
    assert searched.tiny is None and searched.spmd is not None  # 0: the search runs

    def no_search(*args, **kwargs):
        raise AssertionError("a tiny step was searched")

    monkeypatch.setattr(auto._decide, "solve", no_search)
    monkeypatch.setattr(auto._decide, "pipeline_program", no_search)
    plan = parallel.parallelize(train_step, method=parallel.make_method("auto")).plan(*args)
    assert plan.method == "auto" and plan.mesh_shape == {"data": 8}
    assert set(jax.tree.leaves(plan.input_specs(args)[0])) == {P()}  # the state replicated
    assert jax.tree.leaves(plan.input_specs(args)[1]) == [P("data"), P("data")]
    lines = plan.extras["explanation"].splitlines()
    assert lines[1] == "chosen: data parallelism, mesh {'data': 8}"
    assert lines[2].startswith("why: tiny model: the whole step unsplit on one device is "
                               "estimated at ") and "under the 120 us a step program" in lines[2]
    assert plan.extras["planner"]["chosen"] == "data (tiny model)"


@pytest.mark.parametrize("overrides, message", [
    (["parallel.method=auto", "parallel.num_micro_batches=3"],
     "error: parallel.num_micro_batches=3 does not divide the batch of 32; use a divisor of 32"),
    (["parallel.method=auto", "parallel.memory_budget_bytes=1000"],
     "error: no plan of this step on 8 devices fits 1000 bytes per device, even with "
     "micro-batches and rematerialization: the fewest bytes reached are "),
])
def test_bad_input_is_one_line(overrides, message, capsys):
    code = cli.run(lambda: print(cli.plan("tiny/mlp.yaml", overrides)))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1
    if "fewest" in message:  # the fewest bytes reached, pipelined or not, over the budget
        reached = err[len(message):].split()
        assert int(reached[0]) > 1000 and reached[1] in ("(SPMD).", "(pipelined).")


def test_a_plan_over_the_device_memory_says_so_in_one_line():
    from parallel.report import Report

    def report(nbytes):
        return Report("zero3", {"data": 8}, nbytes, 0.0, {}, 1.0, 1.0, 1e-3, "h100", 0.0, 0.0,
                      None, device_memory_bytes=80 * 2**30)

    over = [line for line in report(1536 * 2**30).format().splitlines() if "DOES NOT FIT" in line]
    assert over == ["  per-device memory   1,649,267,441,664 bytes  DOES NOT FIT: 1,536.0 GiB "
                    "per device, the h100 has 80.0 GiB"]
    assert "DOES NOT FIT" not in report(80 * 2**30).format()


def test_a_pipelined_plan_over_the_device_memory_says_so_in_one_line(setup, monkeypatch):
    import dataclasses

    from parallel import profiles

    state, batch, _ = setup
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    step = parallel.parallelize(train_step, method=parallel.make_method(
        "pipeshard", num_micro_batches=2))
    step.plan(*abstract)  # planned for the running devices; reported for 1000-byte ones
    real = profiles.get_profile
    monkeypatch.setattr(profiles, "get_profile",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), memory_bytes=1000))
    report = step.analyze(*abstract, profile="cpu")
    over = [line for line in report.format().splitlines() if "DOES NOT FIT" in line]
    assert over == [f"  per-device memory   {report.per_device_memory_bytes:,} bytes  DOES NOT "
                    f"FIT: {report.per_device_memory_bytes / 2**30:,.1f} GiB per device, the "
                    f"cpu has 0.0 GiB"]


def test_a_pipeline_over_the_budget_once_compiled_is_searched_again_for_less(setup, monkeypatch):
    """XLA's compiled bytes can exceed the search's estimate: the plan that runs must fit."""
    from parallel.auto import _joint

    state, batch, smallest_spmd = setup
    budget = 0.9 * smallest_spmd
    peaks = []

    def first_over(step):  # XLA's bytes, faked: the first pipeline 5% over, the next one fits
        peaks.append(1.05 * budget if not peaks else 0.5 * budget)
        return peaks[-1]

    monkeypatch.setattr(_joint, "_compiled_peak", first_over)
    step = parallel.parallelize(train_step,
                                method=parallel.make_method("auto", memory_budget_bytes=budget))
    plan = step.plan(state, batch)
    assert len(peaks) == 2
    notes = [line for line in plan.extras["explanation"].splitlines()
             if line.startswith("compiled: ")]
    assert len(notes) == 1 and f"needs {1.05 * budget / 2**20:.2f} MiB" in notes[0]
    # Searched again for at least the overshoot less, and the plan chosen fits that.
    planning = plan.extras["planner"]["memory_budget_bytes"]
    assert planning <= 0.95 * budget + 1
    chosen = [p for p in plan.extras["planner"]["pipelines"]
              if p["stages"] == len(plan.extras["stages"])
              and p["num_micro_batches"] == plan.extras["num_micro_batches"]]
    assert chosen and min(p["memory_bytes"] for p in chosen) <= planning

    monkeypatch.setattr(_joint, "_compiled_peak", lambda step: 1.01 * budget)
    step = parallel.parallelize(train_step,
                                method=parallel.make_method("auto", memory_budget_bytes=budget))
    with pytest.raises(auto.MemoryBudgetError, match="once compiled") as error:
        step.plan(state, batch)
    message = str(error.value)  # three searches, each for less, none fitting once compiled
    assert "\n" not in message and (
        f"on 8 devices fits {budget:.0f} bytes per device once compiled: " in message)
    assert f"needs {1.01 * budget / 2**20:.2f} MiB per device once compiled (XLA)" in message
