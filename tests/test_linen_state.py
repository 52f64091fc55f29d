"""A linen CNN with BatchNorm, Dropout and a state collection of its own, written as plain linen
code (``model(x, train=...)``, no ``mutable=`` or ``rngs=``), trains under data, zero3 and auto on
8 devices exactly as the same steps written with ``module.apply`` compute them; its running
statistics are updated, read by eval, seen by ``parallel`` as stored state, and checkpointed."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parallel._roles import STATE, find_roles
from trainer import Callback, ModelError, Trainer, load_config

STEPS, BATCH = 3, 16


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):  # (B, 8, 8, 1) -> (B, 2)
        x = nn.Conv(8, (3, 3), use_bias=False)(x)  # (B, 8, 8, 8); a bias would be cancelled by BN
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))  # (B, 8)
        self.sow("intermediates", "features", x)  # not stored state
        if train:  # a state collection of its own: training calls so far
            calls = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
            if not self.is_initializing():
                calls.value += 1
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(2)(x)


class Images:
    def __init__(self, seed):
        self.seed = seed

    def batch(self, index, batch_size):
        rng = np.random.default_rng([self.seed, index])
        x = rng.normal(size=(batch_size, 8, 8, 1)).astype(np.float32) + 0.5
        return {"image": x, "label": (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int32)}


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class Recorder(Callback):
    def __init__(self):
        self.losses = {}

    def on_step_end(self, trainer, step, metrics):
        self.losses[step] = float(metrics["loss"])


class CNNTrainer(Trainer):
    def build_model(self, rngs):
        return CNN()

    def loss_fn(self, model, batch, rng):
        return cross_entropy(model(batch["image"], train=rng is not None), batch["label"]), {}

    def train_data(self):
        return Images(1)

    def eval_data(self):
        return Images(2)

    def callbacks(self):
        return [self.recorder]

    def flops_per_step(self):  # no mfu: spares lowering the step once more
        return None

    def save(self, step, metrics):  # only the zero3 run's checkpoint is read (saves compile slices)
        if self.config.parallel.method == "zero3":
            super().save(step, metrics)


def make(workdir, method, *extra):
    trainer = CNNTrainer(load_config("tiny/custom.yaml", [
        f"workdir={workdir}", f"parallel.method={method}", f"train.steps={STEPS}",
        f"train.batch_size={BATCH}", f"train.log_every={STEPS}",
        "train.eval_batches=2", *extra]))
    trainer.recorder = Recorder()
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for method in ("data", "zero3", "auto"):
        trainer = make(tmp_path_factory.mktemp(method), method).setup()
        trainer.initial_state = jax.device_get(trainer.state)
        trainer.final_metrics = trainer.fit()
        out[method] = trainer
    return out


@pytest.fixture(scope="module")
def reference(runs):
    """The same steps as plain flax: ``init``, ``apply(..., rngs=, mutable=)`` and optax."""
    trainer = runs["data"]
    module, tx = CNN(), trainer.build_optimizer()
    init_key, rng = jax.random.split(jax.random.key(trainer.config.train.seed))
    variables = module.init({"params": init_key}, jnp.zeros((BATCH, 8, 8, 1)), train=True)
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    params, opt_state = variables["params"], tx.init(variables["params"])
    state = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params, state, opt_state, rng, batch):
        def loss_fn(params):
            logits, new_state = module.apply({"params": params, **state}, batch["image"],
                                             train=True, rngs={"dropout": rng},
                                             mutable=["batch_stats", "counters"])
            return cross_entropy(logits, batch["label"]), new_state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    losses = []
    for i in range(STEPS):
        rng, step_rng = jax.random.split(rng)
        params, state, opt_state, loss = step(params, state, opt_state, step_rng,
                                              Images(1).batch(i, BATCH))
        losses.append(float(loss))
    eval_losses = [cross_entropy(module.apply({"params": params, **state}, b["image"], train=False),
                                 b["label"]) for b in map(lambda i: Images(2).batch(i, BATCH), range(2))]
    return {"init": variables, "params": params, "state": state, "losses": losses,
            "eval_loss": float(np.mean(eval_losses))}


def test_initialization_is_linen_init_with_the_run_key(runs, reference):
    initial = runs["data"].initial_state
    assert initial["model_state"] == {
        "BatchNorm_0": {"mean": pytest.approx(np.zeros(8)), "var": pytest.approx(np.ones(8))},
        "calls": 0}  # the top module's counters/calls; no intermediates
    for a, b in zip(jax.tree.leaves(initial["params"]), jax.tree.leaves(reference["init"]["params"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["data", "zero3", "auto"])
def test_training_equals_plain_flax_and_updates_running_statistics(runs, reference, method):
    trainer = runs[method]
    np.testing.assert_allclose([trainer.recorder.losses[s] for s in range(1, STEPS + 1)],
                               reference["losses"], rtol=1e-5)
    final = jax.device_get(trainer.state)
    assert int(final["model_state"]["calls"]) == STEPS
    stats, expected = final["model_state"]["BatchNorm_0"], reference["state"]["batch_stats"]["BatchNorm_0"]
    assert np.abs(stats["mean"]).max() > 0.05  # moved from 0 by 3 updates with momentum 0.9
    np.testing.assert_allclose(stats["mean"], expected["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], expected["var"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(final["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # eval uses the running statistics (train=False) and changes nothing
    assert trainer.final_metrics["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)


def test_running_statistics_are_stored_state_and_checkpointed(runs):
    trainer = runs["zero3"]
    roles = find_roles(trainer.fns.train_step, (trainer.abstract_state, trainer.batch_spec),
                       batch_argnums=(1,), donate_argnums=(0,))
    paths = [jax.tree_util.keystr(kp) for kp, _ in
             jax.tree_util.tree_flatten_with_path(trainer.abstract_state)[0]]
    assert {p: r for p, r in zip(paths, roles.by_arg[0]) if p.startswith("['model_state']")} == {
        "['model_state']['BatchNorm_0']['mean']": STATE,
        "['model_state']['BatchNorm_0']['var']": STATE,
        "['model_state']['calls']": STATE}
    resumed = make(trainer.workdir, "zero3", "train.resume=true").setup()
    assert int(resumed.state["step"]) == STEPS
    saved = jax.device_get(trainer.state["model_state"])
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state["model_state"])), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)


class Uncalled(CNNTrainer):
    def loss_fn(self, model, batch, rng):
        return jnp.mean(batch["image"]), {}


def test_a_linen_module_the_loss_never_calls_is_refused(tmp_path):
    with pytest.raises(ModelError, match="the linen module CNN has no variables after loss_fn ran "
                                         "once to initialize it; loss_fn must call the model"):
        Uncalled(load_config("tiny/custom.yaml", [f"workdir={tmp_path}"])).build()
