"""Two Ray workers x 4 simulated CPU devices on a private local Ray instance train like one
process with 8 devices.

Each cluster run is a real ``scripts/train.py`` subprocess; the reference runs in this process
(8 devices from conftest). Faults, pipelines across processes and start-up checks run on a
two-node cluster in test_cluster_nodes.py.
"""
import json
import os
import re
import shutil
import subprocess
import sys
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
    before = _ray_processes()
    result = _train(tmp_path, "parallel.method=data")
    time.sleep(1)  # the local Ray instance (raylet, gcs_server, workers) is gone with the run
    assert not [p for p in _ray_processes() - before if _alive(p)]
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


def test_a_solver_chosen_plan_on_two_workers_trains_like_one_process(tmp_path):
    _train(tmp_path, "parallel.method=auto")
    plan = parallel.Plan.from_json((tmp_path / "plan.json").read_text())
    assert plan.method == "auto" and plan.num_devices == 8
    # The reference runs the plan process 0 chose, in one process (a resume reuses a saved
    # plan the same way), so both run one program.
    reference = tmp_path / "reference"
    trainer = Trainer(load_config(CONFIG, [*BASE, "parallel.method=auto", f"workdir={reference}"]))
    trainer._saved_plan = (plan, trainer.config.to_dict()["parallel"])
    trainer.fit()
    assert trainer.plan.to_json() == plan.to_json()
    _assert_same_losses(tmp_path, reference)
