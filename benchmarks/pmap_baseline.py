"""The plain ``jax.pmap`` data-parallel baseline, written the way a pmap user writes it.

The state is replicated by stacking one copy per device on a new leading axis, the global batch
is reshaped to ``[num_devices, B / num_devices, ...]``, each device computes gradients on its
slice, and ``jax.lax.pmean`` averages them before an identical optimizer update on every device.
Benchmarks compare ``parallelize`` against this.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parallel import PlanError

_AXIS = "batch"


class PmapStep:
    """A ``jax.pmap`` train step over the state dict ``{"step", "params", "opt_state", ...}``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` or ``-> (loss, metrics dict)``, on one
        device's slice of the batch.
      optimizer: an optax ``GradientTransformation`` (only ``.update`` is used).
      devices: devices to run on; ``None`` means ``jax.local_devices()``.

    Usage::

      step = pmap_step(loss_fn, optimizer)
      stacked = step.replicate(state)               # one copy per device: [n, ...]
      stacked, metrics = step(stacked, batch)        # batch: global [B, ...]
      state = step.unreplicate(stacked)
    """

    def __init__(self, loss_fn: Callable, optimizer: Any,
                 devices: Sequence[jax.Device] | None = None):
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.devices = list(jax.local_devices() if devices is None else devices)
        self._pmapped = jax.pmap(self._device_step, axis_name=_AXIS, devices=self.devices,
                                 donate_argnums=(0,))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def _device_step(self, state, batch):
        def loss_and_metrics(params):
            out = self.loss_fn(params, batch)
            return (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})

        (loss, metrics), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(
            state["params"])
        grads = jax.lax.pmean(grads, _AXIS)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        metrics = jax.lax.pmean({**metrics, "loss": loss}, _AXIS)
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    def replicate(self, state: Any) -> Any:
        """Stacks one copy of every leaf per device: ``[...] -> [num_devices, ...]``."""
        n = self.num_devices
        return jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * n), state)

    def unreplicate(self, stacked: Any) -> Any:
        """The copy on the first device: ``[num_devices, ...] -> [...]``."""
        return jax.tree.map(lambda x: x[0], stacked)

    def __call__(self, stacked_state: Any, batch: Any) -> tuple[Any, dict]:
        """One step; returns the stacked new state and the device-averaged metrics.

        Raises:
          PlanError: the global batch does not divide by the number of devices.
        """
        new_state, metrics = self._pmapped(stacked_state, self.split_batch(batch))
        return new_state, jax.tree.map(lambda m: m[0], metrics)

    def lower(self, stacked_state: Any, batch: Any):
        """The ``jax.stages.Lowered`` pmapped step (for its compiled memory and collectives)."""
        return self._pmapped.lower(stacked_state, self.split_batch(batch))

    def split_batch(self, batch: Any) -> Any:
        """Reshapes each global batch leaf ``[B, ...] -> [num_devices, B / num_devices, ...]``.

        Raises:
          PlanError: the global batch does not divide by the number of devices.
        """
        n = self.num_devices

        def split(x):
            x = x if hasattr(x, "reshape") else np.asarray(x)
            if x.shape[0] % n:
                raise PlanError(f"global batch size {x.shape[0]} (leaf shape {x.shape}) is not "
                                 f"divisible by the {n} devices pmap runs on; use a multiple "
                                 f"of {n}")
            return x.reshape(n, x.shape[0] // n, *x.shape[1:])  # [B, ...] -> [n, B/n, ...]

        return jax.tree.map(split, batch)


def pmap_step(loss_fn: Callable, optimizer: Any,
              devices: Sequence[jax.Device] | None = None) -> PmapStep:
    """The ``jax.pmap`` baseline step (see ``PmapStep``).

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` or ``(loss, metrics)``.
      optimizer: an optax ``GradientTransformation``.
      devices: devices to run on; ``None`` means ``jax.local_devices()``.
    """
    return PmapStep(loss_fn, optimizer, devices)
