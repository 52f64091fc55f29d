"""Benchmarks: ``parallelize`` against ``jax.pmap`` and hand-written plans, measured.

Suites (``scripts/benchmark.py --suite NAME``):

* ``seed``: the two workloads of the Alpa tutorial, "data parallelism preferred" (a small MLP,
  a large batch) and "model parallelism preferred" (a 4096-wide MLP, batch 32, Adam), each with
  ``pmap``, ``data``, ``zero2``, ``zero3`` and ``auto``.
* ``models``: GPT, MoE and Wide-ResNet with ``data``, ``zero2``, ``zero3``, ``manual``
  (Megatron-style rules), ``auto`` and ``auto_timed`` (``measure=True``: the compiled finalists
  are timed and the fastest kept): CPU step time measured, H100 step time estimated by the
  cost model from the same compiled step. Then, per workload, the hand plans and ``auto``
  timed in turns in one process (``interleaved``: one step of each per round, twice as many
  rounds as timed steps), where ``auto`` is compared with the best hand plan.
* ``pipeline``: an 8-layer GPT and a Wide-ResNet, the best unpipelined plan (data, ZeRO-2,
  ZeRO-3, auto) against ``pipeshard`` with automatic stages, with 4 stages x 2 devices
  (1F1B and GPipe) and with 8 stages x 1 device (1F1B), 8 micro-batches: step time, the
  schedule's bubble and the measured one.
* ``fidelity``: the ``models`` suite's workloads, every hand-written plan and every plan the
  planner compiled (``auto_timed`` times its finalists): predicted step time (the solver's
  price, the cost model on the compiled program) against measured, their rank correlation and
  the worst ratio (``benchmarks._fidelity``); ``auto`` against the best hand plan as in
  ``models``.
* ``solver``: the automatic method's solve and compile time against model depth and device
  count (compiled on abstract shapes; nothing is run), and the solver alone on a 24-layer,
  2048-wide GPT on 8 devices and a 48-layer, 8192-wide GPT on 64 (priced for H100s).

Every case runs in a fresh process whose ``XLA_FLAGS`` simulate the suite's device count on a
CPU (real devices are used on a GPU host), warms up, and times at least five steps; the
median is reported. Ratios compare cases of one run only.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from benchmarks import _fidelity, _report
from benchmarks._report import can_plot as can_plot
from benchmarks._run import RESULT_MARKER
from benchmarks._workloads import SEED_WORKLOADS, WorkloadSpec

__all__ = ["SUITES", "can_plot", "format_markdown", "format_result", "interleaved_cases",
           "merge_rounds", "plot", "run_case_subprocess", "run_suite", "suite_cases",
           "summarize", "write_json"]

SUITES = ("seed", "models", "solver", "pipeline", "fidelity")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "benchmarks")
SEED_METHODS = ("pmap", "data", "zero2", "zero3", "auto")
MODEL_METHODS = ("data", "zero2", "zero3", "manual", "auto")
# "auto" chooses by its estimates alone (the same plan every run); "auto_timed" times its
# compiled finalists on the devices and keeps the fastest.
MEASURED_MODEL_METHODS = MODEL_METHODS + ("auto_timed",)
ESTIMATE_PROFILE = "h100"

# Scaled-down sizes of the models Alpa benchmarked, small enough that a step runs in well
# under a second on 8 simulated CPU devices sharing two cores.
MODEL_WORKLOADS = {
    "gpt": WorkloadSpec("gpt", "gpt", {
        "vocab_size": 1024, "block_size": 64, "num_layers": 2, "num_heads": 8,
        "hidden_size": 256}, batch_size=16, seq_len=64),
    "moe": WorkloadSpec("moe", "moe", {
        "vocab_size": 1024, "block_size": 64, "num_layers": 2, "num_heads": 8,
        "hidden_size": 256, "num_experts": 8, "expert_group_size": 256}, batch_size=16,
        seq_len=64),
    "wide_resnet": WorkloadSpec("wide_resnet", "wide_resnet", {
        "depth": 14, "base_channels": 16, "width_factor": 2, "num_classes": 10,
        "image_size": 32}, batch_size=16, seq_len=32),
}
# The smallest of Alpa's sizes (configs/benchmarks/), compiled on abstract shapes only and
# priced with the H100 profile; global batches cut to what 8 GPUs hold without pipelining.
ESTIMATE_CONFIGS = {"gpt-125m": 64, "moe-380m": 64, "wide_resnet-250m": 256}
# Deeper versions of the models suite's GPT and Wide-ResNet for the pipeline suite: the best
# unpipelined plan (data, ZeRO-2, ZeRO-3, the solver's) against pipeshard with automatic stages
# with four stages of two devices, under 1F1B and GPipe, and with eight stages of one device
# (no collective inside a stage), 8 micro-batches.
PIPELINE_WORKLOADS = {
    "gpt": WorkloadSpec("gpt_8_layers", "gpt", {
        "vocab_size": 1024, "block_size": 64, "num_layers": 8, "num_heads": 8,
        "hidden_size": 256}, batch_size=32, seq_len=64),
    "wide_resnet": dataclasses.replace(MODEL_WORKLOADS["wide_resnet"], batch_size=32),
}
PIPELINE_MICRO_BATCHES = 8
# (label, method, stages): stages None for the unpipelined methods.
PIPELINE_CASES = (("data", "data", None), ("zero2", "zero2", None), ("zero3", "zero3", None),
                  ("auto", "auto", None), ("pipeshard_auto", "pipeshard", "auto"),
                  ("pipeshard_4x2", "pipeshard", 4), ("pipeshard_4x2_gpipe", "pipeshard_gpipe", 4),
                  ("pipeshard_8x1", "pipeshard", 8))
SOLVER_DEPTHS = (1, 2, 4, 8)
SOLVER_DEVICE_COUNTS = (2, 4, 8)
# The solver alone (nothing compiled) on large GPTs, priced for H100s: (config, global batch,
# devices). The targets: under 10 s for the first, under 60 s for the second.
SOLVE_ONLY = (("gpt-1.3b", 64, 8), ("gpt-39b", 64, 64))


def config_workload(name: str, batch_size: int) -> WorkloadSpec:
    """The model of ``configs/benchmarks/NAME.yaml`` at ``batch_size``, computing in bfloat16.

    Raises:
      ValueError: no such benchmark config.
    """
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        known = sorted(f.removesuffix(".yaml") for f in os.listdir(CONFIG_DIR))
        raise ValueError(f"no benchmark config {path}; known: {', '.join(known)}")
    with open(path) as f:
        config = yaml.safe_load(f)
    options = {k: v for k, v in config["model"].items() if k != "name"}
    options["dtype"] = "bfloat16"
    data = config.get("data", {})
    seq_len = data.get("seq_len") or data.get("image_size") or options.get("image_size")
    return WorkloadSpec(name, config["model"]["name"], options, batch_size=batch_size,
                        seq_len=seq_len)


def solver_workload(num_layers: int) -> WorkloadSpec:
    """The GPT of the ``solver`` suite with ``num_layers`` blocks."""
    return WorkloadSpec(f"gpt_{num_layers}_layers", "gpt", {
        "vocab_size": 1024, "block_size": 64, "num_layers": num_layers, "num_heads": 8,
        "hidden_size": 256}, batch_size=16, seq_len=64)


def suite_cases(suite: str, devices: int = 8, steps: int = 5,
                warmup: int = 2) -> list[dict[str, Any]]:
    """The cases of ``suite`` on ``devices`` devices, in the order they run.

    Raises:
      ValueError: an unknown suite, or fewer than 5 timed steps.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {SUITES}")
    if steps < 5:
        raise ValueError(f"steps={steps}: the median needs at least 5 timed steps")

    def case(spec: WorkloadSpec, method: str, n: int = devices, **extra):
        return {"workload": spec.to_json(), "method": method, "devices": n, "steps": steps,
                "warmup": warmup, "measure": True, "profile": None, **extra}

    if suite == "seed":
        return [case(spec, method) for spec in SEED_WORKLOADS.values() for method in SEED_METHODS]
    if suite == "pipeline":
        return [case(spec, method, label=label, **({"pipeline": {
                    "num_micro_batches": PIPELINE_MICRO_BATCHES, "stages": stages}}
                    if stages is not None else {}))
                for spec in PIPELINE_WORKLOADS.values() for label, method, stages in PIPELINE_CASES]
    if suite == "fidelity":
        return [case(spec, method) for spec in MODEL_WORKLOADS.values()
                for method in MEASURED_MODEL_METHODS]
    if suite == "models":
        measured = [case(spec, method, estimate_profiles=[ESTIMATE_PROFILE])
                    for spec in MODEL_WORKLOADS.values() for method in MEASURED_MODEL_METHODS]
        estimated = [case(config_workload(name, batch), method, measure=False,
                          profile=ESTIMATE_PROFILE, estimate_profiles=[ESTIMATE_PROFILE])
                     for name, batch in ESTIMATE_CONFIGS.items() for method in MODEL_METHODS]
        return measured + estimated
    cases = [case(solver_workload(depth), "auto", measure=False) for depth in SOLVER_DEPTHS]
    cases += [case(solver_workload(2), "auto", n, measure=False)
              for n in SOLVER_DEVICE_COUNTS if n != devices or 2 not in SOLVER_DEPTHS]
    cases += [case(config_workload(name, batch), "solve", n, measure=False, profile="h100")
              for name, batch, n in SOLVE_ONLY]
    return cases


