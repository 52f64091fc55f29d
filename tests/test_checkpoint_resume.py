"""Crash, preemption and torn checkpoints through ``scripts/train.py``: resumed losses are exact.

One scenario shares its runs between the tests (each run is a fresh process, ~15 s):
an uninterrupted reference run; alongside it the same command SIGKILLed after step 12; rerun and
SIGTERMed after step 17; the checkpoint SIGTERM saved is then truncated, and a rerun finishes
from the one before it. Every loss any of them logged must equal the reference's at
that step, bit for bit (CPU, same device count, same compiled program).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from parallel import Checkpointer

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30
ARGS = ["--config", "tiny/gpt.yaml", f"train.steps={STEPS}", "train.checkpoint_every=5",
        "train.log_every=1", "train.eval_batches=1", "train.sample_tokens=0"]


def _env(cache_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",  # fast compiles
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),  # later runs reuse the first's programs
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("SHARDAX_DEBUG", None)
    return env


class Run:
    """``scripts/train.py`` in a subprocess writing to ``workdir``; its output goes to a log file."""

    def __init__(self, workdir: Path, env: dict, *extra: str):
        self.workdir = workdir
        self.log_path = workdir.parent / f"{workdir.name}-{time.monotonic_ns()}.log"
        self.metrics_path = workdir / "metrics.jsonl"
        self.final = None  # this run's records once it has exited (later runs rewrite the file)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "train.py"), *ARGS, f"workdir={workdir}", *extra],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def losses(self) -> dict:
        """step -> loss of the train records this run logged to metrics.jsonl.

        A run drops the records past the step it resumes from before it prints where it starts,
        so once that line is out the records past that step are this run's.
        """
        if self.final is not None:
            return self.final
        found = re.search(r"resuming at step (\d+)|starting ->", self.output())
        if found is None or not self.metrics_path.exists():
            return {}
        start = int(found.group(1) or 0)
        text = self.metrics_path.read_text()
        records = [json.loads(line) for line in text.split("\n")[:-1]]  # complete lines only
        return {r["step"]: r["loss"] for r in records if "loss" in r and r["step"] > start}

    def signal_after(self, step: int, sig: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while max(self.losses(), default=0) < step:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"run ended or stalled before step {step}:\n{self.output()}")
            time.sleep(0.005)
        self.proc.send_signal(sig)

    def wait(self) -> int:
        code = self.proc.wait(timeout=300)
        self.final = self.losses()
        return code

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    env = _env(base / "jax-cache")
    workdir = base / "run"
    reference = Run(base / "reference", env)  # runs alongside the killed one
    killed = Run(workdir, env)
    killed.signal_after(12, signal.SIGKILL)
    killed_code = killed.wait()
    assert reference.wait() == 0, reference.output()
    with warnings.catch_warnings():  # step 10 may have been cut mid-save: skipped with a warning
        warnings.simplefilter("ignore")
        after_kill = Checkpointer(workdir / "checkpoints").latest_step()

    terminated = Run(workdir, env)
    terminated.signal_after(17, signal.SIGTERM)
    terminated_code = terminated.wait()
    after_term = Checkpointer(workdir / "checkpoints").latest_step()
    torn = workdir / "checkpoints" / str(after_term)
    truncated = max((p for p in torn.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    truncated.write_bytes(truncated.read_bytes()[:7])

    finished = Run(workdir, env)
    assert finished.wait() == 0, finished.output()
    return dict(reference=reference.losses(), runs=(killed, terminated, finished), workdir=workdir,
                killed_code=killed_code, after_kill=after_kill, terminated_code=terminated_code,
                after_term=after_term, torn=torn, truncated=truncated.relative_to(torn))


def test_a_killed_run_resumes_with_identical_losses(scenario):
    reference = scenario["reference"]
    killed, terminated, finished = scenario["runs"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert scenario["killed_code"] == -signal.SIGKILL
    reached = max(killed.losses())
    assert 12 <= reached < STEPS  # really interrupted mid-run
    resumed_from = min(terminated.losses()) - 1
    assert resumed_from == scenario["after_kill"] and resumed_from in (5, 10) and resumed_from <= reached
    assert f"resuming at step {resumed_from} -> {STEPS} steps" in terminated.output()
    for run in (killed, terminated, finished):
        for step, loss in run.losses().items():
            assert loss == reference[step], (step, loss, reference[step])
    assert max(finished.losses()) == STEPS


def test_sigterm_saves_the_step_reached_and_exits_0(scenario):
    _, terminated, _ = scenario["runs"]
    assert scenario["terminated_code"] == 0, terminated.output()
    reached = max(terminated.losses())
    assert 17 <= reached < STEPS
    assert f"received SIGTERM: saving step {reached} and stopping" in terminated.output()
    assert scenario["after_term"] == reached  # committed and verified


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(scenario):
    _, _, finished = scenario["runs"]
    torn, reached = scenario["torn"], scenario["after_term"]
    previous = (reached - 1) // 5 * 5  # the checkpoint_every=5 step before the SIGTERM one
    out = finished.output()
    assert f"skipping checkpoint {torn}: file {scenario['truncated'].as_posix()} is truncated" in out
    assert f"resuming at step {previous} -> {STEPS} steps" in out
    assert sorted(finished.losses()) == list(range(previous + 1, STEPS + 1))
    moved = torn.parent / "invalid" / torn.name  # moved aside when the step was saved again
    assert (moved / scenario["truncated"]).stat().st_size == 7


def test_the_kept_checkpoints_hold_data_position_config_plan_and_metrics(scenario):
    ckpt = Checkpointer(scenario["workdir"] / "checkpoints")
    infos = ckpt.list()
    assert [(i.step, i.valid) for i in infos] == [(20, True), (25, True), (30, True)]  # keep_checkpoints=3
    extras = ckpt.extras(STEPS)
    assert extras["data_index"] == STEPS
    assert extras["config"]["train"]["steps"] == STEPS and extras["config"]["model"]["name"] == "gpt"
    assert extras["plan"]["method"] == "data"
    assert extras["metrics"]["loss"] == scenario["reference"][STEPS]


def test_resume_false_refuses_to_overwrite_checkpoints(scenario, capsys):
    workdir = scenario["workdir"]
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert _train_in_process(workdir, "train.resume=false") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"{workdir} already holds checkpoints (latest step {STEPS})" in err and "train.overwrite=true" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def _train_in_process(workdir, *overrides) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    return train_script.main([*ARGS, f"workdir={workdir}", *overrides])


def test_no_valid_checkpoint_stops_with_an_error(scenario, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(scenario["workdir"] / "checkpoints" / "30", checkpoints / "30")
    (checkpoints / "30" / "state" / "_METADATA").unlink()
    assert _train_in_process(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: no valid checkpoint in {checkpoints}: {checkpoints / '30'}: file state/_METADATA "
                   f"is missing. Nothing was deleted; move {checkpoints} aside to start from scratch")
    assert not (tmp_path / "metrics.jsonl").exists() and (checkpoints / "30").is_dir()


def test_a_different_model_names_the_first_mismatched_parameter(scenario, tmp_path, capsys):
    shutil.copytree(scenario["workdir"] / "checkpoints" / "30", tmp_path / "checkpoints" / "30")
    # allowed to differ in config, the model still cannot load another model's checkpoint
    assert _train_in_process(tmp_path, "model.hidden_size=48", "train.allow_config_change=true") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: checkpoint {tmp_path / 'checkpoints' / '30'} does not match the model: parameter "
                   "params/blocks/0/attn/out_bias: the checkpoint has shape (32,), the model expects shape (48,)")
