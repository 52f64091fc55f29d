"""A Trainer subclass with a model and data of its own: no registry, no model.name.

It trains alike under data, zero3 and auto on 8 devices, resumes bit for bit, and logs an mfu
from XLA's FLOP count; bad models, data and state fail with one line naming the problem.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parallel.profiles import get_profile
from trainer import Callback, ConfigError, DataError, ModelError, Trainer, cli, load_config

BATCH = 512  # large enough that the replicated Adam update is a small part of a step's FLOPs


class Regressor(nnx.Module):  # not in the registry
    def __init__(self, rngs):
        self.hidden = nnx.Linear(16, 128, rngs=rngs)
        self.out = nnx.Linear(128, 16, rngs=rngs)

    def __call__(self, x):  # (B, 16) -> (B, 16)
        return self.out(nnx.relu(self.hidden(x)))


class Teacher:
    """``y = sin(x @ W)``; batch ``i`` is a pure function of ``(seed, i)``; keys of its own."""

    def __init__(self, seed):
        self.seed, self.w = seed, np.random.default_rng(0).normal(size=(16, 16)) / 4

    def batch(self, index, batch_size):
        x = np.random.default_rng([self.seed, index]).normal(size=(batch_size, 16))
        return {"x": x.astype(np.float32), "y": np.sin(x @ self.w).astype(np.float32)}


class OwnTrainer(Trainer):
    def build_model(self, rngs):
        return Regressor(rngs)

    def loss_fn(self, model, batch, rng):
        loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
        return loss, {}

    def train_data(self):
        return Teacher(1)

    def eval_data(self):
        return Teacher(2)

    def callbacks(self):
        return [self.recorder]

    recorder = None


class Crash(Exception):
    pass


class Recorder(Callback):
    def __init__(self, stop_after=None):
        self.losses, self.stop_after = {}, stop_after

    def on_step_end(self, trainer, step, metrics):
        if self.stop_after is not None and step > self.stop_after:
            raise Crash(f"interrupted at step {step}")  # a crash after the step-6 checkpoint
        self.losses[step] = float(metrics["loss"])


def make(tmp_path, method, steps, *extra, stop_after=None):
    trainer = OwnTrainer(load_config("tiny/custom.yaml", [
        f"workdir={tmp_path}", f"parallel.method={method}", f"train.steps={steps}",
        f"train.batch_size={BATCH}", "train.log_every=4", "train.eval_batches=1", *extra]))
    trainer.recorder = Recorder(stop_after)
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for method in ("data", "zero3", "auto"):
        trainer = make(tmp_path_factory.mktemp(method), method, 12)
        trainer.fit()
        out[method] = trainer
    return out


def test_no_registry_model_is_involved(runs):
    trainer = runs["data"]
    assert trainer.config.model.name is None and trainer.spec is None
    assert trainer.model_name == "Regressor"
    assert trainer.num_params() == 16 * 128 + 128 + 128 * 16 + 16


def test_data_zero3_and_auto_train_alike(runs):
    losses = {method: [t.recorder.losses[s] for s in range(1, 13)] for method, t in runs.items()}
    assert losses["data"][-1] < 0.5 * losses["data"][0]
    np.testing.assert_allclose(losses["zero3"], losses["data"], rtol=1e-5)
    np.testing.assert_allclose(losses["auto"], losses["data"], rtol=1e-5)
    assert runs["data"].plan.mesh_shape == {"data": 8}
    assert runs["zero3"].plan.mesh_shape == {"data": 8}
    kernel = runs["zero3"].state["params"]["hidden"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.size == 256


def test_mfu_is_xla_flop_count_of_the_step(runs):
    trainer = runs["data"]
    state = jax.device_get(trainer.state)
    batch = trainer.train_set.batch(0, BATCH)
    single = jax.jit(trainer.fns.train_step).lower(state, batch).compile().cost_analysis()["flops"]
    # the dots dominate: 2 forward, 3 backward (none for the inputs' gradient), 2*B*16*128 each
    assert single == pytest.approx(5 * 2 * BATCH * 16 * 128, rel=0.1)
    assert trainer.flops_per_step() == pytest.approx(single, rel=0.01)
    # a compiled SPMD program's cost analysis counts one device's share
    per_device = trainer.step_fn.compile(trainer.abstract_state, trainer.batch_spec).cost_analysis()
    assert 8 * per_device["flops"] == pytest.approx(single, rel=0.1)
    records = [json.loads(line) for line in (trainer.workdir / "metrics.jsonl").open()]
    logged = [r for r in records if "mfu" in r]
    assert len(logged) == 3
    peak = get_profile(num_devices=8).peak_flops * 8
    for record in logged:
        assert record["mfu"] * record["step_time_s"] * peak == pytest.approx(single, rel=0.1)


def test_gradient_accumulation_counts_every_micro_batch(runs, tmp_path):
    # XLA counts a loop body once; the count unrolls the micro-batch loop instead
    accumulated = make(tmp_path, "data", 12, "train.grad_accum_steps=4").build()
    assert accumulated.flops_per_step() == pytest.approx(runs["data"].flops_per_step(), rel=0.01)


def test_an_interrupted_run_resumes_bit_exact(runs, tmp_path):
    extra = ["train.checkpoint_every=6"]
    with pytest.raises(Crash, match="interrupted at step 7"):
        make(tmp_path, "zero3", 12, *extra, stop_after=6).fit()
    resumed = make(tmp_path, "zero3", 12, *extra)
    resumed.fit()
    uninterrupted = runs["zero3"]
    assert sorted(resumed.recorder.losses) == list(range(7, 13))
    assert [resumed.recorder.losses[s] for s in range(7, 13)] == [
        uninterrupted.recorder.losses[s] for s in range(7, 13)]
    for a, b in zip(jax.tree.leaves(_raw(resumed.state)), jax.tree.leaves(_raw(uninterrupted.state))):
        np.testing.assert_array_equal(a, b)


def _raw(state):
    """The state on the host, PRNG keys as their raw bits."""
    return jax.device_get(jax.tree.map(
        lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        else x, state))


# ----- bad input: one line naming the problem ---------------------------------------------

class WideOutput(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):  # (B, 16) -> (B, 16): the config's mlp data has 4 targets
        return self.linear(x)


class OnMlpData(Trainer):
    def build_model(self, rngs):
        return WideOutput(rngs)


def test_a_model_that_does_not_fit_the_configs_data_names_both_shapes(tmp_path):
    trainer = OnMlpData(load_config("tiny/mlp.yaml", [f"workdir={tmp_path}"]))
    with pytest.raises(DataError) as info:
        trainer.build()
    assert str(info.value).startswith(  # the README shows this line
        "the data does not fit the model: the config's data (data.source=synthetic, "
        "model.name=mlp) gives inputs (32, 16) float32, targets (32, 4) float32; the model's "
        "output is (32, 16) float32; the loss failed with: sub got incompatible shapes for "
        "broadcasting: (32, 16), (32, 4). ")


class NarrowInput(OwnTrainer):
    def train_data(self):
        class Data:
            def batch(self, index, batch_size):
                return {"x": np.zeros((batch_size, 8), np.float32),
                        "y": np.zeros((batch_size, 16), np.float32)}
        return Data()


class ReturnsClass(OwnTrainer):
    def build_model(self, rngs):
        return Regressor


class ReturnsTuple(OwnTrainer):
    def build_model(self, rngs):
        return Regressor(rngs), rngs


class Tagged(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(16, 16, rngs=rngs)
        self.tag = nnx.Variable("regressor")

    def __call__(self, x):
        return self.linear(x)


class TaggedTrainer(OwnTrainer):
    def build_model(self, rngs):
        return Tagged(rngs)


class VectorLoss(OwnTrainer):
    def loss_fn(self, model, batch, rng):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2, axis=-1), {}


class StringData(OwnTrainer):
    def train_data(self):
        class Data:
            def batch(self, index, batch_size):
                return {"x": np.zeros((batch_size, 16), np.float32), "name": np.array(["a"])}
        return Data()


class NoLoss(OwnTrainer):
    loss_fn = Trainer.loss_fn


class NoData(Trainer):
    def build_model(self, rngs):
        return Regressor(rngs)


@pytest.mark.parametrize("trainer_cls, config, error, message", [
    (NarrowInput, "tiny/custom.yaml", DataError,
     "the data does not fit the model: train_data() gives x (512, 8) float32, y (512, 16) "
     "float32; the loss failed with: dot_general requires contracting dimensions to have the "
     "same shape, got (8,) and (16,)"),
    (ReturnsClass, "tiny/custom.yaml", ModelError,
     "build_model must return a flax.nnx.Module or a flax.linen.Module, got the class "
     "Regressor; return an instance, e.g. Regressor(rngs=rngs), not the class"),
    (ReturnsTuple, "tiny/custom.yaml", ModelError,
     "build_model must return a flax.nnx.Module or a flax.linen.Module, got tuple"),
    (TaggedTrainer, "tiny/custom.yaml", ModelError,
     "the model's state leaf ['tag'] holds a str, not an array; keep strings and other settings "
     "as plain attributes (not nnx.Variable), and numbers as jnp arrays"),
    (VectorLoss, "tiny/custom.yaml", ModelError,
     "loss_fn must return a scalar loss, got shape (512,) on train_data()'s batch x (512, 16) "
     "float32, y (512, 16) float32; reduce it, e.g. with jnp.mean"),
    (StringData, "tiny/custom.yaml", DataError,
     "train_data() batch leaf ['name'] has dtype <U1; only numeric arrays can be trained on"),
    (NoLoss, "tiny/custom.yaml", ConfigError,
     "NoLoss trains on data of its own (train_data() is overridden) and so must override "
     "loss_fn too"),
    (NoData, "tiny/custom.yaml", ConfigError,
     "NoData builds its own model but has no data: data.source=synthetic"),
])
def test_bad_input_is_one_line_naming_it(trainer_cls, config, error, message, tmp_path, capsys):
    overrides = [f"workdir={tmp_path}", f"train.batch_size={BATCH}"]
    if trainer_cls is NoData:
        overrides.append("data.source=synthetic")
    with pytest.raises(error) as info:
        trainer_cls(load_config(config, overrides)).build()
    assert message in str(info.value)
    assert cli.run(lambda: trainer_cls(load_config(config, overrides)).fit()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.split(";")[0] in err

