"""PipeshardParallel: stages on sub-meshes equal the unpipelined step, both schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel
from parallel.pipeline import _method
from tests import _pipeline_setups as setups
from tests.test_pipeline_runtime import Executions, HostReads

STEPS = 3


@pytest.fixture(scope="module")
def reference():
    """Loss and state after 3 unpipelined steps (one device, float32)."""
    step = jax.jit(setups.gpt_step(markers=False))
    state = setups.gpt_state(jax.random.key(0))
    losses = []
    for batch in setups.gpt_batches(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


# Each schedule and each way of finding the layers once: the schedule only orders the same
# programs (shared by both schedules), so the other two pairings compile nothing new.
@pytest.mark.parametrize("markers, schedule", [(True, "1f1b"), (False, "gpipe")],
                         ids=["markers-1f1b", "automatic-gpipe"])
def test_four_stages_equal_unpipelined_step(reference, markers, schedule, monkeypatch):
    if not markers:  # (the marked case compiles the programs test_pipeline_stages.py runs)
        # Odd stages data parallel between solver-planned ones (model=2): activations and their
        # gradients change layout at every cut, which must not go through the host.
        solver = _method.stage_plan

        def alternate(program, regions, placement, stage, devices, profile, **kwargs):
            if stage % 2:
                return {"data": devices}, {}
            return solver(program, regions, placement, stage, devices, profile, **kwargs)

        monkeypatch.setattr(_method, "stage_plan", alternate)
    executions, host = Executions(monkeypatch), HostReads(monkeypatch)
    method = parallel.PipeshardParallel(num_micro_batches=8, stage_option=4, schedule=schedule,
                                        profile=setups.PROFILE)
    step = parallel.parallelize(setups.gpt_step(markers), method=method)
    batches = setups.gpt_batches(STEPS)
    state = step.init_state(setups.gpt_state, jax.random.key(0), batches[0])
    placed = [jax.device_put(b, step.input_shardings(state, b)[1]) for b in batches]
    losses = []
    for k, batch in enumerate(placed):
        executions.count, host.active = 0, k > 0  # the first step compiles
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        host.active = False
        losses.append(float(metrics["loss"]))
    assert host.reads == []
    runner = step.compile(state, batches[0]).runner
    # 2 S M forward and backward programs, plus a few per stage and step (fewer than the
    # state's leaves: gradients accumulate inside the backward programs); none per transfer.
    counts = runner.programs_per_step()
    assert counts["per_micro_batch"] == 2 * 4
    assert counts["per_step"] < len(jax.tree.leaves(state))
    assert executions.count == runner.last_step["programs"] == 2 * 4 * 8 + counts["per_step"]
    assert runner.last_step["transfers"] >= 6 * 8  # 3 cuts, there and back
    ref_losses, ref_state = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Adam divides each gradient by its own running scale: a near-zero gradient summed over
    # micro-batches in another order moves its weight by ~1e-6 after 3 steps (seen: 1.2e-6).
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    plan = step.plan(state, batches[0])
    assert plan.method == "pipeshard"
    assert plan.num_devices == 8
    stages = plan.extras["stages"]
    assert [s["layers"] for s in stages] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert [s["devices"] for s in stages] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Each stage's intra-op mesh (from the ShardParallel solver) covers its 2 devices.
    assert [np.prod(list(s["intra_op_mesh"].values())) for s in stages] == [2, 2, 2, 2]
    if not markers:
        assert all(s["intra_op_mesh"]["data"] == 2 for s in stages[1::2]), stages
        assert all(s["intra_op_mesh"].get("model") == 2 for s in stages[::2]), stages
    # Hand-cut or automatic, only the residual stream crosses a cut: (2, 8, 16) float32 per
    # micro-batch (the labels' work is done on the last stage, not carried there).
    assert [s["sends_bytes_per_micro_batch"] for s in stages] == [2 * 8 * 16 * 4] * 3 + [0]
    # Every state leaf lives on its stage's devices with the spec the plan records; block k
    # lives on stage k.
    leaf_stages = plan.extras["leaf_stages"][0]
    for leaf, planned, stage in zip(jax.tree.leaves(state), plan.inputs[0], leaf_stages):
        assert sorted(d.id for d in leaf.sharding.device_set) == stages[stage]["devices"]
        assert leaf.sharding.spec == planned.spec
    for k, block in enumerate(state["weights"]["blocks"]):
        assert sorted(d.id for d in block["qkv"].sharding.device_set) == [2 * k, 2 * k + 1]


def test_marker_cuts_forward_and_backward():
    def loss(w, x):
        h = parallel.mark_pipeline_boundary(jnp.tanh(x @ w))
        return jnp.mean(h ** 2)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(jnp.ones((3, 3)), jnp.ones((2, 3)))
    marks = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pipeline_boundary"]
    assert ["transpose" in str(e.source_info.name_stack) for e in marks] == [False, True]
    assert float(jax.jit(loss)(jnp.ones((3, 3)), jnp.ones((2, 3)))) == pytest.approx(
        float(jnp.tanh(3.0) ** 2))


def _abstract(state_fn, batch):
    return jax.eval_shape(state_fn, jax.random.key(0)), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)


@pytest.mark.parametrize("method, message", [
    (parallel.PipeshardParallel(num_micro_batches=8, stage_option=16),
     "stage_option=16 stages but only 8 devices"),
    (parallel.PipeshardParallel(num_micro_batches=3, stage_option=2),
     "global batch size 16 is not divisible by num_micro_batches=3"),
    (parallel.PipeshardParallel(num_micro_batches=2, stage_option=8, layers=8),
     "stage_option=8 stages but the step has 4 layers (from its mark_pipeline_boundary calls)"),
])
def test_bad_input_is_a_plan_error(method, message):
    step = parallel.parallelize(setups.gpt_step(markers=True), method=method)
    with pytest.raises(parallel.PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        step.plan(*_abstract(setups.gpt_state, setups.gpt_batches(1)[0]))


@pytest.mark.parametrize("where", ["scan", "cond"])
def test_marker_inside_control_flow_is_refused(where):
    def loss(w, batch):
        x = batch["x"]
        if where == "scan":
            x, _ = jax.lax.scan(lambda c, _: (parallel.mark_pipeline_boundary(c @ w), None),
                                x, None, length=2)
        else:
            x = jax.lax.cond(w[0, 0] > 0, lambda v: parallel.mark_pipeline_boundary(v @ w),
                             lambda v: v, x)
        return jnp.mean(x)

    def step(w, batch):
        return w - jax.grad(loss)(w, batch), {}

    method = parallel.PipeshardParallel(num_micro_batches=2, stage_option=2)
    plan_step = parallel.parallelize(step, method=method)
    body = {"scan": "a scan body", "cond": "a cond branch"}[where]
    with pytest.raises(parallel.PlanError, match=f"inside {body}"):
        plan_step.plan(jax.ShapeDtypeStruct((4, 4), jnp.float32),
                       {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32)})


def test_num_micro_batches_refused_by_methods_that_do_not_pipeline():
    with pytest.raises(parallel.PlanError, match="num_micro_batches=4 applies to pipeline"):
        parallel.make_method("data", num_micro_batches=4)
    assert isinstance(parallel.make_method("pipeshard", num_micro_batches=4),
                      parallel.PipeshardParallel)


def test_interleaved_virtual_stages_equal_the_unpipelined_step(reference):
    """Interleaved 1F1B: 2 stages x 2 virtual stages (the GPT's 4 marked blocks: block k on
    stage k % 2), 4 micro-batches; equal to the unpipelined step, with its smaller bubble."""
    method = parallel.PipeshardParallel(num_micro_batches=4, stage_option=2,
                                        schedule="interleaved", virtual_stages=2,
                                        intra_op="data", profile=setups.PROFILE)
    step = parallel.parallelize(setups.gpt_step(markers=True), method=method)
    batches = setups.gpt_batches(STEPS)
    state = step.init_state(setups.gpt_state, jax.random.key(0), batches[0])
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    ref_losses, ref_state = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Adam divides each gradient by its own running scale: a near-zero gradient summed over
    # micro-batches in another order moves its weight by ~1e-6 after 3 steps (seen: 1.2e-6).
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    plan = step.plan(state, batches[0])
    assert plan.extras["bubble_fraction"] == pytest.approx(1 / 9)  # (S-1) / (v M + S-1)
    assert "2 stages x 2 virtual stages, schedule interleaved" in plan.extras["explanation"]
    stages = plan.extras["stages"]
    assert [s["layers"] for s in stages] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert [s["devices"] for s in stages] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    for k, block in enumerate(state["weights"]["blocks"]):
        assert sorted(d.id for d in block["qkv"].sharding.device_set) == stages[k]["devices"]
    runner = step.compile(state, batches[0]).runner
    assert runner.programs_per_step()["per_micro_batch"] == 2 * 4  # F and B per virtual stage


def test_virtual_stages_bad_options_are_refused_in_one_line():
    for kwargs, message in [
            (dict(stage_option=2, schedule="interleaved"),
             "schedule='interleaved' needs virtual_stages >= 2"),
            (dict(stage_option=2, virtual_stages=2), "virtual_stages=2 needs schedule='interleaved'"),
            (dict(schedule="interleaved", virtual_stages=2), "needs a number of stages")]:
        with pytest.raises(parallel.PlanError, match=message) as refused:
            parallel.PipeshardParallel(num_micro_batches=4, **kwargs)
        assert "\n" not in str(refused.value)
    with pytest.raises(parallel.PlanError, match="needs schedule='interleaved'"):
        parallel.make_method("pipeshard", stages=2, virtual_stages=2)
    # The forward cut into 6 layers does not make 2 stages x 2 equal virtual stages.
    method = parallel.PipeshardParallel(num_micro_batches=2, stage_option=2, layers=6,
                                        schedule="interleaved", virtual_stages=2)
    step = parallel.parallelize(setups.gpt_step(markers=False), method=method)
    with pytest.raises(parallel.PlanError, match="6 layers do not split into 2 stages x 2 "
                                                 "virtual stages"):
        step.plan(*_abstract(setups.gpt_state, setups.gpt_batches(1)[0]))
