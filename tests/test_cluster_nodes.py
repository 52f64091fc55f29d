"""A real two-node Ray cluster on this machine: two network namespaces joined by a veth pair.

One cluster (``tests/_netns.py``) serves the whole module: ``ray start --head`` in namespace A,
``ray start --address`` in namespace B, and runs with ``cluster.address=auto`` started from A, as
the README's real-cluster steps say (a user's script, ``_cluster_user.py``, for training; the
start-up checks through ``scripts/train.py``). JAX's coordinator, gloo and Ray talk between
the namespace addresses. Each run is checked against one process with 8 devices (rtol 1e-5) and
ends with no worker process left; faults are real: SIGSTOP, the link set down, node B's
processes killed, SIGTERM to the driver. To keep the module cheap, a pipelined run is stopped
by SIGTERM and a data-parallel run resumes from it through three faults (one per attempt):
two training runs on the cluster and one reference. Needs root (skipped with the reason
otherwise).
"""
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import parallel
from parallel._checkpoint_files import MANIFEST_NAME
from trainer import Trainer, load_config

from _cluster_user import FAIL_SAVE_ON, RecordingTrainer
from _netns import ROOT, TwoNodes, skip_reason

CONFIG = "tiny/gpt.yaml"
BASE = ["train.log_every=1", "train.sample_tokens=0", "train.eval_batches=1"]
CLUSTER = ["cluster.num_hosts=2", "cluster.devices_per_host=4", "cluster.address=auto",
           "cluster.startup_timeout_s=120", "cluster.hang_timeout_s=8"]
# Every run trains the same 12 steps of a user's script (_cluster_user.py: its own dataset):
# a pipelined run stopped by SIGTERM, then data parallelism resuming from it (checkpoint at 8).
STEPS = 12
DATA = [f"train.steps={STEPS}", "train.checkpoint_every=8", "parallel.method=data"]
PIPELINE = [f"train.steps={STEPS}", "parallel.method=pipeshard", "parallel.num_micro_batches=2",
            "parallel.stages=2"]
