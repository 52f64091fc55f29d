"""Groups of equations that share one decision, and classes of groups that share one solution.

A group is a leader (an input, a ``dot_general``, a gather…) plus the element-wise, shape and
reduction ops that follow it. Groups with the same structure and the same neighbourhood (repeated
layers) form a class; the integer program has one set of variables per class, so a 48-layer
model costs little more to solve than a 1-layer one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections import defaultdict
from typing import Any

import numpy as np

from parallel.auto import _rules
from parallel.auto._batch import batch_dims
from parallel.auto._cost import MeshModel, Spec
from parallel.auto._graph import Graph
from parallel.auto._memory import kept_values
from parallel.auto._tables import Table, number, on_mesh

_CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated"})
_LEADER_RULES = {
    "dot_general": "dot", "conv_general_dilated": "conv", "gather": "gather",
    "scatter-add": "scatter", "scatter": "scatter",
}


@dataclasses.dataclass
class Requirement:
    """An operand that must arrive in a spec the consuming group picks.

    Attributes:
      src: value id of the operand.
      member: position of the consuming equation in its group (-1: the leader); -2 when the
        requirement is that ``src`` take the spec of the group's local value ``operand``
        (loop carries, updated state).
      operand: operand index in the consuming equation (or the local value for member -2).
      weight: how many times per call the operand is moved.
    """

    src: int
    member: int
    operand: int
    weight: float


@dataclasses.dataclass
class Group:
    kind: str  # "input", "constant", "free", "fallback" or a key of _LEADER_RULES' values
    leader: int  # eqn index; -1 for inputs and constants
    values: list[int]
    members: list[int] = dataclasses.field(default_factory=list)
    follow: list[int] = dataclasses.field(default_factory=list)  # local value each member follows
    follow_operand: list[int] = dataclasses.field(default_factory=list)  # ...as which operand
    reqs: list[Requirement] = dataclasses.field(default_factory=list)


class Structure:
    """Groups and classes of a graph; independent of the mesh.

    Args:
      graph: the flattened program.
      paired: ``(output value, input value)`` pairs: updated state must come back in its input's
        spec.
      batch: value ids of the batch arguments' leaves.
    """

    def __init__(self, graph: Graph, paired: list[tuple[int, int]], batch: list[int] = ()):
        self.graph = graph
        self.batch = batch_dims(graph, list(batch))
        self.kept = kept_values(graph, _rules.FOLLOWERS)
        self._eqn_ids: dict[int, int] = {}  # ``_eqn_id``'s answers
        n = len(graph.values)
        self.group_of = np.full(n, -1, np.int64)
        self.local = np.full(n, -1, np.int64)
        self.groups: list[Group] = []
        self._weight = np.zeros(n)
        for v in graph.inputs:
            self._new_group("input", -1, [v])
        for v in graph.constants:
            self._new_group("constant", -1, [v])
        for i, eqn in enumerate(graph.eqns):
            self._place(i, eqn)
        for out, into, weight in graph.loops:
            self._add_value_req(out, into, weight)
        for out, into in paired:
            self._add_value_req(out, into, 1.0)
        self._mark_combinable()
        self.warned = sorted({graph.eqns[g.leader].prim for g in self.groups
                              if g.kind == "fallback"}
                             - _rules.REPLICATED_OK)
        self._classify()

    def _mark_combinable(self):
        """``combinable[gid]``: the group's collectives can merge with their peers'.

        True for the state-update chains (groups led by a stored input) and for operations
        whose results feed only those (weight gradients): nothing else waits for them, so XLA
        combines them into one collective per step.
        """
        kinds = [g.kind for g in self.groups]
        self.combinable = [k == "input" for k in kinds]
        feeds_other = [False] * len(self.groups)
        for gid, g in enumerate(self.groups):
            for r in g.reqs:
                src = int(self.group_of[r.src])
                if src != gid and kinds[gid] != "input":
                    feeds_other[src] = True
        for gid, kind in enumerate(kinds):
            if kind in ("dot", "conv", "scatter") and not feeds_other[gid]:
                self.combinable[gid] = True

    def mesh_for(self, gid: int, mm: MeshModel) -> MeshModel:
        """``mm``, or its latency-free twin for a group whose collectives combine."""
        return mm.combined if self.combinable[gid] else mm

    def _new_group(self, kind, leader, values) -> Group:
        g = Group(kind, leader, [])
        self.groups.append(g)
        for v in values:
            self._add_value(len(self.groups) - 1, v)
        return g

    def _add_value(self, gid: int, v: int):
        g = self.groups[gid]
        self.group_of[v] = gid
        self.local[v] = len(g.values)
        g.values.append(v)
        value = self.graph.values[v]
        if g.kind in ("constant", "free"):
            self._weight[v] = 0.0
        elif value.producer >= 0 and self.graph.eqns[value.producer].prim == "broadcast_in_dim":
            src = self.graph.eqns[value.producer].inputs[0]
            self._weight[v] = 0.0 if src is None else self._weight[src]
        else:
            self._weight[v] = value.nbytes

    def _place(self, i: int, eqn):
        graph = self.graph
        f = _rules.followed_operand(eqn, graph, lambda v: self._weight[v])
        if f is not None:
            gid = int(self.group_of[eqn.inputs[f]])
            g = self.groups[gid]
            member = len(g.members)
            g.members.append(i)
            g.follow.append(int(self.local[eqn.inputs[f]]))
            g.follow_operand.append(f)
            for v in eqn.outputs:
                self._add_value(gid, v)
            skip = f
        else:
            if all(v is None for v in eqn.inputs):
                kind = "free"
            elif eqn.prim == "conv_general_dilated" and (
                    eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1):
                kind = "fallback"
            else:
                kind = _LEADER_RULES.get(eqn.prim, "fallback")
            g = self._new_group(kind, i, eqn.outputs)
            member, skip = -1, None
        for k, v in enumerate(eqn.inputs):
            if k != skip and v is not None and graph.values[v].ndim > 0:
                g.reqs.append(Requirement(v, member, k, eqn.weight))

    def _add_value_req(self, src: int | None, target: int, weight: float):
        if src is None or self.graph.values[target].ndim == 0:
            return
        g = self.groups[int(self.group_of[target])]
        g.reqs.append(Requirement(src, -2, int(self.local[target]), weight))

    # ----------------------------------------------------------------------------------------
    def _eqn_key(self, i: int) -> tuple:
        """Equation ``i``'s work as the strategy rules read it: primitive, parameters, operand
        and result shapes, weight."""
        graph = self.graph
        e = graph.eqns[i]
        params = tuple(sorted((k, repr(v)) for k, v in e.params.items()
                              if not hasattr(v, "jaxpr") and k not in ("jaxpr", "name")))
        shapes = tuple(None if v is None else (graph.values[v].shape, graph.values[v].itemsize)
                       for v in e.inputs + e.outputs)
        return (e.prim, params, shapes, e.weight)

    def _eqn_id(self, i: int) -> int:
        """A number for equation ``i``'s work and which of its values XLA keeps in memory,
        equal across structures (what a member's strategy and traffic depend on)."""
        found = self._eqn_ids.get(i)
        if found is None:
            e = self.graph.eqns[i]
            found = self._eqn_ids[i] = number((self._eqn_key(i), tuple(
                bool(self.kept[v]) for v in e.inputs + e.outputs if v is not None)))
        return found

    def _signature(self, gid: int) -> str:
        g = self.groups[gid]
        graph = self.graph

        if g.leader >= 0:
            head = self._eqn_key(g.leader)
        else:
            v = graph.values[g.values[0]]
            head = (v.shape, v.itemsize)
        reqs = tuple(
            (r.member, r.operand, r.weight,
             int(self.local[r.src]) if self.groups[int(self.group_of[r.src])] is g else -1)
            for r in g.reqs)
        labels = tuple(tuple(sorted(self.batch[v])) for v in g.values + [r.src for r in g.reqs])
        key = (g.kind, head, tuple(self._eqn_key(i) for i in g.members), tuple(g.follow),
               tuple(g.follow_operand), reqs, labels, self.combinable[gid])
        return hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest()

    def _layer_parity(self) -> list[int]:
        """Per group, the parity of the most contractions (dots, convolutions) on a path from
        the program's inputs to any of its values.

        Repeated layers share a class, but a layer and the next repetition of it must be free
        to differ: Megatron's column/row alternation over a stack of identical dense layers is
        such a plan. Consecutive layers of a stack differ in this parity when a layer holds an
        odd number of contractions, so classes never tie a layer to its neighbour; blocks with
        an even number (a transformer block) keep sharing one class.
        """
        graph = self.graph
        depth = np.zeros(len(graph.values), np.int64)
        for eqn in graph.eqns:
            level = max((depth[v] for v in eqn.inputs if v is not None), default=0)
            level += eqn.prim in _CONTRACTIONS
            for v in eqn.outputs:
                depth[v] = level
        return [int(max(depth[v] for v in g.values)) % 2 if g.values else 0
                for g in self.groups]

    def _classify(self, rounds: int = 3):
        """Weisfeiler-Lehman refinement: groups alike up to ``rounds`` hops, whose layers have
        the same parity (``_layer_parity``), share a class."""
        self.structural = [self._signature(gid) for gid in range(len(self.groups))]
        sig = [f"{s}{p}" for s, p in zip(self.structural, self._layer_parity())]
        edges: list[list[tuple]] = [[] for _ in self.groups]
        # out_weight[gid][local]: how often per call the value is read by other groups.
        self.out_weight: list[dict[int, float]] = [defaultdict(float) for _ in self.groups]
        for gid, g in enumerate(self.groups):
            for r_index, r in enumerate(g.reqs):
                src = int(self.group_of[r.src])
                if src != gid:
                    edges[gid].append(("in", r_index, int(self.local[r.src]), src))
                    edges[src].append(("out", int(self.local[r.src]), r_index, gid))
                    self.out_weight[src][int(self.local[r.src])] += r.weight
        for _ in range(rounds):
            sig = [
                hashlib.blake2b(
                    repr((sig[gid], sorted((a, b, c, sig[o]) for a, b, c, o in edges[gid])))
                    .encode(), digest_size=12).hexdigest()
                for gid in range(len(self.groups))]
        ids: dict[str, int] = {}
        self.cls = np.array([ids.setdefault(s, len(ids)) for s in sig], np.int64)
        self.members_of: list[list[int]] = [[] for _ in ids]
        for gid, c in enumerate(self.cls):
            self.members_of[c].append(gid)

    @property
    def num_classes(self) -> int:
        return len(self.members_of)

    # ----------------------------------------------------------------------------------------
    def table(self, c: int, mm: MeshModel, cache: dict[Any, tuple]) -> Table:
        """The strategy table of class ``c`` on mesh ``mm``, without dominated strategies.

        ``cache``: the tables of this structure on ``mm`` by structural signature. A table is
        a function of the signature, the mesh and which of the group's values XLA keeps in
        memory, so tables (and their pruning, which adds the group's outside readers and
        operands) are also shared with the other structures solved on the same mesh."""
        rep = self.members_of[c][0]
        mm = self.mesh_for(rep, mm)
        key = self.structural[rep]
        shared = on_mesh(mm, "tables")
        if key not in cache:
            full = (key, self._kept_key(self.groups[rep]))
            if full not in shared:
                shared[full] = self._build_table(self.groups[rep], mm, on_mesh(mm, "follow"))
            cache[key] = (full, shared[full])
        full, table = cache[key]
        g, values = self.groups[rep], self.graph.values
        prune_key = (full, tuple(self.out_weight[rep].items()),
                     tuple((values[r.src].shape, values[r.src].itemsize) for r in g.reqs
                           if int(self.group_of[r.src]) != rep))
        if prune_key not in shared:
            shared[prune_key] = self._prune(table, rep, mm)
        return shared[prune_key]

    def _kept_key(self, g: Group) -> tuple:
        """Which values of the group's equations XLA keeps in memory (their traffic)."""
        eqns = ([g.leader] if g.leader >= 0 else []) + g.members
        return tuple(bool(self.kept[v]) for i in eqns
                     for v in self.graph.eqns[i].inputs + self.graph.eqns[i].outputs
                     if v is not None)

    def _prune(self, table: Table, gid: int, mm: MeshModel) -> Table:
        """Drops strategy ``b`` when some ``a`` costs less even after converting every value
        that crosses the group's boundary from ``a``'s spec to ``b``'s, and stores no more.

        Resharding costs obey the triangle inequality, so the dropped strategies never beat
        the kept ones; the integer program shrinks without losing its optimum.
        """
        if table.size <= 2:
            return table
        graph, g = self.graph, self.groups[gid]
        extra = np.zeros((table.size, table.size))  # extra[a, b]: running a where b was planned
        crossing = [(table.specs[local], graph.values[g.values[local]], w, False)
                    for local, w in self.out_weight[gid].items()]
        crossing += [(table.req_specs[i], graph.values[r.src], r.weight, True)
                     for i, r in enumerate(g.reqs) if int(self.group_of[r.src]) != gid]
        for specs, value, weight, incoming in crossing:
            distinct: dict = {}
            part = np.array([distinct.setdefault(spec, len(distinct)) for spec in specs])
            if len(distinct) == 1 or None in distinct:
                continue
            move = mm.reshard_matrix(value.shape, value.itemsize, tuple(distinct)) * weight
            extra += move[part[None, :], part[:, None]] if incoming else move[part[:, None],
                                                                               part[None, :]]
        memory = sum(graph.values[v].nbytes / np.array([mm.shards(s) for s in table.specs[i]])
                     for i, v in enumerate(g.values))
        arithmetic = table.compute[:, None] - table.compute[None, :]
        traffic = table.traffic[:, None] - table.traffic[None, :]
        if mm.profile.overlaps_memory:
            # The step pays max(total arithmetic, total traffic): switching b to a raises it by
            # at most the larger increase of the two.
            raise_by = np.maximum(0.0, np.maximum(arithmetic, traffic))
        else:  # the two add up (DeviceProfile.compute_time): the change is their sum
            raise_by = arithmetic + traffic
        total = table.comm[:, None] + extra + raise_by
        cost = table.comm[None, :]
        index = np.arange(table.size)
        beats = (total < cost) | ((total == cost) & (index[:, None] < index))
        beats &= memory[:, None] <= memory[None, :]
        np.fill_diagonal(beats, False)
        keep = np.flatnonzero(~beats.any(axis=0))
        return table if len(keep) == table.size else table.subset(keep)

    def _build_table(self, g: Group, mm: MeshModel, follows: dict | None = None) -> Table:
        """``follows``: members' strategies and traffic by (``_eqn_id``, followed operand, its
        spec), kept on ``mm`` across tables."""
        graph = self.graph
        leaders = self._leader_strategies(g, mm)
        specs: list[list[Spec]] = [[] for _ in g.values]
        compute = np.zeros(len(leaders))
        traffic = np.zeros(len(leaders))
        comm = np.zeros(len(leaders))
        req_specs: list[list[Spec | None]] = [[] for _ in g.reqs]
        weight = 1.0 if g.leader < 0 else graph.eqns[g.leader].weight
        first = len(leaders[0].outputs)
        memo = {} if follows is None else follows
        for k, lead in enumerate(leaders):
            for j, s in enumerate(lead.outputs):
                specs[j].append(s)
            member_ops = {-1: lead.operands}
            compute[k] += lead.compute * weight
            traffic[k] += lead.traffic * weight
            comm[k] += lead.comm * weight
            pos = first
            for m, (i, f_local, f) in enumerate(zip(g.members, g.follow, g.follow_operand)):
                eqn = graph.eqns[i]
                in_spec = specs[f_local][k]
                memo_key = (self._eqn_id(i), f, in_spec)
                found = memo.get(memo_key)
                if found is None:
                    st = _rules.follow(eqn, graph, f, in_spec, mm)
                    found = memo[memo_key] = (st, self._fused_traffic(eqn, st, mm))
                st, fused = found
                for s in st.outputs:
                    specs[pos].append(s)
                    pos += 1
                member_ops[m] = st.operands
                compute[k] += st.compute * eqn.weight
                traffic[k] += fused * eqn.weight
                comm[k] += st.comm * eqn.weight
            for r_index, r in enumerate(g.reqs):
                want = specs[r.operand][k] if r.member == -2 else member_ops[r.member][r.operand]
                req_specs[r_index].append(want)
                if want is not None and self.groups[int(self.group_of[r.src])] is g:
                    have = specs[int(self.local[r.src])][k]
                    value = graph.values[r.src]
                    comm[k] += mm.reshard(value.shape, value.itemsize, have, want) * r.weight
        return Table(leaders, specs, compute, traffic, comm, req_specs)

    def _fused_traffic(self, eqn, st: _rules.Strategy, mm: MeshModel) -> float:
        """Seconds a fused op spends on memory: reading and writing only the arrays XLA keeps."""
        values = self.graph.values
        nbytes = sum(values[v].nbytes / mm.shards(spec)
                     for v, spec in zip(eqn.inputs + eqn.outputs, st.operands + st.outputs)
                     if v is not None and spec is not None and self.kept[v])
        return mm.memory_time(nbytes, 1)

    def _leader_strategies(self, g: Group, mm: MeshModel) -> list[_rules.Strategy]:
        graph = self.graph
        if g.kind == "input":
            return _rules.input_strategies(graph.values[g.values[0]].shape, mm,
                                           self.batch[g.values[0]])
        if g.kind == "constant":
            return [_rules.Strategy("constant", (((),) * graph.values[g.values[0]].ndim,), (),
                                    0.0, 0.0)]
        eqn = graph.eqns[g.leader]
        found = None
        if g.kind == "free" and len(eqn.outputs) == 1:
            # Made from nothing (a broadcast constant, an iota): each device makes the part its
            # readers need, and XLA fuses it into them unless one must read it from memory.
            v = eqn.outputs[0]
            value = graph.values[v]
            return [dataclasses.replace(
                        st, kind="free", operands=(None,) * len(eqn.inputs),
                        traffic=mm.memory_time(value.nbytes / mm.shards(st.outputs[0]), 1)
                        if self.kept[v] else 0.0)
                    for st in _rules.input_strategies(value.shape, mm)]
        if g.kind == "dot":
            found = _rules.dot_strategies(eqn, graph, mm, self.batch)
        elif g.kind == "conv":
            found = _rules.conv_strategies(eqn, graph, mm, self.batch)
        elif g.kind == "gather":
            found = _rules.gather_strategies(eqn, graph, mm, self.batch)
        elif g.kind == "scatter":
            found = _rules.scatter_strategies(eqn, graph, mm, self.batch)
        if found:
            return found
        kind = "free" if g.kind == "free" else f"replicated {eqn.prim}"
        return [_rules.replicated_strategy(eqn, graph, mm, kind)]


def warn_fallbacks(structure: Structure) -> None:
    """One warning naming the primitives that run replicated because no rule covers them."""
    if structure.warned:
        warnings.warn(
            f"ShardParallel has no sharding rule for {', '.join(structure.warned)}; these run "
            "replicated on every device (correct, but their work is not split).",
            stacklevel=3)
