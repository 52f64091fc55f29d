"""The integer program of one mesh: build it from a :class:`Structure`, solve it, read it back."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec

from parallel.auto._cost import MeshModel, Spec
from parallel.auto._groups import Structure
from parallel.auto._ilp import Program, Result
from parallel.auto._memory import Liveness, peak_points
from parallel.auto._tables import Table, on_mesh

# Leaders whose chosen output spec is pinned with a sharding constraint.
CONSTRAINED_KINDS = ("dot", "conv", "gather", "scatter")
# Objective weight of stored bytes, relative to moving them once through memory: breaks ties
# between equally fast plans in favour of the one that stores less.
_STORAGE_TIE_BREAK = 1e-3
# The program counts time in microseconds and memory in MiB, which keeps HiGHS's coefficients
# near 1.
_PER_SECOND = 1e6
_PER_BYTE = 1.0 / 2**20


@dataclasses.dataclass
class MeshResult:
    """The best plan on one mesh shape.

    Attributes:
      mesh_shape: axis name -> size.
      status: ``"optimal"``, ``"time_limit"`` (best found before the limit) or ``"over_budget"``.
      step_time_s: estimated seconds per step (``compute_s + comm_s``).
      compute_s: compute part (work divided by the shards that run it).
      comm_s: collectives inside operations plus resharding between them.
      memory_bytes: estimated peak bytes per device.
      solve_time_s: seconds spent building and solving the integer program.
      input_specs: one ``PartitionSpec`` per flat input leaf.
      output_specs: one ``PartitionSpec`` per flat output leaf.
      constraints: ``(site, output index, PartitionSpec)`` for intermediates to pin.
      choices: ``(leader description, strategy label, times used)`` per class of the solution.
      compiled_step_time_s, compiled_memory_bytes: XLA's figures for the plan when it was
        compiled to check it (``ShardParallel(validate=True)``), else ``None``.
      measured_step_time_s: seconds a step took when the compiled plan was timed on the
        devices (``ShardParallel(measure=...)``), else ``None``.
      variant: ``""``, or which flavour of the mesh was solved for (e.g. ``"batch split"``).
      spec_at: ``spec_at(site, output index)``: the plan's ``PartitionSpec`` of the result of
        the equation at ``site`` (``None``: no such equation); e.g. a pipeline stage's
        residuals, held between its forward and backward programs as planned here.
    """

    mesh_shape: dict[str, int]
    status: str
    step_time_s: float
    compute_s: float
    comm_s: float
    memory_bytes: float
    solve_time_s: float
    input_specs: list[PartitionSpec]
    output_specs: list[PartitionSpec]
    constraints: list[tuple[tuple[int, ...], int, PartitionSpec]]
    choices: list[tuple[str, str, int]]
    compiled_step_time_s: float | None = None
    compiled_memory_bytes: int | None = None
    measured_step_time_s: float | None = None
    variant: str = ""
    spec_at: Any = None


class MeshProblem:
    """The integer program of ``structure`` on mesh ``mm``.

    Args:
      structure: groups and classes of the program.
      mm: the mesh and its cost model.
      liveness: live ranges for the memory constraint.
      paired: output index -> input index of state that must keep its input's spec.
      fed: value ids of inputs that arrive anew each call (the batch), priced by their
        per-device bytes.
      split_leading: value ids of inputs whose leading dim must be split (where it divides),
        e.g. the batch for the data-parallel flavour of a mesh.
      split_any: value ids of inputs that must be split on some dim (where one divides), e.g.
        stored state for the ZeRO-3 flavour.
      whole: value ids of inputs that must stay replicated (small state in that flavour).
      split_most: value ids of inputs that must be split into as many pieces as any of their
        strategies splits them (over every mesh axis where the shape allows), e.g. a pipeline
        stage's parameters when their state must not be kept whole on its devices.
      tables: ``mesh_tables`` of a problem of ``structure`` on an equal mesh (the tables depend
        on nothing else); default: built here.
    """

    def __init__(self, structure: Structure, mm: MeshModel, liveness: Liveness,
                 paired: dict[int, int], fed: set[int], split_leading: set[int] = frozenset(),
                 split_any: set[int] = frozenset(), whole: set[int] = frozenset(),
                 tables: list[Table] | None = None, split_most: set[int] = frozenset()):
        self.s = structure
        self.fed = fed
        self.mm = mm
        self.liveness = liveness
        self.paired = paired
        if tables is None:
            cache: dict = {}
            tables = [structure.table(c, mm, cache) for c in range(structure.num_classes)]
        # The tables of ``structure`` on ``mm`` before any flavour's subset (``tables``: made
        # for another flavour on the same mesh, shared).
        self.mesh_tables = tables
        self.tables: list[Table] = list(tables)
        for c, members in enumerate(structure.members_of):
            value = structure.groups[members[0]].values[0]
            table = self.tables[c]
            if value in split_leading:
                keep = [k for k in range(table.size) if table.specs[0][k][:1] not in ((), ((),))]
            elif value in split_any:
                keep = [k for k in range(table.size) if any(table.specs[0][k])]
            elif value in whole:
                keep = [k for k in range(table.size) if not any(table.specs[0][k])]
            elif value in split_most:
                pieces = [mm.shards(spec) for spec in table.specs[0]]
                keep = [k for k in range(table.size) if pieces[k] == max(pieces)]
            else:
                continue
            if keep:
                self.tables[c] = table.subset(keep)
        self.counts = np.array([len(m) for m in structure.members_of], float)
        self._inv_shards: dict[tuple[int, int], np.ndarray] = {}
        nbytes = np.array([v.nbytes for v in structure.graph.values], float)
        self.nbytes = nbytes

    def inv_shards(self, c: int, local: int) -> np.ndarray:
        key = (c, local)
        if key not in self._inv_shards:
            self._inv_shards[key] = np.array(
                [1.0 / self.mm.shards(spec) for spec in self.tables[c].specs[local]])
        return self._inv_shards[key]

    # ----------------------------------------------------------------------------------------
    def build(self, minimize_memory: bool = False) -> tuple[Program, list[np.ndarray], np.ndarray | None]:
        """The program; ``minimize_memory`` swaps the step-time objective for the peak memory."""
        s, mm = self.s, self.mm
        prog = Program()
        x = []
        for c, table in enumerate(self.tables):
            if minimize_memory:
                x.append(prog.add_choice(np.zeros(table.size)))
                continue
            cost = self.counts[c] * table.comm * _PER_SECOND
            g = s.groups[s.members_of[c][0]]
            if g.kind == "input":
                stored = self.nbytes[g.values[0]] * self.inv_shards(c, 0)
                scale = 1.0 if g.values[0] in self.fed else _STORAGE_TIE_BREAK
                cost = cost + self.counts[c] * scale * mm.memory_time(stored, 1) * _PER_SECOND
            if not mm.profile.overlaps_memory:  # arithmetic and traffic add up (the CPU)
                cost = cost + self.counts[c] * (table.compute + table.traffic) * _PER_SECOND
            x.append(prog.add_choice(cost))
        peak = prog.add_vars(np.ones(1), upper=np.inf) if minimize_memory else None
        if not minimize_memory:
            self._add_edges(prog, x)
        if not minimize_memory and mm.profile.overlaps_memory:
            # The step computes for max(total arithmetic, total traffic): a variable above both.
            busy = prog.add_vars(np.ones(1), upper=np.inf)
            for part in ("compute", "traffic"):
                coefs = [self.counts[c] * getattr(t, part) * _PER_SECOND
                         for c, t in enumerate(self.tables)]
                prog.add_row(np.concatenate(x + [busy]), np.concatenate(coefs + [[-1.0]]),
                             -np.inf, 0.0)
        return prog, x, peak

    def _add_edges(self, prog: Program, x: list[np.ndarray]):
        s, mm = self.s, self.mm
        counts: dict[tuple[int, int, int, int], int] = defaultdict(int)
        for gid, g in enumerate(s.groups):
            cd = int(s.cls[gid])
            for r_index, r in enumerate(g.reqs):
                gs = int(s.group_of[r.src])
                if gs != gid:
                    counts[(int(s.cls[gs]), int(s.local[r.src]), cd, r_index)] += 1
        products: dict[tuple, np.ndarray] = {}
        for (cs, ls, cd, r_index), count in counts.items():
            have = self.tables[cs].specs[ls]
            want = self.tables[cd].req_specs[r_index]
            rep = s.groups[s.members_of[cd][0]]
            value = s.graph.values[rep.reqs[r_index].src]
            mm = s.mesh_for(s.members_of[cd][0], self.mm)
            edge = _edge(mm, have, want, value.shape, value.itemsize, cs == cd)
            if edge is None:
                continue
            weight = rep.reqs[r_index].weight * count * _PER_SECOND
            if cs == cd:
                prog.add_cost(x[cd], weight * edge)
                continue
            src_part, dst_part, cost = edge
            cost = cost * weight
            if not cost.any():
                continue
            if cost.shape[0] == 1:
                prog.add_cost(x[cd], cost[0][dst_part])
            elif cost.shape[1] == 1:
                prog.add_cost(x[cs], cost[:, 0][src_part])
            else:
                key = (cs, cd, tuple(src_part), tuple(dst_part))
                products[key] = products.get(key, 0.0) + cost
        merged = on_mesh(self.mm, "merged")
        for (cs, cd, src_part, dst_part), cost in products.items():
            key = (cost.shape, cost.tobytes(), src_part, dst_part)
            found = merged.get(key)
            if found is None:
                found = _merge_alike(cost, np.asarray(src_part), np.asarray(dst_part))
                for a in found:
                    a.flags.writeable = False
                merged[key] = found
            cost, src_part, dst_part = found
            if cost.shape[0] == 1:
                prog.add_cost(x[cd], cost[0][dst_part])
            elif cost.shape[1] == 1:
                prog.add_cost(x[cs], cost[:, 0][src_part])
            else:
                src = [x[cs][src_part == a] for a in range(cost.shape[0])]
                dst = [x[cd][dst_part == b] for b in range(cost.shape[1])]
                prog.add_product(src, dst, cost)

    def add_memory_row(self, prog: Program, x: list[np.ndarray], point: int, budget: float,
                       peak: np.ndarray | None):
        """Bytes alive while equation ``point`` runs must stay within ``budget`` (or below the
        peak variable)."""
        s = self.s
        coef: dict[int, np.ndarray] = {}
        for v in self.liveness.live_at(point):
            gid = int(s.group_of[v])
            c = int(s.cls[gid])
            contrib = self.nbytes[v] * _PER_BYTE * self.inv_shards(c, int(s.local[v]))
            coef[c] = coef[c] + contrib if c in coef else contrib
        gid, reqs = self._operand_buffers(point)
        if reqs:
            c = int(s.cls[gid])
            table = self.tables[c]
            contrib = sum(self.nbytes[s.groups[gid].reqs[r].src] * _PER_BYTE
                          / np.array([self.mm.shards(spec) for spec in table.req_specs[r]])
                          for r in reqs)
            coef[c] = coef[c] + contrib if c in coef else contrib
        ids = np.concatenate([x[c] for c in coef] + [peak if peak is not None else []])
        vals = np.concatenate([coef[c] for c in coef] + [[-1.0] if peak is not None else []])
        prog.add_row(ids.astype(np.int64), vals, -np.inf,
                     0.0 if peak is not None else budget * _PER_BYTE)

    # ----------------------------------------------------------------------------------------
    def choose(self, result: Result, x: list[np.ndarray]) -> np.ndarray:
        return np.array([int(np.argmax(result.x[ids])) for ids in x])

    def cheapest_each(self) -> np.ndarray:
        """Each class's cheapest strategy on its own (a plan when the solver found none)."""
        return np.array([int(np.argmin(t.compute + t.traffic + t.comm)) for t in self.tables])

    def specs(self, choice: np.ndarray) -> list[Spec | None]:
        s = self.s
        out: list[Spec | None] = [None] * len(s.graph.values)
        for gid, g in enumerate(s.groups):
            table = self.tables[int(s.cls[gid])]
            k = choice[int(s.cls[gid])]
            for local, v in enumerate(g.values):
                out[v] = table.specs[local][k]
        return out

    def _operand_buffers(self, point: int) -> tuple[int, list[int]]:
        """The group led by equation ``point`` and its operand requirements: a leader's
        operands are materialized in the spec it asks for (a resharded copy when they came in
        another one)."""
        eqn = self.s.graph.eqns[point]
        if not eqn.outputs:
            return -1, []
        gid = int(self.s.group_of[eqn.outputs[0]])
        g = self.s.groups[gid]
        if g.leader != point or g.kind in ("free", "constant"):
            return gid, []
        return gid, [r for r, req in enumerate(g.reqs) if req.member == -1]

    def memory_profile(self, choice: np.ndarray, specs: list[Spec | None]) -> np.ndarray:
        """Estimated bytes per device alive at each point of the program under a solution."""
        local = np.array([self.nbytes[v] / self.mm.shards(spec) if spec is not None else
                          self.nbytes[v] for v, spec in enumerate(specs)])
        profile = self.liveness.profile(local)
        for gid, g in enumerate(self.s.groups):
            if g.leader < 0:
                continue
            _, reqs = self._operand_buffers(g.leader)
            table = self.tables[int(self.s.cls[gid])]
            k = choice[int(self.s.cls[gid])]
            profile[g.leader] += sum(self.nbytes[g.reqs[r].src] / self.mm.shards(table.req_specs[r][k])
                                     for r in reqs)
        return profile

    def evaluate(self, choice: np.ndarray, specs: list[Spec | None]) -> tuple[float, float]:
        """(compute seconds, communication seconds) of a solution; compute is the larger of
        arithmetic and memory traffic, or their sum where the profile does not overlap them."""
        s, mm = self.s, self.mm
        arithmetic, traffic = (float(sum(self.counts[c] * getattr(t, part)[choice[c]]
                                         for c, t in enumerate(self.tables)))
                               for part in ("compute", "traffic"))
        compute = max(arithmetic, traffic) if mm.profile.overlaps_memory else arithmetic + traffic
        comm = float(sum(self.counts[c] * t.comm[choice[c]] for c, t in enumerate(self.tables)))
        for gid, g in enumerate(s.groups):
            table = self.tables[int(s.cls[gid])]
            k = choice[int(s.cls[gid])]
            for r_index, r in enumerate(g.reqs):
                want = table.req_specs[r_index][k]
                if want is None or int(s.group_of[r.src]) == gid:
                    continue
                value = s.graph.values[r.src]
                comm += s.mesh_for(gid, mm).reshard(value.shape, value.itemsize, specs[r.src],
                                                    want) * r.weight
        return compute, comm

    def describe(self, choice: np.ndarray) -> list[tuple[str, str, int]]:
        """``(operation, strategy, times used)`` of the dot-like groups, most used first."""
        s = self.s
        used: dict[tuple[str, str], int] = defaultdict(int)
        for c, members in enumerate(s.members_of):
            g = s.groups[members[0]]
            if g.kind not in CONSTRAINED_KINDS:
                continue
            eqn = s.graph.eqns[g.leader]
            shapes = " x ".join(str(list(s.graph.values[v].shape)) for v in eqn.inputs
                                if v is not None)
            strategy = self.tables[c].leaders[choice[c]].describe(self.mm)
            used[(f"{eqn.prim} {shapes}", strategy)] += len(members)
        return sorted(((what, how, n) for (what, how), n in used.items()), key=lambda r: -r[2])

    def constraints(self, specs: list[Spec | None]) -> list[tuple[tuple[int, ...], int,
                                                                   PartitionSpec]]:
        """``(site, output, spec)`` pinning the results of dot-like leaders and every value
        another group reads, so XLA's propagation keeps each decision of the solution."""
        s = self.s
        pinned = {s.graph.eqns[g.leader].outputs[0] for g in s.groups
                  if g.kind in CONSTRAINED_KINDS}
        for gid, g in enumerate(s.groups):
            pinned.update(r.src for r in g.reqs if int(s.group_of[r.src]) != gid)
        out = []
        for v in sorted(pinned):
            value = s.graph.values[v]
            if value.producer < 0 or value.ndim == 0:
                continue
            eqn = s.graph.eqns[value.producer]
            if eqn.site is not None and not eqn.prim.startswith("_"):
                out.append((eqn.site, eqn.outputs.index(v), self.mm.partition_spec(specs[v])))
        return out

    def io_specs(self, specs: list[Spec | None]) -> tuple[list[PartitionSpec], list[PartitionSpec]]:
        graph, mm = self.s.graph, self.mm
        ins = [mm.partition_spec(specs[v]) for v in graph.inputs]
        outs = []
        for i, v in enumerate(graph.outputs):
            if i in self.paired:
                outs.append(ins[self.paired[i]])
            elif v is None:
                outs.append(PartitionSpec())
            else:
                outs.append(mm.partition_spec(specs[v]))
        return ins, outs

    def spec_at(self, specs: list[Spec | None]):
        """``spec_at(site, output)`` of a solution's ``specs`` (the sites indexed when first
        asked: most solves are never asked)."""
        graph, mm, at = self.s.graph, self.mm, {}

        def spec_at(site: tuple, output: int) -> PartitionSpec | None:
            if not at:
                at.update((e.site, e.outputs) for e in graph.eqns if e.site is not None)
            outputs = at.get(tuple(site))
            if outputs is None or output >= len(outputs) or specs[outputs[output]] is None:
                return None
            return mm.partition_spec(specs[outputs[output]])
        return spec_at

    def first_points(self, count: int = 4) -> list[int]:
        return peak_points(self.liveness.profile(self.nbytes), count)


