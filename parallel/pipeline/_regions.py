"""Splits a traced step into the regions a pipeline runs, so that each step computes what the
unpipelined step computes, or the plan is refused (or warned about) naming the output and why.

* ``N`` (once per step, on the global batch's shapes): per-step work and statistics of the data
  alone (a token count), computed over the global batch.
* ``M`` (per micro-batch, micro-batch shapes): the forward and backward passes. Constants that
  depend on the batch size take their global value (``x.shape[0]`` is the global batch), except
  where they scale a statistic of the micro-batch (batch norm's mean); positions over the batch
  (``jnp.arange(x.shape[0])``) are the global ones; random keys are ``fold_in(key, i)`` for
  micro-batch ``i``, as ``train.grad_accum_steps`` does.
* ``A`` (once per step): the update and metrics on the combined micro-batch values: per-example
  values concatenated, sums added, means averaged; anything else (a maximum, a sort over examples)
  runs here on the concatenated per-example values.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parallel._errors import PlanError
from parallel._methods import warn_once
from parallel.pipeline._forms import CONST, Form, FormsPass
from parallel.pipeline._micro_values import PerMicroBatchValues, is_key
from parallel.pipeline._program import Op, Program, Regions, substitute
from parallel.pipeline._trace import Traced


def _inexact(aval) -> bool:
    return not is_key(aval) and jnp.issubdtype(aval.dtype, jnp.inexact)


@dataclasses.dataclass
class _Entry:
    """An operation of the program being assembled: its global and micro-batch versions."""

    glob: Op
    micro: Op
    region: str = "N"
    anchor: int = -1  # the original op it follows (inserted ops) or is (original ops)
    inserted: bool = False


class _Splitter(PerMicroBatchValues, FormsPass):
    """The program being split: each original operation in its global and micro-batch versions,
    plus the operations the split inserts (copies, slices, key folds), each with its region."""

    def __init__(self, traced: Traced, m: int, output_names: list[str]):
        self.t, self.m, self.names = traced, m, output_names
        g = traced.glob
        self.avals = list(g.avals)
        self.consts = dict(g.consts)
        self.dims = dict(traced.batch_dims)
        self.batch_inputs = set(traced.batch_inputs)
        self.entries = [_Entry(a, b, anchor=i) for i, (a, b) in enumerate(
            zip(g.ops, traced.micro.ops))]
        self.index: int | None = None
        self.self_index: set[int] = set()  # values holding each example's own row (local)
        self.origin: dict[int, int] = {}  # per-micro-batch version -> the per-step value
        self.notes: list[str] = []
        self.selections: dict[int, str] = {}  # value -> the op picking examples by position

    # ----- data flow --------------------------------------------------------------------------
    def _consumers(self) -> dict[int, list[int]]:
        consumers: dict[int, list[int]] = {}
        for k, e in enumerate(self.entries):
            for v in e.glob.value_inputs():
                consumers.setdefault(v, []).append(k)
        return consumers

    def _regions(self, per_step: set[int] = frozenset()) -> set[int]:
        """Batch dependence and the N/M/A rule: M reads a per-example value or feeds M."""
        dependent = set(self.batch_inputs)
        for e in self.entries:
            if e.glob.outputs and e.glob.outputs[0] in per_step:
                continue
            if any(v in dependent for v in e.glob.value_inputs()):
                dependent.update(e.glob.outputs)
        consumers = self._consumers()
        for k in range(len(self.entries) - 1, -1, -1):
            e = self.entries[k]
            if not any(v in dependent for v in e.glob.value_inputs()) or (
                    e.glob.outputs and e.glob.outputs[0] in per_step):
                e.region = "N"
                continue
            per_example = any(v in self.dims for v in e.glob.value_inputs())
            feeds = any(self.entries[c].region == "M" for v in e.glob.outputs
                        for c in consumers.get(v, ()))
            e.region = "M" if per_example or feeds else "A"
        return dependent

    def _rewire(self, mapping: dict[int, int], regions=("M",), skip=()) -> None:
        for k, e in enumerate(self.entries):
            if e.region in regions and k not in skip:
                e.glob = substitute(e.glob, mapping)
                e.micro = substitute(e.micro, mapping)

    def _insert(self, after: int, ops: list[Op], region: str) -> None:
        position = len(self.entries)
        if after >= 0:
            position = next(k for k, e in enumerate(self.entries) if e.anchor == after
                            and not e.inserted) + 1
            while position < len(self.entries) and self.entries[position].inserted \
                    and self.entries[position].anchor == after:
                position += 1
        else:
            position = 0
        new = [_Entry(op, op, region, after, True) for op in ops]
        self.entries[position:position] = new

    def _producer_anchor(self, v: int) -> int:
        for e in self.entries:
            if v in e.glob.outputs:
                return e.anchor
        return -1

    def _micro_aval(self, v: int):
        """A value's aval in the micro-batch program (new values: as made)."""
        return self.t.micro.avals[v] if v < len(self.t.micro.avals) else self.avals[v]

    def _micro_index(self) -> int:
        if self.index is None:
            self.index = len(self.avals)
            self.avals.append(jax.core.ShapedArray((), jnp.int32))
        return self.index

    # ----- steps ------------------------------------------------------------------------------
    def run(self) -> tuple[Program, Regions]:
        self._regions()
        if not any(e.region == "M" for e in self.entries):
            raise PlanError("the step does no per-example computation on the batch arguments "
                            "(batch_argnums); nothing to pipeline")
        per_step = self._data_statistics()
        dependent = self._regions(per_step)
        self._per_micro_batch_values()
        self._prune()
        forms = self._forms()
        self._tails(forms)
        self._check_selections()
        return self._assemble(forms, dependent)

    def _data_statistics(self) -> set[int]:
        """Sums over examples of the batch alone (a token count) read by the micro-batch work:
        copied into ``N`` on the global batch, so that what divides by them is exact."""
        g = self.t.glob
        model = {v for v in g.inputs if v not in self.batch_inputs
                 and (_inexact(self.avals[v]) or is_key(self.avals[v]))}
        for e in self.entries:
            if any(v in model for v in e.glob.value_inputs()) or any(
                    is_key(self.avals[v]) for v in e.glob.value_inputs()):
                model.update(e.glob.outputs)
        consumers = self._consumers()
        region_of = {v: e.region for e in self.entries for v in e.glob.outputs}
        stats = [v for e in self.entries if e.region == "M" for v in e.glob.outputs
                 if v not in self.dims and v not in model
                 and any(self.entries[c].region == "M" for c in consumers.get(v, ()))]
        if not stats:
            return set()
        cone, stack = set(), list(stats)
        producer = {v: k for k, e in enumerate(self.entries) for v in e.glob.outputs}
        while stack:
            v = stack.pop()
            k = producer.get(v)
            if k is None or k in cone or region_of.get(v) != "M":
                continue
            cone.add(k)
            stack.extend(self.entries[k].glob.value_inputs())
        copy: dict[int, int] = {}
        for anchor, op in [(self.entries[k].anchor, self.entries[k].glob) for k in sorted(cone)]:
            outputs = []
            for v in op.outputs:
                copy[v] = len(self.avals)
                self.avals.append(self.avals[v])
                outputs.append(copy[v])
            new = Op(op.prim, op.params, [copy.get(a, a) if isinstance(a, int) else a
                                          for a in op.inputs], outputs, False)
            self._insert(anchor, [new], "N")
        self._rewire({v: copy[v] for v in stats}, regions=("M", "A"))
        return set(copy.values())

    def _prune(self) -> None:
        """Drops operations whose results nothing reads (replaced by copies)."""
        live = {v for v in self.t.glob.outputs if isinstance(v, int)}
        keep = [False] * len(self.entries)
        for k in range(len(self.entries) - 1, -1, -1):
            e = self.entries[k]
            if any(v in live for v in e.glob.outputs) or e.glob.prim.name == "pipeline_cut":
                keep[k] = True
                live.update(e.glob.value_inputs())
                live.update(e.micro.value_inputs())
        self.entries = [e for k, e in enumerate(self.entries) if keep[k]]

    # ----- the program ------------------------------------------------------------------------
    def _assemble(self, forms: dict[int, Form], dependent: set[int]) -> tuple[Program, Regions]:
        g = self.t.glob
        ops, region = [], []
        avals = self.avals
        made_in_m = set()
        for e in self.entries:
            op = e.micro if e.region == "M" else e.glob
            ops.append(op)
            region.append(e.region)
            if e.region == "M":
                made_in_m.update(op.outputs)
                if not e.inserted:
                    for v in op.outputs:
                        avals[v] = self.t.micro.avals[v]
        global_avals = {}
        for v in self.batch_inputs:
            global_avals[v] = g.avals[v]
            avals[v] = self.t.micro.avals[v]
        crossing = []
        for op, r in zip(ops, region):
            if r != "M":
                crossing.extend(v for v in op.value_inputs() if v in made_in_m)
        crossing.extend(v for v in g.outputs if isinstance(v, int) and v in made_in_m)
        crossing = list(dict.fromkeys(crossing))
        combine, warned, notes = {}, {}, list(self.notes)
        reach = self._reaching_outputs(ops, region, made_in_m)
        for v in crossing:
            form = forms.get(v, CONST)
            combine[v] = self._combine(v, form, reach.get(v, []))
            if combine[v] == "concat":
                global_avals[v] = g.avals[v]
            if not form.exact:
                warned.setdefault(form.why, []).append(v)
        if warned:  # one warning: the outputs affected and why
            names = list(dict.fromkeys(n for values in warned.values() for v in values
                                       for n in reach.get(v, ())))
            notes += [f"per micro-batch, not over the global batch: {why}" for why in warned]
            shown = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2
                                             else "")
            reasons = "; ".join(list(warned)[:2]) + (
                f" (and {len(warned) - 2} more reasons)" if len(warned) > 2 else "")
            hint = ("; for a loss divided by a count of the model's making, return gradients of "
                    "the sum and divide them by the count after the backward pass"
                    if any("ratio" in why for why in warned) else "")
            verb = "is" if len(names) <= 1 else "are"
            warn_once(f"PipeshardParallel: {shown or 'an output'} {verb} computed per micro-batch "
                      f"and combined as train.grad_accum_steps would, not over the global batch: "
                      f"{reasons}{hint}")
        batch_dim = {v: d[0] for v, d in self.dims.items()}
        anchors = [e.anchor for e in self.entries]
        cuts = [next((k for k, a in enumerate(anchors) if a >= cut), len(anchors))
                for cut in g.cuts]
        program = Program(ops, avals, list(g.inputs), list(g.outputs), self.consts, cuts)
        dependent = dependent | made_in_m
        return program, Regions(region, batch_dim, dependent, crossing, combine, self.index,
                                global_avals, notes)

    def _combine(self, v: int, form: Form, outputs: list[str]) -> Any:
        aval = self.avals[v]
        what = f"a value of shape {aval.shape} and dtype {aval.dtype}"
        if outputs:
            what = (f"{outputs[0]}" + (f" (and {len(outputs) - 1} more outputs)"
                                       if len(outputs) > 1 else "") + f" comes from {what} that")
        else:
            what = f"{what}, read by the update,"
        if form.kind == "E":
            return "concat"
        if form.kind == "S" and (form.mean or (self.m == 1 and np.isclose(form.rho, 1.0))):
            kind = "mean" if form.mean else "sum"
        elif form.kind == "S" and np.isclose(form.rho, 1.0):
            kind = "sum"
        elif form.kind == "S":
            raise PlanError(f"{what} is a sum over examples scaled by {form.rho:g} times the "
                            f"micro-batch's share; PipeshardParallel cannot accumulate it "
                            f"exactly: divide by the batch size once (a mean) or not at all")
        elif form.kind == "MAX":
            raise PlanError(f"{what} is a maximum or minimum over examples that the backward "
                            f"pass reads; PipeshardParallel cannot take it over micro-batches")
        elif form.kind == "C":
            raise PlanError(f"{what} leaves the per-micro-batch work but depends only on the "
                            f"micro-batch's random key or index; PipeshardParallel cannot "
                            f"combine it over micro-batches: return it from per-step work")
        else:
            kind = "mean"
        if kind == "mean" and not _inexact(aval):
            raise PlanError(f"{what} leaves the per-micro-batch work as a mean; an integer "
                            f"mean over micro-batches is not exact: compute it as a float "
                            f"mean, or as a sum (a count)")
        return kind

    def _reaching_outputs(self, ops, region, made_in_m) -> dict[int, list[str]]:
        """For each value made in ``M``: the names of the step's outputs it reaches."""
        reach: dict[int, frozenset[int]] = {}
        for v in made_in_m:
            reach[v] = frozenset((v,))
        for op, r in zip(ops, region):
            if r == "M":
                continue
            found = [reach[v] for v in op.value_inputs() if v in reach]
            if not found:
                continue
            # Shared, never changed in place: an update reads one gradient and a norm over all
            # of them, and copying the larger set for each of its operations is quadratic.
            largest = max(found, key=len)
            sources = largest if all(s <= largest for s in found) else largest.union(*found)
            for v in op.outputs:
                prior = reach.get(v)
                reach[v] = sources if prior is None or prior <= sources else prior | sources
        names: dict[int, list[str]] = {}
        for pos, v in enumerate(self.t.glob.outputs):
            if isinstance(v, int):
                for source in reach.get(v, ()):
                    names.setdefault(source, []).append(self.names[pos])
        return names


def split_regions(traced: Traced, num_micro_batches: int,
                  output_names: list[str]) -> tuple[Program, Regions]:
    """The program a pipeline runs and its regions (see the module docstring).

    Args:
      traced: the step's global and micro-batch traces.
      num_micro_batches: micro-batches per step.
      output_names: a name per flat output leaf (for messages).

    Raises:
      PlanError: an output cannot be combined over micro-batches exactly and is not a
        per-micro-batch statistic (the message names it and why).
    """
    return _Splitter(traced, num_micro_batches, output_names).run()
