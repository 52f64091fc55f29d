"""Linen modules in the Trainer: called as plain linen code, with their state collections kept.

A ``flax.linen`` module returned by ``build_model`` is wrapped as an NNX module (``LinenModule``,
an ``nnx.bridge.ToNNX``) so the Trainer handles it like any other model. The user's loss calls
it as they would call linen code, ``model(x, train=True)``; what ``module.apply`` would need
besides is filled in from where the call happens:

- ``mutable``: in a training step, every collection the module created at initialization
  except ``params`` and ``intermediates`` (``batch_stats`` and any other state); the updated
  values go into the train state's ``model_state``. In evaluation nothing is mutable.
- ``rngs``: in a training step, ``{"params": rng}`` with the loss's ``rng`` (the step's key;
  linen falls back to the ``params`` stream for a stream it is not given, so ``dropout``
  draws from it). A second call in the same loss gets ``fold_in(rng, 1)``, and so on.

So a training loss ``model(x, train=True)`` computes what
``module.apply(variables, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])``
computes for a module whose only random stream is ``dropout`` and whose only state is
``batch_stats``. Arguments the user passes (``mutable=``, ``rngs=`` as a key) win.

The module is initialized by running the loss once on zeros shaped like a batch, so its
``__call__`` may take any arguments (``train`` without a default, several inputs...).
``intermediates`` (``sow``) are not stored state: they are dropped after initialization.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import flax.linen as nn

_NOT_STATE = ("params", "intermediates")


@dataclasses.dataclass
class _Calls:
    """Where the module is being called: a training step (with its key) or evaluation."""

    train: bool
    rng: Any  # a PRNG key, or None in evaluation
    count: int = 0  # calls so far under this context


_CONTEXT: contextvars.ContextVar[_Calls | None] = contextvars.ContextVar("linen_calls", default=None)


@contextlib.contextmanager
def calls(train: bool, rng=None):
    """Linen modules called inside are in a training step (``train``) or in evaluation."""
    token = _CONTEXT.set(_Calls(train, rng))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class LinenModule(nnx.bridge.ToNNX):
    """A linen module as an NNX module whose calls fill in ``mutable`` and ``rngs`` (see above)."""

    def __call__(self, *args, rngs=None, method=None, mutable=None, **kwargs):
        context = _CONTEXT.get()
        if context is not None:
            if rngs is None and context.rng is not None:
                rngs = (context.rng if context.count == 0
                        else jax.random.fold_in(context.rng, context.count))
            context.count += 1
            if mutable is None and not self._pytree__state.initializing:
                mutable = (self.state_collections() or False) if context.train else False
        return super().__call__(*args, rngs=rngs, method=method, mutable=mutable, **kwargs)

    def state_collections(self) -> list[str]:
        """The linen collections this module holds other than ``params`` (``batch_stats``...)."""
        names = {nnx.variable_name_from_type(type(v)) for _, v in nnx.iter_graph(self)
                 if isinstance(v, nnx.Variable)}
        return sorted(names - set(_NOT_STATE))

    def run(self, fn: Callable, *args):
        """``fn(self, *args)``: lets ``nnx.bridge.lazy_init`` initialize through any function."""
        return fn(self, *args)


def wrap(module: nn.Module, key, loss_fn: Callable, example_batch) -> LinenModule:
    """``module`` as a ``LinenModule``, initialized with ``key`` by running ``loss_fn`` once.

    Args:
      module: the linen module.
      key: the PRNG key of its ``params`` stream at initialization.
      loss_fn: the training loss ``(model, batch, rng) -> (loss, metrics)``; it calls the module.
      example_batch: a pytree of arrays or ``jax.ShapeDtypeStruct`` shaped like a batch; the
        loss runs on zeros of these shapes (outside a trace only the shapes matter).

    The result has no variables if the loss never called the module (the caller says so).
    """
    wrapped = LinenModule(module)
    zeros = jax.tree.map(lambda x: jnp.zeros(np.shape(x), x.dtype), example_batch)
    with calls(train=True, rng=key):
        nnx.bridge.lazy_init(wrapped.run, loss_fn, zeros, key)
    nnx.pop(wrapped, nnx.Intermediate)
    return wrapped