def _edge(mm: MeshModel, have: list, want: list, shape: tuple, itemsize: int, same: bool):
    """Resharding from the specs ``have`` (a source class's value) to ``want`` (what a reader
    asks for), before the edge's weight: ``None`` when it never costs anything; for a class
    reading itself (``same``) the cost per strategy; else ``(source part, reader part,
    cost between distinct specs)``. Kept per mesh model: the tables, and so these lists, are
    shared by the structures solved on it (``Structure.table``); by the lists' identity, each
    entry holding its lists so that their ids are not reused meanwhile."""
    found = on_mesh(mm, "edges")
    key = (id(have), id(want), shape, itemsize, same)
    entry = found.get(key)
    if entry is not None:
        return entry[2]
    if all(w is None for w in want):
        edge = None
    elif same:
        edge = np.array([0.0 if w is None else mm.reshard(shape, itemsize, h, w)
                         for h, w in zip(have, want)])
    else:
        src_ids, src_part = _partition(have)
        dst_ids, dst_part = _partition(want)
        cost = np.array([[0.0 if w is None else mm.reshard(shape, itemsize, h, w)
                          for w in dst_ids] for h in src_ids])
        edge = (src_part, dst_part, cost) if cost.any() else None
    found[key] = (have, want, edge)
    return edge


