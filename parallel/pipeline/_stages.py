"""Which stage runs each operation: layers, stages of layers, and the placement of the rest.

Forward operations of the micro-batch region get a layer (from the user's markers, or by
cutting the forward pass where few bytes cross at balanced cost); layers are grouped into
stages. Everything else follows from data dependencies: a backward operation runs on the
stage where its forward residuals are and no earlier than the cotangents it reads allow;
optimizer operations run where the gradient (the largest input) they read is; per-step
operations (casts, RNG splits) run on the first stage that reads them.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from parallel._errors import PlanError
from parallel.pipeline._program import Program, Regions

INF = math.inf


def op_flops(program: Program, op) -> float:
    """A rough FLOP count: matmuls and convolutions exactly, everything else one per element."""
    out = sum(float(np.prod(program.avals[v].shape)) for v in op.outputs)
    name = op.prim.name
    if name == "dot_general":
        (lhs_contract, _), _ = op.params["dimension_numbers"]
        lhs = program.avals[op.inputs[0]].shape
        return 2.0 * out * float(np.prod([lhs[d] for d in lhs_contract]))
    if name == "conv_general_dilated":  # each output element: a window times input features
        rhs = program.avals[op.inputs[1]].shape
        out_features = rhs[op.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * out * float(np.prod(rhs)) / out_features
    return out


@dataclasses.dataclass
class Layers:
    """Forward layers of the micro-batch region.

    Attributes:
      of_op: op index -> layer, for forward ``M`` operations.
      count: number of layers.
      flops: forward FLOPs per layer (one micro-batch).
      cut_bytes: bytes crossing from layer ``i`` to the later ones, per micro-batch.
      from_markers: whether ``mark_pipeline_boundary`` made them.
    """

    of_op: dict[int, int]
    count: int
    flops: list[float]
    cut_bytes: list[float]
    from_markers: bool


def backward_flags(program: Program, regions: Regions) -> list[bool]:
    """Per op: in ``M`` and part of the backward pass (a transpose, or reading one's result)."""
    flags = [False] * len(program.ops)
    produced_backward: set[int] = set()
    for i, op in enumerate(program.ops):
        if regions.region[i] != "M":
            continue
        if op.backward or any(v in produced_backward for v in op.value_inputs()):
            flags[i] = True
            produced_backward.update(op.outputs)
    return flags


def find_layers(program: Program, regions: Regions, backward: list[bool],
                num_layers: int) -> Layers:
    """Layers from the forward markers, or ``num_layers`` layers cut automatically.

    A value marker starts a new layer for what reads its results (data flow); a no-argument
    marker starts one for every forward operation after it (program order, as in Alpa). Work that
    feeds no value marker (e.g. the labels' one-hot) moves to the first layer reading it; with
    no-argument markers the program order is kept as written.
    """
    forward = [i for i, r in enumerate(regions.region) if r == "M" and not backward[i]]
    if not forward:
        raise PlanError("the step's per-example computation has no forward pass to pipeline")
    value_markers = any(program.ops[i].is_marker for i in forward)
    cuts = [k for k in program.cuts if forward[0] < k <= forward[-1]]
    has_markers = value_markers or bool(cuts)
    chunk = {} if has_markers else _auto_cuts(program, forward, num_layers)
    layer_of_value: dict[int, int] = {}
    of_op = {}
    passed = 0  # no-argument cuts before the current op, in program order
    for i in forward:
        while passed < len(cuts) and cuts[passed] <= i:
            passed += 1
        op = program.ops[i]
        s_in = max((layer_of_value[v] for v in op.value_inputs() if v in layer_of_value),
                   default=0)
        layer = s_in + 1 if op.is_marker else max(s_in, chunk.get(i, 0), passed)
        of_op[i] = layer
        for v in op.outputs:
            layer_of_value[v] = layer
    if value_markers and not cuts:
        _delay_side_work(program, forward, of_op, layer_of_value)
    _delay_free_work(program, regions, forward, of_op, layer_of_value)
    # Layers in use, numbered from 0 (a cut before any forward work leaves no empty layer).
    rank = {layer: k for k, layer in enumerate(sorted(set(of_op.values())))}
    of_op = {i: rank[layer] for i, layer in of_op.items()}
    layer_of_value = {v: rank[layer] for v, layer in layer_of_value.items()}
    count = len(rank)
    flops = [0.0] * count
    for i in forward:
        flops[of_op[i]] += op_flops(program, program.ops[i])
    cut = [0.0] * count
    last_use: dict[int, int] = {}
    for i in forward:
        for v in program.ops[i].value_inputs():
            if v in layer_of_value:
                last_use[v] = max(last_use.get(v, 0), of_op[i])
    for v, last in last_use.items():
        for layer in range(layer_of_value[v], last):
            cut[layer] += program.nbytes(v)
    return Layers(of_op, count, flops, cut, has_markers)


def _delay_side_work(program: Program, forward: list[int], of_op: dict[int, int],
                     layer_of_value: dict[int, int]) -> None:
    """Moves forward ops that feed no marker (e.g. the labels' one-hot, read by the loss only)
    to the first layer that reads their results, so they do not cross every cut."""
    feeds_marker: set[int] = set()
    wanted: set[int] = set()
    for i in reversed(forward):
        op = program.ops[i]
        if op.is_marker or any(v in wanted for v in op.outputs):
            feeds_marker.add(i)
            wanted.update(op.value_inputs())
    readers: dict[int, list[int]] = {}
    for i in forward:
        for v in program.ops[i].value_inputs():
            readers.setdefault(v, []).append(i)
    for i in reversed(forward):
        if i in feeds_marker:
            continue
        later = [of_op[r] for v in program.ops[i].outputs for r in readers.get(v, ())]
        if later and min(later) > of_op[i]:
            of_op[i] = min(later)
            for v in program.ops[i].outputs:
                layer_of_value[v] = of_op[i]


def _delay_free_work(program: Program, regions: Regions, forward: list[int],
                     of_op: dict[int, int], layer_of_value: dict[int, int]) -> None:
    """Moves forward ops that read no example (a mask's broadcast, random bits, a slice of
    positions) to the first layer reading their results, so they do not cross cuts."""
    from_batch = {v for v in program.inputs if v in regions.batch_dim}
    free = []
    for i in forward:
        op = program.ops[i]
        if any(v in from_batch for v in op.value_inputs()):
            from_batch.update(op.outputs)
        else:
            free.append(i)
    readers: dict[int, list[int]] = {}
    for i in forward:
        for v in program.ops[i].value_inputs():
            readers.setdefault(v, []).append(i)
    for i in reversed(free):
        later = [of_op[r] for v in program.ops[i].outputs for r in readers.get(v, ())]
        if later:
            of_op[i] = min(later)
            for v in program.ops[i].outputs:
                layer_of_value[v] = of_op[i]


def _auto_cuts(program: Program, forward: list[int], num_layers: int) -> dict[int, int]:
    """Cuts the forward ops (in program order) into ``num_layers`` chunks of similar FLOPs,
    each cut placed where the fewest bytes cross within a window around the balanced point."""
    n = len(forward)
    num_layers = max(1, min(num_layers, n))
    costs = np.array([op_flops(program, program.ops[i]) for i in forward])
    crossing = np.zeros(n + 1)
    produced_at: dict[int, int] = {}
    for k, i in enumerate(forward):
        for v in program.ops[i].outputs:
            produced_at[v] = k
    last = {}
    for k, i in enumerate(forward):
        for v in program.ops[i].value_inputs():
            if v in produced_at:
                last[v] = k
    for v, k_last in last.items():
        crossing[produced_at[v] + 1] += program.nbytes(v)
        crossing[k_last + 1] -= program.nbytes(v)
    crossing = np.cumsum(crossing)  # crossing[k]: bytes live across the cut before op k
    cumulative = np.concatenate([[0.0], np.cumsum(costs)])
    total = cumulative[-1] or 1.0
    cuts = [0]
    for j in range(1, num_layers):
        target = j * total / num_layers
        window = [k for k in range(cuts[-1] + 1, n)
                  if abs(cumulative[k] - target) <= 0.3 * total / num_layers]
        if not window:
            window = [min(range(cuts[-1] + 1, n), key=lambda k: abs(cumulative[k] - target))] \
                if cuts[-1] + 1 < n else []
        if not window:
            break
        cuts.append(min(window, key=lambda k: (crossing[k], abs(cumulative[k] - target))))
    cuts.append(n)
    chunk = {}
    for c, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        for k in range(lo, hi):
            chunk[forward[k]] = c
    return chunk


def balanced_stages(weights: list[float], num_stages: int) -> list[int]:
    """First layer of each of ``num_stages`` contiguous groups minimizing the largest sum."""
    n = len(weights)
    prefix = np.concatenate([[0.0], np.cumsum(weights)])
    best = {}

    def solve(i, k):  # layers i.. into k groups -> (max cost, starts)
        if (i, k) in best:
            return best[(i, k)]
        if k == 1:
            result = (prefix[n] - prefix[i], [i])
        else:
            result = (INF, [])
            for j in range(i + 1, n - k + 2):
                rest, starts = solve(j, k - 1)
                cost = max(prefix[j] - prefix[i], rest)
                if cost < result[0]:
                    result = (cost, [i] + starts)
        best[(i, k)] = result
        return result

    return solve(0, num_stages)[1]


def virtual_stage_starts(layers: Layers, num_stages: int, virtual_stages: int) -> list[int]:
    """First layer of each of ``num_stages * virtual_stages`` virtual stages (interleaved
    1F1B): equal numbers of consecutive layers; virtual stage ``k`` runs on group ``k % S``.

    Raises:
      PlanError: the layers do not split into that many equal parts.
    """
    total = num_stages * virtual_stages
    if layers.count % total:
        fix = ("add or remove mark_pipeline_boundary calls" if layers.from_markers
               else f"set layers= to a multiple of {total}")
        raise PlanError(f"{layers.count} layers do not split into {num_stages} stages x "
                        f"{virtual_stages} virtual stages ({total} equal parts); {fix}, or "
                        f"change virtual_stages")
    per = layers.count // total
    return [k * per for k in range(total)]


@dataclasses.dataclass
class Placement:
    """Where and when every operation runs.

    Attributes:
      num_stages: number of stages.
      stage: per op, its stage.
      phase: per op: ``"N"`` (once per step, before the micro-batches), ``"F"``/``"B"`` (forward
        or backward of each micro-batch), ``"A"`` (once per step, after them).
      level: per op of phase ``A``, how many stage changes lead to it (tasks run level by level).
      home: value id -> stage, for the step's inputs (where each input leaf lives).
      value_stage: value id -> stage of its producer (or home for inputs).
    """

    num_stages: int
    stage: list[int]
    phase: list[str]
    level: list[int]
    home: dict[int, int]
    value_stage: dict[int, int]


def place(program: Program, regions: Regions, backward: list[bool], layers: Layers,
          stage_of_layer: list[int], num_stages: int, mirrors: dict[int, int]) -> Placement:
    """Places every operation, given the stage of each forward layer.

    Args:
      mirrors: output position -> input position, for outputs that replace an input (the new
        state); such an input lives where its replacement is made.
    """
    ops = program.ops
    n = len(ops)
    stage = [0] * n
    phase = [""] * n
    level = [0] * n
    value_stage: dict[int, int] = {}
    fwd_value: set[int] = set()
    for i, layer in layers.of_op.items():
        stage[i], phase[i] = stage_of_layer[layer], "F"
        for v in ops[i].outputs:
            value_stage[v] = stage[i]
            fwd_value.add(v)
    # Forward values are available where they are made and where forward ops read them.
    avail: dict[int, set[int]] = {v: {value_stage[v]} for v in fwd_value}
    for i in layers.of_op:
        for v in ops[i].value_inputs():
            if v in avail:
                avail[v].add(stage[i])
    for i, op in enumerate(ops):
        if regions.region[i] != "M" or not backward[i]:
            continue
        upper = min((value_stage[v] for v in op.value_inputs()
                     if v in value_stage and v not in fwd_value), default=INF)
        candidates = []
        for v in op.value_inputs():
            if v in fwd_value:
                below = [a for a in avail[v] if a <= upper]
                candidates.append(max(below) if below else min(avail[v]))
        s = min([upper] + candidates)
        stage[i] = num_stages - 1 if s == INF else int(s)
        phase[i] = "B"
        for v in op.outputs:
            value_stage[v] = stage[i]
    # Per-step inputs and N values: the first stage of the micro-batch work that needs them.
    need: dict[int, float] = {}
    for i in range(n - 1, -1, -1):
        if regions.region[i] == "N":
            s = min((need.get(v, INF) for v in ops[i].outputs), default=INF)
            for v in ops[i].value_inputs():
                need[v] = min(need.get(v, INF), s)
        elif regions.region[i] == "M":
            for v in ops[i].value_inputs():
                need[v] = min(need.get(v, INF), stage[i])
    a_level: dict[int, int] = {}
    # A: with the largest input that has a place (a gradient rather than a scalar).
    for i, op in enumerate(ops):
        if regions.region[i] != "A":
            continue
        placed = [(program.nbytes(v), -value_stage[v] if v in value_stage else -need[v], v)
                  for v in op.value_inputs()
                  if v in value_stage or need.get(v, INF) != INF]
        if placed:
            _, neg, _ = max(placed)
            stage[i] = -neg
        phase[i] = "A"
        level[i] = max((a_level[v] + (value_stage[v] != stage[i])
                        for v in op.value_inputs() if v in a_level), default=0)
        for v in op.outputs:
            value_stage[v] = stage[i]
            a_level[v] = level[i]
    # N: the first stage among all readers (so values only flow to later stages).
    final_need: dict[int, float] = {}
    for i in range(n - 1, -1, -1):
        if regions.region[i] == "N":
            s = min((final_need.get(v, INF) for v in ops[i].outputs), default=INF)
            stage[i] = 0 if s == INF else int(s)
            phase[i] = "N"
            for v in ops[i].outputs:
                value_stage[v] = stage[i]
        for v in ops[i].value_inputs():
            final_need[v] = min(final_need.get(v, INF), stage[i])
    home = {}
    for v in program.inputs:
        s = final_need.get(v, INF)
        home[v] = 0 if s == INF else int(s)
    for out_pos, in_pos in mirrors.items():
        out = program.outputs[out_pos]
        if isinstance(out, int) and out in value_stage and out not in program.inputs:
            home[program.inputs[in_pos]] = value_stage[out]
    for v, s in home.items():
        value_stage.setdefault(v, s)
    return Placement(num_stages, stage, phase, level, home, value_stage)
