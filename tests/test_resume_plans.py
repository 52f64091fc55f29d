"""SIGKILL and rerun on 8 simulated devices: the saved plan is reused, losses and logs exact.

Per method, one run of ``scripts/train.py`` (a subprocess) is killed after step 10 with
checkpoints every 4 steps; the same config then reruns in this process, where the method's
planning is counted. Up to the kill the killed run is an uninterrupted run: the rerun's losses
of those steps must equal its losses bit for bit.
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

import parallel
from parallel.auto import _method as auto_method
from tensorboardX.proto import event_pb2
from trainer import Trainer, load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train as train_script  # noqa: E402

STEPS = 16
ARGS = [f"train.steps={STEPS}", "train.checkpoint_every=4", "train.log_every=1",
        "train.eval_batches=1", "train.sample_tokens=0", "train.keep_checkpoints=5"]


class KilledRun:
    """train.py on 8 devices in a subprocess, to be SIGKILLed once ``after_step`` is logged."""

    def __init__(self, workdir: Path, method: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
                   XLA_FLAGS="--xla_force_host_platform_device_count=8")
        env.pop("SHARDAX_DEBUG", None)
        self.workdir, self.log = workdir, workdir.parent / f"{workdir.name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "tiny/gpt.yaml",
                 *ARGS, f"parallel.method={method}", f"workdir={workdir}"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.losses = None

    def logged(self) -> dict:
        metrics = self.workdir / "metrics.jsonl"
        if not metrics.exists():
            return {}
        lines = metrics.read_text().split("\n")[:-1]  # complete lines only
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    def kill_after(self, step: int) -> bool:
        """Kills the run once ``step`` is logged; returns whether it is dead."""
        if self.losses is None:
            assert self.proc.poll() is None, self.log.read_text()
            if max(self.logged(), default=0) >= step:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=60)
                self.losses = self.logged()
        return self.losses is not None


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """One killed run per method, run side by side: method -> (workdir, its logged losses)."""
    base = tmp_path_factory.mktemp("killed")
    runs = {method: KilledRun(base / method, method) for method in ("zero3", "auto")}
    deadline = time.monotonic() + 400
    while not all([run.kill_after(10) for run in runs.values()]):
        assert time.monotonic() < deadline, "the runs to kill did not reach step 10"
        time.sleep(0.005)
    return {method: (run.workdir, run.losses) for method, run in runs.items()}


def _count_calls(monkeypatch, owner, name: str) -> list:
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _scalar_events(events_dir: Path, tag: str = "train/loss") -> list[int]:
    """The steps of ``tag`` that TensorBoard shows: events of later files purge those at or
    after a restart's ``SessionLog.START`` step (tensorboardX's ``purge_step``)."""
    steps = []
    for path in sorted(events_dir.iterdir()):  # event file names start with their creation time
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its CRC, the record, its CRC
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                steps = [s for s in steps if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    steps.append(event.step)
    return steps


@pytest.mark.parametrize("method, planner", [("zero3", parallel.Zero3Parallel),
                                             ("auto", parallel.AutoParallel)])
def test_a_killed_run_reruns_on_its_saved_plan_with_identical_losses(method, planner, killed,
                                                                     monkeypatch, capsys):
    workdir, killed = killed[method]
    saved_plan = json.loads((workdir / "plan.json").read_text())

    plans = _count_calls(monkeypatch, planner, "make_plan")
    solves = _count_calls(monkeypatch, auto_method, "solve")
    trainer = Trainer(load_config("tiny/gpt.yaml", [*ARGS, f"parallel.method={method}",
                                                    f"workdir={workdir}"]))
    trainer.fit()
    assert plans == [] and solves == []  # neither the train step nor eval was planned again
    err = capsys.readouterr().err
    assert f"reusing the saved plan ({saved_plan['method']} on mesh " in err
    assert json.loads((workdir / "plan.json").read_text()) == saved_plan

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # each step exactly once
    assert [r["step"] for r in records if "eval_loss" in r] == [STEPS]
    resumed = int(err.split("resuming at step ")[1].split()[0])
    assert resumed in (4, 8)  # the newest committed checkpoint before the kill
    overlap = [r for r in train if resumed < r["step"] <= max(killed)]
    assert len(overlap) >= 2
    for r in overlap:
        assert r["loss"] == killed[r["step"]], (r["step"], r["loss"], killed[r["step"]])
    assert _scalar_events(workdir / "tensorboard") == list(range(1, STEPS + 1))

    # Eval runs on the train plan: the state is taken as it lies, no leaf is moved.
    state_shardings = trainer.eval_fn.input_shardings(trainer.abstract_state, trainer.batch_spec)[0]
    for leaf, sharding in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(state_shardings)):
        assert leaf.sharding == sharding
    moved = []
    real_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: moved.append(x) or real_put(x, *a, **k))
    trainer.evaluate()
    state_ids = {id(leaf) for leaf in jax.tree.leaves(trainer.state)}
    assert not any(id(x) in state_ids for x in moved)
    assert plans == [] and solves == []


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """A finished 16-step zero3 run on 8 devices (in this process): its step-4 checkpoint is
    what a run stopped after step 4 leaves."""
    workdir = tmp_path_factory.mktemp("zero3")
    Trainer(load_config("tiny/gpt.yaml", [*ARGS, "parallel.method=zero3",
                                          f"workdir={workdir}"])).fit()
    return workdir


@pytest.fixture
def resumable(zero3_run, tmp_path):
    """A workdir holding the zero3 run's step-4 checkpoint (16 steps, 8 devices)."""
    shutil.copytree(zero3_run / "checkpoints" / "4", tmp_path / "checkpoints" / "4")
    return tmp_path


RESUME = ["--config", "tiny/gpt.yaml", *ARGS, "parallel.method=zero3"]


@pytest.mark.parametrize("change, named", [
    ("model.hidden_size=48", "model.hidden_size 32 -> 48"),
    ("train.batch_size=8", "train.batch_size 16 -> 8"),
    ("optimizer.learning_rate=0.02", "optimizer.learning_rate 0.01 -> 0.02"),
])
def test_resuming_with_a_math_changing_key_stops_with_one_line(resumable, change, named, capsys):
    code = train_script.main([*RESUME, f"workdir={resumable}", change])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"error: the checkpoint of step 4 in {resumable} was trained with other values "
                   f"of keys that change the math: {named}; rerun with the checkpoint's values, "
                   "pass train.allow_config_change=true to continue anyway, or use another workdir")


def test_resuming_with_other_cadence_proceeds_and_a_longer_run_is_told_its_schedule_changes(
        resumable, capsys):
    args = [*RESUME, f"workdir={resumable}", "train.log_every=3", "train.checkpoint_every=7"]
    assert train_script.main(args) == 0
    err = capsys.readouterr().err
    assert "resuming at step 4 -> 16 steps" in err and "reusing the saved plan (zero3" in err
    records = [json.loads(line) for line in (resumable / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [6, 9, 12, 15, 16]
    assert train_script.main(args + ["train.steps=17"]) == 0
    err = capsys.readouterr().err
    assert ("train.steps changed from 16 to 17: the learning-rate schedule is built from it, so "
            "every later learning rate changes; pass optimizer.decay_steps=16 to keep the "
            "schedule of the run being resumed") in err
    assert "planning anew (the saved plan does not apply: the step's program differs)" in err
