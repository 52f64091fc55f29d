"""PipeshardParallel computes what the unpipelined step computes, or refuses with one line: both
forms of the stage marker, per-example outputs, shape constants, positions over the batch, random
keys per micro-batch, weighted means, batch statistics, micro-batches of one example (8 simulated
CPU devices, tiny models, user state pytrees: a dict with keys of its own, a flax TrainState)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import parallel
from tests import _pipeline_setups as setups

WIDTH, BATCH = 8, 8
SGD = optax.sgd(0.1)


def _method(num_micro_batches, stages=2, **kwargs):
    return parallel.PipeshardParallel(num_micro_batches=num_micro_batches, stage_option=stages,
                                      intra_op="data", profile=setups.PROFILE, **kwargs)


def _init(key):
    """A user's state: a dict with keys of its own (no 'params', no 'opt_state')."""
    k0, k1 = jax.random.split(key)
    weights = {"l0": jax.random.normal(k0, (WIDTH, WIDTH)) * 0.5,
               "l1": jax.random.normal(k1, (WIDTH, WIDTH)) * 0.5}
    return {"w": weights, "sgd": SGD.init(weights), "key": jax.random.key(7)}


def _step(loss_fn):
    """A train step over ``_init``'s state: the loss gets a fresh key each step."""
    def step(state, batch):
        key, sub = jax.random.split(state["key"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["w"], batch, sub)
        updates, sgd = SGD.update(grads, state["sgd"], state["w"])
        return ({"w": optax.apply_updates(state["w"], updates), "sgd": sgd, "key": key},
                {"loss": loss, **aux})

    return step


def _batch(seed=0, size=BATCH):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(size, WIDTH)).astype(np.float32),
            "y": rng.normal(size=(size, WIDTH)).astype(np.float32),
            "mask": np.array([1, 1, 0, 1, 0, 0, 1, 1] * (size // 8), np.float32)}


def _leaves(tree):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x) for x in jax.tree.leaves(tree)]


def _close(got, want, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(_leaves(got), _leaves(want), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _pipelined(step, num_micro_batches, batch, init=_init, **kwargs):
    """``step`` run once under PipeshardParallel; returns its outputs and the parallel step."""
    pipelined = parallel.parallelize(step, method=_method(num_micro_batches, **kwargs))
    state = pipelined.init_state(init, jax.random.key(0), batch)
    return pipelined(state, batch), pipelined


def _unpipelined(step, batch, init=_init):
    return jax.jit(step)(init(jax.random.key(0)), batch)


# ----- the marker ------------------------------------------------------------------------------
def _layers_loss(form):
    def loss(w, batch, key):
        del key
        x = batch["x"]
        for i, name in enumerate(("l0", "l1", "l0", "l1")):
            x = jnp.tanh(x @ w[name])
            if i < 3 and form == "value":
                x = parallel.mark_pipeline_boundary(x)
            elif i < 3 and form == "call":
                assert parallel.mark_pipeline_boundary() is None
        return jnp.mean((x - batch["y"]) ** 2), {}

    return loss


def test_marker_without_arguments_cuts_like_the_marker_with_values():
    batch = _batch()
    want = _unpipelined(_step(_layers_loss(None)), batch)
    plans = {}
    for form in ("value", "call"):
        got, pipelined = _pipelined(_step(_layers_loss(form)), 4, batch)
        _close(got, want)
        plans[form] = pipelined.plan(*jax.tree.map(jnp.asarray, (_init(jax.random.key(0)),
                                                                 batch)))
    stages = {form: [s["layers"] for s in plan.extras["stages"]] for form, plan in plans.items()}
    # Four layers (a cut after each of the first three), two per stage, from either form.
    assert stages["call"] == stages["value"] == [[0, 1], [2, 3]]
    assert plans["call"].extras["leaf_stages"] == plans["value"].extras["leaf_stages"]
    sent = {form: [s["sends_bytes_per_micro_batch"] for s in plan.extras["stages"]]
            for form, plan in plans.items()}
    assert sent["call"] == sent["value"] == [2 * WIDTH * 4, 0]  # (2, 8) float32 per micro-batch
    # Outside a pipeline the marker is nothing: the solver's plan runs the same step.
    sharded = parallel.parallelize(_step(_layers_loss("call")), method=parallel.ShardParallel(
        profile=setups.PROFILE))
    _close(sharded(sharded.init_state(_init, jax.random.key(0), batch), batch), want)


# ----- per-example outputs, shape constants, positions -----------------------------------------
def _per_example_loss(w, batch, key):
    del key
    h = jnp.tanh(batch["x"] @ w["l0"])
    parallel.mark_pipeline_boundary()
    # A loop over steps with the examples in its carry (its backward sums weight gradients).
    h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w["l1"]) + c, None), h, None, length=2)
    err = jnp.mean((h @ w["l1"] - batch["y"]) ** 2, -1)  # (B,)
    n = batch["x"].shape[0]  # the global batch, also per micro-batch
    position = jnp.arange(n)  # positions over the global batch
    weight = 1.0 + position / n
    loss = jnp.sum(err * weight) / n
    return loss, {"err": err, "batch_size": jnp.asarray(n, jnp.float32),
                  "position_sum": jnp.sum(position * err), "worst": jnp.max(err),
                  "sorted": jnp.sort(err), "picked": h[jnp.arange(n), 0]}


