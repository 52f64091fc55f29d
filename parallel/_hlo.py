"""Counts the bytes each device sends in the collectives of a compiled HLO module.

Per device and per execution, with the ring formulas for a group of ``n`` devices and a full
(unsharded) operand of ``S`` bytes:

* all-reduce: ``2 (n-1)/n * S``
* all-gather: ``(n-1)/n * S`` where ``S`` is the gathered result
* reduce-scatter: ``(n-1)/n * S`` where ``S`` is the operand (``n`` times the result)
* all-to-all: ``(n-1)/n * S``
* collective-permute: ``S``

Async pairs are counted once, at their ``-start``. Collectives inside a ``while`` body count
once per iteration when XLA knows the trip count (``known_trip_count``), once otherwise.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
          "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
          "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\([^=]*?\)|\S+)\s+"
    r"(?P<op>" + "|".join(KINDS) + r")(?P<suffix>-start|-done)?\((?P<rest>.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")
_WHILE = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")
_CALLS = re.compile(r"\b(?:to_apply|calls|body|condition|branch_computations|"
                    r"true_computation|false_computation)=\{?([%\w.\-, ]+)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: kind, group size and bytes sent per device per execution.

    ``groups``: the device groups (one row of partition ids each; for a collective-permute, the
    source-target pairs), from which a cost model tells whether the collective crosses hosts.
    """

    kind: str
    group_size: int
    full_bytes: float
    bytes_per_device: float
    groups: tuple[tuple[int, ...], ...] = ()

    def hosts(self, devices_per_host: int | None, first_device: int = 0) -> int:
        """The most hosts any group spans, hosts holding ``devices_per_host`` consecutive
        devices and the module's partition 0 being device ``first_device``."""
        if devices_per_host is None or not self.groups:
            return 1
        return max(len({(first_device + d) // devices_per_host for d in g}) for g in self.groups)


def array_bytes(shape_text: str) -> list[float]:
    """Bytes of each array in an HLO shape such as ``(f32[8,4]{1,0}, bf16[2])``."""
    shape_text = _COMMENT.sub("", shape_text)
    sizes = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in _BYTES:
            continue
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        sizes.append(count * _BYTES[dtype])
    return sizes


def replica_groups(rest: str, num_devices: int) -> np.ndarray:
    """The device groups of an instruction's attribute text, one row per group.

    Understands ``{{0,1},{2,3}}`` lists, iota ``[2,4]<=[8]`` groups (with a ``T(...)``
    transpose), the mesh form ``mesh['x'=2,'y'=4] {'y'}``, and a collective-permute's
    ``source_target_pairs``; an empty or missing group means all ``num_devices``.
    """
    match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if match:
        axes = [(name, int(size)) for name, size in
                re.findall(r"'([^']+)'\s*=\s*(\d+)", match.group(1))]
        names = [a for a, _ in axes]
        inside = [names.index(n) for n in re.findall(r"'([^']+)'", match.group(2))]
        if not inside:
            return np.arange(num_devices)[None, :]
        index = np.arange(math.prod(size for _, size in axes)).reshape([s for _, s in axes])
        order = [a for a in range(len(axes)) if a not in inside] + inside
        size = math.prod(axes[a][1] for a in inside)
        return np.transpose(index, order).reshape(-1, size)
    match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if match:
        dims = [int(d) for d in match.group(3).split(",")]
        index = np.arange(math.prod(dims)).reshape(dims)
        if match.group(4):
            index = np.transpose(index, [int(p) for p in match.group(4).split(",")])
        return index.reshape(int(match.group(1)), int(match.group(2)))
    match = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[^=]*?\})\}", rest)
    if match:
        rows = [[int(x) for x in row.split(",") if x.strip()]
                for row in re.findall(r"\{([^{}]*)\}", match.group(1))]
        if rows and all(len(r) == len(rows[0]) for r in rows):
            return np.array(rows)
    return np.arange(num_devices)[None, :]


def group_size(rest: str, num_devices: int) -> int:
    """Devices per replica group of an instruction's attribute text (see ``replica_groups``)."""
    return int(replica_groups(rest, num_devices).shape[1])


def parse_collective(line: str, num_devices: int) -> Collective | None:
    """The collective on one HLO text line, or ``None`` if the line has none (or is a -done)."""
    match = _INSTRUCTION.match(_COMMENT.sub("", line))
    if match is None or match.group("suffix") == "-done":
        return None
    kind, rest = match.group("op"), match.group("rest")
    sizes = array_bytes(match.group("shape"))
    if match.group("suffix") == "-start" and kind != "all-reduce":
        # Async starts return (operands..., results..., [contexts]); keep the results.
        sizes = sizes[len(sizes) // 2:] if kind == "all-gather" else sizes[:1]
    groups = replica_groups(rest, num_devices)
    n = num_devices if kind == "collective-permute" else int(groups.shape[1])
    result = float(sum(sizes))
    if kind == "all-reduce":
        full, sent = result, 2 * (n - 1) / n * result
    elif kind == "reduce-scatter":
        full = result * n
        sent = (n - 1) / n * full
    elif kind in ("all-gather", "all-to-all"):
        full, sent = result, (n - 1) / n * result
    else:
        full, sent = result, result
    return Collective(kind, n, full, sent, tuple(tuple(int(d) for d in g) for g in groups))


def collective_list(hlo_text: str, num_devices: int) -> list[tuple[Collective, float]]:
    """Every collective of the module with how many times one execution runs it.

    Args:
      hlo_text: ``compiled.as_text()`` of an SPMD-partitioned module.
      num_devices: devices in the module (groups written as ``{}`` span all of them).
    """
    direct: dict[str, list[Collective]] = {}
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(2)
            direct.setdefault(current, [])
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        collective = parse_collective(line, num_devices)
        if collective is not None:
            direct[current].append(collective)
            continue
        body = _WHILE.search(line)
        if body:
            trip = _TRIP.search(line)
            calls[current].append((body.group(1), int(trip.group(1)) if trip else 1))
            continue
        for group in _CALLS.findall(line):
            for callee in group.split(","):
                callee = callee.strip().lstrip("%")
                if callee:
                    calls[current].append((callee, 1))

    def walk(name: str, times: float, seen: frozenset) -> list[tuple[Collective, float]]:
        out = [(c, times) for c in direct.get(name, ())]
        for callee, n in calls.get(name, ()):
            if callee not in seen:
                out += walk(callee, times * n, seen | {callee})
        return out

    if entry is None:
        return [(c, 1.0) for found in direct.values() for c in found]
    return walk(entry, 1.0, frozenset({entry}))


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
    """Collective traffic of one execution of the module, by collective kind.

    Args:
      hlo_text: ``compiled.as_text()`` of an SPMD-partitioned module.
      num_devices: devices in the module (groups written as ``{}`` span all of them).

    Returns:
      ``{kind: {"count": executions, "payload_bytes": sum of full operand sizes S,
      "sent_bytes": bytes one device sends}}`` for each kind in ``KINDS`` (zeros when absent).
    """
    out = {kind: {"count": 0.0, "payload_bytes": 0.0, "sent_bytes": 0.0} for kind in KINDS}
    for collective, times in collective_list(hlo_text, num_devices):
        figures = out[collective.kind]
        figures["count"] += times
        figures["payload_bytes"] += times * collective.full_bytes
        figures["sent_bytes"] += times * collective.bytes_per_device
    return out
