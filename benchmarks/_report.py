"""Benchmark results as Markdown tables and a PNG chart."""
from __future__ import annotations

import importlib.util
import statistics
from typing import Any

MiB = 2**20


def can_plot() -> bool:
    """Whether matplotlib (the ``bench`` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def plan_text(result: dict[str, Any], max_leaves: int = 3) -> str:
    """The mesh and the specs of the largest parameter leaves: ``data=8; [4096,4096]:P()``."""
    plan = result["plan"]
    mesh = ",".join(f"{axis}={size}" for axis, size in plan["mesh_shape"].items())
    params = plan["params"]
    if not isinstance(params, dict):
        return f"{mesh}; params {params}"
    largest = sorted(params.values(), key=lambda p: -_prod(p["shape"]))[:max_leaves]
    specs = " ".join(f"[{','.join(map(str, p['shape']))}]:P({','.join(map(_axes, p['spec']))})"
                     for p in largest)
    return f"{mesh}; {specs}"


def _axes(entry) -> str:
    return "+".join(entry) if isinstance(entry, list) else str(entry)


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def _seed_tables(data: dict[str, Any]) -> list[str]:
    lines = []
    for name, summary in _by_workload(data).items():
        rows, base = summary
        lines += [f"### {name} ({data['devices']} devices)", "",
                  f"| method | step time (ms) | vs {base} | per-device memory (MiB) | vs {base} "
                  f"| communication (MiB/step) | plan (mesh; largest params) |",
                  "|---|---|---|---|---|---|---|"]
        ratios = data["summary"].get(name, {})
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
                continue
            ratio = ratios.get(r["method"], {})
            lines.append(
                f"| {r['method']} | {_ms(r['step_time_s'])} | {_ratio(ratio.get('step_time_s'))} "
                f"| {r['per_device_memory_bytes'] / MiB:.2f} "
                f"| {_ratio(ratio.get('per_device_memory_bytes'))} "
                f"| {r['communication_bytes'] / MiB:.2f} | {plan_text(r)} |")
        lines.append("")
    return lines


def _models_tables(data: dict[str, Any]) -> list[str]:
    lines = ["TFLOP/s: the model's training FLOPs per step (closed form) over the step time, all "
             "devices together. H100 estimates: the cost model on the compiled step (XLA's FLOPs "
             "and bytes, HLO collectives) with the published H100 figures.", ""]
    for name, (rows, base) in _by_workload(data).items():
        params = next((r["num_params"] for r in rows if "num_params" in r), 0)
        lines += [f"### {name} ({params / 1e6:.2f} M params, {data['devices']} devices)", "",
                  f"| method | CPU step (ms) | vs {base} | CPU TFLOP/s | H100 est. step (ms) "
                  f"| vs {base} | H100 est. TFLOP/s | per-device memory (MiB) "
                  f"| communication (MiB/step) | mesh |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        ratios = data["summary"].get(name, {})
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | | | |")
                continue
            h100 = r.get("estimates", {}).get("h100", {})
            tflops = "n/a" if r.get("tflops") is None else f"{r['tflops']:.4f}"
            est_tflops = f"{h100['tflops']:.1f}" if h100 else "n/a"
            mesh = ",".join(f"{a}={s}" for a, s in r["plan"]["mesh_shape"].items())
            ratio = ratios.get(r["method"], {})
            lines.append(
                f"| {r['method']} | {_ms(r['step_time_s'])} "
                f"| {_ratio(ratio.get('step_time_s'))} | {tflops} "
                f"| {_ms(h100.get('step_time_s'))} | {_ratio(ratio.get('h100_step_time_s'))} "
                f"| {est_tflops} "
                f"| {r['per_device_memory_bytes'] / MiB:.2f} "
                f"| {r['communication_bytes'] / MiB:.2f} | {mesh} |")
        lines.append("")
    return lines + _interleaved_table(data)


def paired_ratio(times: list[float], base: list[float]) -> float:
    """The median over rounds of ``times[i] / base[i]`` (steps of one round, taken in turn):
    the load on shared cores moves between rounds more than within one, so this tells two
    plans apart where the ratio of their medians swings (0.92x vs 1.00x paired in one run).

    Raises:
      ValueError: the two lists have different lengths.
    """
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def auto_over_best_hand(turn: dict[str, Any], paired: bool = False) -> tuple[float, str] | None:
    """``auto`` against the best other plan timed in turns in one process (an ``interleaved``
    result), and that plan's name; None if either is missing.

    ``paired=False``: ``auto``'s median step over the fastest plan's median. ``paired=True``:
    against each plan the median over rounds of ``auto``'s step over that plan's step of the
    same round (``paired_ratio``), and the largest of those (the plan that beats ``auto`` most).
    """
    plans = turn.get("plans", {})
    if "auto" not in plans or len(plans) < 2:
        return None
    auto = plans["auto"]["step_times_s"]
    if paired:
        ratios = {p: paired_ratio(auto, r["step_times_s"]) for p, r in plans.items()
                  if p != "auto"}
        best = max(ratios, key=ratios.get)
        return ratios[best], best
    hand = {p: r["step_time_s"] for p, r in plans.items() if p != "auto"}
    best = min(hand, key=hand.get)
    return plans["auto"]["step_time_s"] / hand[best], best


def _interleaved_table(data: dict[str, Any]) -> list[str]:
    turns = [t for t in data.get("interleaved", []) if "plans" in t]
    if not turns:
        return []
    plans = list(turns[0]["plans"])
    rounds = len(next(iter(turns[0]["plans"].values()))["step_times_s"])
    lines = [f"### In one process: each plan timed in turns ({rounds} steps each, median)", "",
             "Separate processes start each plan from a different machine state; here every "
             "plan meets the same load, so these are the ratios to compare.", "",
             "| workload | " + " | ".join(f"{p} (ms)" for p in plans)
             + " | auto / best hand plan (paired) | auto / best hand plan (medians) |",
             "|---" * (len(plans) + 3) + "|"]
    for turn in turns:
        cells = [_ms(turn["plans"][p]["step_time_s"]) for p in plans]
        for paired in (True, False):
            verdict = auto_over_best_hand(turn, paired)
            cells.append(f"{verdict[0]:.2f}x ({verdict[1]})" if verdict else "—")
        lines.append(f"| {turn['workload']} | " + " | ".join(cells) + " |")
    for turn in data.get("interleaved", []):
        if "error" in turn:
            lines.append(f"| {turn['workload']} | failed: {turn['error']} |")
    return lines + [""]


def _solver_table(data: dict[str, Any]) -> list[str]:
    lines = ["Solver: tracing, strategy enumeration and the integer programs of every mesh "
             "shape (`solver.solve_time_s`). Planning: the whole `make_plan` call, which also "
             "compiles close candidates with XLA to check them. Compile: XLA compiling the "
             "chosen plan's step.", "",
             "| workload | devices | equations | groups | ILP classes | solver (s) "
             "| planning (s) | compile (s) | mesh |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['devices']} | failed: {r['error']} "
                         f"| | | | | | |")
            continue
        solver = r.get("solver", {})
        solver_time = solver.get("solve_time_s")
        mesh = ",".join(f"{a}={s}" for a, s in r["plan"]["mesh_shape"].items())
        lines.append(f"| {r['workload']} | {r['devices']} | {solver.get('num_equations', '')} "
                     f"| {solver.get('num_groups', '')} | {solver.get('num_classes', '')} "
                     f"| {'' if solver_time is None else f'{solver_time:.2f}'} "
                     f"| {r['solve_time_s']:.2f} | {_seconds(r['compile_time_s'])} | {mesh} |")
    return lines + [""]


def _pipeline_tables(data: dict[str, Any]) -> list[str]:
    lines = []
    for name, (rows, _) in _by_workload(data).items():
        flat = [r for r in rows if "error" not in r and "pipeline" not in r and r["step_time_s"]]
        best = min(flat, key=lambda r: r["step_time_s"], default=None)
        base = f"best unpipelined ({best['method']})" if best else "best unpipelined"
        lines += [f"### {name} ({data['devices']} devices)", "",
                  f"| method | stages: layers @ devices | step time (ms) | vs {base} "
                  f"| per-device memory (MiB) | bubble (schedule) | bubble (measured) "
                  f"| host issue per step (ms): per stage x micro-batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
                continue
            pipe = r.get("pipeline")
            stages = " / ".join(
                f"{s['layers'][0]}-{s['layers'][1]} @ {len(s['devices'])}"
                for s in pipe["stages"]) if pipe else plan_text(r, 1)
            ratio = (r["step_time_s"] / best["step_time_s"]
                     if best and r["step_time_s"] else None)
            bubble = f"{100 * pipe['bubble_fraction']:.0f}%" if pipe else ""
            measured = pipe.get("measured_bubble_fraction") if pipe else None
            lines.append(f"| {r['method']} | {stages} | {_ms(r['step_time_s'])} | {_ratio(ratio)} "
                         f"| {r['per_device_memory_bytes'] / MiB:.2f} | {bubble} "
                         f"| {'' if measured is None else f'{100 * measured:.0f}%'} "
                         f"| {_issue_text(pipe.get('issue') if pipe else None)} |")
        lines.append("")
    return lines


def _issue_text(issue) -> str:
    """``"31.2: 0.98 (88 programs, 94 transfers)"``: Python's seconds issuing one step, the
    same per (stage, micro-batch), and what it issued."""
    if not issue:
        return ""
    return (f"{issue['host_s'] * 1e3:.1f}: {issue['issue_ms_per_task']:.2f} "
            f"({issue['programs']} programs, {issue['transfers']} transfers)")


def _seconds(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _by_workload(data: dict[str, Any]) -> dict[str, tuple[list, str]]:
    out = {}
    for name in dict.fromkeys(r["workload"] for r in data["results"]):
        rows = [r for r in data["results"] if r["workload"] == name]
        out[name] = (rows, data["summary"].get(name, {}).get("baseline", "pmap"))
    return out


def format_markdown(data: dict[str, Any]) -> str:
    """The suite's results as Markdown tables (one per workload; one for the solver suite)."""
    tables = {"seed": _seed_tables, "models": _models_tables, "solver": _solver_table,
              "pipeline": _pipeline_tables}
    env = data.get("environment", {})
    head = [f"Suite `{data['suite']}`, {data['devices']} devices, jax {env.get('jax', '?')}, "
            f"{env.get('cpu_count', '?')} CPU cores, load average at the end "
            f"{', '.join(f'{x:.1f}' for x in env.get('load_average') or [])}, "
            f"started {env.get('date', '')}.", ""]
    return "\n".join(head + tables[data["suite"]](data))


