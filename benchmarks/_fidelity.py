"""Cost-model fidelity (``--suite fidelity``): the planner's predicted step times against the
measured ones, for every plan it compiled and every hand-written plan of the suite.

Two predictions are compared with the stopwatch:

* ``solver``: the intra-op solver's price of a candidate mesh (what the search ranks by);
* ``compiled``: the cost model on XLA's compiled program (what ``analyze`` reports and what
  the finalists are ranked by when nothing is timed).

Points come from ``auto_timed`` (``measure=True``: every compiled finalist is timed on the
devices) and from each hand-written method (its compiled estimate and its measured step).
Per workload: Spearman's rank correlation of prediction and measurement, the worst ratio of
measured to predicted, and whether the untimed ``auto`` chose the fastest measured plan.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

_HAND = ("data", "zero2", "zero3", "manual")


def points(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per measured plan: ``{"workload", "candidate", "solver_s", "compiled_s",
    "measured_s"}`` (``solver_s`` is ``None`` for hand-written plans)."""
    out = []
    for r in results:
        if "error" in r:
            continue
        if r["method"] == "auto_timed":
            for m in r.get("solver", {}).get("meshes", []):
                if m.get("measured_step_time_s"):
                    mesh = ",".join(f"{a}={s}" for a, s in m["mesh_shape"].items())
                    variant = f" {m['variant']}" if m.get("variant") else ""
                    out.append({"workload": r["workload"], "candidate": f"auto: {mesh}{variant}",
                                "solver_s": m["step_time_s"],
                                "compiled_s": m["compiled_step_time_s"],
                                "measured_s": m["measured_step_time_s"]})
        elif r["method"] in _HAND and r.get("step_time_s") and r.get("estimated_step_time_s"):
            out.append({"workload": r["workload"], "candidate": r["method"], "solver_s": None,
                        "compiled_s": r["estimated_step_time_s"], "measured_s": r["step_time_s"]})
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (``None`` with fewer than 3 points or a constant side)."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr

    value = float(spearmanr(xs, ys).statistic)
    return None if math.isnan(value) else value


def summary(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per workload: the points, both rank correlations, the worst measured/predicted ratios
    and the untimed ``auto``'s measured step against the fastest measured plan."""
    pts = points(results)
    out = {}
    for name in dict.fromkeys(p["workload"] for p in pts):
        mine = [p for p in pts if p["workload"] == name]
        timed = [p for p in mine if p["solver_s"] is not None]
        ratios = [p["measured_s"] / p["compiled_s"] for p in mine if p["compiled_s"]]
        rows = {r["method"]: r for r in results
                if r["workload"] == name and "error" not in r and r.get("step_time_s")}
        fastest = min((p["measured_s"] for p in mine), default=None)
        hand = min((rows[m]["step_time_s"] for m in _HAND if m in rows), default=None)
        auto = rows.get("auto", {}).get("step_time_s")
        timed_auto = rows.get("auto_timed", {}).get("step_time_s")
        out[name] = {
            "points": mine,
            "spearman_compiled": spearman([p["compiled_s"] for p in mine],
                                          [p["measured_s"] for p in mine]),
            "spearman_solver": spearman([p["solver_s"] for p in timed],
                                        [p["measured_s"] for p in timed]),
            "measured_over_compiled": [min(ratios), max(ratios)] if ratios else None,
            "auto_over_fastest": auto / fastest if auto and fastest else None,
            "auto_over_best_hand": auto / hand if auto and hand else None,
            "auto_timed_over_best_hand": timed_auto / hand if timed_auto and hand else None,
        }
    return out


def tables(data: dict[str, Any]) -> list[str]:
    """The fidelity suite as Markdown: per workload, every point, then the figures."""
    lines = []
    for name, s in summary(data["results"]).items():
        lines += [f"### {name} ({data['devices']} devices)", "",
                  "| plan | solver (ms) | compiled estimate (ms) | measured (ms) | measured / compiled |",
                  "|---|---|---|---|---|"]
        for p in sorted(s["points"], key=lambda p: p["measured_s"]):
            ratio = p["measured_s"] / p["compiled_s"] if p["compiled_s"] else None
            lines.append(f"| {p['candidate']} | {_ms(p['solver_s'])} | {_ms(p['compiled_s'])} "
                         f"| {_ms(p['measured_s'])} | {_num(ratio, 'x')} |")
        low_high = s["measured_over_compiled"]
        lines += ["", f"Rank correlation with the measured times: compiled estimate "
                  f"{_num(s['spearman_compiled'])} ({len(s['points'])} plans), solver "
                  f"{_num(s['spearman_solver'])} "
                  f"({sum(p['solver_s'] is not None for p in s['points'])} finalists). "
                  f"Measured / compiled estimate from {_num(low_high and low_high[0], 'x')} to "
                  f"{_num(low_high and low_high[1], 'x')}. The untimed `auto` plan's measured "
                  f"step / the fastest measured plan: {_num(s['auto_over_fastest'], 'x')}; / the "
                  f"best hand-written plan: {_num(s['auto_over_best_hand'], 'x')} "
                  f"(`auto_timed`: {_num(s['auto_timed_over_best_hand'], 'x')}).", ""]
    return lines


def plot(data: dict[str, Any], path: str) -> None:
    """Predicted (compiled estimate) against measured step time, one colour per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    pts = points(data["results"])
    for name in dict.fromkeys(p["workload"] for p in pts):
        mine = [p for p in pts if p["workload"] == name and p["compiled_s"]]
        ax.scatter([p["compiled_s"] * 1e3 for p in mine], [p["measured_s"] * 1e3 for p in mine],
                   label=name)
    values = [v * 1e3 for p in pts for v in (p["compiled_s"], p["measured_s"]) if v]
    if values:
        lo, hi = min(values) / 1.5, max(values) * 1.5
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compiled estimate (ms, CPU profile)")
    ax.set_ylabel("measured step (ms)")
    ax.set_title(f"Cost-model fidelity, {data['devices']} devices")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f}"


def _num(value, unit: str = "") -> str:
    return "—" if value is None else f"{value:.2f}{unit}"