@pytest.mark.parametrize("num_micro_batches", [4, 8], ids=["micro-batch-2", "micro-batch-1"])
def test_per_example_outputs_and_batch_size_constants_equal_the_unpipelined_step(
        num_micro_batches):
    batch = _batch()
    want = _unpipelined(_step(_per_example_loss), batch)
    got, pipelined = _pipelined(_step(_per_example_loss), num_micro_batches, batch)
    _close(got, want)
    metrics = got[1]
    assert metrics["err"].shape == metrics["sorted"].shape == metrics["picked"].shape == (8,)
    assert float(metrics["batch_size"]) == 8.0
    np.testing.assert_allclose(np.asarray(metrics["sorted"]), np.sort(np.asarray(want[1]["err"])),
                               rtol=1e-6)
    regions = pipelined.compile(*jax.tree.map(jnp.asarray, (_init(jax.random.key(0)),
                                                            batch))).runner.regions
    kinds = sorted(set(regions.combine.values()))
    assert kinds == ["concat", "sum"]  # per-example rows, and sums over examples


# ----- random keys -----------------------------------------------------------------------------
def _dropout_loss(w, batch, key):
    h = jnp.tanh(batch["x"] @ w["l0"])
    h = jnp.where(jax.random.bernoulli(key, 0.5, h.shape), 2.0 * h, 0.0)
    parallel.mark_pipeline_boundary()
    err = jnp.mean((h @ w["l1"] - batch["y"]) ** 2, -1)
    return jnp.mean(err), {"err": err}


def test_each_micro_batch_draws_its_own_dropout_mask_as_grad_accumulation_does():
    # The same two examples in each of the 4 micro-batches: equal rows iff masks repeat.
    pair = _batch(size=8)
    batch = jax.tree.map(lambda x: np.concatenate([x[:2]] * 4), pair)
    got, _ = _pipelined(_step(_dropout_loss), 4, batch)
    err = np.asarray(got[1]["err"]).reshape(4, 2)
    assert not np.allclose(err[0], err[1]) and not np.allclose(err[1], err[2])
    # Gradient accumulation by hand: micro-batch i's key is fold_in(step key, i).
    state = _init(jax.random.key(0))
    key, sub = jax.random.split(state["key"])
    grads, losses = [], []
    for i in range(4):
        micro = jax.tree.map(lambda x, i=i: x[2 * i:2 * i + 2], batch)
        (loss, _), g = jax.value_and_grad(_dropout_loss, has_aux=True)(
            state["w"], micro, jax.random.fold_in(sub, i))
        grads.append(g)
        losses.append(loss)
    mean_grads = jax.tree.map(lambda *g: sum(g) / 4, *grads)
    updates, _ = SGD.update(mean_grads, state["sgd"], state["w"])
    _close(got[0]["w"], optax.apply_updates(state["w"], updates))
    np.testing.assert_allclose(float(got[1]["loss"]), float(np.mean(losses)), rtol=1e-6)


# ----- weighted means, statistics, refusals ----------------------------------------------------
def _masked(weighted):
    def loss(w, batch, key):
        del key
        h = jnp.tanh(batch["x"] @ w["l0"])
        parallel.mark_pipeline_boundary()
        err = jnp.mean((h @ w["l1"] - batch["y"]) ** 2, -1)
        total, count = jnp.sum(err * batch["mask"]), jnp.sum(batch["mask"])
        mean = parallel.weighted_mean(total, count) if weighted else total / count
        return mean, {"tokens": count}

    return loss


def _train_state_init(key):
    """A flax TrainState as the whole state."""
    return train_state.TrainState.create(apply_fn=None, params=_init(key)["w"], tx=SGD)


