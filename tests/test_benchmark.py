"""The benchmark harness on a tiny MLP: real numbers, exact communication arithmetic, schema."""
import json
import statistics

import jax
import numpy as np
import pytest

import models
import parallel
from benchmarks import suites
from benchmarks._run import run_case
from benchmarks._workloads import WorkloadSpec, build_workload

TINY = WorkloadSpec("tiny", "mlp", {"in_features": 32, "hidden_size": 64, "num_layers": 1,
                                    "out_features": 16}, batch_size=16)
# Kernels 32x64 and 64x16, biases 64 and 16 (ZeRO shards leaves of >= 1024 elements).
TINY_PARAMS = 32 * 64 + 64 + 64 * 16 + 16


def _case(method, devices=8, **extra):
    return {"workload": TINY.to_json(), "method": method, "devices": devices, "steps": 5,
            "warmup": 2, "measure": True, "profile": None, **extra}


@pytest.fixture(scope="module")
def tiny_results():
    return {method: run_case(_case(method)) for method in ("pmap", "data", "zero3")}


def test_tiny_param_count_matches_the_model():
    assert models.get_spec("mlp").num_params(models.make_config("mlp", TINY.options)) == 3152
    assert TINY_PARAMS == 3152


def test_data_parallel_communication_is_one_ring_all_reduce_of_the_gradients(tiny_results):
    # Gradients (3152 float32) and the loss (one float32) are all-reduced together once:
    # a ring all-reduce over 8 devices sends 2 * 7/8 of the payload per device.
    payload = 4 * TINY_PARAMS + 4
    for method in ("pmap", "data"):
        result = tiny_results[method]
        assert result["collectives"] == {"all-reduce": {
            "count": 1.0, "payload_bytes": payload, "sent_bytes": 2 * 7 / 8 * payload}}
        assert result["communication_bytes"] == 2 * 7 / 8 * payload == 22071.0


def test_pmap_and_parallelize_train_identically_from_the_same_init(tiny_results):
    workload = build_workload(TINY)
    state = jax.jit(workload.init)(jax.random.key(0))
    first_loss = float(jax.jit(workload.loss_fn)(state["params"], workload.batch))
    for method in ("pmap", "data", "zero3"):
        losses = tiny_results[method]["losses"]
        assert len(losses) == 7  # 2 warm-up + 5 timed steps
        np.testing.assert_allclose(losses[0], first_loss, rtol=1e-6)
        np.testing.assert_allclose(losses, tiny_results["pmap"]["losses"], rtol=1e-5)
        assert losses[-1] < losses[0]  # Adam is making progress


def test_step_time_is_the_median_of_five_timed_steps(tiny_results):
    for result in tiny_results.values():
        assert len(result["step_times_s"]) == 5
        assert result["step_time_s"] == statistics.median(result["step_times_s"]) > 0


def test_memory_and_plans_per_method(tiny_results):
    # Replicated params and both Adam moments are at least 3 * 3152 float32 per device; ZeRO-3
    # shards all three over 8 devices, so it holds less than data parallelism.
    data, zero3 = tiny_results["data"], tiny_results["zero3"]
    assert data["per_device_memory_bytes"] >= 3 * 4 * TINY_PARAMS
    assert zero3["per_device_memory_bytes"] < data["per_device_memory_bytes"]
    assert tiny_results["pmap"]["plan"] == {"method": "pmap", "mesh_shape": {"batch": 8},
                                            "params": "replicated"}
    assert data["plan"]["mesh_shape"] == {"data": 8}
    assert data["plan"]["params"]["['kernels'][0]"] == {"shape": [32, 64], "spec": []}
    assert zero3["plan"]["params"]["['kernels'][0]"] == {"shape": [32, 64], "spec": [None, "data"]}


