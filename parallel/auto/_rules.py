"""Sharding strategies of single equations.

*Leaders* (inputs, ``dot_general``, convolutions, gathers, scatters, and anything unsupported)
get a list of strategies of their own. *Followers* (element-wise, broadcasting, shape and
reduction ops) derive their output specs from one operand's spec, so the solver never chooses
for them: they ride along with their producer and keep the integer program small.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

from parallel.auto._cost import MeshModel, Spec, replicated, used_axes
from parallel.auto._graph import Eqn, Graph

ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil clamp
clz complex conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp
exp2 expm1 floor ge gt igamma igammac imag integer_pow is_finite le lgamma log log1p logistic lt
max min mul ne neg nextafter not or polygamma population_count pow real reduce_precision rem
round rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt
square stop_gradient sub tan tanh threefry2x32 xor zeta sharding_constraint _identity _merge
""".split())
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin"
    .split())
# Same-rank ops that need some dimensions whole; the rest of the spec passes through.
_WHOLE_DIM_PARAMS = {
    "cumsum": "axis", "cumprod": "axis", "cummax": "axis", "cummin": "axis",
    "cumlogsumexp": "axis", "sort": "dimension", "concatenate": "dimension", "split": "axis",
    "rev": "dimensions",
}
_WINDOW_OPS = frozenset(
    "slice pad dynamic_slice dynamic_update_slice top_k reduce_window reduce_window_sum "
    "reduce_window_max reduce_window_min select_and_scatter_add select_and_gather_add".split())
_SHAPE_OPS = frozenset(
    "broadcast_in_dim reshape transpose squeeze _slice_leading _stack_leading".split())