HANG_S = 8
TIMEOUT_S = 600  # a bound for one run on a loaded 2-core machine
# Passed on to the workers (JAX_*): the compilation cache in the workdir keeps every program,
# so a restarted attempt's process 0 loads them all (process 1 compiles again on CPU:
# docs/cluster.md).
ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def nodes():
    reason = skip_reason()
    if reason is not None:
        print(f"skipping the two-node cluster tests: {reason}")
        pytest.skip(reason)
    workspace = Path(tempfile.mkdtemp(prefix="sx", dir="/tmp"))  # short: Ray's socket paths
    cluster = TwoNodes(workspace)
    try:
        yield cluster.start()
    finally:
        cluster.close()
        shutil.rmtree(workspace, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run in this process with 8 devices: what every cluster run must
    match (the pipelined one too: its micro-batches and stages change no loss beyond 1e-5)."""
    workdir = tmp_path_factory.mktemp("reference")
    RecordingTrainer(load_config(CONFIG, [*BASE, *DATA, f"workdir={workdir}"])).fit()
    return workdir


@pytest.fixture(scope="module")
def stopped_pipeline(nodes, tmp_path_factory):
    """A pipelined run, one stage per node (train.checkpoint_every=0), stopped by SIGTERM to
    the driver after step 2 shows: ``(workdir, run, the step it stopped after)``."""
    workdir = tmp_path_factory.mktemp("pipeline") / "run"
    run = Run(nodes, _user_script(workdir, *PIPELINE))
    try:
        run.wait_for(rf"\[train step 2/{STEPS}\]")
        run.proc.send_signal(signal.SIGTERM)
        _, _, found = run.wait_for(r"every worker stops after step (\d+) and saves it")
        code = run.finish()
    finally:
        run.finish(timeout=60)
    assert code == 0, run.output[-4000:]
    return workdir, run, int(found.group(1))


class Run:
    """A driver in node A's namespace; its output is collected line by line as it comes."""

    def __init__(self, nodes: TwoNodes, cmd, cwd=ROOT, env=None):
        self.lines, self.start = [], time.monotonic()
        self.proc = nodes.popen_on_head(cmd, cwd=cwd, env={**ENV, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, after: int = 0, timeout: float = TIMEOUT_S) -> tuple:
        """Waits for a line matching ``pattern`` (from line ``after`` on); returns
        ``(index, time, match)``."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(after, len(self.lines)):
                found = re.search(pattern, self.lines[index][1])
                if found:
                    return index, self.lines[index][0], found
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"the run ended before {pattern!r}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output[-4000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float = TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        self._reader.join(timeout=10)
        return code

    def workers(self) -> list[tuple[int, int, str]]:
        """(worker, pid, address) of every worker of every attempt, from the driver's lines."""
        return [(int(i), int(pid), host) for i, pid, host in
                re.findall(r"cluster: worker (\d+) is pid (\d+) on ([\d.]+)", self.output)]


def _train(workdir: Path, *overrides) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", CONFIG, *BASE,
            *CLUSTER, f"workdir={workdir}", *overrides]


def _losses(workdir: Path) -> dict:
    """(kind, step) -> the last logged loss of that step (a resumed run logs its steps again)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        key = "eval_loss" if "eval_loss" in record else "loss"
        out[(key, record["step"])] = record[key]
    return out


def _assert_same_losses(run: Path, reference: Path) -> None:
    got, want = _losses(run), _losses(reference)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)],
                               rtol=1e-5)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _assert_no_worker_left(run: Run) -> None:
    pids = [pid for _, pid, _ in run.workers()]
    assert pids
    deadline = time.monotonic() + 30
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in pids if _alive(p)], run.output[-3000:]


def _wait_until(condition, run: Run, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output[-4000:]
        time.sleep(0.1)


def _user_script(workdir: Path, *overrides) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "_cluster_user.py"), CONFIG, *BASE, *CLUSTER,
            f"workdir={workdir}", *overrides]


# ----- training across the nodes ------------------------------------------------------------
def test_data_parallel_across_nodes_survives_a_frozen_worker_a_cut_link_and_a_lost_node(
        nodes, reference, stopped_pipeline, tmp_path):
    """2 nodes x 4 devices == 1 x 8, for a user's script with its own dataset, resuming the
    pipelined run SIGTERM stopped (another plan: the checkpoint is resharded); JAX's
    coordinator and gloo listen on the namespace addresses. Three faults, one per attempt,
    each detected, named and restarted: SIGSTOP of the worker on node B and the link set down
    (each within hang_timeout_s + 10 s); then every process of node B killed while the save of
    the worker on node A fails (injected): the loss outranks the save error (restarted, not
    fatal), and the driver waits for capacity until a new `ray start` joins. The run ends with
    the uninterrupted run's losses and no worker left; a checkpoint of the two processes
    resumes in one process with the same state. The dataset (with batch_rows) is asked for
    each process's rows only, in every attempt; the driver's XLA_FLAGS and NCCL_* and the
    config's cluster.env reach every worker."""
    workdir = tmp_path / "run"
    stopped_dir, _, stopped_at = stopped_pipeline
    shutil.copytree(stopped_dir, workdir, ignore=shutil.ignore_patterns("calls", "logs"))
    env = {"NCCL_DEBUG": "WARN", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    run = Run(nodes, _user_script(workdir, *DATA, "cluster.capacity_timeout_s=300",
                                  f"cluster.env={{{FAIL_SAVE_ON}: '2'}}"), env=env)
    b = re.escape(nodes.address[1])
    try:
        index, _, _ = run.wait_for(rf"resuming at step {stopped_at} -> {STEPS} steps")
        index, _, _ = run.wait_for(rf"\[train step \d+/{STEPS}\]", index)
        _assert_bound_to_namespace_addresses(nodes, run, workdir)
        # A frozen worker: stopped, it answers nothing (the one on node B, whichever it is),
        # once step 8 is committed: the restarted attempts resume from it.
        _wait_until(lambda: (workdir / "checkpoints" / "8" / MANIFEST_NAME).exists(), run)
        worker, pid, _ = next(w for w in run.workers() if w[2] == nodes.address[1])
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        index, detected, found = run.wait_for(r"cluster: (.*); restarting the workers \(1 of", index)
        assert detected - stopped <= HANG_S + 10, run.output[-6000:]
        # Named, whatever it was doing when stopped (a step, the final eval or save).
        assert re.match(rf"worker {worker} \(pid {pid} on {b}\) (did not answer the driver for "
                        r"\d+ s \(cluster.hang_timeout_s=8; last seen in phase (step|checkpoint|eval|"
                        r"compile)|stopped answering the driver)", found.group(1)), found.group(1)
        # A partition: the link between the nodes goes down mid-step, then comes back.
        index, _, _ = run.wait_for(rf"resuming at step 8 -> {STEPS} steps", index)
        index, _, _ = run.wait_for(rf"\[train step \d+/{STEPS}\]", index)
        nodes.link(up=False)
        cut = time.monotonic()
        index, detected, found = run.wait_for(r"cluster: (.*); restarting the workers \(2 of", index)
        nodes.link(up=True)
        assert detected - cut <= HANG_S + 10, run.output[-6000:]
        assert re.match(rf"worker \d \(pid \d+ on {b}\) (did not answer|stopped answering)",
                        found.group(1)), found.group(1)
        # Node B lost while a save fails: attempt 2's first save waits for it (_cluster_user).
        _wait_until(lambda: all((workdir / f"at-save-{i}").exists() for i in range(2)), run)
        nodes.kill_b()
        (workdir / "peer-killed").write_text("")
        index, _, found = run.wait_for(r"cluster: (.*); restarting the workers \(3 of", index)
        assert re.match(rf"worker \d \(pid \d+ on {b}\) ", found.group(1)), found.group(1)
        assert "raised CheckpointError: injected: saving step" in found.group(1), found.group(1)
        run.wait_for(r"cluster: waiting up to 300 s \(cluster.capacity_timeout_s\) for room", index)
        nodes.start_b(wait=False)  # the driver's own wait for capacity is under test
        index, _, _ = run.wait_for(r"cluster: worker 0 is pid \d+ on .* \(attempt 3\)", index)
        run.wait_for(rf"resuming at step 8 -> {STEPS} steps", index)
        assert run.finish() == 0, run.output[-4000:]
    finally:
        nodes.link(up=True)
        run.finish(timeout=60)
    _assert_same_losses(workdir, reference)
    _assert_no_worker_left(run)
    for i in range(2):  # two processes, each holding 4 of the mesh's 8 devices
        log = (workdir / "logs" / f"worker-{i}.log").read_text()
        assert f"[worker {i}/2 pid" in log and "4 of 8 cpu devices" in log
    for process, rows in enumerate([(0, 8), (8, 16)]):
        for stream in (0, 1):  # train and eval data
            for attempt in range(4):
                path = workdir / "calls" / f"stream{stream}-process{process}-attempt{attempt}"
                calls = [json.loads(line) for line in path.read_text().splitlines()]
                assert {tuple(c[3:]) for c in calls if c[0] == "batch_rows"} <= {rows}
                assert [c for c in calls if c[0] == "batch"] == [["batch", 0, 1]]  # shapes only
        assert (workdir / "calls" / f"stream0-process{process}-attempt3").read_text()
        assert (workdir / "calls" / f"stream1-process{process}-attempt3").read_text()
        seen = json.loads((workdir / f"environment-{process}.json").read_text())
        assert seen == {"NCCL_DEBUG": "WARN", FAIL_SAVE_ON: "2",
                        "XLA_FLAGS": "--xla_cpu_enable_fast_math=false "
                                     "--xla_force_host_platform_device_count=4"}
    # A checkpoint both workers wrote (4 shards each) resumes in one process with 8 devices:
    # the final state is the one-process run's (gloo sums in another order: parameters of
    # ~1e-2 differ by ~1e-6 when the learning rate has decayed; mid-run states differ more).
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir / "checkpoints" / str(STEPS), resumed / "checkpoints" / str(STEPS))
    trainer = Trainer(load_config(CONFIG, [*BASE, *DATA, f"workdir={resumed}"])).setup()
    target = trainer.step_fn.abstract_inputs(trainer.abstract_state, trainer.batch_spec)[0]
    want, _ = parallel.Checkpointer(reference / "checkpoints").restore(STEPS, target)
    assert int(trainer.state["step"]) == STEPS
    for got_leaf, want_leaf in zip(*(jax.tree.leaves(_plain(t)) for t in (trainer.state, want)),
                                   strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-5)


def _plain(tree):
    """A state's leaves as NumPy arrays (random keys as their data)."""
    def one(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.asarray(jax.device_get(leaf))
    return jax.tree.map(one, tree)


def _assert_bound_to_namespace_addresses(nodes: TwoNodes, run: Run, workdir: Path) -> None:
    """JAX's coordinator listens on worker 0's node address; each worker listens (gloo) on its
    own node's address and is connected to the other node's worker; no worker listens on a
    loopback address (what the hostname resolves to on a stock Debian host)."""
    log = (workdir / "logs" / "worker-0.log").read_text()
    coordinator = re.search(r"coordinator ([\d.]+):(\d+)", log)
    port = coordinator.group(2)
    for pid, host in {pid: host for _, pid, host in run.workers()}.items():
        node = nodes.address.index(host)
        other = nodes.address[1 - node]
        mine = [line for line in nodes.listening(node).splitlines() if f"pid={pid}," in line]
        listening = [line.split()[3] for line in mine if line.startswith("LISTEN")]
        assert not [a for a in listening if "127." in a], mine
        if host == coordinator.group(1):
            assert f"[::ffff:{host}]:{port}" in listening or f"{host}:{port}" in listening, mine
        assert [a for a in listening if a.startswith(f"{host}:")], mine  # gloo's listener
        links = [line.split()[3:5] for line in mine if line.startswith("ESTAB")]
        assert [(local, peer) for local, peer in links if local.startswith(f"{host}:")
                and peer.startswith(f"{other}:") and port not in (local.rsplit(":", 1)[1],
                                                                 peer.rsplit(":", 1)[1])], mine


def test_a_pipeline_with_one_stage_per_node_trains_like_one_process_and_stops_on_sigterm(
        stopped_pipeline, reference):
    """Stages on different nodes train like one process; SIGTERM to the driver saves the step
    reached on every worker (train.checkpoint_every=0: no other checkpoint exists, and the
    driver warns once) and exits 0 with nothing left running. (The data-parallel test resumes
    from that checkpoint: its run matches the reference to the end.)"""
    workdir, run, stopped_at = stopped_pipeline
    assert 2 <= stopped_at < 8, run.output[-4000:]
    assert run.output.count("train.checkpoint_every=0 saves only at the end") == 1
    checkpoints = parallel.Checkpointer(workdir / "checkpoints").list()
    assert [(c.step, c.valid) for c in checkpoints] == [(stopped_at, True)]
    _assert_no_worker_left(run)
    stages = json.loads((workdir / "plan.json").read_text())["extras"]["stages"]
    assert [s["devices"] for s in stages] == [[0, 1, 2, 3], [2048, 2049, 2050, 2051]]
    got, want = _losses(workdir), _losses(reference)
    assert sorted(got) == [("loss", step) for step in range(1, stopped_at + 1)]
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(got)],
                               rtol=1e-5)


