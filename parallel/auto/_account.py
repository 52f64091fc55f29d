"""The joint search's account: which plan, why, the runner-ups (printed with the plan), and
the search as JSON-friendly data (saved in the plan's extras)."""
from __future__ import annotations

import dataclasses

from parallel.auto._pipelines import PipelinePrice, PipelineSearch
from parallel.auto._solution import Solution
from parallel.profiles import DeviceProfile


@dataclasses.dataclass
class Decision:
    """What the joint search chose, and what it compared.

    Attributes:
      spmd: the best SPMD plan (``None``: none fits).
      pipeline: the chosen pipeline (``None``: the SPMD plan was chosen).
      pipelines: the best pipeline found for each stage count, micro-batches and remat.
      budget: bytes per device every candidate had to fit.
      explanation: the account printed with the plan.
      search_time_s: seconds the search took.
      searches: the pipeline searches by micro-batch count (their priced layers; for pricing
        other layouts of the same step).
      spmd_refused: why no SPMD plan was searched (the solver's did not fit once compiled).
      tiny: why nothing was searched: the step is tiny (``parallel.auto._tiny``), and the plan
        is data parallelism.
    """

    spmd: Solution | None
    pipeline: PipelinePrice | None
    pipelines: list[PipelinePrice]
    budget: float
    num_layers: int
    explanation: str = ""
    search_time_s: float = 0.0
    searches: dict[int, PipelineSearch] = dataclasses.field(default_factory=dict)
    spmd_refused: str | None = None
    tiny: str | None = None


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def gib(nbytes: float) -> str:
    if nbytes < 2**30:
        return f"{nbytes / 2**20:.2f} MiB"
    return f"{nbytes / 2**30:.2f} GiB"


def explain(d: Decision, profile: DeviceProfile, n: int) -> str:
    """Which plan, why, and the runner-ups (best SPMD plan, best pipeline per stage count)."""
    topology = (f"{profile.num_hosts} hosts x {profile.devices_per_host}"
                if profile.devices_per_host else f"1 host x {n}")
    lines = [f"auto: {n} devices ({topology}), '{profile.name}' profile, budget "
             f"{gib(d.budget)} per device"]
    if d.tiny is not None:
        return "\n".join(lines + [f"chosen: data parallelism, mesh {{'data': {n}}}",
                                  f"why: {d.tiny}"])
    spmd_line = ("SPMD: no plan fits the budget" if d.spmd is None else
                 f"SPMD: mesh {d.spmd.best.mesh_shape}"
                 + (f" ({d.spmd.best.variant})" if d.spmd.best.variant else "")
                 + f", {ms(d.spmd.best.step_time_s)} per step, "
                 f"{gib(d.spmd.best.memory_bytes)} per device")
    if d.pipeline is None:
        lines.append(f"chosen: {spmd_line}")
        why = ("no pipeline is cheaper" if d.pipelines else
               "pipelines were not searched: the devices share one host, so stages cannot "
               "overlap" if profile.shared_host else "no pipeline fits")
        lines.append(f"why: {why}")
    else:
        p = d.pipeline
        what = ("micro-batches in an SPMD plan (gradient accumulation)" if p.num_stages == 1
                else "pipeline")
        lines.append(f"chosen: {what}, {p.describe()}; {ms(p.step_time_s)} per step, "
                     f"{gib(p.memory_bytes)} per device")
        if d.spmd_refused is not None:
            lines.append(f"why: the solver's SPMD plan does not fit once compiled "
                         f"({d.spmd_refused.split('. ')[0]})")
        elif d.spmd is None:
            lines.append("why: no SPMD plan fits the budget at the full batch")
        else:
            lines.append(f"why: {d.spmd.best.step_time_s / p.step_time_s:.2f}x faster than "
                         "the best SPMD plan")
        lines.append(f"  runner-up {spmd_line}")
    for p in sorted(d.pipelines, key=lambda p: (p.num_stages, p.num_micro_batches, p.remat)):
        if p is d.pipeline:
            continue
        fits = "" if p.memory_bytes <= d.budget else " (over the budget)"
        lines.append(f"  runner-up pipeline: {p.describe()}; {ms(p.step_time_s)} per step, "
                     f"{gib(p.memory_bytes)} per device{fits}")
    return "\n".join(lines)


def stats(d: Decision) -> dict:
    """The search as JSON-friendly data (saved in the plan's extras)."""
    return {"search_time_s": d.search_time_s, "memory_budget_bytes": d.budget,
            "spmd_step_time_s": None if d.spmd is None else d.spmd.best.step_time_s,
            "pipelines": [{"stages": p.num_stages, "num_micro_batches": p.num_micro_batches,
                           "remat": p.remat, "step_time_s": p.step_time_s,
                           "memory_bytes": p.memory_bytes,
                           "layers": [[s.first, s.last] for s in p.stages],
                           "meshes": [list(s.mesh) for s in p.stages]} for p in d.pipelines],
            "chosen": ("data (tiny model)" if d.tiny is not None else
                       "spmd" if d.pipeline is None else "pipeline")}
