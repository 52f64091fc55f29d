"""The pipelined step ``parallelize`` runs: placement of arguments, the run, and its report."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from parallel import mesh as mesh_lib
from parallel import profiles
from parallel._errors import PlanError
from parallel._hlo import collective_bytes
from parallel._transfer import place_outputs, transfer
from parallel.pipeline._memory import StageMemory, check_budget, runner_memory
from parallel.pipeline._schedule import bubble_fraction
from parallel.plan import LeafPlan, Plan
from parallel.report import Report, cost_figures


# Per (init function, leaves, shardings): the jitted program making one stage's state.
_INIT_PROGRAMS: dict[tuple, Any] = {}


class PipelinedStep:
    """A step split into stages: called like the function, reports like ``analyze``.

    Each state leaf lives on the sub-mesh of the stage that uses it (a ``NamedSharding`` over
    that sub-mesh), so checkpoints save and restore it like any other sharded array.
    """

    def __init__(self, fn, method, runner, abstract_args, flat_args, global_batch, layers,
                 choice, search, mirrors, batch_argnums, donate_argnums):
        self.fn, self.method, self.runner = fn, method, runner
        self.abstract_args = tuple(abstract_args)
        self.layers, self.choice = layers, choice
        self.compile_time_s = 0.0
        self.measured_stage_times_s: list[float] | None = None  # set by time_stages()
        self._compiled: dict[tuple, Any] = {}
        program, placement = runner.program, runner.placement
        self.in_treedef = jax.tree.structure(tuple(abstract_args))
        flat_in = []
        for v in program.inputs:
            stage = placement.home[v]
            flat_in.append(runner.batch_sharding(v, stage) if v in runner.regions.batch_dim
                           else runner.sharding(v, stage))
        offsets = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in abstract_args])
        runner.donated = {program.inputs[k] for i in donate_argnums
                          for k in range(offsets[i], offsets[i + 1])}
        out = jax.eval_shape(fn, *abstract_args)
        self.out_treedef = jax.tree.structure(out)
        flat_out = []
        for pos, (v, stage) in enumerate(zip(program.outputs, runner.output_stage)):
            if pos in mirrors:
                flat_out.append(flat_in[mirrors[pos]])
            elif isinstance(v, int):
                flat_out.append(runner.sharding(v, stage))
            else:
                flat_out.append(NamedSharding(runner.meshes[stage], PartitionSpec()))
        self.flat_in_shardings, self.flat_out_shardings = flat_in, flat_out
        self._fresh_outputs = [pos not in mirrors for pos in range(len(flat_out))]  # metrics
        unflat = jax.tree.unflatten(self.in_treedef, flat_in)
        self.in_shardings = tuple(unflat)
        self.out_shardings = jax.tree.unflatten(self.out_treedef, flat_out)
        virtual = runner.virtual_stages
        num_stages = len(choice.sizes) // virtual  # groups of devices (virtual stages share one)
        num_devices = sum(choice.sizes[:num_stages])
        shapes = [dict(mesh.shape) for mesh in runner.meshes]
        if all(shape == shapes[0] for shape in shapes):
            mesh_shape = {"stage": num_stages, **shapes[0]}
        else:
            mesh_shape = {"devices": num_devices}
        devices = [d for mesh in runner.meshes[:num_stages] for d in mesh.devices.flat]
        self.mesh = mesh_lib.make_mesh(mesh_shape, devices)
        stage_of_flat = [placement.home[v] for v in program.inputs]
        inputs, k = [], 0
        leaf_stages = []
        for arg in abstract_args:
            flat, _ = jax.tree_util.tree_flatten_with_path(arg)
            inputs.append(tuple(
                LeafPlan(jax.tree_util.keystr(kp), tuple(leaf.shape), np.dtype(leaf.dtype).name
                         if _is_numeric(leaf) else str(leaf.dtype), flat_in[k + j].spec)
                for j, (kp, leaf) in enumerate(flat)))
            leaf_stages.append(stage_of_flat[k:k + len(flat)])
            k += len(flat)
        out_flat, _ = jax.tree_util.tree_flatten_with_path(out)
        outputs = tuple(
            LeafPlan(jax.tree_util.keystr(kp), tuple(leaf.shape), str(leaf.dtype), sh.spec)
            for (kp, leaf), sh in zip(out_flat, flat_out))
        self.stage_info = self._stage_info(global_batch)
        extras = {"num_micro_batches": runner.num_micro_batches, "schedule": runner.schedule,
                  "bubble_fraction": bubble_fraction(num_stages, runner.num_micro_batches,
                                                     virtual),
                  "virtual_stages": virtual,
                  "stages": self.stage_info, "leaf_stages": leaf_stages, "search": search}
        extras["explanation"] = format_stages(extras)
        self.plan = Plan("pipeshard", mesh_shape, tuple(inputs), outputs,
                         batch_argnums=tuple(batch_argnums), donate_argnums=tuple(donate_argnums),
                         extras=extras)
        self.check_memory(getattr(method, "memory_budget_bytes", None))

    def check_memory(self, budget: float | None) -> None:
        """Refuses (``PlanError``, one line) a split whose most loaded device needs more than
        ``budget`` bytes: first by the placed pipeline's bytes, then with XLA's temporaries of
        every compiled stage program (so a budget compiles the programs at plan time)."""
        if budget is None:
            return
        sizes = sorted(set(self.choice.sizes))
        v = self.runner.virtual_stages
        what = (f"{len(self.choice.sizes) // v} stages"
                + (f" x {v} virtual stages" if v > 1 else "") + " of "
                f"{' or '.join(map(str, sizes))} device{'s' if sizes != [1] else ''}")
        check_budget(runner_memory(self.runner), budget, what)
        check_budget(runner_memory(self.runner, self.compile_all()), budget, what)

    def _stage_info(self, global_batch: int) -> list[dict]:
        info = []
        starts = list(self.choice.starts) + [self.layers.count]
        offset = 0
        for s, size in enumerate(self.choice.sizes):
            mesh = self.runner.meshes[s]
            info.append({
                "stage": s,
                "layers": [int(starts[s]), int(starts[s + 1]) - 1],
                "devices": [int(d.id) for d in mesh.devices.flat],
                "submesh": [1, int(size)],  # (hosts, devices per host)
                "intra_op_mesh": {k: int(v) for k, v in mesh.shape.items()},
                "micro_batch_size": global_batch // self.runner.num_micro_batches,
                "predicted_time_per_micro_batch_s": float(self.choice.stage_times_s[s]),
                "sends_bytes_per_micro_batch": float(self.layers.cut_bytes[int(starts[s + 1]) - 1])
                if s + 1 < len(self.choice.sizes) else 0.0,
            })
            offset += size
        return info

    # ----- running --------------------------------------------------------------------------
    def __call__(self, *args):
        flat, treedef = jax.tree.flatten(tuple(args))
        if treedef != self.in_treedef:
            raise PlanError(f"arguments have structure {treedef}, the plan was made for "
                            f"{self.in_treedef}")
        placed = place_outputs(self.runner(flat), self.flat_out_shardings, self.mesh,
                               spread=self._fresh_outputs)
        return jax.tree.unflatten(self.out_treedef, placed)

    def init_state(self, init_fn, rng_key):
        """Creates each state leaf on its stage's devices in the stage's layout.

        One program per stage computes only that stage's leaves (XLA drops the others' work),
        each created sharded as the stage's plan lays it out: no leaf is ever whole on a device
        unless the plan replicates it, and no stage holds another stage's leaves.
        """
        targets, treedef = jax.tree.flatten(self.in_shardings[0])
        groups: dict[tuple, list[int]] = {}
        for i, sharding in enumerate(targets):
            groups.setdefault(tuple(d.id for d in sharding.mesh.devices.flat), []).append(i)
        leaves: list[Any] = [None] * len(targets)
        for positions in groups.values():
            mesh = targets[positions[0]].mesh
            key = rng_key
            if isinstance(key, jax.Array) and key.committed:
                key = transfer(key, NamedSharding(mesh, PartitionSpec()))
            shardings = tuple(targets[i] for i in positions)

            def part(k, positions=positions):
                flat = jax.tree.leaves(init_fn(k))
                return tuple(flat[i] for i in positions)

            try:  # another step of the same layout reuses the compiled program
                cache_key = (init_fn, tuple(positions), shardings)
                program = _INIT_PROGRAMS.setdefault(
                    cache_key, jax.jit(part, out_shardings=shardings))
            except TypeError:  # an unhashable callable: compiled for this call
                program = jax.jit(part, out_shardings=shardings)
            made = program(key)
            for i, x in zip(positions, made):
                leaves[i] = x
        return jax.tree.unflatten(treedef, leaves)

    def follow(self, fn, abstract_args, *, batch_argnums, donate_argnums):
        """``fn`` (a step without backward pass, e.g. evaluation) on this pipeline's stages,
        its state where training keeps it (``parallel.FollowPlan`` of a pipelined step)."""
        from parallel.pipeline._forward import ForwardStep

        return ForwardStep(self, fn, abstract_args, batch_argnums, donate_argnums)

    def lower(self, *args):
        raise PlanError("a pipelined step is one program per stage and task, not one lowered "
                        "program; use step.analyze(...) for its costs")

    def time_stages(self, repeats: int = 5) -> list[float]:
        """Seconds each stage's forward plus backward program takes for one micro-batch, run
        alone on zero-filled inputs (the median of ``repeats`` runs). The report then shows
        them as ``measured_time_per_micro_batch_s``."""
        seconds = []
        for s in range(self.runner.placement.num_stages):
            total = 0.0
            for kind in ("F", "B"):
                if (kind, s) not in self.runner.tasks:
                    continue
                program = self.runner.jitted((kind, s))
                abstract = self.runner.abstract_inputs((kind, s))
                donated = len(self.runner.tasks[(kind, s)].inputs)
                args = [_zeros(a) for a in abstract]
                runs = []
                for _ in range(repeats + 1):
                    args[donated:] = [_zeros(a) for a in abstract[donated:]]  # accumulators
                    start = time.perf_counter()
                    jax.block_until_ready(program(*args))
                    runs.append(time.perf_counter() - start)
                total += float(np.median(runs[1:]))
            seconds.append(total)
        self.measured_stage_times_s = seconds
        return seconds

    # ----- report ---------------------------------------------------------------------------
    def compile_all(self) -> dict[tuple, Any]:
        """Compiles every task program (for the report); returns them by task key."""
        if not self._compiled:
            start = time.perf_counter()
            for key in self.runner.tasks:
                jitted = self.runner.jitted(key)
                self._compiled[key] = jitted.lower(*self.runner.abstract_inputs(key)).compile()
            self.compile_time_s = time.perf_counter() - start
        return self._compiled

    def report(self, profile: str | None = None, solve_time_s: float = 0.0) -> Report:
        """Per stage: layers, devices, FLOPs, time and memory; per device: the worst stage."""
        compiled = self.compile_all()
        runner = self.runner
        m = runner.num_micro_batches
        num_stages = len(self.choice.sizes)  # virtual stages included
        groups = num_stages // runner.virtual_stages
        device_profile = profiles.get_profile(profile, sum(self.choice.sizes[:groups]))
        memories = {mem.stage: mem for mem in runner_memory(runner, compiled)}
        per_stage = []
        total_flops = total_bytes = 0.0
        for s in range(num_stages):
            flops = accessed = 0.0
            micro_flops = micro_time = 0.0
            sent = 0.0
            forward_output = 0
            for key, program in compiled.items():
                if runner.tasks[key].stage != s:
                    continue
                f, b = cost_figures(program)
                times = m if key[0] in "FB" else 1
                flops += f * times
                accessed += b * times
                if key[0] in "FB":
                    micro_flops += f
                    micro_time += device_profile.compute_time(f, b)
                sent += times * sum(c["sent_bytes"] for c in collective_bytes(
                    program.as_text(), self.choice.sizes[s]).values())
                if key[0] == "F":
                    forward_output = _output_bytes(program)
            # Virtual stages sharing devices: the group's bytes (all of its virtual stages).
            memory = memories.get(s % groups) or StageMemory(s, 0, 0, 0, 0, 0, 0)
            entry = dict(self.stage_info[s])
            entry.update(
                flops_per_micro_batch=micro_flops,
                estimated_time_per_micro_batch_s=micro_time,
                measured_time_per_micro_batch_s=(None if self.measured_stage_times_s is None
                                                 else self.measured_stage_times_s[s]),
                activation_bytes_per_micro_batch=memory.activations_per_micro_batch,
                forward_output_bytes_per_micro_batch=forward_output,
                max_micro_batches_in_flight=memory.in_flight,
                peak_activation_bytes=memory.activations,
                memory=dataclasses.asdict(memory),
                memory_bytes=memory.total,
                communication_bytes=sent,
            )
            per_stage.append(entry)
            total_flops = max(total_flops, flops)
            total_bytes = max(total_bytes, accessed)
        times = [e["estimated_time_per_micro_batch_s"] for e in per_stage]
        step_time = sum(times) + (m - 1) * max(times)
        stages = {"schedule": runner.schedule, "num_micro_batches": m,
                  "bubble_fraction": bubble_fraction(groups, m, runner.virtual_stages),
                  "virtual_stages": runner.virtual_stages, "stages": per_stage,
                  "table": format_stages(self.plan.extras, per_stage)}
        shardings = jax.tree.map(lambda sh: sh.spec, self.in_shardings)
        return Report(
            method="pipeshard", mesh_shape=dict(self.plan.mesh_shape),
            per_device_memory_bytes=int(max(e["memory_bytes"] for e in per_stage)),
            communication_bytes=max(e["communication_bytes"] for e in per_stage),
            collectives={}, flops=total_flops,
            bytes_accessed=total_bytes, estimated_step_time_s=step_time,
            profile=device_profile.name, solve_time_s=solve_time_s,
            compile_time_s=self.compile_time_s, shardings=shardings, stages=stages,
            device_memory_bytes=device_profile.memory_bytes)


def format_stages(extras: dict, report_stages: list[dict] | None = None) -> str:
    """The stage table ``scripts/plan.py`` prints."""
    stages = report_stages or extras["stages"]
    virtual = extras.get("virtual_stages", 1)
    lines = [f"pipeline: {len(stages) // virtual} stages"
             + (f" x {virtual} virtual stages" if virtual > 1 else "") + f", schedule {extras['schedule']}, "
             f"{extras['num_micro_batches']} micro-batches, bubble "
             f"{100 * extras['bubble_fraction']:.1f}% (predicted step "
             f"{1e3 * extras['search']['cost_s']:.3f} ms)"]
    header = ["stage", "layers", "devices", "intra-op mesh", "predicted ms/micro-batch"]
    measured = bool(report_stages) and all(
        s.get("measured_time_per_micro_batch_s") is not None for s in report_stages)
    if report_stages:
        header += ["XLA-estimated ms/micro-batch"] + (["measured ms/micro-batch"] if measured
                                                       else [])
        header += ["activations/micro-batch", "in flight", "peak memory/device"]
    rows = [header]
    for s in stages:
        row = [str(s["stage"]), f"{s['layers'][0]}-{s['layers'][1]}",
               ",".join(map(str, s["devices"])),
               ",".join(f"{k}={v}" for k, v in s["intra_op_mesh"].items()),
               f"{1e3 * s['predicted_time_per_micro_batch_s']:.3f}"]
        if report_stages:
            row += [f"{1e3 * s['estimated_time_per_micro_batch_s']:.3f}"]
            if measured:
                row += [f"{1e3 * s['measured_time_per_micro_batch_s']:.3f}"]
            row += [f"{s['activation_bytes_per_micro_batch']:,}",
                    str(s["max_micro_batches_in_flight"]), f"{s['memory_bytes']:,}"]
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _output_bytes(program) -> int:
    """Bytes per device a compiled program writes (XLA's memory analysis)."""
    stats = program.memory_analysis()
    if isinstance(stats, (list, tuple)):
        stats = stats[0]
    return int(stats.output_size_in_bytes)


def _zeros(abstract):
    if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
        keys = jax.random.split(jax.random.key(0), int(np.prod(abstract.shape)))
        return jax.device_put(keys.reshape(abstract.shape), abstract.sharding)
    return jax.jit(lambda: jax.numpy.zeros(abstract.shape, abstract.dtype),
                   out_shardings=abstract.sharding)()


def _is_numeric(leaf) -> bool:
    try:
        np.dtype(leaf.dtype)
        return True
    except TypeError:
        return False

