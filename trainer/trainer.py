"""The ``Trainer`` users subclass: hooks for the model, loss, optimizer and data; ``fit`` runs it."""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
import parallel
from parallel import cluster
from parallel.profiles import UnknownDeviceError, get_profile
from trainer import _pretrained, _resume, _sample, _steps, _tokenizer
from trainer._cluster import StopSignals, read_everywhere
from trainer._errors import TrainingDiverged
from trainer.config import DEFAULT_MODEL, Config, ConfigError, dump_config
from trainer.data import (DataError, Prefetcher, ProcessShare, build_datasets, place_batch,
                          process_rows)
from trainer.metrics import MetricsLogger, move_logs_aside
from trainer.optim import build_optimizer, learning_rate_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Callback:
    """Override any of these to observe training; each gets the trainer."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict) -> None: ...

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict) -> None: ...

    def on_fit_end(self, trainer: "Trainer", step: int) -> None: ...


class Trainer:
    """Trains a Flax model under a ``parallel`` method, with logging and checkpoints.

    Subclass and override ``build_model`` and ``loss_fn`` (and optionally ``build_optimizer``,
    ``train_data``, ``eval_data``, ``eval_step``, ``callbacks``, ``flops_per_step``). The defaults
    train the registry model named by ``config.model.name`` (``gpt`` when none is named) with
    its task's loss, so a config alone is enough.

    A subclass that overrides ``build_model`` trains its own model: nothing about it comes from
    the registry (``spec`` is None), and ``model.name`` may be left out of the config. Its data
    is ``train_data()``/``eval_data()``; if it does not override them it gets the config's
    built-in data (a text source, or the synthetic data of the registry model ``model.name``
    names) and, unless it overrides ``loss_fn``, that data's loss. Data whose shapes do not fit
    the model fail in ``build`` with a ``DataError`` naming both shapes.

    Attributes:
      spec: the registry ``models.ModelSpec`` of the model trained; None for a subclass's model.
    """

    def __init__(self, config: Config):
        self.config = config
        self.workdir = Path(config.workdir)
        own_model = type(self).build_model is not Trainer.build_model
        self.spec = None if own_model else models.get_spec(config.model.name or DEFAULT_MODEL)
        if own_model and config.model.from_pretrained is not None:
            raise _pretrained.own_model_error(self)
        self.state = None
        self.step_fn = None
        self._flops = None
        self._saved_plan = None  # the plan of the checkpoint being resumed, reused if it applies
        self._notes: list[str] = []  # one-line notes of setup, printed when training starts
        self._pending: list[tuple[int, jax.Array]] = []  # (step, loss) not yet read back

    # ----- hooks for subclasses -------------------------------------------------------------
    def build_model(self, rngs):
        """Returns the model: a ``flax.nnx.Module`` (a ``flax.linen.Module`` is accepted too)."""
        return models.create_model(self.spec.name, dict(self.config.model.options), rngs=rngs)

    def loss_fn(self, model, batch, rng):
        """Returns ``(loss, dict of metrics)``; ``rng`` is None during evaluation. The loss may be a
        pair ``(sum, count)`` (a masked mean), divided once: exact under accumulation and pipelines.

        The default is the loss of the data's task (next-token cross entropy, classification
        or regression); a subclass training on data of its own must override it.
        """
        task = self.data_task()
        if task is None:
            raise ConfigError(f"{type(self).__name__} trains on data of its own "
                              "(train_data() is overridden) and so must override loss_fn too")
        return _steps.TASK_LOSSES[task](model, batch, rng)

    def eval_step(self, model, batch) -> dict:
        """Metrics of one eval batch; by default the loss and the loss function's metrics."""
        loss, metrics = self.loss_fn(model, batch, None)
        return {"loss": loss, **metrics}

    def build_optimizer(self) -> optax.GradientTransformation:
        """The config's optimizer; ``muon`` finds its matrices by the params' logical axes."""
        opt = self.config.optimizer
        axes = (_steps.param_axes(self.build_model, self.loss_fn, getattr(self, "batch_spec", None))
                if opt.name == "muon" else None)
        return build_optimizer(opt, self.config.train.steps, axes)

    def train_data(self):
        """An object with ``batch(index, batch_size) -> dict of numpy arrays``.

        A pure function of the index, so a resumed run sees the data it would have seen. The
        default is the config's built-in data (see ``data_task``).
        """
        return self._datasets()[0]

    def eval_data(self):
        """Like ``train_data``, for evaluation."""
        if type(self).train_data is not Trainer.train_data:
            raise ConfigError(f"{type(self).__name__} overrides train_data() but not eval_data(); "
                              "override eval_data() too (it may return the training data)")
        return self._datasets()[1]

    def callbacks(self) -> list[Callback]:
        return []

    def flops_per_step(self) -> float | None:
        """Training FLOPs of one step (all devices together), the numerator of ``mfu``.

        The registry's closed form for its models; otherwise XLA's cost analysis of the train
        step lowered for one device (``_steps.xla_flops``), with gradient accumulation unrolled.
        XLA counts a loop body once, so a model that loops over its layers with ``scan`` should
        override this with its own count. ``None``: no ``mfu`` is logged. Needs ``build``.
        """
        if self.spec is not None:
            per_example = self.spec.flops_per_example(
                self.spec.config_cls(**self.config.model.options), self.config.data.seq_len)
            if per_example:
                return per_example * self.config.train.batch_size
        return _steps.xla_flops(self.fns.unrolled_train_step, self.abstract_state, self.batch_spec)

    def data_task(self) -> str | None:
        """The task of the config's built-in data: ``lm``, ``classify`` or ``regress``.

        The registry model's task; for a subclass's own model, the task of the registry model
        ``model.name`` names (whose options give the synthetic data's shapes), else ``lm`` for a
        text source. ``None`` when the subclass gives its own ``train_data()``.

        Raises:
          ConfigError: synthetic data with neither a registry model to shape it nor a
            ``train_data()`` of the subclass.
        """
        if self.spec is not None:
            return self.spec.task
        if type(self).train_data is not Trainer.train_data:
            return None
        if self.config.model.name:
            return models.get_spec(self.config.model.name).task
        if self.config.data.source != "synthetic":
            return "lm"
        raise ConfigError(
            f"{type(self).__name__} builds its own model but has no data: data.source=synthetic "
            "takes its shapes from a registry model (set model.name, e.g. mlp with in_features "
            "and out_features); or override train_data() and eval_data()")

    # ----- setup ----------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The registry name of the model, or its class name for a subclass's own model."""
        return self.spec.name if self.spec is not None else self.fns.model_name

    def _builtin_data_name(self) -> str:
        name = self.config.model.name or (self.spec.name if self.spec is not None else None)
        shaped = f", model.name={name}" if name else ""
        return f"the config's data (data.source={self.config.data.source}{shaped})"

    def _datasets(self):
        if not hasattr(self, "_data_cache"):
            cfg = self.config
            options = cfg.model.options if self.spec is not None or cfg.model.name else {}
            self._data_cache = build_datasets(cfg.data, self.data_task(), cfg.train.seed, options)
        return self._data_cache

    def build(self):
        """Builds the pure step functions and the parallel plan; allocates no model state.

        The loss is traced on the train and eval batches' shapes first, so bad input stops here.

        Raises:
          DataError: the data's shapes do not fit the model (both are named), or a batch is
            not a dict of numeric arrays.
          ModelError: ``build_model`` returned no Flax module, the model holds a non-array
            state leaf, or the loss is not a scalar.
          ConfigError: a subclass's own model has no data to train on, or no loss for its data.
        """
        cfg = self.config
        self.train_set, self.eval_set = self.train_data(), self.eval_data()
        example = self.train_set.batch(0, 1)  # shapes only: a full batch may be large
        self.batch_spec = _batch_spec(example, cfg.train.batch_size, "train_data()")
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self.fns = _steps.make_step_functions(
            self.build_model, self.loss_fn, self.eval_step, self.build_optimizer(), self.schedule,
            self.batch_spec, DTYPES[cfg.train.compute_dtype],
            cfg.train.grad_accum_steps)
        self.abstract_state = jax.eval_shape(self.fns.init, jax.random.key(cfg.train.seed))
        self._check_data(example)
        method = parallel.make_method(
            cfg.parallel.method, mesh=cfg.parallel.mesh, rules=cfg.parallel.rules,
            memory_budget_bytes=cfg.parallel.memory_budget_bytes,
            num_micro_batches=cfg.parallel.num_micro_batches, profile=cfg.parallel.profile,
            stages=cfg.parallel.stages, schedule=cfg.parallel.schedule, remat=cfg.parallel.remat,
            virtual_stages=cfg.parallel.virtual_stages,
            num_hosts=cfg.cluster.num_hosts, devices_per_host=cfg.cluster.devices_per_host)
        # Only rule-based methods read the models' logical axis names.
        axes = (self.fns.logical_axes, None) if cfg.parallel.method == "manual" else None
        self.step_fn = parallel.parallelize(
            self.fns.train_step, method=method, batch_argnums=(1,), donate_argnums=(0,),
            logical_axes=axes)
        # Eval runs on the train step's plan (a pipeline's stages): the state stays put.
        self.eval_fn = parallel.parallelize(self.fns.eval_step, method=parallel.FollowPlan(
            self.step_fn), batch_argnums=(1,), donate_argnums=())
        self._reuse_saved_plan()
        self.plan = self.step_fn.plan(self.abstract_state, self.batch_spec)
        if jax.process_count() > 1:  # each process builds only the rows its devices hold
            for name, fn, label in (("train_set", self.step_fn, "train_data()"),
                                    ("eval_set", self.eval_fn, "eval_data()")):
                shardings = fn.input_shardings(self.abstract_state, self.batch_spec)[1]
                rows = process_rows(shardings, self.batch_spec)
                share = ProcessShare(getattr(self, name), rows, cfg.train.batch_size, label)
                setattr(self, name, share)
                self._notes += [share.note] if share.note else []
        return self

    def _reuse_saved_plan(self) -> None:
        """Gives the step the resumed checkpoint's plan when it still applies (no solve)."""
        saved, self._saved_plan = self._saved_plan, None
        if saved is not None:
            self._notes.append(_resume.reuse_plan(self.step_fn, *saved, self.config,
                                                  self.abstract_state, self.batch_spec))

    def _check_data(self, example: dict) -> None:
        """Traces the loss on the train and eval batches' shapes, so a mismatch fails here."""
        cfg = self.config
        micro_batch = cfg.train.batch_size // cfg.train.grad_accum_steps
        names = (("train_data()", "eval_data()") if self.data_task() is None else
                 (self._builtin_data_name(),) * 2)
        train_spec = _batch_spec(example, micro_batch, names[0])
        _steps.check_loss(self.fns, self.abstract_state, train_spec, names[0])
        eval_spec = _batch_spec(self.eval_set.batch(0, 1), micro_batch, names[1])
        if jax.tree.structure(eval_spec) != jax.tree.structure(train_spec) or any(
                a.shape != b.shape or a.dtype != b.dtype
                for a, b in zip(jax.tree.leaves(eval_spec), jax.tree.leaves(train_spec))):
            _steps.check_loss(self.fns, self.abstract_state, eval_spec, names[1])

    def setup(self):
        """``build``, then the state: restored from the newest valid checkpoint, or new.

        Resuming, the checkpoint's config must agree with this one on every key that changes
        the math (``ConfigError`` otherwise), and its plan is reused when it still applies.
        """
        cfg = self.config
        directory = self.workdir / "checkpoints"
        keep = dict(max_to_keep=cfg.train.keep_checkpoints, keep_every=cfg.train.keep_every)
        if not cfg.train.resume and cfg.train.overwrite:  # old checkpoints are moved aside
            self.checkpointer, latest = parallel.Checkpointer.start_over(directory, **keep), None
            primary = jax.process_index() == 0  # the one process that writes logs
            aside = move_logs_aside(self.workdir) if primary and self.workdir.is_dir() else None
            if aside is not None:
                self._notes.append(f"moved the previous logs to {aside}")
        else:
            self.checkpointer = parallel.Checkpointer(directory, **keep)
            latest = self.checkpointer.latest_step()
            if latest is not None and not cfg.train.resume:
                raise ConfigError(
                    f"{self.workdir} already holds checkpoints (latest step {latest}) and "
                    "train.resume=false; pass train.resume=true to continue, or "
                    "train.overwrite=true to start over (old checkpoints are moved aside, not deleted)")
        if latest is not None:
            saved = self.checkpointer.extras(latest)
            if saved.get("config"):  # written by a Trainer: compare what it trained with
                self._notes += _resume.check_config(saved["config"], cfg, latest, self.workdir)
            if saved.get("plan"):
                self._saved_plan = (parallel.Plan.from_json(json.dumps(saved["plan"])),
                                    (saved.get("config") or {}).get("parallel") or {})
        with cluster.phase("planning"):
            self.build()
        abstract_state = self.abstract_state
        if latest is not None:
            target = self.step_fn.abstract_inputs(abstract_state, self.batch_spec)[0]
            self.state, extras = self.checkpointer.restore(latest, target)
            self.last_metrics = extras.get("metrics", {})
        elif cfg.model.from_pretrained is not None:  # fine-tuning: the directory's weights
            self.state, self.last_metrics = _pretrained.pretrained_state(self), {}
        else:
            with cluster.phase("compile"):
                self.state = self.step_fn.init_state(self.fns.init, jax.random.key(cfg.train.seed),
                                                     self.batch_spec)
            self.last_metrics = {}
        return self

    # ----- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        """Trains to ``train.steps``, evaluating, logging and checkpointing; returns last metrics."""
        cfg, tc = self.config, self.config.train
        if cfg.cluster.num_hosts > 1 and cluster.worker_info() is None:
            from trainer._cluster import fit_on_cluster  # Ray is imported only here

            return fit_on_cluster(self)
        if self.step_fn is None:
            with cluster.phase("restore"):  # and planning, compiling the initial state
                self.setup()
        primary = jax.process_index() == 0  # one process writes the run's files and logs
        self.workdir.mkdir(parents=True, exist_ok=True)
        if primary:
            dump_config(cfg, self.workdir / "config.yaml")
            (self.workdir / "plan.json").write_text(self.plan.to_json())
        start = int(read_everywhere(self.state["step"]))
        logger = MetricsLogger(self.workdir, tc.steps, start, primary=primary)
        callbacks = self.callbacks()
        logger.print(f"shardax: {self.model_name} with {self.num_params():,} parameters, "
                     f"method {self.plan.method} on mesh {self.plan.mesh_shape}, "
                     f"{'resuming at step ' + str(start) if start else 'starting'} -> {tc.steps} steps")
        for note in self._notes:
            logger.print(note)
        self._notes.clear()
        signals = StopSignals()
        shardings = self.step_fn.input_shardings(self.abstract_state, self.batch_spec)[1]
        place = functools.partial(place_batch, shardings=shardings, global_shapes=self.batch_spec)
        prefetch = Prefetcher(self.train_set, tc.batch_size, start, tc.steps, place=place)
        step, metrics = start, dict(self.last_metrics)
        # Throughput windows open once a step has compiled and close at a log step; evals
        # close them too. The loop reads the device only at log, eval, checkpoint and end steps.
        window_start, window_steps = None, 0
        cluster.phase("step")  # a step finishing is a heartbeat; the first one compiles
        try:
            for index, batch in prefetch:
                with cluster.phase("compile" if index == start else "step"):
                    self.state, step_metrics = self.step_fn(self.state, batch)
                step = index + 1
                cluster.heartbeat(step, ready=step_metrics["loss"])
                self._pending.append((step, step_metrics["loss"]))
                if window_start is None:
                    window_start = time.perf_counter()
                window_steps += 1
                logger.advance()
                if step % tc.log_every == 0 or step == tc.steps:
                    self._check_losses()
                    elapsed = time.perf_counter() - window_start
                    metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    metrics.update(self._speed(elapsed / window_steps))
                    logger.log(step, metrics)
                    window_start, window_steps = time.perf_counter(), 0
                for cb in callbacks:
                    cb.on_step_end(self, step, step_metrics)
                if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                    self._evaluate_and_log(logger, step, callbacks)
                    window_start, window_steps = time.perf_counter(), 0
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    self._save_logged(logger, step, metrics)
                if signals.stop(step) is not None:
                    logger.print(f"received {signals.name}: saving step {step} and stopping")
                    self._save_logged(logger, step, metrics)
                    break
            else:
                if step == tc.steps and start < tc.steps:
                    metrics.update(self._evaluate_and_log(logger, step, callbacks))
                    self._save_logged(logger, step, metrics)
                if (self.spec is not None and self.spec.task == "lm" and tc.sample_tokens
                        and signals.name is None):
                    with cluster.phase("eval"):
                        logger.print("sample:\n" + self.sample(tc.sample_tokens))
            for cb in callbacks:
                cb.on_fit_end(self, step)
        finally:
            self._pending.clear()
            prefetch.close()
            with cluster.phase("checkpoint"):
                self.checkpointer.wait()
            logger.close()
            signals.restore()
        return metrics

    def _save_logged(self, logger, step: int, metrics: dict) -> None:
        """Saves ``step`` once its logs are on disk: a resume from it finds them all."""
        logger.flush()
        self.save(step, metrics)

    def _check_losses(self) -> None:
        """Reads the losses of the steps since the last check (one transfer); stops at a NaN.

        Raises:
          TrainingDiverged: naming the first step whose loss is not finite.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        for step, loss in zip([s for s, _ in pending], jax.device_get([l for _, l in pending])):
            if not math.isfinite(float(loss)):
                cfg = self.config
                raise TrainingDiverged(
                    f"loss became {float(loss)} at step {step}; that state was not saved. Lower "
                    f"optimizer.learning_rate (now {cfg.optimizer.learning_rate}), set "
                    "optimizer.grad_clip, or use train.compute_dtype=float32")

    def evaluate(self) -> dict:
        """Mean eval metrics over ``train.eval_batches`` fixed batches of the eval split."""
        if self.step_fn is None:
            self.setup()
        tc = self.config.train
        shardings = self.eval_fn.input_shardings(self.abstract_state, self.batch_spec)[1]
        with cluster.phase("eval"):
            results = jax.device_get([  # one read back, after every batch ran
                self.eval_fn(self.state, place_batch(self.eval_set.batch(i, tc.batch_size),
                                                     shardings, self.batch_spec))
                for i in range(tc.eval_batches)])
        totals = {}
        for result in results:
            for k, v in result.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {k: v / tc.eval_batches for k, v in totals.items()}

    def save(self, step: int, metrics: dict) -> None:
        """Checkpoints the state with the data position, config, plan and metrics (async).

        Raises:
          TrainingDiverged: a loss since the last check is not finite (nothing is saved).
        """
        with cluster.phase("checkpoint"):
            self._check_losses()
            extras = {"data_index": step, "config": self.config.to_dict(),
                      "plan": json.loads(self.plan.to_json()), "metrics": metrics}
            self.checkpointer.save(step, self.state, extras)

    def sample(self, num_tokens: int, temperature: float = 0.8) -> str:
        """Text generated from a prompt taken from the eval split, decoded as the data was encoded."""
        prompt = self.eval_set.batch(0, 1)["inputs"][0, : self.config.data.seq_len // 2]
        tokens = _sample.generate(self.fns.graphdef, self.state, prompt, num_tokens,
                                  self.config.data.seq_len, temperature, self.config.train.seed)
        return _sample.printable(_tokenizer.decode(self.config.data.tokenizer, tokens))

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
        if self.data_task() == "lm":
            out["tokens_per_s"] = tc.batch_size * self.config.data.seq_len / step_time
        if self._flops is None:
            self._flops = self.flops_per_step() or 0.0
        peak = self._peak_flops()
        if self._flops and peak:
            out["mfu"] = self._flops / step_time / (peak * jax.device_count())
        return out

    def _peak_flops(self) -> float | None:
        """One device's peak FLOP/s in the run's compute dtype; None for an unknown device."""
        if not hasattr(self, "_peak"):
            dtype, name = self.config.train.compute_dtype, None
            try:
                get_profile(num_devices=jax.device_count())  # the running device, if known
            except UnknownDeviceError as e:
                name = self.config.parallel.profile
                if name is None:
                    self._peak = None
                    print(f"mfu is not reported: {e}", file=sys.stderr)
                    return None
            self._peak = get_profile(name, jax.device_count()).peak_flops_for(dtype)
        return self._peak


def _batch_spec(example: dict, batch_size: int, name: str) -> dict:
    """``example``'s leaves as ``jax.ShapeDtypeStruct`` with leading dimension ``batch_size``.

    Raises:
      DataError: ``example`` is not a dict of arrays with a leading batch dimension.
    """
    if not isinstance(example, dict) or not example:
        raise DataError(f"{name}.batch(index, batch_size) must return a dict of numpy arrays, "
                        f"got {type(example).__name__}")

    def one(path, leaf):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype") or np.ndim(leaf) == 0:
            raise DataError(f"{name} batch leaf {jax.tree_util.keystr(path)} is "
                            f"{type(leaf).__name__} {str(leaf)[:40]!r}; every leaf must be an "
                            "array whose first dimension is the batch")
        if not (jnp.issubdtype(leaf.dtype, jnp.number) or jnp.issubdtype(leaf.dtype, jnp.bool_)):
            raise DataError(f"{name} batch leaf {jax.tree_util.keystr(path)} has dtype "
                            f"{leaf.dtype}; only numeric arrays can be trained on")
        return jax.ShapeDtypeStruct((batch_size, *leaf.shape[1:]), leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, example)