def test_run_suite_schema_summary_and_tables(tiny_results):
    cases = [_case("pmap"), _case("data")]
    data = suites.run_suite("seed", 8, cases=cases, log=lambda line: None,
                                runner=lambda case: tiny_results[case["method"]])
    assert data["suite"] == "seed" and data["devices"] == 8
    assert [(r["workload"], r["method"]) for r in data["results"]] == [("tiny", "pmap"),
                                                                       ("tiny", "data")]
    for r in data["results"]:
        assert {"workload", "method", "step_time_s", "per_device_memory_bytes",
                "communication_bytes"} <= set(r)
    pmap, dp = tiny_results["pmap"], tiny_results["data"]
    assert data["summary"]["tiny"]["baseline"] == "pmap"
    assert data["summary"]["tiny"]["data"] == {
        "step_time_s": dp["step_time_s"] / pmap["step_time_s"],
        "per_device_memory_bytes": dp["per_device_memory_bytes"] / pmap["per_device_memory_bytes"]}
    json.loads(json.dumps(data))  # JSON-serializable as written by --json
    table = suites.format_markdown(data)
    assert "| method | step time (ms) | vs pmap |" in table
    assert f"| data | {dp['step_time_s'] * 1e3:.2f} |" in table


def test_fresh_process_case_uses_the_requested_device_count():
    # Two simulated devices in a child process: the all-reduce sends 2 * 1/2 of the payload.
    result = suites.run_case_subprocess(_case("data", devices=2))
    assert "error" not in result, result
    assert result["devices"] == 2 and result["plan"]["mesh_shape"] == {"data": 2}
    assert result["communication_bytes"] == 4 * TINY_PARAMS + 4 == 12612


def test_suite_cases_name_the_tutorial_workloads_and_methods():
    cases = suites.suite_cases("seed", 8)
    assert [(c["workload"]["name"], c["method"]) for c in cases] == [
        (w, m) for w in ("data_parallel_preferred", "model_parallel_preferred")
        for m in ("pmap", "data", "zero2", "zero3", "auto")]
    assert {c["steps"] for c in cases} == {5}
    with pytest.raises(ValueError, match="at least 5 timed steps"):
        suites.suite_cases("seed", 8, steps=3)
    with pytest.raises(ValueError, match="unknown suite 'seeds'"):
        suites.suite_cases("seeds")


