"""Runs a placed program: one jitted program per task on its stage's sub-mesh, a static schedule
issued from Python (asynchronous dispatch overlaps the stages), device-to-device transfers
between sub-meshes, and the values leaving the micro-batch region accumulated inside the
programs that make them.

A step issues, per stage, one program per micro-batch and kind of task (forward, backward)
plus a few per step: the per-step work, one split of the batch, one creation of the
accumulators and one finish of them, and the update. Nothing in a step reads an array back to
the host.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel._transfer import copy_all, copy_to, transfer
from parallel.pipeline._program import Program, Regions
from parallel.pipeline._schedule import issue_order
from parallel.pipeline._stages import Placement
from parallel.pipeline._task_programs import TaskPrograms, rank_of
from parallel.pipeline._tasks import (Accumulator, accumulators, build_tasks, combine_of,
                                      made_by, primary_kind, weights_read)



class StageRunner(TaskPrograms):
    """Executes the tasks of a placed program on the stage meshes, per a schedule.

    Args:
      program: the step flattened (traced on one micro-batch).
      regions: its regions.
      placement: where each op runs.
      meshes: one ``Mesh`` per stage (with virtual stages, several stages share a mesh).
      num_micro_batches: micro-batches per step.
      schedule: ``"1f1b"``, ``"gpipe"``, ``"interleaved"`` or ``"forward"`` (no backward).
      output_stage: per flat output leaf, the stage it is returned on.
      remat: backward tasks recompute their stage's forward.
      specs: per stage, value id -> spec the stage's intra-op plan gives it (parameters).
      same_as: value id -> input value id it replaces (the new state takes the old's layout).
      virtual_stages: stages per mesh (interleaved 1F1B); stage ``k`` runs on mesh
        ``k % (len(meshes) / virtual_stages)``.
    """

    def __init__(self, program: Program, regions: Regions, placement: Placement,
                 meshes: list[Mesh], num_micro_batches: int, schedule: str,
                 output_stage: list[int], remat: bool = False,
                 specs: dict[int, dict[int, PartitionSpec]] | None = None,
                 same_as: dict[int, int] | None = None, virtual_stages: int = 1):
        self.program, self.regions, self.placement = program, regions, placement
        self.meshes = meshes
        self.num_micro_batches = m = num_micro_batches
        self.schedule = schedule
        self.virtual_stages = virtual_stages
        self.output_stage = output_stage
        self.specs = specs or {}
        self.same_as = same_as or {}
        self.donated: set[int] = set()
        self.tasks = build_tasks(program, regions, placement, remat)
        made = made_by(program, self.tasks)
        for key, accs in accumulators(program, regions, m, made).items():
            self.tasks[key].accumulates = accs
        for key, w in weights_read(self.tasks, made):  # a weight from another stage's task
            self.tasks[key].inputs.append(w)
            if w not in self.tasks[made[w]].outputs:
                self.tasks[made[w]].outputs.append(w)
        self.order = issue_order(schedule, placement.num_stages // virtual_stages, m,
                                 virtual_stages)
        self.index_value = regions.micro_batch_index
        self.per_micro_batch = {v for i, p in enumerate(placement.phase) if p in "FB"
                                for v in program.ops[i].outputs}
        self.batch_inputs = [v for v in program.inputs if v in regions.batch_dim]
        self.per_micro_batch.update(self.batch_inputs)
        self.crossing = set(regions.crossing)
        self._output_ids = {v for v in program.outputs if isinstance(v, int)}
        # Stored leaves that only the update reads (an optimizer's moments): no micro-batch
        # task and no per-step work before them needs them whole.
        before_update = {v for k, t in self.tasks.items() if k[0] in "NFB" for v in t.inputs}
        self._update_only = {v for v in program.inputs
                             if v not in regions.batch_dim and v not in before_update}
        # A per-step value made from a stored leaf of the same shape (the decayed moments, the
        # update, a cast) takes that leaf's layout rather than a replicated one.
        self._like: dict[int, int] = {}
        stored = {v for v in program.inputs if v not in regions.batch_dim}
        for i, op in enumerate(program.ops):
            if placement.phase[i] in "FB":
                continue
            sources = [self._like.get(v, v) for v in op.value_inputs()
                       if v in stored or v in self._like]
            for out in op.outputs:
                shape = program.avals[out].shape
                match = [v for v in sources if program.avals[v].shape == shape]
                if match and len(shape) and out not in self.same_as:
                    self._like[out] = match[0]
        # Per (per-micro-batch value, stage): how many times its copy there is read before it
        # can go (each task on that stage reading it; for the original, also each copy made
        # from it for another stage).
        self._reads: dict[tuple[int, int], int] = {}
        for key, task in self.tasks.items():
            if key[0] in "FB":
                for v in task.inputs:
                    if v in self.per_micro_batch:
                        source = placement.value_stage.get(v, placement.home.get(v))
                        self._reads[(v, task.stage)] = self._reads.get((v, task.stage), 0) + 1
                        if task.stage != source and (v, task.stage, "copy") not in self._reads:
                            self._reads[(v, task.stage, "copy")] = 1
                            self._reads[(v, source)] = self._reads.get((v, source), 0) + 1
        self._reads = {k: n for k, n in self._reads.items() if len(k) == 2}
        self._splits: dict[int, list[int]] = {}
        for v in self.batch_inputs:
            self._splits.setdefault(placement.home[v], []).append(v)
        self._accs: dict[int, list[Accumulator]] = {}
        for key in sorted(k for k in self.tasks if k[0] in "FB"):
            if self.tasks[key].accumulates:
                self._accs.setdefault(key[1], []).extend(self.tasks[key].accumulates)
        # Per stage, the crossing values its accumulators finish into (in the finish's order).
        self._finished = {s: [a.value for a in accs if a.value in self.crossing
                              and a.kind == primary_kind(combine_of(regions, a.value))]
                          for s, accs in self._accs.items()}
        self._per_step = sorted((k for k in self.tasks if k[0] in "NLA"), key=rank_of)
        self._const_cache: dict[tuple[int, int], Any] = {}
        self._index_cache: dict[tuple[int, int], Any] = {}
        self._jitted: dict[tuple, Any] = {}
        # XLA's CPU client runs the collectives of simulated devices on a shared thread pool:
        # many multi-device programs in flight at once can starve a rendezvous until XLA aborts
        # the process (seen with a 1-stage x 8-device run issued without waiting). On CPUs at
        # most ``in_flight`` programs run while the next is issued: Python prepares and issues
        # a task while the previous one computes, and the program issued ``in_flight`` launches
        # earlier is waited for. ``None``: no wait (other platforms, and CPU stages of one
        # device each: their programs have no collective to rendezvous); ``0``: wait for each.
        collectives = any(mesh.size > 1 for mesh in meshes)
        self.in_flight: int | None = (1 if meshes[0].devices.flat[0].platform == "cpu"
                                      and collectives else None)
        # Set to a list to record, per stage, the most bytes per device of per-micro-batch values
        # (activations and their gradients) alive at once during a step.
        self.peak_live_bytes: list[int] | None = None
        # Of the last step: programs and transfers issued, seconds issuing them (Python) and
        # seconds waiting for programs to finish (CPU devices only).
        self.last_step: dict[str, float] = {}
        # Per F/B task key, what issuing it needs, worked out once (``_issue_plan``).
        self._issue: dict[tuple, tuple] = {}

    # Called with no arguments after each program finished (CPU devices; each program is then
    # waited for before the next is issued), e.g. to sample the arrays alive during a step.
    after_program: Callable[[], None] | None = None

    # ----- counts ---------------------------------------------------------------------------
    def programs_per_step(self) -> dict[str, int]:
        """Programs one step issues: ``per_micro_batch`` tasks run ``M`` times each, plus
        ``per_step`` ones (per-step work, batch splits, accumulator creation and finish,
        update); ``total = per_micro_batch * M + per_step``."""
        micro = sum(1 for k in self.tasks if k[0] in "FB")
        per_step = (len(self._per_step) + len(self._splits) + 2 * len(self._accs))
        return {"per_micro_batch": micro, "per_step": per_step,
                "total": micro * self.num_micro_batches + per_step}

    # ----- one step -------------------------------------------------------------------------
    def __call__(self, flat_args: list) -> list:
        program, placement, m = self.program, self.placement, self.num_micro_batches
        start, waited = time.perf_counter(), 0.0
        counts = {"programs": 0, "transfers": 0}
        step: dict[int, dict[int, Any]] = {}
        micro: list[dict[int, dict[int, Any]]] = [{} for _ in range(m)]
        reads = [dict(self._reads) for _ in range(m)]

        def read(v: int, stage: int, i: int) -> None:
            """One read of micro-batch ``i``'s copy of ``v`` on ``stage`` is done."""
            left = reads[i].get((v, stage))
            if left is None:
                return
            if left == 1:
                del reads[i][(v, stage)]
                copies = micro[i].get(v, {})
                copies.pop(stage, None)
                if not copies:
                    micro[i].pop(v, None)
            else:
                reads[i][(v, stage)] = left - 1

        window = 0 if self.after_program is not None else self.in_flight
        pending: list = []

        def launch(key, args):
            nonlocal waited
            outs = self.jitted(key)(*args)
            counts["programs"] += 1
            if window is not None:  # (outputs donated to a later program since are skipped)
                pending.append(outs)
                if len(pending) > window:
                    began = time.perf_counter()
                    jax.block_until_ready([x for x in pending.pop(0) if not x.is_deleted()])
                    waited += time.perf_counter() - began
                    if self.after_program is not None:
                        self.after_program()
            return outs

        def bring(vs: list[int], stage: int, i: int) -> None:
            """Micro-batch ``i``'s values ``vs`` made on other stages, copied onto ``stage`` in
            one batched device-to-device transfer (one process)."""
            table, xs, origins = micro[i], [], []
            for v in vs:
                copies = table.get(v)
                if copies is not None and stage not in copies:
                    origins.append(self.source_stage(v))
                    xs.append((v, copies[origins[-1]]))
            if not xs:
                return
            moved = copy_all([x for _, x in xs], self.meshes[stage])
            counts["transfers"] += len(xs)
            for (v, _), y, origin in zip(xs, moved, origins):
                table[v][stage] = y
                read(v, origin, i)

        def get(v: int, stage: int, i: int | None):
            if v == self.index_value:
                return self._index(stage, i)
            table = micro[i] if i is not None and v in self.per_micro_batch else step
            if v not in table:  # a closed-over constant
                if (v, stage) not in self._const_cache:
                    self._const_cache[(v, stage)] = jax.device_put(
                        program.consts[v], self.sharding(v, stage))
                return self._const_cache[(v, stage)]
            copies = table[v]
            if stage not in copies:
                origin = self.source_stage(v)
                if jax.process_count() > 1:
                    copies[stage] = transfer(copies[origin], self.sharding(v, stage))
                else:
                    copies[stage] = copy_to(copies[origin], self.meshes[stage])
                counts["transfers"] += 1
                if table is not step:
                    read(v, origin, i)
            return copies[stage]

        for v, arg in zip(program.inputs, flat_args):  # batch leaves whole: per-step tasks
            step[v] = {placement.home[v]: arg}
        by_value = dict(zip(program.inputs, flat_args))
        for stage, vs in self._splits.items():
            pieces = launch(("split", stage), [by_value[v] for v in vs])
            for i in range(m):
                for k, v in enumerate(vs):
                    micro[i][v] = {stage: pieces[i * len(vs) + k]}
            del pieces  # each micro-batch's piece goes once its last reader ran
        del by_value
        for key in self._per_step:
            if key[0] == "N":
                task = self.tasks[key]
                outs = launch(key, [get(v, task.stage, None) for v in task.inputs])
                for v, x in zip(task.outputs, outs):
                    step[v] = {task.stage: x}
        totals = {stage: list(launch(("zeros", stage), [])) for stage in self._accs}
        one_process = jax.process_count() == 1
        for kind, stage, i in self.order:
            key = (kind, stage)
            plan = self._issue.get(key) or self._issue_plan(key)
            if plan is None:
                continue
            task, own, concat, incoming, dropped = plan
            if one_process and incoming:
                bring(incoming, stage, i)
            args = [get(v, stage, i) for v in task.inputs]
            args += [totals[stage][k] for k in own]
            if concat:
                args.append(self._index(stage, i))
            outs = launch(key, args)
            del args  # no reference here keeps a micro-batch's values beyond their last reader
            n = len(task.outputs)
            for v, x in zip(task.outputs, outs[:n]):
                micro[i][v] = {stage: x}
            for k, x in zip(own, outs[n:]):
                totals[stage][k] = x
            outs = x = None
            for v in dropped:
                read(v, stage, i)
            if self.peak_live_bytes is not None:
                self._record_live(micro)
        for stage in self._accs:
            finished = launch(("finish", stage), totals.pop(stage))
            for v, x in zip(self._finished[stage], finished):
                step[v] = {stage: x}
        for key in self._per_step:
            if key[0] in "LA":
                task = self.tasks[key]
                outs = launch(key, [get(v, task.stage, None) for v in task.inputs])
                for v, x in zip(task.outputs, outs):
                    step[v] = {task.stage: x}
        results = []
        for v, stage in zip(program.outputs, self.output_stage):
            if isinstance(v, int):  # the original: the caller lays it out as the plan says
                source = self.source_stage(v)
                results.append(get(v, stage if source is None else source, None))
            else:
                results.append(self._literal(v.val, stage))
        self.last_step = {**counts, "wait_s": waited,
                          "host_s": time.perf_counter() - start - waited}
        return results

    def _issue_plan(self, key: tuple) -> tuple | None:
        """For F/B task ``key``: the task, the positions of its accumulators in its stage's
        list, whether it takes the micro-batch index, the per-micro-batch inputs made on other
        stages (copied in before it runs) and those whose copy on its stage it reads (one
        read each, done once it ran). ``None``: the schedule names a task the program lacks."""
        task = self.tasks.get(key)
        if task is None:
            self._issue[key] = None
            return None
        accs = self._accs[task.stage] if task.accumulates else []
        own = [accs.index(a) for a in task.accumulates]
        concat = any(a.kind == "concat" for a in task.accumulates)
        incoming = [v for v in task.inputs if v in self.per_micro_batch
                    and v != self.index_value and self.source_stage(v) != task.stage]
        dropped = [v for v in task.inputs if (v, task.stage) in self._reads]
        self._issue[key] = (task, own, concat, incoming, dropped)
        return self._issue[key]

    def _index(self, stage: int, i: int):
        """Micro-batch index ``i`` as an int32 scalar on the stage (made once)."""
        key = (stage, i)
        if key not in self._index_cache:
            self._index_cache[key] = jax.device_put(
                np.int32(i), NamedSharding(self.meshes[stage], PartitionSpec()))
        return self._index_cache[key]

    def _literal(self, value, stage: int):
        key = ("literal", repr(value), stage)
        if key not in self._const_cache:
            self._const_cache[key] = jax.device_put(
                jnp.asarray(value), NamedSharding(self.meshes[stage], PartitionSpec()))
        return self._const_cache[key]

    def _record_live(self, micro) -> None:
        live = [0] * len(self.meshes)
        for table in micro:
            for copies in table.values():
                for stage, x in copies.items():
                    live[stage] += _per_device_bytes(x)
        self.peak_live_bytes = [max(a, b) for a, b in zip(self.peak_live_bytes, live)]


def _per_device_bytes(x) -> int:
    shard = x.addressable_shards[0].data
    return int(shard.size * shard.dtype.itemsize)