_FIGURES = (("step_time_s", "step time (measured)"),
            ("h100_step_time_s", "step time (H100 estimate)"),
            ("per_device_memory_bytes", "per-device memory"))


def plot(data: dict[str, Any], path: str) -> None:
    """Draws the suite's results to a PNG at ``path``.

    Seed and models suites: per workload, each method's step time and per-device memory
    relative to the baseline (log scale). Solver suite: solve and compile time per case.

    Raises:
      RuntimeError: matplotlib is not installed.
    """
    if not can_plot():
        raise RuntimeError("plotting needs matplotlib: pip install -e '.[bench]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    if data["suite"] == "solver":
        fig, ax = plt.subplots(figsize=(8, 4))
        ok = [r for r in data["results"] if "error" not in r]
        labels = [f"{r['workload']}\n{r['devices']} dev" for r in ok]
        x = range(len(ok))
        for offset, label, values in (
                (-0.27, "solver", [r.get("solver", {}).get("solve_time_s", 0.0) for r in ok]),
                (0.0, "planning (with XLA checks)", [r["solve_time_s"] for r in ok]),
                (0.27, "compile", [r["compile_time_s"] or 0.0 for r in ok])):
            bars = ax.bar([i + offset for i in x], values, 0.27, label=label)
            ax.bar_label(bars, [f"{v:.1f}" for v in values], fontsize=6, padding=2)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("seconds")
        ax.legend()
        ax.set_title("ShardParallel: planning and compile time (GPT)")
        ax.margins(y=0.1)
    else:
        groups = _by_workload(data)
        columns = min(len(groups), 3)
        rows_count = -(-len(groups) // columns)
        fig, axes = plt.subplots(rows_count, columns, figsize=(5.5 * columns, 4.6 * rows_count),
                                 squeeze=False)
        for ax in axes.flat[len(groups):]:
            ax.set_visible(False)
        for ax, (name, (rows, base)) in zip(axes.flat, groups.items()):
            ratios = data["summary"].get(name, {})
            methods = [r["method"] for r in rows if r["method"] in ratios]
            x = range(len(methods))
            shown = [(key, label) for key, label in _FIGURES
                     if any(key in ratios[m] for m in methods)]
            width = 0.8 / max(len(shown), 1)
            drawn = [ratios[m][key] for m in methods for key, _ in shown if ratios[m].get(key)]
            wide_range = bool(drawn) and max(drawn) / min(drawn) > 8
            for k, (key, label) in enumerate(shown):
                offset = (k - (len(shown) - 1) / 2) * width
                values = [ratios[m].get(key, 0.0) for m in methods]
                bars = ax.bar([i + offset for i in x], values, width, label=label)
                ax.bar_label(bars, [f"{v:.2f}" if v else "" for v in values], fontsize=6,
                             rotation=90 if len(shown) > 2 else 0, padding=2)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            if wide_range:  # ratios over an order of magnitude apart: log scale
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.margins(y=0.15)
            long_labels = sum(len(m) for m in methods) > 40
            ax.set_xticks(list(x), methods, rotation=25 if long_labels else 0,
                          ha="right" if long_labels else "center", fontsize=8)
            ax.set_ylabel(f"relative to {base}" + (" (log scale)" if wide_range else "")
                          + ", lower is better")
            ax.set_title(f"{name}, {data['devices']} devices")
            ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False,
                      bbox_to_anchor=(0.5, -0.3 if long_labels else -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
