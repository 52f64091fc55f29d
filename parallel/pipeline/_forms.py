"""How each value of the micro-batch region relates to the same value over the global batch.

Every value made per micro-batch has a form:

* ``C``: the same in every micro-batch (parameters, per-step values) or a micro-batch's own
  random key or index.
* ``E``: per example: the micro-batch's rows of the global value (concatenated over micro-batches).
* ``S``: a sum over examples, scaled: the global value is ``rho * sum_i`` of the micro-batches'
  (``rho = 1``: a sum; ``rho = 1 / M``: a mean, which may also gain constants).
* ``MAX``: a maximum or minimum over examples.
* ``X``: none of these: a per-micro-batch value that the pipeline averages over micro-batches, as
  ``train.grad_accum_steps`` does (a ratio of batch sums, a batch statistic).

``E`` and ``S`` values also say whether they are exact: an example's value that reads a batch
statistic (batch norm) is the micro-batch's, not the global batch's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from jax.extend import core as jax_core

from parallel._errors import PlanError
from parallel._weighted import WEIGHTED_MEAN_NAME
from parallel.pipeline._marker import MARKER_NAME
from parallel.pipeline._program import substitute

INDEX_PATH = {"concatenate", "broadcast_in_dim", "reshape", "convert_element_type", "squeeze",
              "expand_dims"}
INDEXED = {"gather", "scatter-add", "scatter_add", "scatter", "scatter-mul", "scatter_mul",
           "scatter-min", "scatter-max", "scatter_min", "scatter_max"}


@dataclasses.dataclass(frozen=True)
class Form:
    kind: str  # "C" | "E" | "S" | "MAX" | "X"
    rho: float = 1.0
    mean: bool = False  # an S with rho = 1/M: constants may be added
    exact: bool = True
    why: str = ""  # for inexact values: the first operation that made them so

    def inexact(self, why: str) -> "Form":
        return dataclasses.replace(self, exact=False, why=self.why or why)


CONST = Form("C")

# Operations linear in their one non-constant operand (per micro-batch values pass through).
_LINEAR = {"neg", "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose",
           "reduce_sum", "slice", "copy", "copy_p", MARKER_NAME, "reduce_precision", "real",
           "imag", "rev", "cumsum", "concatenate", "pad", "dynamic_slice", "sharding_constraint",
           "optimization_barrier", "squeeze", "convert_element_type", "select_n",
           "dynamic_update_slice", "gather", "conj"}
_ADDITIVE = {"add", "sub", "add_any"}
# Reductions over examples that are sums of per-example terms.
_SUMS = {"reduce_sum", "dot_general", "conv_general_dilated", "scatter-add", "scatter_add"}
_EXTREMA = {"reduce_max", "reduce_min"}
# Operations with bodies (kept whole by the flattening).
_BODIES = {"scan", "while", "cond", "remat2", "checkpoint"}
# Operations that pick examples by position: along the batch they select other rows per
# micro-batch (refused, unless they run after the backward pass on the whole batch).
_SELECTIONS = {"slice", "pad", "gather", "dynamic_slice", "dynamic_update_slice", "rev",
               "scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul",
               "scatter-min", "scatter-max", "scatter_min", "scatter_max"}
# Operations that act along one axis given by a parameter: along the batch they mix examples.
_AXIS_PARAMS = {"cumsum": "axis", "cumprod": "axis", "cummax": "axis", "cummin": "axis",
                "cumlogsumexp": "axis", "sort": "dimension", "rev": "dimensions",
                "concatenate": "dimension", "argsort": "dimension", "top_k": None,
                "reduce_sum": "axes", "reduce_max": "axes", "reduce_min": "axes",
                "reduce_prod": "axes", "argmax": "axes", "argmin": "axes",
                "reduce_and": "axes", "reduce_or": "axes"}


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def mixes_examples(op, in_dims: list[tuple], out_dims: tuple, in_shapes: list[tuple],
                   out_shapes: list[tuple]) -> bool:
    """Whether an operation with batch-shaped inputs and outputs combines different examples
    (its result's rows are not each a function of the same row of its inputs)."""
    name = op.prim.name
    batch_in = [d for dims in in_dims for d in dims]
    if name in _AXIS_PARAMS:
        key = _AXIS_PARAMS[name]
        if key is None:  # top_k: the last axis
            axes = tuple(len(s) - 1 for s in in_shapes[:1])
        else:
            axes = _as_tuple(op.params.get(key))
        return any(a in dims for dims in in_dims for a in axes)
    if name == "slice":
        dims = in_dims[0]
        start, limit = op.params["start_indices"], op.params["limit_indices"]
        strides = op.params.get("strides") or (1,) * len(start)
        return any(start[d] != 0 or limit[d] != in_shapes[0][d] or strides[d] != 1
                   for d in dims)
    if name == "pad":
        return any(tuple(op.params["padding_config"][d]) != (0, 0, 0) for d in in_dims[0])
    if name == "dot_general":
        (lc, rc), (lb, rb) = op.params["dimension_numbers"]
        contracted = [d for d in lc if d in in_dims[0]] + [d for d in rc if d in in_dims[1]]
        if contracted:
            return True
        # Free batch dimensions of both operands: every example against every other.
        free_l = [d for d in in_dims[0] if d not in lb]
        free_r = [d for d in in_dims[1] if d not in rb] if len(in_dims) > 1 else []
        return bool(free_l and free_r)
    if name == "conv_general_dilated":
        lhs_spec = op.params["dimension_numbers"].lhs_spec
        return bool(in_dims[0]) and in_dims[0][0] != lhs_spec[0] or len(in_dims) > 1 and bool(
            in_dims[1])
    if name == "reshape":
        before_in = in_shapes[0][:in_dims[0][0]] if in_dims[0] else ()
        before_out = out_shapes[0][:out_dims[0]] if out_dims else ()
        return int(np.prod(before_in)) != int(np.prod(before_out))
    if name == "transpose" or name == "broadcast_in_dim" or name == "squeeze" \
            or name == "expand_dims":
        return False
    if name in ("gather", "scatter-add", "scatter_add", "scatter", "scatter-mul",
                "scatter_mul", "scatter-min", "scatter-max", "scatter_min", "scatter_max"):
        return indexes_batch(op, in_dims) is not None
    if name == "scan":  # a scan along the batch carries one example's state to the next
        first_xs = op.params["num_consts"] + op.params["num_carry"]
        return any(0 in dims for dims in in_dims[first_xs:])
    if name in ("dynamic_slice", "dynamic_update_slice"):
        operand = in_shapes[0]
        if name == "dynamic_slice":
            sizes = op.params["slice_sizes"]
            return any(sizes[d] != operand[d] for d in in_dims[0])
        update = in_shapes[1]
        return any(update[d] != operand[d] for d in in_dims[0])
    return bool(batch_in) and not out_dims


def indexes_batch(op, in_dims: list[tuple]):
    """For a gather or scatter: the operand's batch dimension its indices select along (or
    ``None`` when each example's slice comes from its own row or the operand has none)."""
    numbers = op.params["dimension_numbers"]
    operand_dims = in_dims[0]
    if op.prim.name == "gather":
        mapped = numbers.start_index_map
        batching = getattr(numbers, "operand_batching_dims", ())
    else:
        mapped = numbers.scatter_dims_to_operand_dims
        batching = getattr(numbers, "operand_batching_dims", ())
    for d in operand_dims:
        if d in mapped and d not in batching:
            return d
    return None


def reduction_form(op, forms: list[Form], in_dims: list[tuple], mixing: bool = False) -> Form:
    """The form of an operation reading per-example values and making a value without a batch
    dimension: a sum, an extremum, or neither.

    A loop (``scan``, ``while``) is one operation here: one that does not run along the batch
    is taken as a sum over examples (what the backward pass of a scan over layers or time
    accumulates, the weight gradients); its body is not inspected.
    """
    name = op.prim.name
    examples = [f for f in forms if f.kind == "E"]
    statistics = [f for f in forms if f.kind not in ("C", "E")]
    exact = all(f.exact for f in examples) and not statistics
    why = next((f.why for f in examples if not f.exact), "")
    if name in _SUMS or (name in _BODIES and not mixing):
        form = Form("S")
        return form if exact else form.inexact(why or f"{name} reads a batch statistic")
    if name in _EXTREMA:
        return Form("MAX") if exact else Form("X", exact=False, why=why or name)
    return Form("X", exact=False, why=why or f"{name} reduces over the examples")


def statistic_form(op, forms: list[Form], literal_scale: float | None, m: int) -> Form:
    """The form of an operation reading per-micro-batch statistics (no per-example values).

    Args:
      literal_scale: for a multiplication or division by a constant that depends on the batch
        size (kept at the micro-batch's value), the factor taken from global to micro value.
    """
    name = op.prim.name
    varying = [(k, f) for k, f in enumerate(forms) if f.kind != "C"]
    first = varying[0][1]
    same = all(f.kind == first.kind and np.isclose(f.rho, first.rho) for _, f in varying)
    exact = all(f.exact for _, f in varying)
    why = next((f.why for _, f in varying if not f.exact), "")

    def done(form: Form) -> Form:
        if form.kind == "S" and np.isclose(form.rho, 1.0 / m) and m > 1:
            form = dataclasses.replace(form, mean=True)
        return form if exact else form.inexact(why)

    if first.kind == "X":
        return Form("X", exact=False, why=why or first.why)
    if name == WEIGHTED_MEAN_NAME and [k for k, _ in varying] == [0]:
        return done(first)
    position = varying[0][0]
    operand_ok = {"select_n": position >= 1, "dynamic_update_slice": position <= 1}.get(
        name, position == 0 or name not in ("gather", "dynamic_slice", "pad"))
    if name in _LINEAR and len(varying) == 1 and operand_ok and not (
            name == "convert_element_type"
            and not np.issubdtype(op.params["new_dtype"], np.inexact)):
        return done(first)
    if first.kind == "MAX":
        return Form("X", exact=False, why=f"{name} of a maximum over examples")
    if name in _ADDITIVE and same:
        if len(varying) == len(forms):
            return done(first)
        if first.mean:
            return done(first)  # a mean plus a constant: still the mean of the micro-batches'
        return Form("X", exact=False, why=f"{name} adds a constant to a sum over examples")
    if name in ("mul", "dot_general") and len(varying) == 1:
        form = first if literal_scale is None else dataclasses.replace(
            first, rho=first.rho * literal_scale, mean=False)
        return done(form)
    if name == "div" and [k for k, _ in varying] == [0]:
        form = first if literal_scale is None else dataclasses.replace(
            first, rho=first.rho * literal_scale, mean=False)
        return done(form)
    if name in ("div", "mul", "dot_general"):
        return Form("X", exact=False, why=f"{name} of two sums over examples (a ratio or "
                                            f"product of batch statistics)")
    return Form("X", exact=False, why=f"{name} of a sum over examples")


class FormsPass:
    """Methods of the region splitter (``_regions._Splitter``, whose state they use) that give
    every micro-batch value its form, choose each batch-size constant's value, and move work
    that is exact only over the global batch to the apply region."""

    def _forms(self) -> dict[int, Form]:
        forms: dict[int, Form] = {v: Form("E") for v in self.batch_inputs}
        for e in self.entries:
            if e.region != "M":
                continue
            op = e.micro
            ins = op.value_inputs()
            in_forms = [forms.get(v, CONST) for v in ins]
            varying = [f for f in in_forms if f.kind != "C"]
            scale = None if e.inserted else self._choose_literals(e, varying)
            in_dims = [self.dims.get(v, ()) for v in ins]
            for v in op.outputs:  # a loop's outputs: per example or not, each its own form
                out_dims = self.dims.get(v, ())
                if not varying:
                    forms[v] = Form("E") if out_dims else CONST
                elif out_dims:
                    forms[v] = self._example_form(op, ins, in_forms, out_dims)
                elif any(f.kind == "E" for f in varying):
                    mixing = op.prim.name in _BODIES and mixes_examples(
                        op, in_dims, (), [self._micro_aval(x).shape for x in ins], [])
                    forms[v] = reduction_form(op, in_forms, in_dims, mixing)
                else:
                    forms[v] = statistic_form(op, in_forms, scale, self.m)
            if op.prim.name == "weighted_mean" and len(op.inputs) > 1 and \
                    forms.get(op.inputs[1], CONST).kind != "C":
                raise PlanError(
                    "parallel.weighted_mean: its count depends on the model's parameters (it is "
                    "computed from the forward pass), so PipeshardParallel cannot take it over "
                    "the global batch before the micro-batches run; compute the count from the "
                    "batch alone (e.g. jnp.sum(batch['mask']))")
        return forms

    def _example_form(self, op, ins, in_forms, out_dims) -> Form:
        if any(f.kind in ("S", "MAX", "X") for f in in_forms):
            return Form("E", exact=False,
                        why="per-example work reads a statistic of the micro-batch (e.g. batch "
                            "norm's mean and variance)")
        bad = next((f for f in in_forms if f.kind == "E" and not f.exact), None)
        if bad is not None:
            return Form("E", exact=False, why=bad.why)
        in_dims = [self.dims.get(v, ()) for v in ins]
        if op.prim.name in INDEXED and len(ins) > 1 and op.inputs[1] in self.self_index:
            mixing = False
        else:
            mixing = mixes_examples(op, in_dims, out_dims,
                                    [self._micro_aval(v).shape for v in ins],
                                    [self._micro_aval(v).shape for v in op.outputs])
        if op.prim.name in INDEX_PATH and any(v in self.self_index for v in ins):
            self.self_index.update(op.outputs)
        if mixing and op.prim.name in _SELECTIONS and op.outputs:
            self.selections[op.outputs[0]] = op.prim.name
        if mixing:
            return Form("E", exact=False, why=f"{op.prim.name} mixes the examples of a "
                                               f"micro-batch")
        return Form("E")

    def _check_selections(self) -> None:
        """Per-micro-batch work that picks examples by position over the batch (a slice or a
        gather along it) would pick other rows in each micro-batch: refused."""
        for e in self.entries:
            if e.region == "M" and e.glob.outputs and e.glob.outputs[0] in self.selections:
                name = self.selections[e.glob.outputs[0]]
                raise PlanError(
                    f"the step's operation {name} picks examples by their position in the batch "
                    f"(output shape {tuple(self.avals[e.glob.outputs[0]].shape)}) in work the "
                    f"backward pass depends on; split into micro-batches it would pick other "
                    f"examples, so PipeshardParallel cannot run it exactly. Select per example "
                    f"(a mask, jnp.take_along_axis) or move it after the backward pass")

    def _choose_literals(self, e, varying: list[Form]) -> float | None:
        """Constants that depend on the batch size: the global value, except where they scale a
        statistic of the micro-batch. Returns the factor from micro to global (mul/div)."""
        micro_lits = [(k, a) for k, a in enumerate(e.micro.inputs)
                      if isinstance(a, jax_core.Literal)]
        scale = None
        statistic = any(f.kind in ("S", "MAX", "X") for f in varying)
        inputs = list(e.micro.inputs)
        for k, a in micro_lits:
            g = e.glob.inputs[k]
            if np.array_equal(np.asarray(a.val), np.asarray(g.val)):
                continue
            if statistic:
                if e.micro.prim.name == "mul":
                    scale = float(g.val) / float(a.val)
                elif e.micro.prim.name == "div" and k == 1:
                    scale = float(a.val) / float(g.val)
            else:
                inputs[k] = g
        e.micro = dataclasses.replace(e.micro, inputs=inputs)
        return scale

    def _tails(self, forms: dict[int, Form]) -> None:
        """Work after the last per-example step that is not exact per micro-batch (a maximum or
        a sort over examples, a ratio of sums) runs in ``A`` on the combined values."""
        consumers = self._consumers()
        for k in range(len(self.entries) - 1, -1, -1):
            e = self.entries[k]
            if e.region != "M" or e.inserted or not e.glob.outputs:
                continue
            form = forms.get(e.glob.outputs[0], CONST)
            exact = form.exact and form.kind in ("E", "S", "C")
            if exact:
                continue
            if any(self.entries[c].region == "M" for v in e.glob.outputs
                   for c in consumers.get(v, ())):
                continue
            # Inputs made per micro-batch must combine exactly; per-micro-batch constants
            # (a micro-batch's key) have no global value to read.
            ins = [forms[v] for v in e.glob.value_inputs() if v in forms]
            if all(f.exact and f.kind in ("E", "S") for f in ins):
                e.region = "A"
                e.glob = substitute(e.glob, self.origin)
