"""Pipelined plans priced on one cost model: stages of layer ranges on sub-meshes.

For ``S`` stages of ``N / S`` devices each (sub-meshes inside a host, or of whole hosts), a
dynamic program chooses the layer ranges and each stage's intra-op mesh shape. A stage's time per
micro-batch is the solver's price of its layers on its sub-mesh (``LayerPricer``) plus the
activations it sends on and the gradients it sends back, over the link the boundary crosses, and
the launches of its programs (a forward and a backward per micro-batch). The
step's time is Alpa's pipeline latency ``sum(stage times) + (M - 1) * max(stage time)`` plus the
slowest stage's update; on a profile whose devices share one host (simulated CPU devices) the
stages cannot overlap and the step takes the sum of all the work. A stage must fit the memory
budget: its parameters, optimizer state and gradient accumulators, and the activations of the
micro-batches in flight (1F1B: ``S - s`` on stage ``s``; with rematerialization only each
micro-batch's input, plus one micro-batch's activations recomputed). A micro-batch's residuals
(the forward values its backward reads) count as the runtime holds them: as the stage's plan
lays out what its forward makes (a Megatron plan keeps its hidden activations split over the
model axis), the batch split for what it receives.
"""
from __future__ import annotations

import dataclasses
import math

from parallel.auto._layers import LayerPricer, MeshPrice, PipelineProgram
from parallel.profiles import DeviceProfile

# The optimizer update reads and writes parameters, gradients and optimizer state about twice.
_UPDATE_PASSES = 2.0
# Recomputing a stage's forward costs about a third of its forward and backward compute.
_FORWARD_SHARE = 1.0 / 3.0
# Programs the pipeline runtime launches on a stage per micro-batch (its forward and its
# backward) and per step (the per-step work, the batch split, creating and finishing the
# accumulators, the update), each costing the profile's program_overhead_s; an SPMD step
# launches one program.
_LAUNCHES_PER_MICRO_BATCH = 2
_LAUNCHES_PER_STEP = 5


@dataclasses.dataclass
class StagePrice:
    """One stage of a pipelined candidate.

    Attributes:
      first, last: its layers.
      devices: its device count; ``first_device`` its first device among the cluster's.
      mesh: ``(data, model)`` of its intra-op plan.
      time_s: one micro-batch's forward and backward, transfers included.
      update_s: its share of the once-per-step update.
      memory_bytes: peak bytes per device.
      split_state: its parameters and optimizer state are held split over its sub-mesh (the
        solver's fastest plan keeping them whole did not fit); the runtime plans it so too.
    """

    first: int
    last: int
    devices: int
    first_device: int
    mesh: tuple[int, int]
    time_s: float
    update_s: float
    memory_bytes: float
    split_state: bool = False


