"""``PipeshardParallel``: pipeline stages on sub-meshes, plugged into ``parallelize``."""
from __future__ import annotations


from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from parallel import mesh as mesh_lib
from parallel._errors import PlanError
from parallel._methods import Method, register_method, warn_once
from parallel.pipeline import _dp
from parallel.pipeline._intra import stage_plan
from parallel.pipeline._regions import split_regions
from parallel.pipeline._runtime import StageRunner
from parallel.pipeline._schedule import SCHEDULES
from parallel.pipeline._stages import (backward_flags, balanced_stages, find_layers, place,
                                      virtual_stage_starts)
from parallel.pipeline._step import PipelinedStep
from parallel.pipeline._trace import trace_step
from parallel.profiles import DeviceProfile, resolve_profile

# Layers cut automatically when stage_option="auto" and the step has no markers.
DEFAULT_AUTO_LAYERS = 8


class PipeshardParallel(Method):
    """Pipeline parallelism: the step's layers split into stages, each on its own sub-mesh.

    The step is the user's, unchanged (plain ``jax.value_and_grad`` and an optax update over any
    state pytree). It is traced on the global batch and split: per-step work, the per-micro-batch
    forward and backward (cut into stages, run on the same operations at the micro-batch's
    size), and the update, which sees the micro-batches' values combined: sums added, means
    averaged, per-example values concatenated. Constants depending on the batch size keep their
    global value. The result equals the unpipelined step, except for what is per micro-batch by
    nature (random keys, ``fold_in(key, i)`` as ``train.grad_accum_steps``; statistics of the
    model's activations over the batch, warned about); what cannot be combined exactly is
    refused with a ``PlanError`` naming it (see ``docs/pipeline.md``).

    Args:
      num_micro_batches: micro-batches per step; the global batch must divide by it.
      stage_option: ``"auto"``: the number of stages, the layers of each and each stage's number
        of devices by dynamic programming over Alpa's latency objective; an int ``N``: ``N``
        stages of ``devices / N`` devices with balanced FLOPs.
      schedule: ``"1f1b"`` (at most ``S - s`` micro-batches alive on stage ``s``),
        ``"gpipe"`` (all forwards, then all backwards) or ``"interleaved"`` (1F1B over
        ``virtual_stages`` model chunks per stage: bubble ``(S - 1) / (v M + S - 1)``).
      layers: how many layers to cut the forward into when it has no
        ``mark_pipeline_boundary``; ``None``: the number of stages (int option) or 8 (auto).
      intra_op: ``"solver"``: each stage's sub-mesh shape (``data`` x ``model``) and parameter
        specs come from the ``ShardParallel`` solver run on the stage's own work; ``"data"``:
        every stage is data parallel over its devices (no solve).
      remat: recompute each stage's forward in its backward (like ``jax.checkpoint`` around
        the stage): a stage then keeps only its input per micro-batch in flight, not every
        activation.
      mesh: must be ``None``; stages pick their own sub-meshes.
      profile: device profile the automatic stages are priced with; ``None``: the running device.
      virtual_stages: model chunks per stage (``v``) with ``schedule="interleaved"``: the
        layers are cut into ``S * v`` equal groups, group ``k`` on stage ``k % S``; needs an
        int ``stage_option`` and layers dividing into ``S * v``.
      memory_budget_bytes: per-device limit; a stage split whose most loaded device needs more
        (``parallel.pipeline._memory``: state, accumulators, batch, in-flight activations and
        XLA's temporaries of its programs) is refused with a ``PlanError``.
    """

    name = "pipeshard"

    def __init__(self, num_micro_batches: int = 1, stage_option: int | str = "auto",
                 schedule: str = "1f1b", layers: int | None = None, remat: bool = False,
                 intra_op: str = "solver", mesh: Mapping[str, int] | None = None,
                 profile: str | DeviceProfile | None = None,
                 memory_budget_bytes: float | None = None, virtual_stages: int = 1):
        super().__init__(None)
        if mesh is not None:
            raise PlanError(f"parallel.mesh={dict(mesh)} does not apply to method 'pipeshard': "
                            f"each stage gets its own sub-mesh; drop parallel.mesh or set "
                            f"parallel.stages")
        if not isinstance(num_micro_batches, int) or num_micro_batches < 1:
            raise PlanError(f"num_micro_batches={num_micro_batches!r} must be a positive integer")
        if schedule not in SCHEDULES:
            raise PlanError(f"schedule={schedule!r} is not a pipeline schedule; use one of "
                            f"{', '.join(SCHEDULES)}")
        if not (stage_option == "auto" or (isinstance(stage_option, int) and stage_option >= 1)
                or isinstance(stage_option, _dp.StageLayout)):
            raise PlanError(f"stage_option={stage_option!r} must be 'auto' or a positive number "
                            f"of stages")
        if (not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool)
                or virtual_stages < 1):
            raise PlanError(f"virtual_stages={virtual_stages!r} must be a positive integer")
        if schedule == "interleaved" and virtual_stages < 2:
            raise PlanError(f"schedule='interleaved' needs virtual_stages >= 2 (got "
                            f"{virtual_stages}); set virtual_stages or use schedule='1f1b'")
        if virtual_stages > 1 and schedule != "interleaved":
            raise PlanError(f"virtual_stages={virtual_stages} needs schedule='interleaved' (got "
                            f"{schedule!r}); set the schedule or virtual_stages=1")
        if virtual_stages > 1 and not isinstance(stage_option, int):
            raise PlanError(f"virtual_stages={virtual_stages} needs a number of stages "
                            f"(stage_option={stage_option!r}): the automatic stage search does "
                            f"not place virtual stages")
        self.virtual_stages = virtual_stages
        self.num_micro_batches = num_micro_batches
        self.stage_option = stage_option
        self.schedule = schedule
        self.layers = layers
        self.remat = bool(remat)
        if intra_op not in ("solver", "data"):
            raise PlanError(f"intra_op={intra_op!r} must be 'solver' or 'data'")
        self.intra_op = intra_op
        self.profile = profile
        self.memory_budget_bytes = memory_budget_bytes

    def __repr__(self) -> str:
        return (f"PipeshardParallel(num_micro_batches={self.num_micro_batches}, "
                f"stage_option={self.stage_option!r}, schedule={self.schedule!r}"
                + (f", virtual_stages={self.virtual_stages}" if self.virtual_stages > 1 else "")
                + (", remat=True)" if self.remat else ")"))

    def make_plan(self, fn, abstract_args, *, batch_argnums, donate_argnums, devices,
                  logical_axes):
        del logical_axes
        return self.build_executable(fn, abstract_args, batch_argnums=batch_argnums,
                                     donate_argnums=donate_argnums, devices=devices).plan

    def build_executable(self, fn: Callable, abstract_args: Sequence[Any], *,
                         batch_argnums: Sequence[int], donate_argnums: Sequence[int],
                         devices: Sequence[jax.Device]) -> PipelinedStep:
        """Traces, splits and places ``fn``; returns the step that runs it (compiled lazily)."""
        m = self.num_micro_batches
        num_devices = len(devices)
        traced = trace_step(fn, abstract_args, batch_argnums, m)
        global_batch = traced.global_batch
        out_paths, _ = jax.tree_util.tree_flatten_with_path(jax.eval_shape(fn, *abstract_args))
        names = [f"output{jax.tree_util.keystr(path)}" for path, _ in out_paths]
        program, regions = split_regions(traced, m, names)
        flat_args = jax.tree.leaves(tuple(abstract_args))
        backward = backward_flags(program, regions)
        if not any(backward):
            raise PlanError("the step computes no gradient from the batch (no backward pass): "
                            "PipeshardParallel pipelines training steps; use DataParallel for "
                            "evaluation")
        stages = self.stage_option
        if isinstance(stages, int) and stages > num_devices:
            raise PlanError(f"stage_option={stages} stages but only {num_devices} devices; use "
                            f"at most {num_devices} stages")
        if isinstance(stages, int) and num_devices % stages:
            raise PlanError(f"{num_devices} devices do not split into {stages} equal stages; use "
                            f"a number of stages dividing {num_devices}, or stage_option='auto'")
        layout = stages if isinstance(stages, _dp.StageLayout) else None
        virtual = self.virtual_stages
        num_layers = (layout.num_layers if layout else self.layers
                      or (stages * virtual if isinstance(stages, int) else DEFAULT_AUTO_LAYERS))
        layers = find_layers(program, regions, backward, num_layers)
        costs = _dp.LayerCosts(layers.flops, _weight_bytes(program, regions, layers),
                               layers.cut_bytes)
        profile = resolve_profile(self.profile, num_devices, self.hosts(devices))
        micro_batch = global_batch // m
        if layout is not None:  # a layout a search priced: run it as it is
            choice = layout.choice(layers.count, num_devices)
        elif isinstance(stages, int):
            if stages * virtual > layers.count:
                raise PlanError(
                    f"stage_option={stages} stages"
                    + (f" x {virtual} virtual stages" if virtual > 1 else "")
                    + f" but the step has {layers.count} layers"
                    + (" (from its mark_pipeline_boundary calls)" if layers.from_markers else "")
                    + f"; use at most {layers.count} stages"
                    + ("" if layers.from_markers else " or more layers (layers=...)"))
            if virtual > 1:  # equal layer groups, virtual stage k on stage k % S
                starts = virtual_stage_starts(layers, stages, virtual)
            else:
                starts = balanced_stages([f * 1.0 for f in layers.flops], stages)
            choice = _dp.price(costs, starts, [num_devices // stages] * len(starts), m, profile)
        else:
            choice = _dp.search(costs, num_devices, m, profile, micro_batch)
        equal = None if virtual > 1 else _equal_split(costs, len(choice.starts), num_devices,
                                                      m, profile)
        num_stages = len(choice.starts)  # virtual stages included
        groups = num_stages // virtual
        stage_of_layer = []
        for k, start in enumerate(choice.starts):
            end = choice.starts[k + 1] if k + 1 < num_stages else layers.count
            stage_of_layer += [k] * (end - start)
        mirrors = _mirrors(fn, abstract_args, donate_argnums)
        placement = place(program, regions, backward, layers, stage_of_layer, num_stages, mirrors)
        sizes = list(choice.sizes[:groups])
        offsets = np.cumsum([0] + sizes)
        shapes = [{"data": int(d)} for d in choice.sizes]
        specs: dict[int, dict[int, Any]] = {}
        if self.intra_op == "solver":
            for k, d in enumerate(choice.sizes):
                if d > 1:
                    shapes[k], specs[k] = stage_plan(
                        program, regions, placement, k, int(d), profile,
                        mesh_shape=layout.mesh_shapes[k] if layout else None,
                        split_state=bool(layout) and layout.splits(k),
                        first_device=int(offsets[k % groups]))
        for k in range(groups, num_stages):  # a virtual stage runs on its group's mesh
            if shapes[k] != shapes[k % groups]:
                shapes[k], specs[k] = shapes[k % groups], {}  # data parallel on that mesh
        group_meshes = [mesh_lib.make_mesh(shapes[k], list(devices)[offsets[k]:offsets[k + 1]])
                        for k in range(groups)]
        meshes = [group_meshes[k % groups] for k in range(num_stages)]
        same_as = {program.outputs[pos]: program.inputs[i] for pos, i in mirrors.items()
                   if isinstance(program.outputs[pos], int)
                   and program.outputs[pos] not in program.inputs}
        output_stage = []
        for pos, v in enumerate(program.outputs):
            if pos in mirrors:
                output_stage.append(placement.home[program.inputs[mirrors[pos]]])
            else:
                output_stage.append(placement.value_stage.get(v, 0) if isinstance(v, int) else 0)
        runner = StageRunner(program, regions, placement, meshes, m, self.schedule,
                             output_stage, remat=self.remat, specs=specs, same_as=same_as,
                             virtual_stages=virtual)
        search = {"cost_s": choice.cost_s, "stage_times_s": list(choice.stage_times_s)}
        if equal is not None:
            search.update(equal_layers_starts=list(equal.starts), equal_layers_cost_s=equal.cost_s)
        step = PipelinedStep(fn, self, runner, abstract_args, flat_args, global_batch,
                             layers, choice, search, mirrors, batch_argnums, donate_argnums)
        step.plan.extras["per_micro_batch"] = list(regions.notes)
        if regions.notes:
            step.plan.extras["explanation"] += "".join(f"\n{note}" for note in regions.notes)
        return step


def _weight_bytes(program, regions, layers) -> list[float]:
    """Bytes of the batch-independent values (parameters) each layer's forward reads."""
    seen = [set() for _ in range(layers.count)]
    for i, layer in layers.of_op.items():
        for v in program.ops[i].value_inputs():
            if v not in regions.batch_dependent:
                seen[layer].add(v)
    return [float(sum(program.nbytes(v) for v in vs)) for vs in seen]


def _equal_split(costs, num_stages, num_devices, m, profile):
    """The same number of stages with equal layer counts and devices, priced (or ``None``)."""
    n = len(costs.flops)
    if num_stages > n or num_devices % num_stages:
        return None
    starts = [k * n // num_stages for k in range(num_stages)]
    return _dp.price(costs, starts, [num_devices // num_stages] * num_stages, m, profile)


def _mirrors(fn, abstract_args, donate_argnums, out=None) -> dict[int, int]:
    """Flat output position -> flat input position, for outputs that replace an argument
    (same structure and leaf shapes; donated arguments first). ``out``: ``fn``'s output
    shapes, when known (else traced)."""
    if out is None:
        out = jax.eval_shape(fn, *abstract_args)
    entries = list(out) if isinstance(out, (tuple, list)) else [out]
    offsets = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in abstract_args])
    order = list(donate_argnums) + [i for i in range(len(abstract_args))
                                    if i not in donate_argnums]

    def signature(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple(tuple(x.shape) for x in leaves)

    mirrors, pos = {}, 0
    for entry in entries:
        n = len(jax.tree.leaves(entry))
        for i in order:
            if signature(abstract_args[i]) == signature(entry):
                mirrors.update({pos + k: int(offsets[i]) + k for k in range(n)})
                break
        pos += n
    return mirrors


def _factory(mesh=None, rules=None, memory_budget_bytes=None, num_micro_batches=1,
             profile=None, stages=None, schedule=None, remat=False, virtual_stages=1):
    if rules:
        raise PlanError(f"parallel.rules={dict(rules)} only applies to method 'manual'; "
                        f"method 'pipeshard' places each stage itself. Drop the rules")
    return PipeshardParallel(num_micro_batches=num_micro_batches,
                             memory_budget_bytes=memory_budget_bytes,
                             stage_option="auto" if stages is None else stages,
                             schedule="1f1b" if schedule is None else schedule,
                             remat=remat, mesh=mesh, profile=profile,
                             virtual_stages=virtual_stages)


_factory.pipeline = True
register_method("pipeshard", _factory)