FOLLOWERS = ELEMENTWISE | REDUCTIONS | _SHAPE_OPS | _WINDOW_OPS | frozenset(_WHOLE_DIM_PARAMS)
# Small or state-like ops that are kept replicated on purpose (no warning).
REPLICATED_OK = frozenset(
    "iota random_bits random_seed random_wrap random_unwrap random_fold_in random_split "
    "rng_bit_generator rng_uniform".split())


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One way to run an equation.

    Attributes:
      kind: what runs (``"dot"``, ``"gather"``, ``"placed"`` for inputs...).
      outputs: spec of each result.
      operands: spec each operand must arrive in (``None``: no requirement, e.g. a literal).
      compute: seconds of arithmetic per run (FLOPs over the device's peak).
      comm: seconds of collectives per run.
      collective: ``(name, mesh axes, output dim or None)`` of the collective that reduces
        partial sums, if any.
      traffic: seconds of memory traffic per run (bytes over the memory bandwidth); a step
        takes the larger of its total arithmetic and total traffic, as in ``analyze``.
    """

    kind: str
    outputs: tuple[Spec, ...]
    operands: tuple[Spec | None, ...]
    compute: float
    comm: float
    collective: tuple[str, tuple[int, ...], int | None] | None = None
    traffic: float = 0.0

    def describe(self, mm: MeshModel) -> str:
        """E.g. ``dot P(None, 'data') x P('data', None) -> P() + all-reduce(data)``."""
        text = self.kind
        if self.operands:
            text += " " + " x ".join("-" if s is None else _show(s, mm) for s in self.operands)
        text += " -> " + ", ".join(_show(s, mm) for s in self.outputs)
        if self.collective:
            name, axes, dim = self.collective
            text += f" + {name}({','.join(mm.axis_names[a] for a in axes)})"
            if dim is not None:
                text += f" on dim {dim}"
        return text


def _assignments(num_slots: int, mm: MeshModel, data_ok=None):
    """Every way to put each mesh axis on one slot or none; axes sharing a slot go major-first.

    ``data_ok[slot]``: whether the slot carries the batch. On a 2-D mesh, or a 1-D mesh the user
    named ``data``, the data axis (0) only goes to such slots (see ``_batch``); the single axis
    of a 1-D mesh the solver chose goes anywhere (it is named by what it splits).
    """
    axes = mm.axes
    choices = [range(-1, num_slots)] * len(axes)
    if (data_ok is not None and axes and axes[0] == 0
            and (len(axes) == 2 or mm.data_axis_named)):
        choices[0] = [-1] + [i for i in range(num_slots) if data_ok[i]]
    for choice in itertools.product(*choices):
        slots: list[tuple[int, ...]] = [()] * num_slots
        for axis, slot in zip(axes, choice):
            if slot >= 0:
                slots[slot] = slots[slot] + (axis,)
        yield slots


def _dedupe(strategies: list[Strategy]) -> list[Strategy]:
    best: dict[tuple, Strategy] = {}
    for s in strategies:
        key = (s.outputs, s.operands)
        if key not in best or s.compute + s.comm < best[key].compute + best[key].comm:
            best[key] = s
    return list(best.values())


def input_strategies(shape: tuple[int, ...], mm: MeshModel,
                     batch: frozenset[int] = frozenset()) -> list[Strategy]:
    """Every spec an input array can be placed in (``batch``: its batch dims, if a batch leaf;
    stored state may be split on any dim by either axis)."""
    out = []
    data_ok = [d in batch for d in range(len(shape))] if batch else None
    for slots in _assignments(len(shape), mm, data_ok):
        spec = tuple(slots)
        if mm.fits(shape, spec):
            out.append(Strategy("placed", (spec,), (), 0.0, 0.0))
    return out


def replicated_strategy(eqn: Eqn, graph: Graph, mm: MeshModel, kind: str) -> Strategy:
    """Everything whole on every device (the safe fallback)."""
    outs = tuple(replicated(graph.values[v].ndim) for v in eqn.outputs)
    ops = tuple(None if v is None else replicated(graph.values[v].ndim) for v in eqn.inputs)
    nbytes = sum(graph.values[v].nbytes for v in eqn.outputs + eqn.inputs if v is not None)
    return Strategy(kind, outs, ops, 0.0, 0.0, traffic=mm.memory_time(nbytes, 1))


def _contracted(kind, slots, contract_slots, out_dims, out_shape, itemsize, flops, mm,
                operands, operand_bytes) -> list[Strategy]:
    """Strategies of a contraction whose slots are assigned; partial sums are reduced by an
    all-reduce, or by a reduce-scatter onto one output dimension."""
    out_spec = tuple(slots[s] for s in out_dims)
    if not mm.fits(out_shape, out_spec):
        return []
    used = tuple(a for s in slots for a in s)
    compute = mm.compute_time(flops, mm.group_size(used))
    partial = tuple(sorted(a for s in contract_slots for a in slots[s]))
    local = math.prod(out_shape) * itemsize / mm.shards(out_spec)
    traffic = mm.memory_time(local + sum(b / mm.shards(s) for b, s in zip(operand_bytes, operands)),
                             1)
    if not partial:
        return [Strategy(kind, (out_spec,), operands, compute, 0.0, traffic=traffic)]
    out = [Strategy(kind, (out_spec,), operands, compute, mm.all_reduce(local, partial),
                    ("all-reduce", partial, None), traffic)]
    # Reduce-scatter onto the largest output dimension that divides evenly (like ZeRO does).
    # Without a native reduce-scatter it is an all-reduce plus a free slice: the all-reduce
    # strategy followed by a sliced consumer already prices that.
    n = mm.group_size(partial)
    dims = [d for d in range(len(out_spec))
            if out_shape[d] % (mm.group_size(out_spec[d]) * n) == 0]
    if dims and mm.profile.native_reduce_scatter:
        d = max(dims, key=lambda d: (out_shape[d] // mm.group_size(out_spec[d]), -d))
        scattered = out_spec[:d] + (out_spec[d] + partial,) + out_spec[d + 1:]
        out.append(Strategy(kind, (scattered,), operands, compute,
                            mm.reduce_scatter(local, partial), ("reduce-scatter", partial, d),
                            traffic))
    return out


def dot_strategies(eqn: Eqn, graph: Graph, mm: MeshModel, batch) -> list[Strategy]:
    """Which batch, free and contracting dimensions of a ``dot_general`` each mesh axis splits
    (``batch[v]``: the batch dims of value ``v``)."""
    lhs, rhs = (graph.values[v] for v in eqn.inputs)
    out = graph.values[eqn.outputs[0]]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    # Slots: batch pairs, lhs free, rhs free, contracting pairs (output order: batch, lf, rf).
    lhs_slot = {d: i for i, d in enumerate(lb)}
    rhs_slot = {d: i for i, d in enumerate(rb)}
    nb = len(lb)
    lhs_slot.update({d: nb + i for i, d in enumerate(lf)})
    rhs_slot.update({d: nb + len(lf) + i for i, d in enumerate(rf)})
    nc0 = nb + len(lf) + len(rf)
    lhs_slot.update({d: nc0 + i for i, d in enumerate(lc)})
    rhs_slot.update({d: nc0 + i for i, d in enumerate(rc)})
    contract = range(nc0, nc0 + len(lc))
    flops = 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lc)
    data_ok = [False] * (nc0 + len(lc))
    for operand, slot_of in ((eqn.inputs[0], lhs_slot), (eqn.inputs[1], rhs_slot)):
        for d in batch[operand]:
            data_ok[slot_of[d]] = True
    strategies = []
    for slots in _assignments(nc0 + len(lc), mm, data_ok):
        lhs_spec = tuple(slots[lhs_slot[d]] for d in range(lhs.ndim))
        rhs_spec = tuple(slots[rhs_slot[d]] for d in range(rhs.ndim))
        if not (mm.fits(lhs.shape, lhs_spec) and mm.fits(rhs.shape, rhs_spec)):
            continue
        strategies += _contracted("dot", slots, contract, range(nc0), out.shape, out.itemsize,
                                  flops, mm, (lhs_spec, rhs_spec), (lhs.nbytes, rhs.nbytes))
    return _dedupe(strategies)


def conv_strategies(eqn: Eqn, graph: Graph, mm: MeshModel, batch) -> list[Strategy]:
    """Batch, output-feature and input-feature splits of an ungrouped convolution."""
    p = eqn.params
    lhs, rhs = (graph.values[v] for v in eqn.inputs)
    out = graph.values[eqn.outputs[0]]
    lhs_dims, rhs_dims, out_dims = p["dimension_numbers"]
    # Slots: 0 batch, 1 output feature, 2 input feature (contracted); spatial dims stay whole.
    lhs_slot = {lhs_dims[0]: 0, lhs_dims[1]: 2}
    rhs_slot = {rhs_dims[0]: 1, rhs_dims[1]: 2}
    kernel = math.prod(rhs.shape[d] for d in rhs_dims[2:])
    flops = 2.0 * math.prod(out.shape) * lhs.shape[lhs_dims[1]] * kernel
    data_ok = [False] * 3
    for operand, slot_of in ((eqn.inputs[0], lhs_slot), (eqn.inputs[1], rhs_slot)):
        for d in batch[operand]:
            if d in slot_of:
                data_ok[slot_of[d]] = True
    strategies = []
    for slots in _assignments(3, mm, data_ok):
        lhs_spec = tuple(slots[lhs_slot[d]] if d in lhs_slot else () for d in range(lhs.ndim))
        rhs_spec = tuple(slots[rhs_slot[d]] if d in rhs_slot else () for d in range(rhs.ndim))
        if not (mm.fits(lhs.shape, lhs_spec) and mm.fits(rhs.shape, rhs_spec)):
            continue
        out_slot = {out_dims[0]: 0, out_dims[1]: 1}
        order = [out_slot.get(d, 3) for d in range(out.ndim)]
        padded = list(slots) + [()]
        strategies += _contracted("conv", padded, [2], order, out.shape, out.itemsize, flops, mm,
                                  (lhs_spec, rhs_spec), (lhs.nbytes, rhs.nbytes))
    return _dedupe(strategies)


def gather_strategies(eqn: Eqn, graph: Graph, mm: MeshModel, batch) -> list[Strategy]:
    """Splits of a gather along index batch dimensions and whole-slice operand dimensions."""
    operand, indices = (graph.values[v] for v in eqn.inputs)
    out = graph.values[eqn.outputs[0]]
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    offset_operand = [d for d in range(operand.ndim)
                      if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
    batch_out = [d for d in range(out.ndim) if d not in dn.offset_dims]
    # slot -> (output dim, operand dim or None, indices dim or None)
    slots_def = []
    for j, q in zip(batch_out, range(indices.ndim - 1)):
        o = None
        if q in dn.start_indices_batching_dims:
            o = dn.operand_batching_dims[list(dn.start_indices_batching_dims).index(q)]
        slots_def.append((j, o, q))
    for j, o in zip(dn.offset_dims, offset_operand):
        if sizes[o] == operand.shape[o] and o not in dn.start_index_map:
            slots_def.append((j, o, None))
    data_ok = [(o is not None and o in batch[eqn.inputs[0]])
               or (q is not None and q in batch[eqn.inputs[1]]) for _, o, q in slots_def]
    strategies = []
    for slots in _assignments(len(slots_def), mm, data_ok):
        out_spec = [()] * out.ndim
        op_spec = [()] * operand.ndim
        idx_spec = [()] * indices.ndim
        for axes, (j, o, q) in zip(slots, slots_def):
            out_spec[j] = axes
            if o is not None:
                op_spec[o] = axes
            if q is not None:
                idx_spec[q] = axes
        specs = (tuple(out_spec), tuple(op_spec), tuple(idx_spec))
        if not all(mm.fits(v.shape, s) for v, s in zip((out, operand, indices), specs)):
            continue
        strategies.append(Strategy(
            "gather", (specs[0],), specs[1:], 0.0, 0.0,
            traffic=mm.memory_time(2 * out.nbytes, mm.shards(specs[0]))))
    return _dedupe(strategies)


def scatter_strategies(eqn: Eqn, graph: Graph, mm: MeshModel, batch) -> list[Strategy]:
    """Splits of a scatter along window dimensions, or (scatter-add) along scattered update
    dimensions, whose partial sums are then reduced."""
    operand, indices, updates = (graph.values[v] for v in eqn.inputs)
    dn = eqn.params["dimension_numbers"]
    window_operand = [d for d in range(operand.ndim)
                      if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
    scatter_upd = [d for d in range(updates.ndim) if d not in dn.update_window_dims]
    additive = eqn.prim == "scatter-add" or eqn.prim == "scatter_add"
    # slot -> (operand dim or None, updates dim, indices dim or None)
    slots_def = []
    for u, o in zip(dn.update_window_dims, window_operand):
        if updates.shape[u] == operand.shape[o] and o not in dn.scatter_dims_to_operand_dims:
            slots_def.append((o, u, None))
    contract = []
    for u, q in zip(scatter_upd, range(indices.ndim - 1)):
        if q in dn.scatter_indices_batching_dims:
            o = dn.operand_batching_dims[list(dn.scatter_indices_batching_dims).index(q)]
            slots_def.append((o, u, q))
        elif additive:
            contract.append(len(slots_def))
            slots_def.append((None, u, q))
    data_ok = [(o is not None and o in batch[eqn.inputs[0]]) or u in batch[eqn.inputs[2]]
               or (q is not None and q in batch[eqn.inputs[1]]) for o, u, q in slots_def]
    strategies = []
    for slots in _assignments(len(slots_def), mm, data_ok):
        op_spec = [()] * operand.ndim
        upd_spec = [()] * updates.ndim
        idx_spec = [()] * indices.ndim
        for axes, (o, u, q) in zip(slots, slots_def):
            upd_spec[u] = axes
            if o is not None:
                op_spec[o] = axes
            if q is not None:
                idx_spec[q] = axes
        op_spec, upd_spec, idx_spec = tuple(op_spec), tuple(upd_spec), tuple(idx_spec)
        if not (mm.fits(updates.shape, upd_spec) and mm.fits(indices.shape, idx_spec)
                and mm.fits(operand.shape, op_spec)):
            continue
        slot_of_dim = [len(slots)] * operand.ndim
        for s, (o, _, _) in enumerate(slots_def):
            if o is not None:
                slot_of_dim[o] = s
        flops = updates.nbytes / max(updates.itemsize, 1)
        strategies += _contracted(
            "scatter", list(slots) + [()], contract, slot_of_dim,
            operand.shape, operand.itemsize, flops, mm, (op_spec, idx_spec, upd_spec),
            (operand.nbytes, indices.nbytes, updates.nbytes))
    return _dedupe(strategies)


def _show(spec: Spec, mm: MeshModel) -> str:
    return "P(" + ", ".join(repr(e) for e in mm.partition_spec(spec)) + ")"


# ---------------------------------------------------------------------------------------------
# Followers


def followed_operand(eqn: Eqn, graph: Graph, weight) -> int | None:
    """Which operand's spec the equation's results derive from (``None``: it is a leader).

    ``weight(value)`` ranks candidate operands of element-wise ops: the heaviest real array wins,
    the most recently computed one on ties.
    """
    if eqn.prim not in FOLLOWERS:
        return None
    if eqn.prim in _SHAPE_OPS or eqn.prim in REDUCTIONS or eqn.prim in _WHOLE_DIM_PARAMS:
        if eqn.prim not in ("concatenate", "sort"):
            return 0 if eqn.inputs and eqn.inputs[0] is not None else None
    rank = graph.values[eqn.outputs[0]].ndim
    best, best_key = None, None
    for i, v in enumerate(eqn.inputs):
        if v is None or graph.values[v].ndim != rank:
            continue
        key = (weight(v), graph.values[v].producer, v)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


def follow(eqn: Eqn, graph: Graph, f: int, spec: Spec, mm: MeshModel) -> Strategy:
    """The strategy an equation takes when operand ``f`` arrives as ``spec``.

    Its memory traffic is left to the caller, which knows which arrays XLA fuses away.
    """
    vals = graph.values
    src = vals[eqn.inputs[f]]
    outs = [vals[v] for v in eqn.outputs]
    p = eqn.params
    gathered: tuple[int, ...] = ()
    if eqn.prim in REDUCTIONS:
        axes = set(p["axes"])
        out_spec = tuple(s for d, s in enumerate(spec) if d not in axes)
        partial = tuple(sorted(a for d in axes for a in spec[d]))
        local = outs[0].nbytes / mm.shards(out_spec)
        comm = mm.all_reduce(local, partial) if partial else 0.0
        return Strategy("reduce", (out_spec,), _require(eqn, graph, f, spec, ()), 0.0, comm)
    if eqn.prim == "broadcast_in_dim":
        out_spec = [()] * outs[0].ndim
        for i, d in enumerate(p["broadcast_dimensions"]):
            if src.shape[i] == outs[0].shape[d]:
                out_spec[d] = spec[i]
        out_specs = (tuple(out_spec),)
    elif eqn.prim == "transpose":
        out_specs = (tuple(spec[d] for d in p["permutation"]),)
    elif eqn.prim == "squeeze":
        out_specs = (tuple(s for d, s in enumerate(spec) if d not in set(p["dimensions"])),)
    elif eqn.prim == "_slice_leading":
        out_specs, gathered = (spec[1:],), spec[0]
    elif eqn.prim == "_stack_leading":
        out_specs = (((),) + spec,)
    elif eqn.prim == "reshape":
        out_spec, gathered = _reshape_spec(src.shape, outs[0].shape, spec, mm)
        out_specs = (out_spec,)
    else:
        whole = p.get(_WHOLE_DIM_PARAMS.get(eqn.prim, ""), ())
        whole = {whole} if isinstance(whole, int) else set(whole)
        if eqn.prim == "top_k":
            whole = {src.ndim - 1}
        out_specs = tuple(
            tuple(s if d not in whole and o.shape[d] == src.shape[d] else ()
                  for d, s in enumerate(spec))
            for o in outs)
        kept = set(used_axes(out_specs[0]))
        gathered = tuple(a for a in used_axes(spec) if a not in kept)
    comm = 0.0
    if gathered:
        comm = mm.all_gather(src.nbytes / mm.shards(spec) * mm.group_size(gathered), gathered)
    ops = _require(eqn, graph, f, spec, out_specs[0])
    return Strategy(eqn.prim, out_specs, ops, 0.0, comm)


def _require(eqn: Eqn, graph: Graph, f: int, spec: Spec, out_spec: Spec):
    """Specs the other operands must arrive in: the output's, on dimensions of equal size."""
    out_shape = graph.values[eqn.outputs[0]].shape
    ops = []
    for i, v in enumerate(eqn.inputs):
        if i == f:
            ops.append(spec)
        elif v is None or graph.values[v].ndim == 0:
            ops.append(None)
        else:
            shape = graph.values[v].shape
            if len(shape) == len(out_shape):
                ops.append(tuple(s if shape[d] == out_shape[d] else ()
                                 for d, s in enumerate(out_spec)))
            else:
                ops.append(replicated(len(shape)))
    return tuple(ops)


def _reshape_spec(src_shape, dst_shape, spec: Spec, mm: MeshModel) -> tuple[Spec, tuple[int, ...]]:
    """Maps ``spec`` through a reshape; returns the new spec and the axes that must be gathered.

    Dimensions are matched in groups of equal element count. A group keeps its split when only
    its major-most dimension is split and the group's first output dimension divides evenly.
    """
    out: list[tuple[int, ...]] = [()] * len(dst_shape)
    if 0 in src_shape:
        return tuple(out), used_axes(spec)
    gathered: list[int] = []
    i = j = 0
    while i < len(src_shape) or j < len(dst_shape):
        i0, j0 = i, j
        a = src_shape[i] if i < len(src_shape) else 1
        b = dst_shape[j] if j < len(dst_shape) else 1
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= src_shape[i]
                i += 1
            else:
                b *= dst_shape[j]
                j += 1
        src_dims = [d for d in range(i0, min(i, len(src_shape))) if src_shape[d] != 1]
        dst_dims = [d for d in range(j0, min(j, len(dst_shape))) if dst_shape[d] != 1]
        split = [(d, spec[d]) for d in range(i0, min(i, len(src_shape))) if spec[d]]
        if not split:
            continue
        if (len(split) == 1 and src_dims and split[0][0] == src_dims[0] and dst_dims
                and dst_shape[dst_dims[0]] % mm.group_size(split[0][1]) == 0):
            out[dst_dims[0]] = split[0][1]
        else:
            gathered += [a for _, axes in split for a in axes]
    return tuple(out), tuple(gathered)