# ----- start-up checks ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["versions-and-workdir", "devices", "platform"])
def test_a_misconfigured_worker_stops_the_run_with_one_line(nodes, tmp_path, case):
    """Node B imports another checkout and cannot see the workdir; a worker with fewer CPU
    devices than asked; GPU workers on nodes without a usable GPU: exit 2, one line naming the
    worker, what it saw and what was asked, before any training and within a bounded time."""
    workdir, cwd, extra = tmp_path / "run", ROOT, []
    if case == "versions-and-workdir":
        workdir, cwd = nodes.hidden / tmp_path.name, nodes.other_code
    elif case == "devices":
        extra = ["cluster.env={JAX_NUM_CPU_DEVICES: '2'}"]
    else:
        extra = ["cluster.devices_per_host=null", "cluster.gpus_per_host=1"]
    cmd = _train(workdir, "train.steps=2", *extra)
    cmd[1] = str(cwd / "scripts" / "train.py")
    run = Run(nodes, cmd, cwd=cwd)
    start = time.monotonic()
    assert run.finish(timeout=300) == 2, run.output[-4000:]
    assert time.monotonic() - start < 240
    line = run.output.strip().splitlines()[-1]
    b = re.escape(nodes.address[1])
    if case == "versions-and-workdir":
        assert re.fullmatch(
            rf"error: worker (\d) \(pid \d+ on {b}\) runs shardax source \w+ at {nodes.other_code} "
            rf"but the driver runs shardax source \w+ at {nodes.other_code}; put the same shardax "
            r"checkout on every node \(a shared filesystem, or the same commit everywhere\); "
            rf"worker \1 \(pid \d+ on {b}\) does not see the workdir the driver uses: "
            rf"{workdir}/.shardax-cluster \(written by the driver\) is missing there; put the "
            r"workdir on a filesystem every node mounts at the same path \(NFS, a cloud file share\)",
            line), line
    elif case == "devices":
        assert re.match(r"error: worker \d \(pid \d+ on [\d.]+\) has 2 cpu device\(s\) but was asked "
                        r"for cluster.devices_per_host=4 CPU device\(s\)", line), line
    else:
        assert re.match(r"error: worker \d \(pid \d+ on [\d.]+\) was asked for "
                        r"cluster.gpus_per_host=1 GPU\(s\) but JAX could not start "
                        r"JAX_PLATFORMS=cuda \(", line), line
    assert "[train step" not in run.output
    _assert_no_worker_left(run)