def test_cli_plot_without_matplotlib_fails_with_one_line(monkeypatch, capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py")
    spec = importlib.util.spec_from_file_location("benchmark_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setattr(suites, "can_plot", lambda: False)
    assert cli.main(["--suite", "seed", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --plot needs matplotlib: pip install -e '.[bench]'\n"


def test_repeated_rounds_pool_the_timed_steps_of_each_case():
    rounds = iter([[0.5, 0.1, 0.2, 0.3, 0.4], [0.6, 0.7, 0.8, 0.9, 1.0]])

    def runner(case):
        times = next(rounds)
        return {"workload": "w", "method": case["method"], "devices": 8,
                "step_times_s": times, "step_time_s": statistics.median(times),
                "tflops": 1.0, "model_flops_per_step": 3e12, "per_device_memory_bytes": 10,
                "communication_bytes": 0.0, "plan": {"mesh_shape": {"data": 8}}}

    ran = []

    def logged(case):
        ran.append(case["method"])
        if not case["measure"]:
            return {"workload": "w", "method": case["method"], "devices": 8, "step_time_s": None,
                    "per_device_memory_bytes": 10, "communication_bytes": 0.0,
                    "plan": {"mesh_shape": {"data": 8}}}
        return runner(case)

    data = suites.run_suite("seed", 8, cases=[_case("data"), _case("zero3", measure=False)],
                                repeat=2, runner=logged, log=lambda line: None)
    result, unmeasured = data["results"]
    assert ran == ["data", "zero3", "data"]  # nothing timed: compiled in the first round only
    assert "rounds" not in unmeasured
    assert data["repeat"] == 2 and result["rounds"] == 2
    assert result["step_times_s"] == [0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert result["step_time_s"] == pytest.approx(0.55)  # median of the 10 pooled steps
    assert result["tflops"] == pytest.approx(3e12 / 0.55 / 1e12)


def test_each_round_of_turns_starts_one_plan_later():
    from benchmarks._interleaved import round_order

    assert [round_order(["data", "zero3", "auto"], i) for i in range(4)] == [
        ["data", "zero3", "auto"], ["zero3", "auto", "data"], ["auto", "data", "zero3"],
        ["data", "zero3", "auto"]]


def test_interleaved_case_times_each_plan_in_turns_and_trains_like_the_fresh_process(
        tiny_results):
    result = run_case({"workload": TINY.to_json(), "method": "interleaved",
                       "plans": ["data", "zero3"], "devices": 8, "steps": 5, "warmup": 2})
    assert (result["workload"], result["method"], result["devices"]) == ("tiny", "interleaved", 8)
    assert list(result["plans"]) == ["data", "zero3"]
    for plan, run in result["plans"].items():
        assert run["mesh_shape"] == {"data": 8}
        assert len(run["step_times_s"]) == len(run["cpu_times_s"]) == 5
        assert run["step_time_s"] == statistics.median(run["step_times_s"]) > 0
        # Taking turns changes nothing in what each plan computes: 2 warm-up + 5 timed steps
        # from the same init as the case that ran alone in its own process.
        np.testing.assert_allclose(run["losses"], tiny_results[plan]["losses"], rtol=1e-5)


def test_models_suite_compares_auto_with_the_best_hand_plan_timed_in_turns():
    cases = suites.interleaved_cases("models", 8, steps=5, warmup=2)
    assert [(c["workload"]["name"], c["method"], c["plans"], c["steps"], c["warmup"])
            for c in cases] == [(w, "interleaved", ["data", "zero2", "zero3", "manual", "auto"],
                                 30, 2) for w in ("gpt", "moe", "wide_resnet")]
    assert suites.interleaved_cases("seed") == suites.interleaved_cases("pipeline") == []
    rounds = iter([{"data": [0.4, 0.5], "zero3": [0.2, 0.2], "auto": [0.2, 0.3]},
                   {"data": [0.6, 0.5], "zero3": [0.3, 0.4], "auto": [0.1, 0.2]}])

    def runner(case):
        times = next(rounds)
        return {"workload": "w", "method": "interleaved", "devices": 8, "plans": {
            p: {"step_times_s": t, "step_time_s": statistics.median(t)} for p, t in times.items()}}

    data = suites.run_suite("models", 8, cases=[], interleaved=[{"method": "interleaved"}],
                            repeat=2, runner=runner, log=lambda line: None)
    (turn,) = data["interleaved"]
    assert turn["rounds"] == 2
    assert turn["plans"]["zero3"]["step_times_s"] == [0.2, 0.2, 0.3, 0.4]
    assert turn["plans"]["zero3"]["step_time_s"] == pytest.approx(0.25)
    assert turn["plans"]["auto"]["step_time_s"] == pytest.approx(0.2)
    table = suites.format_markdown(data)
    assert ("| workload | data (ms) | zero3 (ms) | auto (ms) | auto / best hand plan (paired) "
            "| auto / best hand plan (medians) |") in table
    # paired: against zero3 the rounds' ratios 1.0, 1.5, 0.33, 0.5 -> median 0.75; against data
    # 0.5, 0.6, 0.17, 0.4 -> 0.45; medians: 0.2 / 0.25.
    assert "| w | 500.00 | 250.00 | 200.00 | 0.75x (zero3) | 0.80x (zero3) |" in table


def test_models_and_solver_suites_cover_their_workloads():
    cases = suites.suite_cases("models", 8)
    methods = ("data", "zero2", "zero3", "manual", "auto")
    assert [(c["workload"]["name"], c["method"], c["measure"], c["profile"]) for c in cases] == [
        (w, m, measure, profile)
        for ws, measure, profile, ms in (
            (("gpt", "moe", "wide_resnet"), True, None, methods + ("auto_timed",)),
            (("gpt-125m", "moe-380m", "wide_resnet-250m"), False, "h100", methods))
        for w in ws for m in ms]
    gpt_125m = next(c["workload"] for c in cases if c["workload"]["name"] == "gpt-125m")
    assert gpt_125m["options"]["hidden_size"] == 768 and gpt_125m["seq_len"] == 1024
    solver = suites.suite_cases("solver", 8)
    assert [(c["workload"]["options"]["num_layers"], c["devices"]) for c in solver] == [
        (1, 8), (2, 8), (4, 8), (8, 8), (2, 2), (2, 4), (24, 8), (48, 64)]
    assert [c["workload"]["options"]["hidden_size"] for c in solver[-2:]] == [2048, 8192]
    assert {(c["method"], c["measure"]) for c in solver[:-2]} == {("auto", False)}
    assert {(c["method"], c["profile"]) for c in solver[-2:]} == {("solve", "h100")}


def test_benchmarked_methods():
    from benchmarks._run import make_method

    auto = make_method("auto", "h100")
    assert isinstance(auto, parallel.AutoParallel) and auto.profile == "h100"
    assert auto.shard.measure is False and make_method("auto_timed").shard.measure is True
    manual = make_method("manual")
    assert isinstance(manual, parallel.ManualParallel) and manual.rules == parallel.MEGATRON_RULES
    assert type(make_method("zero3")) is parallel.Zero3Parallel
    with pytest.raises(ValueError, match="'pmap' runs the jax.pmap baseline"):
        make_method("pmap")


def test_plans_timed_in_turns_can_name_their_mesh():
    from benchmarks._interleaved import make_method

    manual = make_method("manual:d2xm4")
    assert isinstance(manual, parallel.ManualParallel)
    assert (manual.rules, manual.mesh) == (parallel.MEGATRON_RULES, {"data": 2, "model": 4})
    shard = make_method("shard:d4xm2")
    assert type(shard) is parallel.ShardParallel and shard.mesh == {"data": 4, "model": 2}
    pipelined = make_method("4x8")
    assert (pipelined.num_micro_batches, pipelined.stage_option) == (8, 4)
    with pytest.raises(ValueError, match="manual:d2xm4 \\(data 2 x model 4\\)"):
        make_method("manual:data=2")


def test_round_robin_pairs_each_round_with_the_first_plans_step():
    from benchmarks._report import paired_ratio

    # Round 2 ran under load for both plans: its ratio counts, not its 3x slower steps.
    assert paired_ratio([0.11, 0.33, 0.12], [0.10, 0.30, 0.10]) == pytest.approx(1.1)
    with pytest.raises(ValueError):
        paired_ratio([0.1], [0.1, 0.2])


def test_solve_only_case_times_the_solver_and_compiles_nothing():
    result = run_case(_case("solve", measure=False, profile="h100"))
    assert result["step_time_s"] is None
    assert result["compile_time_s"] is None and result["communication_bytes"] is None
    assert result["solve_time_s"] == result["solver"]["solve_time_s"] > 0
    assert result["solver"]["num_equations"] > 0
    assert result["solver"]["memory_budget_bytes"] == 80 * 2**30  # planned for an H100
    mesh = result["plan"]["mesh_shape"]
    assert mesh == result["solver"]["meshes"][0]["mesh_shape"] and mesh["data"] * mesh["model"] == 8
    assert "compile n/a" in suites.format_result(result)
    table = suites.format_markdown({"suite": "solver", "devices": 8, "repeat": 1,
                                        "results": [result], "environment": {}})
    mesh_text = ",".join(f"{a}={n}" for a, n in mesh.items())
    assert "| tiny | 8 |" in table and f"| — | {mesh_text} |" in table


def test_the_library_packages_import_no_benchmark_code():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = ("import sys, parallel, trainer, models; "
             "print(sorted(m for m in sys.modules if m.startswith('benchmarks') or 'bench' in m "
             "or m.endswith('_pmap')), hasattr(parallel, 'pmap_step'), hasattr(parallel, 'PmapStep'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, check=True).stdout
    assert out == "[] False False\n"


def test_pipeline_case_reports_stages_bubbles_and_trains_like_data(tiny_results):
    pipe = run_case(_case("pipeshard", label="pipeshard_2x4",
                          pipeline={"num_micro_batches": 4, "stages": 2}))
    assert pipe["method"] == "pipeshard_2x4"
    figures = pipe["pipeline"]
    assert [s["devices"] for s in figures["stages"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert figures["bubble_fraction"] == pytest.approx(1 / 5)  # (S - 1) / (M + S - 1)
    assert 0.0 <= figures["measured_bubble_fraction"] < 1.0
    assert len(figures["stage_time_per_micro_batch_s"]) == 2
    issue = figures["issue"]  # the host's issue time of a timed step, per (stage, micro-batch)
    assert issue["stage_micro_batches"] == 2 * 4 and issue["host_s"] > 0
    assert issue["programs"] > 2 * 2 * 4 and issue["transfers"] >= 2 * 4  # one cut, both ways
    np.testing.assert_allclose(pipe["losses"], tiny_results["data"]["losses"], rtol=1e-5)
    results = [tiny_results["data"], pipe]
    table = suites.format_markdown({"suite": "pipeline", "devices": 8, "repeat": 1,
                                    "results": results, "summary": suites.summarize(results),
                                    "environment": {}})
    assert "vs best unpipelined (data)" in table
    row = next(line for line in table.splitlines() if line.startswith("| pipeshard_2x4 |"))
    assert " 0-0 @ 4 / 1-1 @ 4 " in row and "| 20% |" in row
    assert f"({issue['programs']} programs, {issue['transfers']} transfers)" in row
    cases = suites.suite_cases("pipeline", 8)
    assert [(c["workload"]["name"], c["label"]) for c in cases] == [
        (w, label) for w in ("gpt_8_layers", "wide_resnet")
        for label in ("data", "zero2", "zero3", "auto", "pipeshard_auto", "pipeshard_4x2",
                      "pipeshard_4x2_gpipe", "pipeshard_8x1")]


def _fidelity_results():
    mesh = {"mesh_shape": {"data": 8}, "variant": "", "step_time_s": 0.05,
            "compiled_step_time_s": 0.3, "measured_step_time_s": 0.15}
    untimed = {"mesh_shape": {"data": 4, "model": 2}, "variant": "zero3", "step_time_s": 0.04,
               "compiled_step_time_s": 0.25, "measured_step_time_s": None}
    return [{"workload": "w", "method": "data", "step_time_s": 0.2, "estimated_step_time_s": 0.1},
            {"workload": "w", "method": "zero3", "step_time_s": 0.3,
             "estimated_step_time_s": 0.2},
            {"workload": "w", "method": "manual", "error": "exit code 1: boom"},
            {"workload": "w", "method": "auto", "step_time_s": 0.25,
             "estimated_step_time_s": 0.3},
            {"workload": "w", "method": "auto_timed", "step_time_s": 0.15,
             "estimated_step_time_s": 0.3, "solver": {"meshes": [mesh, untimed]}}]


def test_fidelity_pairs_every_measured_plan_with_its_predictions():
    from benchmarks import _fidelity

    results = _fidelity_results()
    assert [(p["candidate"], p["solver_s"], p["compiled_s"], p["measured_s"])
            for p in _fidelity.points(results)] == [
        ("data", None, 0.1, 0.2), ("zero3", None, 0.2, 0.3), ("auto: data=8", 0.05, 0.3, 0.15)]
    s = _fidelity.summary(results)["w"]
    # Ranks: predicted 1, 2, 3; measured 2, 3, 1; 1 - 6 * (1 + 1 + 4) / (3 * 8) = -0.5.
    assert s["spearman_compiled"] == pytest.approx(-0.5)
    assert s["spearman_solver"] is None  # one timed finalist
    assert s["measured_over_compiled"] == pytest.approx([0.5, 2.0])
    assert s["auto_over_fastest"] == pytest.approx(0.25 / 0.15)
    assert s["auto_over_best_hand"] == pytest.approx(1.25)
    assert s["auto_timed_over_best_hand"] == pytest.approx(0.75)
    assert _fidelity.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _fidelity.spearman([1, 1, 1], [1, 2, 3]) is None


def test_fidelity_suite_cases_and_tables():
    cases = suites.suite_cases("fidelity", 8)
    assert [(c["workload"]["name"], c["method"], c["measure"]) for c in cases] == [
        (w, m, True) for w in ("gpt", "moe", "wide_resnet")
        for m in ("data", "zero2", "zero3", "manual", "auto", "auto_timed")]
    results = [{**r, "devices": 8, "per_device_memory_bytes": 2**20, "communication_bytes": 0,
                "plan": {"mesh_shape": {"data": 8}}, "num_params": 1000}
               for r in _fidelity_results()]
    table = suites.format_markdown({"suite": "fidelity", "devices": 8, "repeat": 1,
                                    "results": results, "summary": suites.summarize(results)})
    assert table.startswith("Suite `fidelity`, 8 devices")
    assert "| auto: data=8 | 50.00 | 300.00 | 150.00 | 0.50x |" in table
    assert ("Rank correlation with the measured times: compiled estimate -0.50 (3 plans), "
            "solver — (1 finalists). Measured / compiled estimate from 0.50x to 2.00x.") in table
    assert "best hand-written plan: 1.25x (`auto_timed`: 0.75x)" in table