def interleaved_cases(suite: str, devices: int = 8, steps: int = 5,
                      warmup: int = 2) -> list[dict[str, Any]]:
    """The ``models`` suite's comparison in one process per workload: its hand plans and
    ``auto`` timed in turns, ``6 * steps`` rounds (``benchmarks._interleaved``): per-step
    times on the shared cores spread 30% (180-260 ms on the GPT), so the median needs many
    rounds to tell plans 5% apart. Other suites: none."""
    if suite != "models":
        return []
    return [{"workload": spec.to_json(), "method": "interleaved", "plans": list(MODEL_METHODS),
             "devices": devices, "steps": 6 * steps, "warmup": warmup}
            for spec in MODEL_WORKLOADS.values()]


def run_case_subprocess(case: dict[str, Any], timeout_s: float = 1800.0) -> dict[str, Any]:
    """Runs ``case`` in a fresh Python process with ``case["devices"]`` simulated CPU devices.

    Returns:
      The case's result; on failure ``{"workload", "method", "devices", "error": message}``.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                        f"{case['devices']}").strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    failed = {"workload": case["workload"]["name"], "method": case.get("label", case["method"]),
              "devices": case["devices"]}
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks._run", json.dumps(case)],
                              capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**failed, "error": f"exit code {proc.returncode}: {tail}"}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per workload, each method's step time and memory as a ratio of the baseline's.

    Ratios are keyed ``step_time_s`` (measured), ``per_device_memory_bytes`` and, for cost
    model estimates, ``{profile}_step_time_s``.

    The baseline is ``pmap`` when the workload ran it, else ``data``.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["workload"] for r in results):
        rows = {r["method"]: r for r in results if r["workload"] == name and "error" not in r}
        base_name = "pmap" if "pmap" in rows else "data"
        base = rows.get(base_name)
        if base is None:
            continue
        entry: dict[str, Any] = {"baseline": base_name}
        for method, row in rows.items():
            ratios = {}
            for key, value in _compared_figures(row).items():
                base_value = _compared_figures(base).get(key)
                if value is not None and base_value:
                    ratios[key] = value / base_value
            entry[method] = ratios
        summary[name] = entry
    return summary


def _compared_figures(row: dict[str, Any]) -> dict[str, Any]:
    figures = {"step_time_s": row.get("step_time_s"),
               "per_device_memory_bytes": row.get("per_device_memory_bytes")}
    for profile, estimate in row.get("estimates", {}).items():
        figures[f"{profile}_step_time_s"] = estimate["step_time_s"]
    return figures


def environment() -> dict[str, Any]:
    """Where and when the numbers were taken."""
    import jax

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit,
            "jax": jax.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def merge_rounds(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One result from two runs of a case: timed steps pooled, the median taken over all."""
    if "error" in first or "error" in later:
        return first if "error" in first else later
    merged = dict(first)
    if first.get("step_times_s") and later.get("step_times_s"):
        merged["step_times_s"] = first["step_times_s"] + later["step_times_s"]
        merged["step_time_s"] = statistics.median(merged["step_times_s"])
        if first.get("tflops") is not None:
            merged["tflops"] = first["model_flops_per_step"] / merged["step_time_s"] / 1e12
    merged["rounds"] = first.get("rounds", 1) + 1
    return merged


