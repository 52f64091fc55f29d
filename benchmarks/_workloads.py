"""Benchmark workloads: a registry model, its Adam train step, a fixed batch and its sizes.

A workload is everything one benchmark case needs to build a step for any method: the pure
``init``/``train_step`` over the state dict ``{"step", "params", "opt_state", "model_state",
"rng"}`` that ``parallel.parallelize`` runs, the ``loss_fn(params, batch)`` and optimizer that
the ``jax.pmap`` baseline runs, the params' logical axis names (for the hand-written rules),
and a deterministic batch. Sizes are named so results can be compared across runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import models
from trainer._steps import TASK_LOSSES, logical_axes_of


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A named benchmark workload: a registry model, its options, batch and sequence sizes.

    Attributes:
      name: the workload's name in results (``data_parallel_preferred``, ``gpt_small``...).
      model: registry name (``models.create_model``).
      options: the model's options.
      batch_size: global batch size.
      seq_len: tokens per sequence (language models) or image size (classifiers); ``None`` for
        the MLP.
      learning_rate: Adam's learning rate.
    """

    name: str
    model: str
    options: dict
    batch_size: int
    seq_len: int | None = None
    learning_rate: float = 1e-3

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON-friendly data."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Workload:
    """The pure functions and data of one workload (see the module docstring).

    Attributes:
      spec: what was built.
      init: ``key -> state``.
      train_step: ``(state, batch) -> (state, {"loss"})``.
      loss_fn: ``(params, batch) -> loss`` for models without non-param state (pmap baseline).
      optimizer: the optax transformation both steps apply.
      batch: numpy arrays with the global batch as leading dimension.
      logical_axes: per-argument logical axis names for ``parallelize`` (state, batch).
      num_params: parameter count.
      flops_per_step: training FLOPs of one global batch by the model's closed form
        (``0.0`` when the model has none).
      has_model_state: the model keeps non-param variables (batch-norm statistics).
    """

    spec: WorkloadSpec
    init: Callable
    train_step: Callable
    loss_fn: Callable
    optimizer: Any
    batch: dict
    logical_axes: tuple
    num_params: int
    flops_per_step: float
    has_model_state: bool


def make_batch(task: str, config: Any, batch_size: int, seq_len: int | None,
               seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic random batch for ``task`` with ``batch_size`` examples.

    Returns:
      ``lm``: ``inputs``/``targets`` int32 ``[B, T]``; ``classify``: ``inputs`` float32
      ``[B, S, S, C]`` and ``targets`` int32 ``[B]``; ``regress``: float32 ``inputs [B, D_in]``,
      ``targets [B, D_out]``.
    """
    rng = np.random.default_rng(seed)
    if task == "lm":
        tokens = rng.integers(0, config.vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}  # (B, T) each
    if task == "classify":
        images = rng.normal(size=(batch_size, seq_len, seq_len, config.in_channels))
        return {"inputs": images.astype(np.float32),
                "targets": rng.integers(0, config.num_classes, size=(batch_size,), dtype=np.int32)}
    return {"inputs": rng.normal(size=(batch_size, config.in_features)).astype(np.float32),
            "targets": rng.normal(size=(batch_size, config.outputs)).astype(np.float32)}


def build_workload(spec: WorkloadSpec) -> Workload:
    """Builds the model of ``spec`` abstractly and returns its pure step functions and batch.

    Nothing large is allocated here: parameters are created by ``init`` (which ``parallelize``
    jits with the plan's shardings).
    """
    model_spec = models.get_spec(spec.model)
    config = models.make_config(spec.model, spec.options)
    task_loss = TASK_LOSSES[model_spec.task]
    optimizer = optax.adam(spec.learning_rate)

    def build(key):
        with nnx.use_eager_sharding(False):
            return models.create_model(spec.model, spec.options, rngs=nnx.Rngs(key))

    abstract = nnx.eval_shape(lambda: build(jax.random.key(0)))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    has_model_state = bool(jax.tree.leaves(abstract_rest))

    def init(key):
        _, params, model_state = nnx.split(build(key), nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params),
                "model_state": nnx.to_pure_dict(model_state), "rng": jax.random.key(0)}

    def loss_with_state(params, model_state, batch):
        model = nnx.merge(graphdef, params, model_state)
        loss, _ = task_loss(model, batch, jnp.zeros((), jnp.int32))  # rng set: train mode
        return loss, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])

    def train_step(state, batch):
        (loss, model_state), grads = jax.value_and_grad(loss_with_state, has_aux=True)(
            state["params"], state["model_state"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {**state, "step": state["step"] + 1,
                     "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state, "model_state": model_state}
        return new_state, {"loss": loss}

    empty_state = nnx.to_pure_dict(abstract_rest)

    def loss_fn(params, batch):
        return loss_with_state(params, empty_state, batch)[0]

    axes = {"step": None, "params": logical_axes_of(abstract_params), "opt_state": None,
            "model_state": None, "rng": None}
    batch = make_batch(model_spec.task, config, spec.batch_size, spec.seq_len)
    flops = model_spec.flops_per_example(config, spec.seq_len) * spec.batch_size
    return Workload(spec, init, train_step, loss_fn, optimizer, batch, (axes, None),
                    model_spec.num_params(config), float(flops), has_model_state)


SEED_WORKLOADS = {
    # The tutorial's two cases. A small MLP with a large batch: activations dominate, the
    # parameters are cheap to replicate and all-reduce, so data parallelism is the right plan.
    "data_parallel_preferred": WorkloadSpec(
        "data_parallel_preferred", "mlp",
        {"in_features": 256, "hidden_size": 256, "num_layers": 2, "out_features": 256},
        batch_size=2048),
    # A wide MLP with a small batch and Adam: the 4096-wide weights and their optimizer state
    # dominate, so replicating them (pmap) costs memory and redundant updates on every device.
    "model_parallel_preferred": WorkloadSpec(
        "model_parallel_preferred", "mlp",
        {"in_features": 1024, "hidden_size": 4096, "num_layers": 2, "out_features": 1024},
        batch_size=32),
}
