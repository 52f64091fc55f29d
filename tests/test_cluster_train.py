"""Two Ray workers x 4 simulated CPU devices on a private local Ray instance (the default
``cluster.address``) train a solver-chosen plan like one process with 8 devices.

The cluster run is a real ``scripts/train.py`` subprocess; the reference runs in this process
(8 devices from conftest). Data parallelism, faults, pipelines across processes, checkpoints
restored in one process and start-up checks run on a two-node cluster in
test_cluster_nodes.py; the local instance's clean-up is checked in test_cluster_start.py.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import parallel
from trainer import Trainer, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "tiny/gpt.yaml"
BASE = ["train.steps=4", "train.log_every=1", "train.sample_tokens=0", "train.eval_batches=1"]
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
