"""How many bytes each device of a pipeline stage holds during a step.

A stage's devices hold, for the whole step: its state leaves (parameters and their per-step
copies, optimizer state, anything else the step stores), the accumulators of the values its
micro-batch tasks hand out (gradients), and its share of the global batch; and, per
micro-batch whose forward ran and whose backward has not, the activations its backward reads.
The schedule says how many micro-batches that is (``max_in_flight``). On top, while a program
runs: XLA's temporaries and the outputs it does not write over an input.

Two ways in:

* ``estimate_stage`` (for the stage search, nothing placed yet): from per-layer figures of the
  traced step (``layer_memory``), with the state and activations split evenly over the stage's
  devices or not.
* ``runner_memory`` (a placed pipeline): every value with the layout the runtime gives it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from parallel._errors import PlanError
from parallel.pipeline._schedule import max_in_flight
from parallel.pipeline._tasks import accumulator_dtype


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Bytes per device of one group of devices (a stage, or the virtual stages it runs).

    Attributes:
      stage: the stage (its first virtual stage).
      parameters: state leaves the micro-batch tasks read, and per-step values made from them
        or copied from other stages (e.g. casts to the compute dtype, a tied embedding).
      optimizer_state: the other state leaves (read only by the update).
      accumulators: running totals over micro-batches (gradients, metrics).
      batch: the stage's share of the global batch (all micro-batches are cut at once).
      activations_per_micro_batch: what one micro-batch's backward reads of its forward.
      in_flight: the most micro-batches the schedule keeps between forward and backward.
      in_transit: values of one micro-batch received from other stages and not kept (the
        gradients a backward receives).
      program: the most one running program adds (XLA's temporaries plus outputs not written
        over an input); 0 until compiled.
    """

    stage: int
    parameters: int
    optimizer_state: int
    accumulators: int
    batch: int
    activations_per_micro_batch: int
    in_flight: int
    in_transit: int = 0
    program: int = 0

    @property
    def activations(self) -> int:
        return self.activations_per_micro_batch * self.in_flight

    @property
    def total(self) -> int:
        """The peak bytes per device."""
        return (self.parameters + self.optimizer_state + self.accumulators + self.batch
                + self.activations + self.in_transit + self.program)

    def describe(self) -> str:
        parts = [f"parameters {self.parameters:,}", f"optimizer state {self.optimizer_state:,}",
                 f"accumulators {self.accumulators:,}", f"batch {self.batch:,}",
                 f"activations {self.activations_per_micro_batch:,} x {self.in_flight} in flight",
                 f"in transit {self.in_transit:,}"]
        if self.program:
            parts.append(f"program temporaries {self.program:,}")
        return ", ".join(parts)


def check_budget(memories: list[StageMemory], budget: float | None, what: str) -> None:
    """Refuses a stage split whose most loaded device exceeds ``budget`` bytes.

    Args:
      memories: per stage (``runner_memory``).
      budget: ``memory_budget_bytes``; ``None`` checks nothing.
      what: the split, for the message (e.g. ``"4 stages of 2 devices"``).

    Raises:
      PlanError: one line naming the bytes per device reached, the budget and what to change.
    """
    if budget is None or not memories:
        return
    worst = max(memories, key=lambda m: m.total)
    if worst.total > budget:
        raise PlanError(
            f"the pipeline ({what}) does not fit parallel.memory_budget_bytes={int(budget):,}: "
            f"the smallest per-device peak it reaches is {worst.total:,} bytes, on stage "
            f"{worst.stage} ({worst.describe()}); use more devices per stage, more stages, "
            f"parallel.remat=true, more micro-batches, or a larger budget")


