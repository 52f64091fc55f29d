"""PipeshardParallel: stages on sub-meshes equal the unpipelined step, both schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel
from tests import _pipeline_setups as setups

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


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "automatic"])
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_four_stages_equal_unpipelined_step(reference, markers, schedule):
    method = parallel.PipeshardParallel(num_micro_batches=8, stage_option=4, schedule=schedule,
                                        profile=setups.PROFILE)
    step = parallel.parallelize(setups.gpt_step(markers), method=method)
    batches = setups.gpt_batches(STEPS)
    state = step.init_state(setups.gpt_state, jax.random.key(0), batches[0])
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    ref_losses, ref_state = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    plan = step.plan(state, batches[0])
    assert plan.method == "pipeshard"
    assert plan.num_devices == 8
    stages = plan.extras["stages"]
    assert [s["layers"] for s in stages] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert [s["devices"] for s in stages] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Each stage's intra-op mesh (from the ShardParallel solver) covers its 2 devices.
    assert [np.prod(list(s["intra_op_mesh"].values())) for s in stages] == [2, 2, 2, 2]
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