@dataclasses.dataclass
class PipelinePrice:
    """A pipelined candidate: ``num_micro_batches`` micro-batches through ``stages``."""

    stages: list[StagePrice]
    num_micro_batches: int
    remat: bool
    step_time_s: float

    @property
    def memory_bytes(self) -> float:
        return max(s.memory_bytes for s in self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def splits_state(self) -> bool:
        """Some stage holds its state split because its fastest plans did not fit."""
        return any(s.split_state for s in self.stages)

    def describe(self) -> str:
        parts = [f"layers {s.first}-{s.last} on {s.devices} (data {s.mesh[0]} x model "
                 f"{s.mesh[1]}{', state split' if s.split_state else ''})" for s in self.stages]
        remat = ", rematerialized" if self.remat else ""
        what = ("1 stage" if self.num_stages == 1 else f"{self.num_stages} stages")
        return (f"{what} x {self.num_micro_batches} micro-batches{remat}: " + "; ".join(parts))


def pipeline_time(stages: list[StagePrice], num_micro_batches: int,
                  profile: DeviceProfile, num_devices: int) -> float:
    """Seconds per step of a 1F1B (or GPipe) schedule of ``stages``."""
    m = num_micro_batches
    if profile.shared_host:  # one program at a time, each at the speed of the whole host
        return sum((m * s.time_s + s.update_s) * s.devices / num_devices for s in stages)
    times = [s.time_s for s in stages]
    return sum(times) + (m - 1) * max(times) + max(s.update_s for s in stages)


def stage_counts(num_devices: int, num_layers: int, devices_per_host: int | None) -> list[int]:
    """Stage counts searched: powers of two with equal sub-meshes that sit inside a host or
    hold whole hosts, and every divisor of the host count (stages of whole hosts: 15 hosts
    give 1, 3, 5 and 15 stages, where no power of two above 1 divides the devices by hosts)."""
    out = set()
    s = 1
    while s <= min(num_devices, num_layers):
        n = num_devices // s
        if num_devices % s == 0 and (devices_per_host is None or devices_per_host % n == 0
                                     or n % devices_per_host == 0):
            out.add(s)
        s *= 2
    if devices_per_host and num_devices % devices_per_host == 0:
        hosts = num_devices // devices_per_host
        out.update(d for d in range(1, min(hosts, num_layers) + 1) if hosts % d == 0)
    return sorted(out)


class PipelineSearch:
    """The best layer ranges and sub-mesh shapes for ``S`` equal stages, by dynamic programming.

    Args:
      pp: the step as the runtime runs it (traced for ``pp.num_micro_batches`` micro-batches).
      pricer: prices layers on sub-meshes.
      profile: devices and hosts.
      num_devices: devices in all.
      budget: bytes per device.
    """

    def __init__(self, pp: PipelineProgram, pricer: LayerPricer, profile: DeviceProfile,
                 num_devices: int, budget: float):
        self.pp = pp
        self.pricer = pricer
        self.profile = profile
        self.num_devices = num_devices
        self.budget = budget
        self.smallest_memory = math.inf
        # Stages may hold their state split over their devices when their fastest plans do not
        # fit (``best``'s default); ``False``: only the fastest plans.
        self.split = True

    def best(self, num_stages: int, remat: bool = False,
             meshes: tuple[int, int] | None = None,
             starts: list[int] | None = None,
             split_state: bool | None = None) -> PipelinePrice | None:
        """The cheapest ``num_stages``-stage pipeline within the budget (``None`` if none fits).

        Args:
          remat: stages recompute their forward in their backward.
          meshes: every stage on this ``(data, model)`` shape (e.g. Megatron's); default: the
            cheapest for each stage.
          starts: these layer ranges (e.g. equal ones); default: the cheapest.
          split_state: ``True``: every stage's parameters and optimizer state split over its
            sub-mesh (Megatron's layout with ``meshes``); ``False``: every stage on its fastest
            plans; default: split only in a stage whose fastest plans do not fit (if
            ``self.split``).
        """
        s_count, n = num_stages, self.num_devices // num_stages
        layers = self.pp.num_layers
        m = self.pp.num_micro_batches
        table: dict[tuple[int, int, int], StagePrice | None] = {}

        def stage(k: int, i: int, j: int) -> StagePrice | None:
            if (k, i, j) not in table:
                table[(k, i, j)] = self._stage(k, i, j, n, s_count, m, remat, meshes,
                                               split_state=split_state)
            return table[(k, i, j)]

        # Every layer's prices on each stage's devices, the solves side by side (the table
        # below reads them all).
        ranges = ([range(layers)] * s_count if starts is None else
                  [range(a, b) for a, b in zip(starts, list(starts[1:]) + [layers])])
        self.pricer.prices_all(self._wanted(s_count, ranges))
        if split_state and meshes is not None and starts is not None:
            # Every stage split on one shape: its layers' lean plans (read below whether the
            # layout fits or not, then for its fewest bytes).
            self.pricer.lean_all([(layer, n, k * n, meshes) for k in range(s_count)
                                  for layer in ranges[k]])
        if starts is not None:
            bounds = list(starts) + [layers]
            chosen = [stage(k, bounds[k], bounds[k + 1] - 1) for k in range(s_count)]
            if any(c is None for c in chosen):
                self._note_smallest(s_count, n, m, remat, meshes, starts, split_state)
                return None
            return self._candidate(chosen, m, remat)
        best: PipelinePrice | None = None
        # Alpa's search: for each bound on the slowest stage, the least total time under it.
        bounds_seen: set[float] = set()
        for k in range(s_count):
            for i in range(layers):
                for j in range(i, layers):
                    found = stage(k, i, j)
                    if found is not None:
                        bounds_seen.add(found.time_s)
        bounds = sorted(bounds_seen)
        if self.profile.shared_host:  # the step takes the sum of all work: no bound matters
            bounds = bounds[-1:]
        for bound in bounds:
            # A layout better than the best found so far has its slowest stage at this bound
            # (one with a faster slowest stage was found at a smaller bound, or a layout at
            # least as good was), so it takes at least M times the bound.
            if best is not None and m * bound >= best.step_time_s:
                break
            memo: dict[tuple[int, int], tuple[float, tuple]] = {}

            def cheapest(k: int, i: int) -> tuple[float, tuple]:
                if k == s_count:
                    return (0.0, ()) if i == layers else (math.inf, ())
                if (k, i) in memo:
                    return memo[(k, i)]
                result: tuple[float, tuple] = (math.inf, ())
                for j in range(i, layers - (s_count - k - 1)):
                    found = stage(k, i, j)
                    if found is None or found.time_s > bound:
                        continue
                    rest, tail = cheapest(k + 1, j + 1)
                    if found.time_s + rest < result[0]:
                        result = (found.time_s + rest, (found,) + tail)
                memo[(k, i)] = result
                return result

            total, chosen = cheapest(0, 0)
            if total == math.inf:
                continue
            candidate = self._candidate(list(chosen), m, remat)
            if best is None or candidate.step_time_s < best.step_time_s * (1 - 1e-9):
                best = candidate
        if best is None:
            self._note_smallest(s_count, n, m, remat, meshes, None, split_state)
        return best

    def prefetch(self, stage_counts: list[int]) -> None:
        """Prices every layer on every stage's devices for these stage counts, all the solves
        side by side (what ``best`` reads for each count)."""
        layers = self.pp.num_layers
        self.pricer.prices_all([w for s in stage_counts if s <= layers
                                for w in self._wanted(s, [range(layers)] * s)])

    def _wanted(self, s_count: int, ranges: list[range]) -> list[tuple[int, int, int]]:
        n = self.num_devices // s_count
        return [(layer, n, k * n) for k in range(s_count) for layer in ranges[k]]

    def _note_smallest(self, s_count: int, n: int, m: int, remat: bool,
                       meshes: tuple[int, int] | None, starts: list[int] | None,
                       split_state: bool | None = None) -> None:
        """Records the fewest bytes per device any layout of ``s_count`` stages reaches (the
        largest stage's), for the message when nothing fits."""
        layers = self.pp.num_layers
        saved, self.budget = self.budget, math.inf
        try:
            memo: dict[tuple[int, int], float] = {}

            def least(k: int, i: int) -> float:
                if k == s_count:
                    return 0.0 if i == layers else math.inf
                if (k, i) not in memo:
                    ends = ([starts[k + 1] - 1 if k + 1 < s_count else layers - 1]
                            if starts is not None else range(i, layers - (s_count - k - 1)))
                    memo[(k, i)] = min((max(self._least_memory(k, i, j, n, s_count, m, remat,
                                                               meshes, split_state),
                                            least(k + 1, j + 1))
                                        for j in ends), default=math.inf)
                return memo[(k, i)]

            self.smallest_memory = min(self.smallest_memory, least(0, 0))
        finally:
            self.budget = saved

    def _least_memory(self, k, i, j, n, s_count, m, remat, meshes, split_state) -> float:
        found = self._stage(k, i, j, n, s_count, m, remat, meshes, least_memory=True,
                            split_state=split_state)
        return math.inf if found is None else found.memory_bytes

    def _candidate(self, stages: list[StagePrice], m: int, remat: bool) -> PipelinePrice:
        return PipelinePrice(stages, m, remat,
                             pipeline_time(stages, m, self.profile, self.num_devices))

    def _stage(self, k: int, first: int, last: int, n: int, num_stages: int, m: int,
               remat: bool, meshes: tuple[int, int] | None,
               least_memory: bool = False, split_state: bool | None = None) -> StagePrice | None:
        """Stage ``k`` running layers ``first..last`` on its ``n`` devices: the cheapest mesh
        shape that fits the budget (or, ``least_memory``, the one needing least), or ``None``.

        On each mesh shape the solver's fastest plan of each layer, or where the stage does not
        fit with it (or ``split_state``), the fastest that splits the parameters and their
        optimizer state over the sub-mesh (``LayerPricer.lean``)."""
        pp, profile = self.pp, self.profile
        first_device = k * n
        prices = self.pricer.prices_all([(layer, n, first_device)
                                         for layer in range(first, last + 1)])
        shapes = set(prices[0])
        for p in prices[1:]:
            shapes &= set(p)
        if meshes is not None:
            shapes &= {meshes}
        per_host = profile.devices_per_host
        # Activations and their gradients cross to the neighbours; a boundary between two hosts
        # uses the inter-host link. Each device sends its share.
        transfer = 0.0
        for boundary, layer in ((first_device, first - 1), (first_device + n, last)):
            if 0 <= layer < pp.num_layers - 1 and 0 < boundary < self.num_devices:
                crosses = per_host is not None and boundary % per_host == 0
                transfer += profile.comm_time(pp.cut_bytes(layer) / n, crosses)
        in_flight = min(m, num_stages - k)
        best: StagePrice | None = None
        # Equal times: the larger data axis wins (the planner's rule for ties, ``rank``).
        for shape in sorted(shapes, key=lambda shape: -shape[0]):
            variants = (False, True) if self.split else (False,)
            for split in (variants if split_state is None else (split_state,)):
                if split and not least_memory and self._floor(prices, first, n, shape,
                                                              in_flight, remat) > self.budget:
                    break  # no plan fits: the state split over all n devices is the least
                if split:
                    parts = self.pricer.lean_all([(layer, n, first_device, shape)
                                                  for layer in range(first, last + 1)])
                    if split_state is None and not any(p.split_state for p in parts):
                        break  # the fastest plan splits the state already
                else:
                    parts = [p[shape] for p in prices]
                found = self._on_mesh(parts, first, last, n, first_device, shape, transfer,
                                      in_flight, remat, split)
                if found.memory_bytes > self.budget:
                    continue
                key = (lambda c: c.memory_bytes) if least_memory else (lambda c: c.time_s)
                if best is None or key(found) < key(best):
                    best = found
                if not least_memory:
                    break  # the fastest plan fits: nothing to split
        return best

    def _floor(self, prices: list[dict], first: int, n: int, shape: tuple[int, int],
               in_flight: int, remat: bool) -> float:
        """A lower bound of the stage's bytes per device on ``shape`` whatever the plans of its
        layers (``prices``, from ``first`` on): its state and its micro-batches' residuals split
        over all ``n`` devices, and the stash ``_on_mesh`` counts."""
        pp = self.pp
        state = sum(pp.layer_state[first + k] for k in range(len(prices))) / n
        residuals = sum(p[shape].residual_whole_bytes for p in prices) / n
        if remat:
            return state + residuals + (in_flight - 1) * self._stash(first, shape)
        return state + in_flight * residuals

    def _stash(self, first: int, shape: tuple[int, int]) -> float:
        """Bytes per device of one micro-batch's input to a rematerialized stage starting at
        layer ``first``, kept until its backward: received split over the ``data`` axis only."""
        return self.pp.cut_bytes(first - 1) / shape[0] if first > 0 else 0.0

    def _on_mesh(self, parts: list[MeshPrice], first: int, last: int, n: int,
                 first_device: int, shape: tuple[int, int], transfer: float, in_flight: int,
                 remat: bool, split: bool) -> StagePrice:
        """The stage of layers ``first..last`` priced with the plans ``parts`` of its layers."""
        profile = self.profile
        time = (sum(p.time_s for p in parts) + transfer
                + _LAUNCHES_PER_MICRO_BATCH * profile.program_overhead_s)
        state = sum(p.state_bytes for p in parts)
        grads = sum(p.grad_bytes for p in parts)
        # A micro-batch in flight keeps its residuals (with remat: only the stage's input),
        # laid out as the runtime holds them on these plans; one more runs its forward or
        # backward with the largest layer's working set.
        residuals = parts[0].residual_bytes + sum(p.residual_inner_bytes for p in parts[1:])
        working = max(p.activation_bytes for p in parts)
        if remat:
            time += _FORWARD_SHARE * sum(p.compute_s for p in parts)
            memory = (state + grads + residuals + working
                      + (in_flight - 1) * self._stash(first, shape))
        else:
            memory = state + grads + working + in_flight * residuals
        update = (_UPDATE_PASSES * (state + grads) / profile.memory_bandwidth
                  + _LAUNCHES_PER_STEP * profile.program_overhead_s)
        return StagePrice(first, last, n, first_device, shape, time, update, memory,
                          split_state=split and any(p.split_state for p in parts))
