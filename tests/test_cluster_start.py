"""Cluster start-up and bad input: config errors, unreachable addresses, too few resources, hangs.

These start no training; the ones that start Ray use a private local instance (loopback only).
"""
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "tiny/gpt.yaml"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("overrides, message", [
    (["cluster.address=auto"], "cluster.address='auto' does nothing with cluster.num_hosts=1"),
    (["cluster.devices_per_host=4"], "cluster.devices_per_host=4 does nothing with cluster.num_hosts=1"),
    (["cluster.max_restarts=5"], "cluster.max_restarts=5 does nothing with cluster.num_hosts=1"),
    (["cluster.num_hosts=2", "cluster.devices_per_host=4", "cluster.gpus_per_host=1"],
     "cluster.devices_per_host=4 simulates CPU devices, but cluster.gpus_per_host=1 asks for GPUs"),
    (["cluster.num_hosts=3"], "train.batch_size (16) must divide by cluster.num_hosts (3)"),
    (["cluster.num_hosts=2", "cluster.devices_per_host=4", "parallel.mesh={data: 4}"],
     "parallel.mesh {'data': 4} covers 4 devices but cluster.num_hosts x cluster.devices_per_host = 2 x 4 = 8"),
    (["cluster.num_hosts=2", "cluster.hang_timeout_s=0"], "cluster.hang_timeout_s must be positive"),
    (["cluster.num_hosts=2", "cluster.adress=auto"], "did you mean 'cluster.address'"),
    (["cluster.num_hosts=2", "cluster.phase_timeout_s.step=5"],
     "unknown key 'cluster.phase_timeout_s.step'; its limit is cluster.hang_timeout_s"),
    (["cluster.num_hosts=2", "cluster.phase_timeout_s.compil=5"],
     "unknown key 'cluster.phase_timeout_s.compil'; phases with a limit of their own: planning, "
     "compile, restore, eval, checkpoint"),
    (["cluster.num_hosts=2", "cluster.phase_timeout_s.compile=0"],
     "cluster.phase_timeout_s.compile must be a positive number of seconds, got 0"),
    (["cluster.num_hosts=2", "cluster.env={NCCL_DEBUG: [INFO]}"],
     "cluster.env.NCCL_DEBUG must be a string (quote it), got ['INFO']"),
    (["cluster.env={NCCL_DEBUG: INFO}"], "cluster.env={'NCCL_DEBUG': 'INFO'} does nothing with cluster.num_hosts=1"),
    (["cluster.num_hosts=2", "cluster.restart_window_s=0"], "cluster.restart_window_s must be positive"),
])
def test_cluster_keys_that_would_do_nothing_or_cannot_work_fail(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny/gpt.yaml", overrides)
    assert message in str(info.value)


def test_cluster_defaults_are_one_process_without_ray():
    cluster = load_config("tiny/gpt.yaml").cluster
    assert (cluster.num_hosts, cluster.address, cluster.devices_per_host, cluster.max_restarts) == (1, "", None, 3)


def test_unreachable_address_fails_in_one_line_within_the_timeout(tmp_path):
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    result = subprocess.run(
        [*TRAIN, f"workdir={tmp_path}", "cluster.num_hosts=2", f"cluster.address=127.0.0.1:{port}",
         "cluster.startup_timeout_s=20"], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: no Ray cluster answers at cluster.address='127.0.0.1:{port}'")
    assert elapsed < 20 + 30  # the timeout plus Python's start-up on a loaded machine
    assert not (tmp_path / "metrics.jsonl").exists()


def test_more_workers_than_the_cluster_can_place_fail_naming_what_fits(tmp_path):
    result = subprocess.run(
        [*TRAIN, f"workdir={tmp_path}", "cluster.num_hosts=2", "cluster.gpus_per_host=1",
         "cluster.startup_timeout_s=60"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cluster.num_hosts=2 but the cluster can place 0 worker(s) (each needs {CPU: 1, "
        "GPU: 1}; 1 node(s) with CPU: 2, GPU: 0 in all); lower cluster.num_hosts or "
        "cluster.gpus_per_host, or add nodes")


def _ray_processes() -> set:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            elsewhere = os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        except OSError:
            continue
        if elsewhere:
            continue  # another network namespace: the two-node cluster of test_cluster_nodes.py
        if re.search(r"ray::|/raylet|/gcs_server", cmd) and state != "Z":
            found.add(int(pid))
    return found


def test_a_hung_worker_is_detected_and_the_run_fails_naming_it(tmp_path):
    """A worker without heartbeats is named within the limit; the private local Ray instance
    (raylet, gcs_server, the workers) is gone with the driver."""
    # time.sleep after a step stands in for a collective waiting on a lost peer: no heartbeat.
    before = _ray_processes()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from parallel import cluster

        def one_step_then_wait():
            cluster.heartbeat(1)
            time.sleep(600)

        spec = cluster.ClusterSpec(num_hosts=1, devices_per_host=1, max_restarts=0,
                                   hang_timeout_s=3, startup_timeout_s=60)
        try:
            cluster.run(one_step_then_wait, spec=spec, log_dir={str(tmp_path)!r})
        except cluster.ClusterError as e:
            print("ClusterError:", e)
    """)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert time.monotonic() - start < 120
    line = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"ClusterError: no worker made progress: worker 0 \(pid \d+ on 127.0.0.1\) for [345] s in "
        r"phase step \(cluster.hang_timeout_s=3; last finished step 1\); gave up: 0 restart\(s\) "
        r"within cluster.restart_window_s=3600 already \(cluster.max_restarts=0\)", line), \
        result.stdout + result.stderr
    deadline = time.monotonic() + 10
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes() - before
