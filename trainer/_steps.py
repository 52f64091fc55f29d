"""Turns a Flax model, a loss and an optimizer into pure functions over pytrees.

``parallel`` sees only these functions and the state dict they pass around:
``{"step", "params", "opt_state", "model_state", "rng"}`` — never a Flax object.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
import flax.linen as nn

from trainer import _linen
from trainer._errors import ConfigError, DataError, ModelError


def as_nnx(model: Any, key, loss_fn, example_batch) -> nnx.Module:
    """Returns ``model`` as an NNX module; a linen module is wrapped (``_linen.LinenModule``)
    and initialized with ``key`` by running ``loss_fn`` once on zeros like ``example_batch``.

    Raises:
      ModelError: ``model`` is not a Flax module (a class, a tuple, a function...), or a linen
        module that ``loss_fn`` does not call.
    """
    if isinstance(model, nnx.Module):
        return model
    if isinstance(model, nn.Module):
        wrapped = _linen.wrap(model, key, loss_fn, example_batch)
        if not jax.tree.leaves(nnx.state(wrapped)):
            raise ModelError(f"the linen module {type(model).__name__} has no variables after "
                             "loss_fn ran once to initialize it; loss_fn must call the model")
        return wrapped
    if isinstance(model, type):
        got = f"the class {model.__name__}"
        hint = f"; return an instance, e.g. {model.__name__}(rngs=rngs), not the class"
    else:
        text = " ".join(repr(model).split())
        got = f"{type(model).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
        hint = "; return the module itself (build_model(self, rngs) -> module)"
    raise ModelError(f"build_model must return a flax.nnx.Module or a flax.linen.Module, got "
                     f"{got}{hint}")


def logical_axes_of(abstract_params: nnx.State):
    """A pure-dict pytree matching the params: per leaf, its tuple of logical axis names or None."""
    def names(v):
        axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        return tuple(axes) if axes is not None else None

    is_var = lambda x: isinstance(x, nnx.Variable)
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(names(v)), abstract_params, is_leaf=is_var))


def cast_floating(tree, dtype):
    """Casts floating leaves to the compute dtype (gradients flow back to the f32 originals)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The pure functions of one training setup. ``graphdef`` rebuilds the module inside them."""

    graphdef: Any
    init: Callable  # key -> state
    train_step: Callable  # (state, batch) -> (state, metrics)
    eval_step: Callable  # (state, batch) -> metrics
    logical_axes: Any  # pytree over the state: tuples of axis names or None
    model_name: str  # the module's class name, for logs
    loss: Callable  # (state, batch) -> (loss, metrics), the training loss alone
    apply: Callable  # (state, inputs) -> the model's outputs
    # The train step with every micro-batch in one pass: the same FLOPs as ``train_step``, with
    # no loop, so XLA's cost analysis (which counts a loop body once) counts all of them.
    unrolled_train_step: Callable


def _build(build_model, loss_fn, example_batch, key) -> nnx.Module:
    with nnx.use_eager_sharding(False):
        return as_nnx(build_model(nnx.Rngs(key)), key, loss_fn, example_batch)


def _abstract_model(build) -> nnx.Module:
    """``build(key)`` with abstract arrays; a state leaf that is not an array is a ModelError."""
    try:
        return nnx.eval_shape(lambda: build(jax.random.key(0)))
    except TypeError as e:
        if "not a valid JAX type" not in str(e):
            raise
        # JAX names the leaf: "... returned a value of type <class 'str'> at output component
        # .states[0]['tag'][0], which is not a valid JAX type"
        found = re.search(r"of type <class '([\w.]+)'> at output component \.states\[0\](\S*?)"
                          r"(\[0\])?,", str(e))
        what = (f"leaf {found.group(2)} holds a {found.group(1)}" if found else
                f"holds a leaf that is not an array ({_first_line(e)})")
        raise ModelError(
            f"the model's state {what}, not an array; keep strings and other settings as plain "
            "attributes (not nnx.Variable), and numbers as jnp arrays") from None


def param_axes(build_model, loss_fn, example_batch):
    """The logical axis names of the params ``build_model`` makes (see ``logical_axes_of``),
    from an abstract build: nothing is allocated."""
    abstract = _abstract_model(functools.partial(_build, build_model, loss_fn, example_batch))
    return logical_axes_of(nnx.state(abstract, nnx.Param))


def make_step_functions(build_model, loss_fn, eval_metrics_fn, optimizer, schedule,
                        example_batch, compute_dtype, grad_accum_steps: int) -> StepFunctions:
    """Builds init/train/eval functions from the Trainer's hooks.

    Args:
      build_model: ``rngs -> module`` (NNX, or linen wrapped by ``as_nnx``).
      loss_fn: ``(model, batch, rng) -> (loss, metrics)``.
      eval_metrics_fn: ``(model, batch) -> metrics``.
      optimizer: an optax transformation over the params.
      schedule: step -> learning rate, reported as a metric.
      example_batch: a batch (arrays or ``jax.ShapeDtypeStruct``) the loss of a linen module
        runs on once to initialize it; unused for NNX modules.
      compute_dtype: dtype the forward and backward passes run in; params stay float32.
      grad_accum_steps: micro-batches per step whose gradients are summed before the update.
    """
    build = functools.partial(_build, build_model, loss_fn, example_batch)
    abstract = _abstract_model(build)
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    model = abstract.to_nnx__module if isinstance(abstract, nnx.bridge.ToNNX) else abstract

    def init(key):
        init_key, rng = jax.random.split(key)
        _, params, model_state = nnx.split(build(init_key), nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": optimizer.init(params),
            "model_state": nnx.to_pure_dict(model_state),
            "rng": rng,
        }

    def loss_and_state(params, model_state, batch, rng):
        model = nnx.merge(graphdef, cast_floating(params, compute_dtype), model_state)
        with _linen.calls(train=True, rng=rng):
            loss, metrics = loss_fn(model, batch, rng)
        new_model_state = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
        loss, count = split_loss(loss)  # a (sum, count) loss: differentiate the sum
        return loss.astype(jnp.float32), (metrics, new_model_state, count)

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    def train_step(state, batch, grad_accum_steps=grad_accum_steps):
        rng, step_rng = jax.random.split(state["rng"])
        params, model_state = state["params"], state["model_state"]
        if grad_accum_steps == 1:
            (loss, (metrics, model_state, count)), grads = grad_fn(params, model_state, batch,
                                                                   step_rng)
        else:
            micro = jax.tree.map(  # (B, ...) -> (A, B/A, ...)
                lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

            def accumulate(carry, inputs):
                grads_sum, loss_sum, count_sum, model_state = carry
                micro_batch, key = inputs
                (loss, (metrics, model_state, count)), grads = grad_fn(
                    params, model_state, micro_batch, key)
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                count_sum = count_sum + (1.0 if count is None else count)
                return (grads_sum, loss_sum + loss, count_sum, model_state), metrics

            zeros = jax.tree.map(jnp.zeros_like, params)
            # Micro-batch i's key is fold_in(step key, i), as a pipeline's micro-batch i gets.
            keys = jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(
                jnp.arange(grad_accum_steps))
            (grads, loss, count, model_state), metrics = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                             model_state), (micro, keys))
            metrics = jax.tree.map(lambda m: m.mean(), metrics)
        if count is not None:  # loss and gradients: sums over examples, divided once
            loss = loss / count
            grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "model_state": model_state,
            "rng": rng,
        }
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                       learning_rate=jnp.asarray(schedule(state["step"]), jnp.float32))
        return new_state, metrics

    def eval_step(state, batch):
        model = nnx.merge(graphdef, cast_floating(state["params"], compute_dtype), state["model_state"])
        with _linen.calls(train=False):
            metrics = eval_metrics_fn(model, batch)  # a (sum, count) pair is a mean
        metrics = {k: v[0] / v[1] if isinstance(v, tuple) else v for k, v in metrics.items()}
        return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def loss(state, batch):
        loss, (metrics, _, count) = loss_and_state(state["params"], state["model_state"], batch,
                                                   state["rng"])
        return (loss if count is None else loss / count), metrics

    def apply(state, inputs):
        model = nnx.merge(graphdef, cast_floating(state["params"], compute_dtype),
                          state["model_state"])
        with _linen.calls(train=True, rng=state["rng"]):
            return forward(model, inputs, True)[0]

    axes = {"step": None, "params": logical_axes_of(abstract_params), "opt_state": None,
            "model_state": None, "rng": None}
    return StepFunctions(graphdef, init, train_step, eval_step, axes, type(model).__name__,
                         loss, apply, lambda state, batch: train_step(state, batch, 1))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")


def _shapes(tree) -> str:
    """``inputs (32, 16) float32, targets (32, 4) float32`` for a dict of arrays; else the shapes."""
    if isinstance(tree, dict):
        return ", ".join(f"{k} {_shapes(v)}" for k, v in tree.items())
    leaves = jax.tree.leaves(tree)
    if len(leaves) == 1 and hasattr(leaves[0], "shape"):
        return f"{tuple(leaves[0].shape)} {leaves[0].dtype}"
    return str(jax.tree.map(lambda x: tuple(x.shape), tree))


def check_loss(fns: StepFunctions, abstract_state, batch_spec, name: str = "train_data()") -> None:
    """Traces the loss on the data's shapes (nothing runs) so a mismatch fails before step 1.

    Args:
      fns: the step functions.
      abstract_state: the state as ``jax.ShapeDtypeStruct`` leaves.
      batch_spec: one batch as ``jax.ShapeDtypeStruct`` leaves.
      name: where the batch came from, for the message.

    Raises:
      DataError: the loss does not trace on these shapes (the message names the batch's
        shapes, the model's output shape when the batch has ``inputs``, and JAX's complaint).
      ModelError: the loss is not a scalar.
    """
    try:
        loss, _ = jax.eval_shape(fns.loss, abstract_state, batch_spec)
    except KeyError as e:
        raise DataError(f"loss_fn looked up batch key {e} but {name} gives keys "
                        f"{sorted(batch_spec)}; use the data's keys in loss_fn or change the "
                        "data") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, (ModelError, DataError, ConfigError)):  # already says what to change
            raise
        output = ""
        if isinstance(batch_spec, dict) and "inputs" in batch_spec:
            try:
                out = jax.eval_shape(fns.apply, abstract_state, batch_spec["inputs"])
                output = f"; the model's output is {_shapes(out)}"
            except (TypeError, ValueError) as inner:
                output = f"; the model does not take these inputs ({_first_line(inner)})"
        raise DataError(
            f"the data does not fit the model: {name} gives {_shapes(batch_spec)}{output}; "
            f"the loss failed with: {_first_line(e)}. Change the model or the data so their "
            "shapes agree (a subclass gives its data with train_data()/eval_data())"
        ) from None
    if loss.shape != ():
        raise ModelError(f"loss_fn must return a scalar loss, got shape {loss.shape} on {name}'s "
                         f"batch {_shapes(batch_spec)}; reduce it, e.g. with jnp.mean")


def xla_flops(fn: Callable, *abstract_args) -> float | None:
    """FLOPs of ``fn`` on these shapes as XLA's cost analysis counts them (whole program).

    ``fn`` is lowered with ``jax.jit`` and no shardings, so this is the unpartitioned program:
    every device's share together. (The cost analysis of a compiled multi-device SPMD program
    reports one device's share, ``parallel.Report.flops``.) A loop body (``scan``, ``while``)
    is counted once whatever its trip count. ``None`` when the backend reports no count.
    """
    costs = jax.jit(fn).lower(*abstract_args).cost_analysis()
    if isinstance(costs, (list, tuple)):  # older JAX: one dict per program
        costs = costs[0] if costs else None
    flops = (costs or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def split_loss(loss):
    """``(loss, None)`` for a scalar loss; ``(total, count)`` for a loss given as a sum over
    examples and their count (gradients of the sum are divided by the global count once, so
    ``train.grad_accum_steps`` and pipelines accumulate it exactly).

    Raises:
      ModelError: a tuple that is not a pair.
    """
    if not isinstance(loss, (tuple, list)):
        return loss, None
    if len(loss) != 2:
        raise ModelError(f"loss_fn returned a loss of {len(loss)} parts; return a scalar loss or "
                         f"a pair (sum over examples, count), e.g. (jnp.sum(ce * mask), "
                         f"jnp.sum(mask))")
    total, count = loss
    return jnp.asarray(total), jnp.asarray(count, jnp.float32)


def forward(model, inputs, train: bool):
    """``(outputs, aux_losses)`` from a registry model's ``forward``, or ``(model(inputs), {})``."""
    if hasattr(model, "forward"):
        return model.forward(inputs, train=train)
    return model(inputs), {}


def lm_loss(model, batch, rng):
    """Next-token cross entropy (nats per token) plus any auxiliary losses the model reports."""
    logits, aux = forward(model, batch["inputs"], rng is not None)  # (B, T, V)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"]).mean()
    metrics = {"ce_loss": ce, **aux} if aux else {}
    return ce + sum(aux.values()), metrics


def classify_loss(model, batch, rng):
    """Softmax cross entropy over classes, with accuracy."""
    logits, aux = forward(model, batch["inputs"], rng is not None)  # (B, classes)
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    accuracy = (logits.argmax(-1) == batch["targets"]).mean()
    return ce + sum(aux.values()), {"accuracy": accuracy, **aux}


def regress_loss(model, batch, rng):
    """Mean squared error."""
    out, aux = forward(model, batch["inputs"], rng is not None)
    mse = jnp.mean((out.astype(jnp.float32) - batch["targets"]) ** 2)
    return mse + sum(aux.values()), dict(aux)


TASK_LOSSES = {"lm": lm_loss, "classify": classify_loss, "regress": regress_loss}
