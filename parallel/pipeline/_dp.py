"""Automatic stages: dynamic programming over (layer ranges x sub-mesh sizes).

Minimizes Alpa's pipeline latency ``sum(stage times) + (num_micro_batches - 1) * max(stage
time)``, where a stage's time per micro-batch is its forward and backward compute on its
devices (data parallel inside the stage), the all-reduce of its weight gradients, and the
transfer of the activations it sends to the next stage and of their gradients back — the
inter-stage traffic Alpa's cost model left out. Priced on abstract shapes with a device
profile: nothing is run or compiled.
"""
from __future__ import annotations

import dataclasses
import math

from parallel._errors import PlanError
from parallel.profiles import DeviceProfile

# The backward pass costs about twice the forward (two matmuls per forward matmul).
_FORWARD_AND_BACKWARD = 3.0


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """What the cost model knows of each layer, for one micro-batch.

    Attributes:
      flops: forward FLOPs per layer.
      weight_bytes: bytes of the parameters each layer reads.
      cut_bytes: bytes layer ``i`` (and those before it) hands to the layers after it.
    """

    flops: list[float]
    weight_bytes: list[float]
    cut_bytes: list[float]


@dataclasses.dataclass(frozen=True)
class StageChoice:
    """A pipeline layout: stage ``k`` runs layers ``starts[k]..starts[k+1]-1`` on
    ``sizes[k]`` devices; ``cost_s`` is its priced latency per step."""

    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    stage_times_s: tuple[float, ...]
    cost_s: float


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """A pipeline layout a search chose and priced, for ``PipeshardParallel`` to run as it is.

    Stage ``k`` runs layers ``starts[k]..starts[k+1]-1`` of the forward pass cut into
    ``num_layers`` layers, on the next ``sizes[k]`` devices, with the intra-op mesh
    ``mesh_shapes[k]`` (``{"data": d, "model": m}``; the solver plans the stage on it).

    Attributes:
      stage_times_s: the priced seconds per micro-batch of each stage.
      cost_s: the priced seconds per step.
      split_state: per stage, whether the solver must split its parameters (and so their
        optimizer state) over its sub-mesh, as the search priced it; empty: none.
    """

    num_layers: int
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    mesh_shapes: tuple[dict, ...]
    stage_times_s: tuple[float, ...]
    cost_s: float
    split_state: tuple[bool, ...] = ()

    def splits(self, stage: int) -> bool:
        """Whether stage ``stage``'s parameters are held split over its sub-mesh."""
        return bool(self.split_state) and bool(self.split_state[stage])

    def choice(self, num_layers: int, num_devices: int) -> StageChoice:
        """The layout as the runtime's ``StageChoice``, checked against the program.

        Raises:
          PlanError: the step has another number of layers, or the sizes do not cover the
            devices.
        """
        if num_layers != self.num_layers or sum(self.sizes) != num_devices:
            raise PlanError(
                f"the pipeline layout was made for {self.num_layers} layers on "
                f"{sum(self.sizes)} devices, this step has {num_layers} layers on {num_devices}; "
                f"plan it again")
        return StageChoice(tuple(self.starts), tuple(self.sizes), tuple(self.stage_times_s),
                           self.cost_s)


def stage_time(costs: LayerCosts, first: int, last: int, devices: int,
               profile: DeviceProfile) -> float:
    """Seconds one micro-batch spends on the stage running layers ``first..last``."""
    flops = _FORWARD_AND_BACKWARD * sum(costs.flops[first:last + 1]) / devices
    weights = sum(costs.weight_bytes[first:last + 1])
    compute = profile.compute_time(flops, _FORWARD_AND_BACKWARD * weights)
    allreduce = profile.comm_time(2.0 * (devices - 1) / devices * weights) if devices > 1 else 0.0
    sends = costs.cut_bytes[last] if last + 1 < len(costs.flops) else 0.0
    return compute + allreduce + 2.0 * profile.comm_time(sends)


def price(costs: LayerCosts, starts: list[int], sizes: list[int], num_micro_batches: int,
          profile: DeviceProfile) -> StageChoice:
    """Prices a given layout (used to compare the search's choice with others)."""
    bounds = list(starts) + [len(costs.flops)]
    times = tuple(stage_time(costs, a, b - 1, d, profile)
                  for a, b, d in zip(bounds[:-1], bounds[1:], sizes))
    return StageChoice(tuple(starts), tuple(sizes), times,
                       sum(times) + (num_micro_batches - 1) * max(times))


def search(costs: LayerCosts, num_devices: int, num_micro_batches: int,
           profile: DeviceProfile, micro_batch_size: int) -> StageChoice:
    """The cheapest layout using all ``num_devices`` devices.

    Sub-mesh sizes are the powers of two dividing both ``num_devices`` and the micro-batch size
    (so the batch splits evenly inside a stage). For each candidate bound on the slowest stage,
    a dynamic program over (first layer, devices left) minimizes the sum of stage times; the
    best bound gives the layout.
    """
    n = len(costs.flops)
    sizes = [d for d in (2 ** k for k in range(int(math.log2(num_devices)) + 1))
             if num_devices % d == 0 and micro_batch_size % d == 0]
    if num_devices not in sizes and n * max(sizes) < num_devices:
        sizes = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    times = {(i, j, d): stage_time(costs, i, j, d, profile)
             for i in range(n) for j in range(i, n) for d in sizes}
    best: StageChoice | None = None
    for bound in sorted(set(times.values())):
        memo: dict[tuple[int, int], tuple[float, tuple]] = {}

        def cheapest(i: int, left: int):
            if i == n:
                return (0.0, ()) if left == 0 else (math.inf, ())
            if (i, left) in memo:
                return memo[(i, left)]
            result = (math.inf, ())
            for j in range(i, n):
                for d in sizes:
                    t = times[(i, j, d)]
                    if d > left or t > bound:
                        continue
                    rest, layout = cheapest(j + 1, left - d)
                    if t + rest < result[0]:
                        result = (t + rest, ((i, d),) + layout)
            memo[(i, left)] = result
            return result

        total, layout = cheapest(0, num_devices)
        if total == math.inf:
            continue
        cost = total + (num_micro_batches - 1) * bound
        if best is None or cost < best.cost_s - 1e-15:
            best = price(costs, [i for i, _ in layout], [d for _, d in layout],
                         num_micro_batches, profile)
    if best is None:
        raise PlanError(f"no pipeline layout covers {num_devices} devices with {n} layers and "
                        f"sub-meshes of {sizes} devices; give more layers (layers=...) or fewer "
                        f"devices")
    return best