def _train_state_step(loss_fn):
    def step(state, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, None)
        return state.apply_gradients(grads=grads), {"loss": loss, **aux}

    return step


@pytest.mark.parametrize("weighted, make_step, init", [
    (True, _step, _init), (False, _train_state_step, _train_state_init)],
    ids=["weighted_mean-dict", "division-TrainState"])
def test_masked_mean_equals_the_unpipelined_step(weighted, make_step, init):
    # Two masked-out rows in micro-batch 1, one in the others: a mean of per-micro-batch
    # ratios would differ.
    batch = _batch()
    want = _unpipelined(make_step(_masked(weighted)), batch, init)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: nothing to warn about
        got, _ = _pipelined(make_step(_masked(weighted)), 4, batch, init)
    _close(got, want, rtol=1e-5)
    assert float(got[1]["tokens"]) == 5.0


def _batch_norm_loss(w, batch, key):
    del key
    h = batch["x"] @ w["l0"]
    mean, var = jnp.mean(h, 0), jnp.var(h, 0)
    h = jnp.tanh((h - mean) / jnp.sqrt(var + 1e-5))
    parallel.mark_pipeline_boundary()
    return jnp.mean((h @ w["l1"] - batch["y"]) ** 2), {"mean": mean}


def test_batch_statistics_are_per_micro_batch_warned_and_reported():
    batch = _batch()
    with pytest.warns(UserWarning, match=r"output\[1\]\['loss'\].*computed per micro-batch.*"
                                         r"batch norm"):
        got, pipelined = _pipelined(_step(_batch_norm_loss), 4, batch)
    plan = pipelined.plan(*jax.tree.map(jnp.asarray, (_init(jax.random.key(0)), batch)))
    assert any("batch norm" in note for note in plan.extras["per_micro_batch"])
    assert "per micro-batch" in plan.extras["explanation"]
    # The batch mean itself is a mean of micro-batch means: exact.
    np.testing.assert_allclose(np.asarray(got[1]["mean"]),
                               np.asarray(batch["x"] @ _init(jax.random.key(0))["w"]["l0"]).mean(0),
                               rtol=1e-5, atol=1e-6)


def _max_loss(w, batch, key):
    del key
    h = jnp.tanh(batch["x"] @ w["l0"])
    parallel.mark_pipeline_boundary()
    return jnp.max(jnp.mean((h @ w["l1"] - batch["y"]) ** 2, -1)), {}


def _model_count_loss(w, batch, key):
    del key
    h = jnp.tanh(batch["x"] @ w["l0"])
    parallel.mark_pipeline_boundary()
    err = jnp.mean((h @ w["l1"] - batch["y"]) ** 2, -1)
    return parallel.weighted_mean(jnp.sum(err), jnp.sum(err > 0.5)), {}


def _pairs_loss(w, batch, key):
    del key
    h = jnp.tanh(batch["x"] @ w["l0"])
    parallel.mark_pipeline_boundary()
    out = h @ w["l1"]
    return jnp.mean((out - jnp.flip(out, 0)) ** 2), {}  # example i against example B-1-i


@pytest.mark.parametrize("loss, message", [
    (_max_loss, r"^output\[1\]\['loss'\] comes from a value of shape \(\) and dtype float32 "
                r"that is a maximum or minimum over examples that the backward pass reads"),
    (_model_count_loss, r"weighted_mean: its count depends on the model's parameters"),
    (_pairs_loss, r"operation rev picks examples by their position in the batch"),
])
def test_outputs_that_cannot_be_accumulated_exactly_are_refused(loss, message):
    step = parallel.parallelize(_step(loss), method=_method(4))
    abstract = jax.eval_shape(_init, jax.random.key(0)), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch())
    with pytest.raises(parallel.PlanError, match=message) as error:
        step.plan(*abstract)
    assert "\n" not in str(error.value)


def test_virtual_stages_must_divide_the_layers():
    from parallel.pipeline._stages import Layers, virtual_stage_starts

    layers = Layers({}, 12, [1.0] * 12, [0.0] * 12, True)
    assert virtual_stage_starts(layers, 2, 3) == [0, 2, 4, 6, 8, 10]
    with pytest.raises(parallel.PlanError, match=r"^12 layers do not split into 4 stages x 2 "
                                                 r"virtual stages \(8 equal parts\); add or "
                                                 r"remove mark_pipeline_boundary calls"):
        virtual_stage_starts(layers, 4, 2)
