"""Which dimensions of each array carry the batch, traced from the batch arguments' leading dim.

On a 2-D mesh the solver lets the ``"data"`` axis split only these dimensions (and any
dimension of stored state, ZeRO-style), while ``"model"`` may split anything: the usual
data x tensor layout, and a search space small enough to solve in seconds.
"""
from __future__ import annotations

from parallel.auto import _rules
from parallel.auto._cost import MeshModel
from parallel.auto._graph import Graph
from parallel.profiles import DeviceProfile

# Labels ride on a one-device mesh: axis 0 marks a batch dimension; costs are never read.
_LABEL_MESH = MeshModel(("batch",), (1,), DeviceProfile("labels", 1.0, 1, 1.0, 1.0, 0.0))
_MARK = (0,)


def batch_dims(graph: Graph, batch_values: list[int]) -> list[frozenset[int]]:
    """For each value, the set of its dimensions that index examples of the batch."""
    labels: list[frozenset[int]] = [frozenset()] * len(graph.values)
    for v in batch_values:
        if graph.values[v].ndim:
            labels[v] = frozenset({0})
    for _ in range(2):  # a second pass carries labels around loop carries
        for out, into, _ in graph.loops:
            labels[into] = labels[into] | labels[out]
        for eqn in graph.eqns:
            for v, dims in zip(eqn.outputs, _propagate(eqn, graph, labels)):
                labels[v] = labels[v] | dims
    return labels


def _spec(dims: frozenset[int], ndim: int):
    return tuple(_MARK if d in dims else () for d in range(ndim))


def _propagate(eqn, graph: Graph, labels) -> list[frozenset[int]]:
    outs = [graph.values[v] for v in eqn.outputs]
    empty = [frozenset()] * len(outs)
    ins = [None if v is None else labels[v] for v in eqn.inputs]
    if not any(ins):
        return empty
    if eqn.prim in _rules.FOLLOWERS:
        found = list(empty)
        for i, v in enumerate(eqn.inputs):
            if not ins[i]:
                continue
            if eqn.prim in _rules.ELEMENTWISE and graph.values[v].shape != outs[0].shape:
                continue
            st = _rules.follow(eqn, graph, i, _spec(ins[i], graph.values[v].ndim), _LABEL_MESH)
            found = [f | {d for d, s in enumerate(spec) if s} for f, spec in zip(found, st.outputs)]
        return found
    if eqn.prim == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = (graph.values[v].ndim for v in eqn.inputs)
        lf = [d for d in range(lhs) if d not in lc and d not in lb]
        rf = [d for d in range(rhs) if d not in rc and d not in rb]
        lhs_l, rhs_l = ins[0] or frozenset(), ins[1] or frozenset()
        dims = {i for i, (a, b) in enumerate(zip(lb, rb)) if a in lhs_l or b in rhs_l}
        dims |= {len(lb) + j for j, d in enumerate(lf) if d in lhs_l}
        dims |= {len(lb) + len(lf) + j for j, d in enumerate(rf) if d in rhs_l}
        return [frozenset(dims)]
    if eqn.prim == "conv_general_dilated":
        lhs_dims, _, out_dims = eqn.params["dimension_numbers"]
        return [frozenset({out_dims[0]}) if ins[0] and lhs_dims[0] in ins[0] else frozenset()]
    if eqn.prim == "gather":
        dn = eqn.params["dimension_numbers"]
        batch_out = [d for d in range(outs[0].ndim) if d not in dn.offset_dims]
        return [frozenset(j for q, j in enumerate(batch_out) if ins[1] and q in ins[1])]
    if eqn.prim in ("scatter-add", "scatter"):
        return [ins[0] or frozenset()]
    return empty
