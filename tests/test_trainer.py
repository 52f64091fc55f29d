"""The Trainer's pure functions: accumulation, linen models, divergence, sharded eval."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import Trainer, TrainingDiverged, load_config

TINY = ["train.steps=3", "train.log_every=1", "train.eval_batches=1", "train.sample_tokens=0",
        "train.batch_size=8", "data.max_bytes=200000"]


def one_step(overrides, trainer_cls=Trainer):
    trainer = trainer_cls(load_config("tiny/gpt.yaml", TINY + overrides)).build()
    state = trainer.fns.init(jax.random.key(0))
    batch = trainer.train_set.batch(0, 8)
    return jax.jit(trainer.fns.train_step)(state, batch)


def test_gradient_accumulation_equals_one_big_batch():
    (state_1, metrics_1) = one_step(["train.grad_accum_steps=1"])
    (state_4, metrics_4) = one_step(["train.grad_accum_steps=4"])
    np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state_1["params"]), jax.tree.leaves(state_4["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    state, metrics = one_step(["train.compute_dtype=bfloat16"])
    _, reference = one_step([])
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
    np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=2e-2)  # bf16 rounding


class LinenBigram(nn.Module):
    @nn.compact
    def __call__(self, tokens):  # (B, T) -> (B, T, 256)
        return nn.Dense(256)(nn.Embed(256, 16)(tokens))


class LinenTrainer(Trainer):
    def build_model(self, rngs):
        return LinenBigram()


def test_linen_model_trains_with_the_default_loss(tmp_path):
    trainer = LinenTrainer(load_config("tiny/gpt.yaml", TINY + [
        f"workdir={tmp_path}", "train.steps=30", "train.log_every=10", "optimizer.learning_rate=0.05"]))
    metrics = trainer.fit()
    assert trainer.num_params() == 256 * 16 + 16 * 256 + 256
    assert metrics["loss"] < 4.0  # from ln(256) = 5.55: the bigram statistics are being learned


class NaNTrainer(Trainer):
    def loss_fn(self, model, batch, rng):
        loss, metrics = super().loss_fn(model, batch, rng)
        return loss + jnp.log(-1.0), metrics  # NaN from the first step


def test_nan_loss_stops_and_saves_nothing(tmp_path):
    trainer = NaNTrainer(load_config("tiny/gpt.yaml", TINY + [f"workdir={tmp_path}",
                                                               "train.checkpoint_every=1"]))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1; that state was not saved"):
        trainer.fit()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_parallel_eval_matches_single_device_eval(tmp_path):
    trainer = Trainer(load_config("tiny/gpt.yaml", TINY + ["parallel.method=zero3",
                                                           f"workdir={tmp_path}"])).setup()
    batch = trainer.eval_set.batch(0, 8)
    sharded = trainer.eval_fn(trainer.state, batch)
    state = jax.device_get(trainer.state)
    single = jax.jit(trainer.fns.eval_step)(state, batch)
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5)