def merge_interleaved(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One interleaved result from two runs: each plan's timed steps pooled, median over all."""
    if "error" in first or "error" in later:
        return first if "error" in first else later
    plans = {}
    for plan, run in first["plans"].items():
        times = run["step_times_s"] + later["plans"][plan]["step_times_s"]
        plans[plan] = {**run, "step_times_s": times, "step_time_s": statistics.median(times)}
    return {**first, "plans": plans, "rounds": first.get("rounds", 1) + 1}


def run_suite(suite: str, devices: int = 8, *, steps: int = 5, warmup: int = 2,
              repeat: int = 1, cases: Sequence[dict[str, Any]] | None = None,
              interleaved: Sequence[dict[str, Any]] | None = None,
              runner: Callable[[dict[str, Any]], dict[str, Any]] = run_case_subprocess,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every case of ``suite`` and collects the results.

    Args:
      suite: one of ``SUITES``.
      devices: devices per case (simulated on a CPU).
      steps: timed steps per case (at least 5; the median is reported).
      warmup: untimed steps first (compilation happens in the first).
      repeat: rounds over all cases; each case's timed steps are pooled over the rounds, so
        a burst of load from other processes weighs on every method alike. Cases that time
        nothing (``measure`` false) run in the first round only.
      cases: run these instead of ``suite_cases(suite, devices, steps, warmup)``.
      interleaved: run these (``"interleaved"`` cases) after each round's cases; default
        ``interleaved_cases(suite, ...)``, none when ``cases`` is given.
      runner: runs one case; the default starts a fresh process per case.
      log: receives one progress line per case.

    Returns:
      ``{"suite", "devices", "repeat", "results": [one dict per case], "summary":
      summarize(results), "interleaved": [one dict per interleaved case], "environment":
      environment()}`` (the load average at the end).
    """
    if interleaved is None:
        interleaved = (interleaved_cases(suite, devices, steps, warmup) if cases is None
                       else [])
    cases = list(cases if cases is not None else suite_cases(suite, devices, steps, warmup))
    env = environment()  # the commit measured is the one at the start
    results: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []

    def run(round_index, batch, collected, merge, label):
        for i, case in enumerate(batch):
            if round_index and not case.get("measure", True):
                continue  # nothing timed: a second compile gives the same figures
            result = runner(case)
            log(f"[round {round_index + 1}/{repeat}, {label}{i + 1}/{len(batch)}] "
                f"{format_result(result)}")
            if round_index == 0:
                collected.append(result)
            else:
                collected[i] = merge(collected[i], result)

    for round_index in range(repeat):
        run(round_index, cases, results, merge_rounds, "")
        run(round_index, interleaved, turns, merge_interleaved, "interleaved ")
    return {"suite": suite, "devices": devices, "repeat": repeat, "results": results,
            "summary": summarize(results), "interleaved": turns,
            "environment": {**env, "load_average": environment()["load_average"]}}


def format_result(result: dict[str, Any]) -> str:
    """One readable line for a case's result."""
    head = f"{result['workload']:<26} {result['method']:<7} devices={result['devices']}"
    if "error" in result:
        return f"{head} FAILED: {result['error']}"
    if "plans" in result:
        return head + " " + "  ".join(f"{plan} {run['step_time_s'] * 1e3:.2f} ms"
                                      for plan, run in result["plans"].items())
    step = result.get("step_time_s")
    comm, compile_s = result.get("communication_bytes"), result.get("compile_time_s")
    parts = [f"step {step * 1e3:9.2f} ms" if step is not None else "step       n/a",
             f"memory {result['per_device_memory_bytes'] / 2**20:8.2f} MiB",
             f"comm {comm / 2**20:8.2f} MiB" if comm is not None else "comm        n/a",
             f"mesh {result['plan']['mesh_shape']}",
             f"solve {result.get('solve_time_s', 0.0):.2f} s",
             f"compile {compile_s:.2f} s" if compile_s is not None else "compile n/a"]
    return head + " " + "  ".join(parts)


def format_markdown(data: dict[str, Any]) -> str:
    """The suite's results as Markdown tables."""
    if data["suite"] != "fidelity":
        return _report.format_markdown(data)
    models = _report.format_markdown({**data, "suite": "models"})
    models = models.replace("Suite `models`", "Suite `fidelity`", 1)
    return models + "\n\n" + "\n".join(
        ["## Predicted against measured", ""] + _fidelity.tables(data))


def plot(data: dict[str, Any], path: str) -> None:
    """Draws the suite's results to a PNG at ``path`` (``benchmarks._report.plot``; the
    fidelity suite: predicted against measured step times)."""
    if data["suite"] == "fidelity":
        if not can_plot():
            raise RuntimeError("plotting needs matplotlib: pip install -e '.[bench]'")
        _fidelity.plot(data, path)
    else:
        _report.plot(data, path)


def write_json(data: dict[str, Any], path: str) -> None:
    """Writes the suite's results as indented JSON."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
