"""Exact pipelines through the Trainer and the CLI: micro-batches of one example for the
repository's GPT, dropout keys per micro-batch equal to ``train.grad_accum_steps``, a loss given as
(sum, count), and a step that cannot be accumulated exactly refused with one line (exit 2)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import parallel
from tests import _pipeline_setups as setups
from trainer import Trainer, cli, load_config

PIPE = ["parallel.method=pipeshard", "parallel.stages=2"]
CONSTANT = ["optimizer.schedule=constant", "optimizer.warmup_steps=0"]


def _losses(workdir) -> list:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_repository_gpt_trains_with_micro_batches_of_one_example(tmp_path):
    # SGD with momentum: Adam's first step would turn rounding in near-zero gradients into
    # updates of +-lr.
    trainer = Trainer(load_config("tiny/gpt.yaml", [
        f"workdir={tmp_path}", "train.batch_size=8", "model.num_layers=1",
        "optimizer.name=momentum", "optimizer.weight_decay=0", *CONSTANT])).build()
    fns, batch = trainer.fns, trainer.train_set.batch(0, 8)
    want = jax.jit(fns.train_step)(fns.init(jax.random.key(0)), batch)
    method = parallel.PipeshardParallel(num_micro_batches=8, stage_option=2, intra_op="data",
                                        profile=setups.PROFILE)
    step = parallel.parallelize(fns.train_step, method=method)
    state = step.init_state(fns.init, jax.random.key(0), batch)
    assert {s["micro_batch_size"] for s in step.plan(state, batch).extras["stages"]} == {1}
    got = step(state, batch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 16, rngs=rngs)
        self.b = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x, rng):  # (B, 8) -> (B, 8), dropout when rng is given
        h = jnp.tanh(self.a(x))
        if rng is not None:
            h = jnp.where(jax.random.bernoulli(rng, 0.5, h.shape), 2.0 * h, 0.0)
        parallel.mark_pipeline_boundary()
        return self.b(h)


class _Data:
    """Batch ``i``: inputs, targets and a mask over targets (keys of its own)."""

    def __init__(self, seed):
        self.seed = seed

    def batch(self, index, batch_size):
        rng = np.random.default_rng([self.seed, index])
        x = rng.normal(size=(batch_size, 8)).astype(np.float32)
        return {"x": x, "y": np.sin(x).astype(np.float32),
                "mask": (rng.random((batch_size, 8)) < 0.5).astype(np.float32)}


class _MaskedTrainer(Trainer):
    """A masked mean given as (sum, count); dropout unless ``dropout`` is False."""

    dropout = True

    def build_model(self, rngs):
        return _Net(rngs)

    def loss_fn(self, model, batch, rng):
        err = (model(batch["x"], rng if self.dropout else None) - batch["y"]) ** 2
        return (jnp.sum(err * batch["mask"]), jnp.sum(batch["mask"])), {}

    def train_data(self):
        return _Data(1)

    def eval_data(self):
        return _Data(2)


def _fit(trainer_cls, workdir, *overrides, dropout=True):
    trainer = trainer_cls(load_config("tiny/custom.yaml", [
        f"workdir={workdir}", "train.steps=1", "train.batch_size=16", "train.log_every=1",
        "train.eval_every=0", "train.checkpoint_every=0", *CONSTANT, *overrides]))
    trainer.dropout = dropout
    trainer.fit()
    return _losses(workdir), jax.device_get(trainer.state["params"])


def test_dropout_and_a_sum_count_loss_match_grad_accumulation(tmp_path):
    pipe = _fit(_MaskedTrainer, tmp_path / "pipe", *PIPE, "parallel.num_micro_batches=4")
    accum = _fit(_MaskedTrainer, tmp_path / "accum", "parallel.method=data",
                 "train.grad_accum_steps=4")
    np.testing.assert_allclose(pipe[0], accum[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pipe[1]), jax.tree.leaves(accum[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Without dropout the (sum, count) loss accumulated over micro-batches is the whole
    # batch's (a mean of per-micro-batch masked means would not be).
    exact = _fit(_MaskedTrainer, tmp_path / "exact", "parallel.method=data",
                 "train.grad_accum_steps=4", dropout=False)
    whole = _fit(_MaskedTrainer, tmp_path / "whole", "parallel.method=data", dropout=False)
    np.testing.assert_allclose(exact[0], whole[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(exact[1]), jax.tree.leaves(whole[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class _MaxTrainer(_MaskedTrainer):
    dropout = False

    def loss_fn(self, model, batch, rng):  # the worst example's error: not accumulable
        return jnp.max(jnp.mean((model(batch["x"], None) - batch["y"]) ** 2, -1)), {}


def test_a_step_that_cannot_be_accumulated_exits_2_with_one_line(tmp_path, capsys):
    config = load_config("tiny/custom.yaml", [f"workdir={tmp_path}", "train.steps=1",
                                              "train.batch_size=16", *PIPE,
                                              "parallel.num_micro_batches=4"])
    assert cli.run(lambda: _MaxTrainer(config).fit()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "maximum or minimum over examples" in err[0]
