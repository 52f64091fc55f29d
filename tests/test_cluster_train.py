"""Two Ray workers x 4 simulated CPU devices train like one process with 8 devices.

Each cluster run is a real ``scripts/train.py`` (or user script) subprocess with a private local
Ray instance; the reference runs in this process (8 devices from conftest).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import parallel
from trainer import Trainer, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "tiny/gpt.yaml"
BASE = ["train.steps=6", "train.log_every=1", "train.checkpoint_every=3", "train.sample_tokens=0",
        "train.eval_batches=1"]
CLUSTER = ["cluster.num_hosts=2", "cluster.devices_per_host=4", "cluster.startup_timeout_s=120"]
TIMEOUT_S = 600  # a bound on a loaded 2-core machine; idle runs take well under a minute


def _losses(workdir: Path) -> dict:
    """step -> the last logged loss of that step (a resumed run logs its steps again)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        key = "eval_loss" if "eval_loss" in record else "loss"
        out[(key, record["step"])] = record[key]
    return out


def _reference(tmp_path_factory, name: str, overrides) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    Trainer(load_config(CONFIG, [*BASE, *overrides, f"workdir={workdir}"])).fit()
    return workdir


@pytest.fixture(scope="module")
def data_reference(tmp_path_factory):
    return _reference(tmp_path_factory, "reference-data", ["parallel.method=data"])


def _ray_processes() -> set:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if re.search(r"ray::|/raylet|/gcs_server", cmd):
            found.add(int(pid))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _train(workdir: Path, *overrides) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", CONFIG, *BASE, *CLUSTER,
         f"workdir={workdir}", *overrides], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _assert_same_losses(run: Path, reference: Path) -> None:
    got, want = _losses(run), _losses(reference)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)],
                               rtol=1e-5)


def test_two_workers_train_like_one_process_and_their_checkpoint_restores_on_one(
        tmp_path, data_reference):
    result = _train(tmp_path, "parallel.method=data")
    _assert_same_losses(tmp_path, data_reference)
    for i in range(2):  # two processes, each holding 4 of the mesh's 8 devices
        assert f"[worker {i}/2 pid" in (tmp_path / "logs" / f"worker-{i}.log").read_text()
        assert "4 of 8 cpu devices" in (tmp_path / "logs" / f"worker-{i}.log").read_text()
    assert "method data on mesh {'data': 8}" in result.stderr  # worker 0's lines, shown live
    # The checkpoint both workers wrote (4 shards each) resumes in one process with 8 devices.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "checkpoints" / "3", resumed / "checkpoints" / "3")
    trainer = Trainer(load_config(CONFIG, [*BASE, "parallel.method=data", f"workdir={resumed}"]))
    trainer.setup()
    assert int(trainer.state["step"]) == 3
    trainer.fit()
    got, want = _losses(resumed), _losses(tmp_path)
    assert sorted(got) == [("eval_loss", 6), ("loss", 4), ("loss", 5), ("loss", 6)]
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(got)],
                               rtol=1e-5)


KILLED_RUN = textwrap.dedent("""
    # A user's Trainer subclass on two workers; worker 1 stops after step 4 of its first
    # attempt and waits there to be killed from outside.
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from parallel import cluster
    from trainer import Callback, Trainer, load_config

    class WaitToBeKilled(Callback):
        def on_step_end(self, trainer, step, metrics):
            info = cluster.worker_info()
            if info.process_id == 1 and info.attempt == 0 and step == 4:
                Path({flag!r}).write_text(str(os.getpid()))
                time.sleep(600)

    class MyTrainer(Trainer):
        def callbacks(self):
            return [WaitToBeKilled()]

    MyTrainer(load_config({config!r}, {overrides!r})).fit()
""")


def test_a_worker_killed_mid_run_is_replaced_and_the_run_ends_as_if_uninterrupted(
        tmp_path, data_reference):
    # Start from the one-process run's checkpoint of step 3: it restores on 2 workers x 4 devices.
    workdir, flag = tmp_path / "run", tmp_path / "killed-pid"
    shutil.copytree(data_reference / "checkpoints" / "3", workdir / "checkpoints" / "3")
    before = _ray_processes()
    overrides = [*BASE, *CLUSTER, "parallel.method=data", f"workdir={workdir}"]
    script = KILLED_RUN.format(root=str(ROOT), flag=str(flag), config=CONFIG, overrides=overrides)
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not flag.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert flag.exists(), run.communicate(timeout=30)[0][-3000:]
        time.sleep(0.2)  # the pid is written: kill that worker
        os.kill(int(flag.read_text()), signal.SIGKILL)
        output, _ = run.communicate(timeout=TIMEOUT_S)
    finally:
        run.kill()
    assert run.returncode == 0, output[-3000:]
    assert f"cluster: worker 1 (pid {flag.read_text()} on 127.0.0.1) died" in output
    assert "restarting the workers (1 of at most 3 restarts)" in output
    assert output.count("resuming at step 3") == 2  # the 1-process checkpoint, both attempts
    got, want = _losses(workdir), _losses(data_reference)
    assert max(step for _, step in got) == 6
    for key in [("loss", 4), ("loss", 5), ("loss", 6), ("eval_loss", 6)]:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    pids = [int(p) for p in re.findall(r"cluster: worker \d is pid (\d+)", output)]
    assert len(pids) == 4  # two attempts of two workers
    time.sleep(1)
    assert not [p for p in pids if _alive(p)]
    assert not [p for p in _ray_processes() - before if _alive(p)]


def test_a_solver_chosen_plan_on_two_workers_trains_like_one_process(tmp_path):
    _train(tmp_path, "parallel.method=auto")
    plan = parallel.Plan.from_json((tmp_path / "plan.json").read_text())
    assert plan.method == "shard" and plan.num_devices == 8
    # The reference runs the plan process 0 chose, in one process (a resume reuses a saved
    # plan the same way), so both run one program.
    reference = tmp_path / "reference"
    trainer = Trainer(load_config(CONFIG, [*BASE, "parallel.method=auto", f"workdir={reference}"]))
    trainer._saved_plan = (plan, trainer.config.to_dict()["parallel"])
    trainer.fit()
    assert trainer.plan.to_json() == plan.to_json()
    _assert_same_losses(tmp_path, reference)


def test_a_pipeline_whose_stages_sit_in_different_processes_trains_like_one_process(tmp_path):
    pipeline = ["parallel.method=pipeshard", "parallel.num_micro_batches=4", "parallel.stages=2"]
    _train(tmp_path, *pipeline)
    stages = json.loads((tmp_path / "plan.json").read_text())["extras"]["stages"]
    # Stage 0 on worker 0's four devices, stage 1 on worker 1's (JAX numbers process 1's CPU
    # devices from 2048): activations and gradients cross processes with jax.device_put.
    assert [s["devices"] for s in stages] == [[0, 1, 2, 3], [2048, 2049, 2050, 2051]]
    reference = tmp_path / "reference"
    Trainer(load_config(CONFIG, [*BASE, *pipeline, f"workdir={reference}"])).fit()
    _assert_same_losses(tmp_path, reference)
