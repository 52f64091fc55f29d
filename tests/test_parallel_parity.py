"""Every method trains exactly like one device: 3 Adam steps of an MLP and a GPT on 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel
from benchmarks.pmap_baseline import pmap_step
from _parallel_setups import gpt_setup, mlp_setup, run_reference

STEPS = 3
# Adam divides each gradient by its running RMS, so a parameter whose gradient is tiny still moves
# by about the learning rate, and float32 reduction-order noise in that gradient shows up as a
# difference of up to ~1e-3 of the learning rate (measured: 1.1e-6 at lr 1e-3 on one GPT weight).
# atol is 2e-3 of the learning rate; parameter values are O(1e-2..1).
SETUPS = {"mlp": (lambda: mlp_setup(learning_rate=1e-2), 2e-5),
          "gpt": (lambda: gpt_setup(learning_rate=1e-3), 2e-6)}
METHODS = {
    "data": lambda: parallel.DataParallel(),
    "zero2": lambda: parallel.Zero2Parallel(),
    "zero3": lambda: parallel.Zero3Parallel(),
    "manual": lambda: parallel.ManualParallel(parallel.MEGATRON_RULES, mesh={"data": 2, "model": 4}),
}


@pytest.fixture(scope="module", params=sorted(SETUPS))
def trained_reference(request):
    make_setup, atol = SETUPS[request.param]
    setup = make_setup()
    initial = setup.init(jax.random.key(0))
    state, losses = run_reference(setup, STEPS, initial)
    return setup, initial, state, losses, atol


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_three_steps_match_single_device(trained_reference, method_name):
    setup, initial, reference_state, reference_losses, atol = trained_reference
    method = METHODS[method_name]()
    logical_axes = (setup.logical_axes, None) if method_name == "manual" else None
    step = parallel.parallelize(setup.train_step, method=method, logical_axes=logical_axes)
    # sharded creation (step.init_state) is tested on the MLP in test_parallel_plan; here the
    # step places a copy of one host-made initial state itself (compiling a sharded GPT init
    # per method would double this file's time)
    state = jax.tree.map(jnp.copy, initial)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, setup.batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert int(state["step"]) == STEPS
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol),
                 state["params"], reference_state["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol),
                 state["opt_state"][0].mu, reference_state["opt_state"][0].mu)
    # the state stays where the plan put it: the next step moves no data before it runs
    specs = step.plan(state, setup.batch).input_specs((state, setup.batch))[0]
    jax.tree.map(lambda leaf, spec: _assert_spec(leaf, spec), state, specs)


def _assert_spec(leaf, spec):
    assert leaf.sharding.spec == spec and len(leaf.sharding.device_set) == 8


def test_pmap_baseline_matches_single_device():
    setup = mlp_setup(learning_rate=1e-2)
    reference_state, reference_losses = run_reference(setup, STEPS)
    step = pmap_step(setup.loss_fn, setup.optimizer)
    stacked = step.replicate(setup.init(jax.random.key(0)))
    assert stacked["params"]["dense_0"]["kernel"].shape == (8, 16, 64)  # one copy per device
    losses = []
    for _ in range(STEPS):
        stacked, metrics = step(stacked, setup.batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    state = step.unreplicate(stacked)
    assert int(state["step"]) == STEPS
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state["params"], reference_state["params"])
    odd = {k: v[:12] for k, v in setup.batch.items()}
    with pytest.raises(parallel.PlanError, match="global batch size 12 .* not divisible by the 8"):
        step(stacked, odd)