# ----- estimates for the stage search ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """Per forward layer, bytes of the whole (unsplit) values, for one micro-batch.

    Attributes:
      parameters: the state leaves the layer's forward reads (each counted at its first layer).
      optimizer_state: the other state leaves, shared out in proportion to ``parameters``.
      accumulator_bytes_per_parameter_byte: gradients' accumulators per parameter byte
        (float32 totals of narrower parameters count double).
      activations: the values the layer's forward makes that the backward reads.
      batch: bytes of the global batch (on the first stage).
    """

    parameters: list[float]
    optimizer_state: list[float]
    accumulator_bytes_per_parameter_byte: float
    activations: list[float]
    batch: float


def layer_memory(program, regions, layers, backward: list[bool]) -> LayerMemory:
    """``LayerMemory`` of a traced step (``_program.flatten`` / ``split_regions``,
    ``_stages.find_layers``, ``_stages.backward_flags``)."""
    count = layers.count
    params = [0.0] * count
    seen: set[int] = set()
    derived: dict[int, int] = {}  # per-step value -> the input it is made from (casts)
    for i, op in enumerate(program.ops):
        if regions.region[i] == "N":
            sources = [derived.get(v, v) for v in op.value_inputs()]
            for v in op.outputs:
                if sources:
                    derived[v] = sources[0]
    inputs = set(program.inputs)
    for i in sorted(layers.of_op):
        for v in program.ops[i].value_inputs():
            source = derived.get(v, v)
            if source in inputs and source not in regions.batch_dim and source not in seen:
                seen.add(source)
                params[layers.of_op[i]] += program.nbytes(source)
    state = [v for v in program.inputs if v not in regions.batch_dim]
    other = float(sum(program.nbytes(v) for v in state if v not in seen))
    total_params = sum(params) or 1.0
    optimizer = [other * p / total_params for p in params]
    grads = [v for v in regions.crossing if regions.batch_dim.get(v) is None]
    grad_bytes = sum(_acc_itemsize(program.avals[v].dtype) * math.prod(program.avals[v].shape)
                     for v in grads)
    activations = [0.0] * count
    read_backward = {v for i, op in enumerate(program.ops) if backward[i]
                     for v in op.value_inputs()}
    for i, layer in layers.of_op.items():
        for v in program.ops[i].outputs:
            if v in read_backward:
                activations[layer] += program.nbytes(v)
    batch = float(sum(program.nbytes(v) for v in program.inputs if v in regions.batch_dim))
    return LayerMemory(params, optimizer, grad_bytes / total_params, activations, batch)


def estimate_stage(memory: LayerMemory, first: int, last: int, devices: int, stage: int,
                   num_stages: int, num_micro_batches: int, schedule: str = "1f1b",
                   virtual_stages: int = 1, state_split: bool = True) -> StageMemory:
    """Bytes per device of a candidate stage running layers ``first..last`` on ``devices``.

    Args:
      memory: ``layer_memory`` of the step.
      first, last: the stage's layers (inclusive).
      devices: the stage's devices.
      stage, num_stages: its position in the pipeline (the schedule's in-flight count).
      num_micro_batches: micro-batches per step.
      schedule: ``"1f1b"``, ``"gpipe"`` or ``"interleaved"``.
      virtual_stages: stages per group of devices (interleaved).
      state_split: parameters, optimizer state and accumulators split evenly over the devices
        (what the stage's intra-op plan does for large leaves); else replicated.

    Returns:
      The estimate (``program`` is 0: nothing is compiled).
    """
    share = devices if state_split else 1
    params = sum(memory.parameters[first:last + 1])
    optimizer = sum(memory.optimizer_state[first:last + 1])
    acts = sum(memory.activations[first:last + 1]) / num_micro_batches
    batch = memory.batch / devices if stage == 0 else 0.0
    return StageMemory(
        stage=stage, parameters=int(params / share), optimizer_state=int(optimizer / share),
        accumulators=int(params * memory.accumulator_bytes_per_parameter_byte / share),
        batch=int(batch), activations_per_micro_batch=int(acts / devices),
        in_flight=max_in_flight(schedule, stage, num_stages, num_micro_batches, virtual_stages))


# ----- a placed pipeline ----------------------------------------------------------------------
def runner_memory(runner, programs: dict[tuple, Any] | None = None) -> list[StageMemory]:
    """Per group of devices, what a ``StageRunner`` keeps on each device during a step.

    Args:
      runner: the placed pipeline.
      programs: compiled task programs by task key (``PipelinedStep.compile_all``); when given,
        ``program`` is the largest of XLA's temporaries plus, for per-step tasks, outputs not
        aliased to an input.
    """
    program, regions, placement = runner.program, runner.regions, runner.placement
    tasks = runner.tasks
    feeds_micro: set[int] = set()
    for key, task in tasks.items():
        if key[0] in "FB":
            feeds_micro.update(task.inputs)
    per_stage: dict[int, dict[str, float]] = {}

    def add(stage: int, field: str, amount: float) -> None:
        entry = per_stage.setdefault(stage, dict.fromkeys(
            ("parameters", "optimizer_state", "accumulators", "batch", "activations",
             "in_transit", "program"), 0.0))
        entry[field] += amount

    for v in program.inputs:
        stage = placement.home[v]
        if v in regions.batch_dim:
            add(stage, "batch", _bytes(program.avals[v].shape, program.avals[v].dtype,
                                       runner.batch_sharding(v, stage), runner.num_micro_batches))
        else:
            field = "parameters" if v in feeds_micro else "optimizer_state"
            add(stage, field, _value_bytes(runner, v, stage))
    step_values: set[tuple[int, int]] = set()  # made for, or copied to, micro-batch tasks
    for key, task in tasks.items():
        if key[0] not in "FB":
            continue
        for v in task.inputs:
            if (v in runner.per_micro_batch or v == runner.index_value
                    or v in program.inputs and placement.home[v] == task.stage
                    or (v, task.stage) in step_values):
                continue
            step_values.add((v, task.stage))
            aval = program.avals[v]
            add(task.stage, "parameters",
                _bytes(aval.shape, aval.dtype, runner.input_sharding(v, task.stage)))
    seen_copies: set[tuple[int, int]] = set()
    for key, task in tasks.items():
        for acc in task.accumulates:
            add(task.stage, "accumulators", _bytes(acc.shape, acc.dtype,
                                                   runner._acc_sharding(acc, task.stage)))
        if key[0] != "F" or ("B", task.stage) not in tasks:
            continue
        backward = tasks[("B", task.stage)]
        for v in task.outputs + task.inputs:
            if (v in backward.inputs and v in runner.per_micro_batch
                    and (v, task.stage) not in seen_copies):
                seen_copies.add((v, task.stage))
                sharding = (runner.sharding(v, task.stage) if v in task.outputs
                            else runner.input_sharding(v, task.stage))
                add(task.stage, "activations",
                    _bytes(program.avals[v].shape, program.avals[v].dtype, sharding))
    for key, task in tasks.items():  # values arriving from another stage, one micro-batch's
        if key[0] not in "FB":
            continue
        for v in task.inputs:
            if (v in runner.per_micro_batch and (v, task.stage) not in seen_copies
                    and runner.source_stage(v) != task.stage):
                seen_copies.add((v, task.stage))
                add(task.stage, "in_transit", _bytes(program.avals[v].shape, program.avals[v].dtype,
                                                     runner.input_sharding(v, task.stage)))
    if programs:
        for key, compiled in programs.items():
            stats = compiled.memory_analysis()
            if isinstance(stats, (list, tuple)):
                stats = stats[0]
            extra = stats.temp_size_in_bytes
            if key[0] not in "FB":
                extra += max(0, stats.output_size_in_bytes - stats.alias_size_in_bytes)
            stage = key[-1]
            entry = per_stage.get(stage)
            if entry is not None:
                entry["program"] = max(entry["program"], float(extra))
            else:
                add(stage, "program", float(extra))
    num_stages = placement.num_stages // runner.virtual_stages
    groups: dict[int, list[StageMemory]] = {}
    for stage, entry in sorted(per_stage.items()):
        in_flight = (max_in_flight(runner.schedule, stage, num_stages,
                                   runner.num_micro_batches, runner.virtual_stages)
                     if runner.schedule != "forward" else 1)
        groups.setdefault(stage % num_stages, []).append(StageMemory(
            stage=stage, parameters=int(entry["parameters"]),
            optimizer_state=int(entry["optimizer_state"]), accumulators=int(entry["accumulators"]),
            batch=int(entry["batch"]), activations_per_micro_batch=int(entry["activations"]),
            in_flight=in_flight, in_transit=int(entry["in_transit"]),
            program=int(entry["program"])))
    return [_merge(group) for _, group in sorted(groups.items())]


def _merge(group: list[StageMemory]) -> StageMemory:
    """Virtual stages on one group of devices: their bytes add up (activations at each one's
    own in-flight count, expressed as one micro-batch's worth times the largest count)."""
    if len(group) == 1:
        return group[0]
    in_flight = max(m.in_flight for m in group) or 1
    activations = sum(m.activations for m in group)
    return StageMemory(
        stage=group[0].stage, parameters=sum(m.parameters for m in group),
        optimizer_state=sum(m.optimizer_state for m in group),
        accumulators=sum(m.accumulators for m in group), batch=sum(m.batch for m in group),
        activations_per_micro_batch=-(-activations // in_flight), in_flight=in_flight,
        in_transit=sum(m.in_transit for m in group), program=max(m.program for m in group))


def _value_bytes(runner, v: int, stage: int) -> int:
    aval = runner.program.avals[v]
    return _bytes(aval.shape, aval.dtype, runner.sharding(v, stage))


def _bytes(shape, dtype, sharding, times: int = 1) -> int:
    global_shape = list(shape)
    if global_shape and times > 1:
        global_shape[0] *= times
    shard = sharding.shard_shape(tuple(global_shape))
    return int(math.prod(shard)) * _itemsize(dtype)


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # typed PRNG keys: two uint32 words
        return 8


def _acc_itemsize(dtype) -> int:
    return accumulator_dtype(dtype).itemsize
