"""Per-step values the micro-batch work reads that differ between micro-batches.

Part of the region split (``parallel.pipeline._regions``): batch-shaped per-step values (a mask's
broadcast, random bits) are recomputed per micro-batch at its size; positions over the batch
(``jnp.arange(x.shape[0])``) are sliced from the global ones, or, where they select each
example's own row (``x[jnp.arange(n), labels]``), recomputed for the micro-batch after checking
that they do; random keys entering the micro-batch work become ``fold_in(key, i)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from parallel._errors import PlanError
from parallel.pipeline import _forms
from parallel.pipeline._forms import INDEX_PATH, INDEXED
from parallel.pipeline._program import Op, emit, evaluate


def is_key(aval) -> bool:
    return jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key)


class PerMicroBatchValues:
    """Methods of the region splitter (``_regions._Splitter``, whose state they use) that
    make per-step values per micro-batch."""

    def _per_micro_batch_values(self) -> None:
        """Per-step values the micro-batch work reads that are not the same for every
        micro-batch: batch-shaped values (broadcasts, positions over the batch, constants) and
        random keys."""
        g = self.t.glob
        consumers = self._consumers()
        producer = {v: k for k, e in enumerate(self.entries) for v in e.glob.outputs}
        category: dict[int, str] = {}
        for v, c in g.consts.items():
            category[v] = "positional" if v in self.dims else "plain"
        for e in self.entries:
            if e.region != "N":
                continue
            op, ins = e.glob, e.glob.value_inputs()
            out_dims = self.dims.get(op.outputs[0], ()) if op.outputs else ()
            kinds = {category.get(v, "plain") for v in ins}
            if any(is_key(self.avals[v]) for v in ins) or "random" in kinds:
                kind = "random"
            elif "positional" in kinds or (op.prim.name == "iota" and op.params.get(
                    "dimension") in out_dims) or (any(v in self.dims for v in ins) and (
                    not out_dims or _forms.mixes_examples(
                        op, [self.dims.get(v, ()) for v in ins], out_dims,
                        [self.avals[v].shape for v in ins],
                        [self.avals[v].shape for v in op.outputs]))):
                kind = "positional"
            else:
                kind = "plain"
            for v in op.outputs:
                category[v] = kind
        outputs = {v for v in g.outputs if isinstance(v, int)}
        moved = [False] * len(self.entries)
        for k in range(len(self.entries) - 1, -1, -1):
            e = self.entries[k]
            if e.region != "N" or e.inserted or not e.glob.outputs:
                continue
            kind = category.get(e.glob.outputs[0])
            batch_shaped = any(v in self.dims for v in e.glob.outputs)
            if kind == "random" and self.m == 1 and not batch_shaped:
                continue
            if not (kind == "random" or (kind == "plain" and batch_shaped)):
                continue
            if any(v in outputs for v in e.glob.outputs):
                continue
            readers = [c for v in e.glob.outputs for c in consumers.get(v, ())]
            if readers and all(self.entries[c].region == "M" or moved[c] for c in readers):
                moved[k] = True
        for k, e in enumerate(self.entries):
            if moved[k]:
                e.region = "M"
        # What the micro-batch work still reads from N: folds, slices, local positions.
        fold, slices, local = {}, {}, {}
        for k, e in enumerate(self.entries):
            if e.region != "M":
                continue
            for v in e.glob.value_inputs():
                if v in fold or v in slices or v in local:
                    continue
                k_in = producer.get(v)
                made_in_m = k_in is not None and self.entries[k_in].region == "M"
                if made_in_m or v in self.batch_inputs:
                    continue
                if is_key(self.avals[v]):
                    if self.m > 1:
                        fold[v] = None
                elif v in self.dims:
                    kind = category.get(v, "plain")
                    if kind == "positional" and self._used_as_index(v, consumers):
                        local[v] = None
                    else:
                        slices[v] = None
        if fold:
            self.notes.append("per micro-batch: random keys are fold_in(key, micro-batch "
                              "index), as train.grad_accum_steps draws them")
        mapping = {v: self._local_positions(v) for v in local}
        for v in fold:
            ops, out = self._emit(_fold_in, [v, self._micro_index()])
            self._insert(self._producer_anchor(v), ops, "M")
            mapping[v] = out[0]
        for v in slices:
            dims = self.dims[v]
            if len(dims) > 1:
                raise PlanError(
                    f"a per-step value of shape {self.avals[v].shape} has {len(dims)} "
                    f"dimensions that grow with the batch and is read per micro-batch; "
                    f"PipeshardParallel cannot split it into micro-batches")
            d = dims[0]
            size = self.t.micro.avals[v].shape[d]
            ops, out = self._emit(lambda x, i, d=d, size=size: jax.lax.dynamic_slice_in_dim(
                x, i * size, size, d), [v, self._micro_index()])
            self._insert(self._producer_anchor(v), ops, "M")
            self.dims[out[0]] = dims
            mapping[v] = out[0]
        self.origin.update({new: old for old, new in mapping.items()})
        if mapping:
            skip = {k for k, e in enumerate(self.entries) if e.inserted and e.region == "M"
                    and any(v in mapping for v in e.glob.value_inputs())}
            self._rewire(mapping, regions=("M",), skip=skip)

    def _emit(self, fn, inputs):
        return emit(fn, inputs, self.avals, self.consts)

    def _used_as_index(self, v: int, consumers) -> bool:
        """Whether the micro-batch work reads ``v`` only to select rows along the batch
        dimension of a per-example operand (``x[jnp.arange(n), labels]``)."""
        uses, stack, seen = set(), [v], set()
        while stack:
            x = stack.pop()
            for c in consumers.get(x, ()):
                e = self.entries[c]
                if e.region != "M" or c in seen:
                    continue
                seen.add(c)
                op = e.glob
                if op.prim.name in INDEXED and len(op.inputs) > 1 and op.inputs[1] == x \
                        and _forms.indexes_batch(op, [self.dims.get(a, ()) if isinstance(
                            a, int) else () for a in op.inputs]) is not None:
                    uses.add("index")
                elif op.prim.name in INDEX_PATH:
                    stack.extend(op.outputs)
                else:
                    uses.add("data")
        return uses == {"index"}

    def _local_positions(self, v: int) -> int:
        """Recomputes a position-over-the-batch value at the micro-batch's size, after checking
        that it selects each example's own row (so the micro-batch's rows are the same)."""
        producer = {x: k for k, e in enumerate(self.entries) for x in e.glob.outputs}
        cone, stack = [], [v]
        while stack:
            x = stack.pop()
            k = producer.get(x)
            if k is None:
                if x in self.t.glob.inputs:
                    raise PlanError(self._index_message(v))
                continue
            if k not in cone:
                cone.append(k)
                stack.extend(self.entries[k].glob.value_inputs())
        cone.sort()
        glob_env, micro_env = dict(self.t.glob.consts), dict(self.t.micro.consts)
        evaluate([self.entries[k].glob for k in cone], glob_env)
        evaluate([self.entries[k].micro for k in cone], micro_env)
        b, d = self.t.micro_batch, self.dims[v][0]
        full, part = np.asarray(glob_env[v]), np.asarray(micro_env[v])
        # Which entries of the index vectors select along the batch (all, unless ``v`` is the
        # indices of a gather or scatter itself).
        offset = np.full(part.shape, b)
        components = self._batch_components(v)
        if components is not None:
            offset = np.zeros(part.shape, np.int64)
            offset[..., components] = b
        for i in range(self.m):
            rows = np.take(full, range(i * b, (i + 1) * b), axis=d)
            local = rows - i * offset
            if not np.issubdtype(part.dtype, np.integer) or rows.shape != part.shape or \
                    not np.array_equal(local, part) or np.any((offset > 0) & (
                        (part < 0) | (part >= b))):
                raise PlanError(self._index_message(v))
        mapping, copies = {}, []
        for k in cone:
            op = self.entries[k].micro
            outputs = []
            for x in op.outputs:
                mapping[x] = len(self.avals)
                self.avals.append(self.t.micro.avals[x])
                outputs.append(mapping[x])
                if x in self.dims:
                    self.dims[mapping[x]] = self.dims[x]
            copies.append(Op(op.prim, op.params, [mapping.get(a, a) if isinstance(a, int)
                                                  else a for a in op.inputs], outputs, False))
        self._insert(self.entries[cone[-1]].anchor, copies, "M")
        self.self_index.add(mapping[v])
        return mapping[v]

    def _batch_components(self, v: int) -> list[int] | None:
        """The index-vector entries of ``v`` that select along a batch dimension, when every
        reader of ``v`` is a gather or scatter taking it as its indices; else ``None``."""
        components = set()
        for e in self.entries:
            op = e.glob
            if e.region != "M" or v not in op.value_inputs():
                continue
            if op.prim.name not in INDEXED or op.inputs[1] != v or v in op.inputs[:1] + \
                    op.inputs[2:]:
                return None
            numbers = op.params["dimension_numbers"]
            mapped = (numbers.start_index_map if op.prim.name == "gather"
                      else numbers.scatter_dims_to_operand_dims)
            dims = self.dims.get(op.inputs[0], ()) if isinstance(op.inputs[0], int) else ()
            components.update(k for k, dim in enumerate(mapped) if dim in dims)
        return sorted(components)

    def _index_message(self, v: int) -> str:
        return (f"the step selects rows along the batch dimension with indices of shape "
                f"{self.avals[v].shape} that do not each pick the example's own row; split into "
                f"micro-batches they would pick rows of other micro-batches. PipeshardParallel "
                f"cannot run it exactly: index per example (jnp.take_along_axis) instead")


def _fold_in(key, index):
    data = index.astype(jnp.uint32)
    if key.shape == ():
        return jax.random.fold_in(key, data)
    flat = key.reshape(-1)
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(flat).reshape(key.shape)
