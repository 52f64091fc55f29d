"""The ``Trainer`` users subclass: hooks for the model, loss, optimizer and data; ``fit`` runs it."""
from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
import parallel
from parallel.profiles import get_profile
from trainer import _sample, _steps
from trainer.config import Config, ConfigError, dump_config
from trainer.data import Prefetcher, build_datasets
from trainer.metrics import MetricsLogger
from trainer.optim import build_optimizer, learning_rate_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the state of that step is never saved."""


class Callback:
    """Override any of these to observe training; each gets the trainer."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict) -> None: ...

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict) -> None: ...

    def on_fit_end(self, trainer: "Trainer", step: int) -> None: ...


class Trainer:
    """Trains a Flax model under a ``parallel`` method, with logging and checkpoints.

    Subclass and override ``build_model`` and ``loss_fn`` (and optionally ``build_optimizer``,
    ``train_data``, ``eval_data``, ``eval_step``, ``callbacks``). The defaults train the registry
    model named by ``config.model.name`` with its task's loss, so a config alone is enough.
    """

    def __init__(self, config: Config):
        self.config = config
        self.workdir = Path(config.workdir)
        self.spec = models.get_spec(config.model.name)
        self.state = None
        self.step_fn = None
        self._stop_signal = None

    # ----- hooks for subclasses -------------------------------------------------------------
    def build_model(self, rngs):
        """Returns the model: a ``flax.nnx.Module`` (a ``flax.linen.Module`` is accepted too)."""
        return models.create_model(self.config.model.name, dict(self.config.model.options), rngs=rngs)

    def loss_fn(self, model, batch, rng):
        """Returns ``(scalar loss, dict of metrics)``; ``rng`` is None during evaluation."""
        return _steps.TASK_LOSSES[self.spec.task](model, batch, rng)

    def eval_step(self, model, batch) -> dict:
        """Metrics of one eval batch; by default the loss and the loss function's metrics."""
        loss, metrics = self.loss_fn(model, batch, None)
        return {"loss": loss, **metrics}

    def build_optimizer(self) -> optax.GradientTransformation:
        return build_optimizer(self.config.optimizer, self.config.train.steps)

    def train_data(self):
        """An object with ``batch(index, batch_size) -> dict of numpy arrays``."""
        return self._datasets()[0]

    def eval_data(self):
        return self._datasets()[1]

    def callbacks(self) -> list[Callback]:
        return []

    # ----- setup ----------------------------------------------------------------------------
    def _datasets(self):
        if not hasattr(self, "_data_cache"):
            cfg = self.config
            self._data_cache = build_datasets(cfg.data, self.spec.task, cfg.train.seed, cfg.model.options)
        return self._data_cache

    def build(self):
        """Builds the pure step functions and the parallel plan; allocates no model state."""
        cfg = self.config
        self.train_set, self.eval_set = self.train_data(), self.eval_data()
        example = self.train_set.batch(0, 1)  # shapes only: a full batch may be large
        self.batch_spec = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape[1:]), v.dtype)
                           for k, v in example.items()}
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self.fns = _steps.make_step_functions(
            self.build_model, self.loss_fn, self.eval_step, self.build_optimizer(), self.schedule,
            example["inputs"][:1], DTYPES[cfg.train.compute_dtype], cfg.train.grad_accum_steps)
        method = parallel.make_method(
            cfg.parallel.method, mesh=cfg.parallel.mesh, rules=cfg.parallel.rules,
            memory_budget_bytes=cfg.parallel.memory_budget_bytes,
            num_micro_batches=cfg.parallel.num_micro_batches, profile=cfg.parallel.profile,
            stages=cfg.parallel.stages, schedule=cfg.parallel.schedule, remat=cfg.parallel.remat)
        # Only rule-based methods read the models' logical axis names.
        axes = (self.fns.logical_axes, None) if cfg.parallel.method == "manual" else None
        self.step_fn = parallel.parallelize(
            self.fns.train_step, method=method, batch_argnums=(1,), donate_argnums=(0,),
            logical_axes=axes)
        # A pipeline runs training steps; evaluation (no backward) runs data parallel.
        eval_method = parallel.DataParallel() if cfg.parallel.method == "pipeshard" else method
        self.eval_fn = parallel.parallelize(
            self.fns.eval_step, method=eval_method, batch_argnums=(1,), donate_argnums=(),
            logical_axes=axes)
        self.abstract_state = jax.eval_shape(self.fns.init, jax.random.key(cfg.train.seed))
        self.plan = self.step_fn.plan(self.abstract_state, self.batch_spec)
        return self

    def setup(self):
        """``build``, then the state: restored from the newest valid checkpoint, or new."""
        cfg = self.config
        self.build()
        abstract_state = self.abstract_state
        directory = self.workdir / "checkpoints"
        keep = dict(max_to_keep=cfg.train.keep_checkpoints, keep_every=cfg.train.keep_every)
        if not cfg.train.resume and cfg.train.overwrite:  # old checkpoints are moved aside
            self.checkpointer, latest = parallel.Checkpointer.start_over(directory, **keep), None
        else:
            self.checkpointer = parallel.Checkpointer(directory, **keep)
            latest = self.checkpointer.latest_step()
            if latest is not None and not cfg.train.resume:
                raise ConfigError(
                    f"{self.workdir} already holds checkpoints (latest step {latest}) and "
                    "train.resume=false; pass train.resume=true to continue, or "
                    "train.overwrite=true to start over (old checkpoints are moved aside, not deleted)")
        if latest is not None:
            target = self.step_fn.abstract_inputs(abstract_state, self.batch_spec)[0]
            self.state, extras = self.checkpointer.restore(latest, target)
            self.last_metrics = extras.get("metrics", {})
        else:
            self.state = self.step_fn.init_state(self.fns.init, jax.random.key(cfg.train.seed), self.batch_spec)
            self.last_metrics = {}
        return self

    # ----- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        """Trains to ``train.steps``, evaluating, logging and checkpointing; returns last metrics."""
        cfg, tc = self.config, self.config.train
        if self.step_fn is None:
            self.setup()
        self.workdir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.workdir / "config.yaml")
        (self.workdir / "plan.json").write_text(self.plan.to_json())
        start = int(jax.device_get(self.state["step"]))
        logger = MetricsLogger(self.workdir, tc.steps, start)
        callbacks = self.callbacks()
        logger.print(f"shardax: {self.spec.name} with {self.num_params():,} parameters, "
                     f"method {self.plan.method} on mesh {self.plan.mesh_shape}, "
                     f"{'resuming at step ' + str(start) if start else 'starting'} -> {tc.steps} steps")
        previous = self._install_signal_handlers()
        prefetch = Prefetcher(self.train_set, tc.batch_size, start, tc.steps)
        step, metrics = start, dict(self.last_metrics)
        window_start, window_steps = time.perf_counter(), 0
        try:
            for index, batch in prefetch:
                self.state, step_metrics = self.step_fn(self.state, batch)
                step = index + 1
                loss = float(step_metrics["loss"])
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at step {step}; that state was not saved. Lower "
                        f"optimizer.learning_rate (now {cfg.optimizer.learning_rate}), set "
                        "optimizer.grad_clip, or use train.compute_dtype=float32")
                window_steps += 1
                logger.advance()
                if step % tc.log_every == 0 or step == tc.steps:
                    elapsed = time.perf_counter() - window_start
                    metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    metrics.update(self._speed(elapsed / window_steps))
                    logger.log(step, metrics)
                    window_start, window_steps = time.perf_counter(), 0
                for cb in callbacks:
                    cb.on_step_end(self, step, step_metrics)
                if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                    self._evaluate_and_log(logger, step, callbacks)
                    window_start = time.perf_counter()
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    self.save(step, metrics)
                if self._stop_signal is not None:
                    logger.print(f"received {self._stop_signal}: saving step {step} and stopping")
                    self.save(step, metrics)
                    break
            else:
                if step == tc.steps and start < tc.steps:
                    metrics.update(self._evaluate_and_log(logger, step, callbacks))
                    self.save(step, metrics)
                if self.spec.task == "lm" and tc.sample_tokens and self._stop_signal is None:
                    logger.print("sample:\n" + self.sample(tc.sample_tokens))
            for cb in callbacks:
                cb.on_fit_end(self, step)
        finally:
            prefetch.close()
            self.checkpointer.wait()
            logger.close()
            self._restore_signal_handlers(previous)
        return metrics

    def evaluate(self) -> dict:
        """Mean eval metrics over ``train.eval_batches`` fixed batches of the eval split."""
        if self.step_fn is None:
            self.setup()
        totals = {}
        for i in range(self.config.train.eval_batches):
            batch = self.eval_set.batch(i, self.config.train.batch_size)
            for k, v in jax.device_get(self.eval_fn(self.state, batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {k: v / self.config.train.eval_batches for k, v in totals.items()}

    def save(self, step: int, metrics: dict) -> None:
        """Checkpoints the state with the data position, config, plan and metrics (async)."""
        extras = {"data_index": step, "config": self.config.to_dict(),
                  "plan": json.loads(self.plan.to_json()), "metrics": metrics}
        self.checkpointer.save(step, self.state, extras)

    def sample(self, num_tokens: int, temperature: float = 0.8) -> str:
        """Text generated from a prompt taken from the eval split (byte-level models)."""
        prompt = self.eval_set.batch(0, 1)["inputs"][0, : self.config.data.seq_len // 2]
        tokens = _sample.generate(self.fns.graphdef, self.state, prompt, num_tokens,
                                  self.config.data.seq_len, temperature, self.config.train.seed)
        return bytes(np.clip(tokens, 0, 255).astype(np.uint8)).decode("utf-8", errors="replace")

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract_state["params"])))

    # ----- helpers --------------------------------------------------------------------------
    def _evaluate_and_log(self, logger, step, callbacks) -> dict:
        metrics = self.evaluate()
        logger.log(step, metrics, prefix="eval")
        for cb in callbacks:
            cb.on_eval_end(self, step, metrics)
        return {f"eval_{k}": v for k, v in metrics.items()}

    def _speed(self, step_time: float) -> dict:
        tc = self.config.train
        out = {"step_time_s": step_time}
        if self.spec.task == "lm":
            out["tokens_per_s"] = tc.batch_size * self.config.data.seq_len / step_time
        flops = self.spec.flops_per_example(self.spec.config_cls(**self.config.model.options),
                                            self.config.data.seq_len)
        if flops:
            profile = get_profile(num_devices=jax.device_count())
            out["mfu"] = flops * tc.batch_size / step_time / (profile.peak_flops * jax.device_count())
        return out

    def _install_signal_handlers(self):
        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return previous

    def _restore_signal_handlers(self, previous):
        for sig, old in previous.items():
            signal.signal(sig, old)
