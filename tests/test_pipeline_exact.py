"""PipeshardParallel computes what the unpipelined step computes, or refuses with one line:
both forms of the stage marker, per-example outputs, shape constants, random keys, weighted means,
micro-batches of one example (8 simulated CPU devices, tiny models)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import parallel
from tests import _pipeline_setups as setups


def _method(num_micro_batches, stages=2, **kwargs):
    return parallel.PipeshardParallel(num_micro_batches=num_micro_batches, stage_option=stages,
                                      intra_op="data", profile=setups.PROFILE, **kwargs)


def _gpt_loss(weights, batch, form):
    """The setups' GPT with a stage cut after each block: ``form`` "value" passes the residual
    stream through the marker, "call" calls it with no arguments, None does not cut."""
    x = weights["embed"][batch["tokens"]] + weights["pos"]
    for i, p in enumerate(weights["blocks"]):
        x = setups._block(p, x)
        if i < setups.DEPTH - 1 and form == "value":
            x = parallel.mark_pipeline_boundary(x)
        elif i < setups.DEPTH - 1 and form == "call":
            assert parallel.mark_pipeline_boundary() is None
    logits = x @ weights["embed"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def _gpt_step(form):
    def step(state, batch):
        loss, grads = jax.value_and_grad(_gpt_loss)(state["weights"], batch, form)
        updates, moments = setups.OPTIMIZER.update(grads, state["moments"], state["weights"])
        return ({"weights": optax.apply_updates(state["weights"], updates), "moments": moments,
                 "count": state["count"] + 1}, {"loss": loss})

    return step


def _run(step, state, batches):
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def _close(got, want, rtol=1e-5, atol=1e-6):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def gpt_reference():
    """Two unpipelined steps of the GPT (one device)."""
    batches = setups.gpt_batches(2, size=8)
    return batches, _run(jax.jit(_gpt_step(None)), setups.gpt_state(jax.random.key(0)), batches)


def test_marker_without_arguments_cuts_like_the_marker_with_values(gpt_reference):
    batches, (want_state, want_metrics) = gpt_reference
    plans = {}
    for form in ("value", "call"):
        step = parallel.parallelize(_gpt_step(form), method=_method(4, stages=2))
        state = step.init_state(setups.gpt_state, jax.random.key(0), batches[0])
        plans[form] = step.plan(state, batches[0])
        got_state, got_metrics = _run(step, state, batches)
        _close(got_state, want_state)
        _close(got_metrics, want_metrics)
    stages = {form: [s["layers"] for s in plan.extras["stages"]] for form, plan in plans.items()}
    # Four layers (one per block), two per stage, from either form of the marker.
    assert stages["call"] == stages["value"] == [[0, 1], [2, 3]]
    assert plans["call"].extras["leaf_stages"] == plans["value"].extras["leaf_stages"]
    sent = {form: [s["sends_bytes_per_micro_batch"] for s in plan.extras["stages"]]
            for form, plan in plans.items()}
    assert sent["call"] == sent["value"] == [2 * setups.SEQ * setups.WIDTH * 4, 0]
