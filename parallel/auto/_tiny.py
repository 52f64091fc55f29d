"""Tiny steps: planned as plain data parallelism without a search.

A step whose whole work, run unsplit on one device, takes less time than the device needs to
launch one step program (``DeviceProfile.program_overhead_s``) cannot be made faster by any
split by more than that overhead, which no plan changes and the cost model does not count:
every plan's estimate is a tie, and the tie rule (``parallel.auto.rank``) picks the simplest
plan, data parallelism (the batch split, the state replicated). The search and its compiled
checks, seconds of CPU for a model of a few hundred parameters, are skipped.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from parallel._roles import trace
from parallel.auto._layers import _nbytes
from parallel.auto._graph import build_graph
from parallel.profiles import DeviceProfile


@dataclasses.dataclass(frozen=True)
class StepSize:
    """One step's work, unsplit, on one device.

    Attributes:
      flops: arithmetic (matmuls and convolutions at 2 per multiply-add, one per element
        of every other operation's results).
      bytes_accessed: bytes every operation reads and writes (XLA's count before fusion).
      state_bytes: the donated arguments (parameters, optimizer and model state).
      time_s: ``DeviceProfile.compute_time`` of ``flops`` and ``bytes_accessed``.
    """

    flops: float
    bytes_accessed: float
    state_bytes: float
    time_s: float


def step_size(fn: Callable, abstract_args: Sequence[Any], donate_argnums: Sequence[int],
              profile: DeviceProfile, num_devices: int, traced: tuple | None = None) -> StepSize:
    """The work of ``fn(*abstract_args)`` run unsplit on one device of ``profile`` (traced
    once, nothing compiled). Simulated devices sharing one host (``shared_host``) each have a
    share of its figures; unsplit work runs at the whole host's speed. ``traced``:
    ``parallel._roles.trace(fn, abstract_args)`` made already (not traced again)."""
    closed, _, _ = traced or trace(fn, tuple(abstract_args))
    graph = build_graph(closed)
    flops = accessed = 0.0
    for eqn in graph.eqns:
        outs = [graph.values[v] for v in eqn.outputs]
        ins = [graph.values[v] for v in eqn.inputs if v is not None]
        accessed += eqn.weight * (sum(v.nbytes for v in ins) + sum(v.nbytes for v in outs))
        flops += eqn.weight * _flops(eqn, ins, outs)
    state = sum(_nbytes(x) for i in donate_argnums for x in jax.tree.leaves(abstract_args[i]))
    share = (profile.devices_per_host or num_devices) if profile.shared_host else 1
    return StepSize(flops, accessed, state, profile.compute_time(flops / share, accessed / share))


def _flops(eqn, ins, outs) -> float:
    out_elements = sum(math.prod(v.shape) for v in outs)
    if eqn.prim == "dot_general" and len(ins) == 2:
        (contract, _), _ = eqn.params["dimension_numbers"]
        return 2.0 * out_elements * math.prod(ins[0].shape[d] for d in contract)
    if eqn.prim == "conv_general_dilated" and len(ins) == 2:
        lhs_dims, rhs_dims, _ = eqn.params["dimension_numbers"]
        kernel = math.prod(ins[1].shape[d] for d in rhs_dims[2:])
        groups = eqn.params.get("feature_group_count", 1)
        return 2.0 * out_elements * ins[0].shape[lhs_dims[1]] // groups * kernel
    return float(out_elements)


def tiny_account(size: StepSize, profile: DeviceProfile, limit_s: float) -> str:
    """The plan's account of a tiny step."""
    return (f"tiny model: the whole step unsplit on one device is estimated at "
            f"{size.time_s * 1e6:.1f} us ({size.flops / 1e6:.2f} MFLOP, "
            f"{size.bytes_accessed / 2**20:.2f} MiB accessed, state {size.state_bytes / 2**10:.1f} "
            f"KiB), under the {limit_s * 1e6:.0f} us a step program costs to launch on "
            f"'{profile.name}' devices: no split saves more than that, so every plan ties and the "
            "simplest is taken, data parallelism (batch split, state replicated), without the "
            "search (AutoParallel(tiny_step_s=0) searches anyway)")