def _merge_alike(cost: np.ndarray, src_part: np.ndarray, dst_part: np.ndarray):
    """Merges source specs whose cost rows are equal, and destination specs whose columns are:
    the product only needs to tell apart choices that cost differently."""
    while True:
        rows, row_of = _unique_rows(cost)
        cols, col_of = _unique_rows(rows.T)
        cols = cols.T
        if cols.shape == cost.shape:
            return cost, src_part, dst_part
        cost = cols
        src_part = row_of.reshape(-1)[src_part]
        dst_part = col_of.reshape(-1)[dst_part]


def _unique_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, axis=0, return_inverse=True)`` (the distinct rows in lexicographic
    order, and each row's index among them), without its structured-array sort, which costs
    far more than the planner's small matrices."""
    keys = [tuple(row) for row in a.tolist()]
    distinct = sorted(set(keys))
    index = {key: i for i, key in enumerate(distinct)}
    return (np.array(distinct, dtype=a.dtype).reshape(len(distinct), a.shape[1]),
            np.array([index[key] for key in keys], dtype=np.intp))


def _partition(specs: list) -> tuple[list, np.ndarray]:
    """Distinct entries of ``specs`` and, per position, the index of its entry."""
    distinct: dict = {}
    part = np.array([distinct.setdefault(spec, len(distinct)) for spec in specs])
    return list(distinct), part
