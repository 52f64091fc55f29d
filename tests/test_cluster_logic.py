"""The cluster's decisions, without Ray: hangs, stop agreement, restarts, worker set-up, rows.

The runs that exercise them end to end are in test_cluster_nodes.py (two network namespaces)
and test_cluster_start.py / test_cluster_train.py (a local Ray instance).
"""
import os
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel.cluster import ClusterError, ClusterSpec, _checks, _progress
from parallel.cluster._driver import RestartBudget
from parallel.cluster._watch import Watch
from trainer.data import (DataError, ProcessShare, SyntheticImages, SyntheticRegression,
                          TokenDataset, process_rows)


def _watch(reports, asked_s=None, spec=None):
    """A Watch of len(reports) workers whose last answers are ``reports`` (phase, idle_s);
    ``asked_s[i]``: how long worker i's query has waited (None: answered)."""
    spec = spec or ClusterSpec(num_hosts=len(reports), hang_timeout_s=10, answer_timeout_s=300)
    watch = Watch([None] * len(reports), [f"pid {i} on 10.0.0.{i}" for i in range(len(reports))], spec)
    now = time.monotonic()
    watch.last = [{"phase": phase, "idle_s": idle, "step": 4} for phase, idle in reports]
    watch.asked = [None if s is None else ("ref", now - s) for s in (asked_s or [None] * len(reports))]
    return watch


def test_a_worker_waiting_for_a_compiling_peer_is_not_hung():
    # worker 0 loaded its programs from the compilation cache; worker 1 still compiles
    assert _watch([("step", 25.0), ("compile", 25.0)]).hung() is None
    assert _watch([("step", 25.0), ("step", 3.0)]).hung() is None


def test_every_worker_past_its_phase_limit_is_a_hang_naming_each_and_its_phase():
    message = _watch([("step", 12.0), ("eval", 3700.0)]).hung()
    assert message == (
        "no worker made progress: worker 0 (pid 0 on 10.0.0.0) for 12 s in phase step "
        "(cluster.hang_timeout_s=10; last finished step 4), worker 1 (pid 1 on 10.0.0.1) for "
        "3700 s in phase eval (cluster.phase_timeout_s.eval=3600; last finished step 4)")
    assert _watch([("step", 12.0), ("step", 12.0)]).hung(finished={1}).startswith(
        "no worker made progress: worker 0 ")


def test_an_unanswered_query_is_a_hang_within_the_shorter_of_its_limits():
    spec = ClusterSpec(num_hosts=2, hang_timeout_s=10, answer_timeout_s=60,
                       phase_timeout_s={"compile": 7200})
    # worker 1 froze mid-step: its query waits, worker 0 waits for it in a collective
    message = _watch([("step", 11.0), ("step", 0.1)], [None, 11.0], spec).hung()
    assert message == (
        "worker 1 (pid 1 on 10.0.0.1) did not answer the driver for 11 s (cluster."
        "hang_timeout_s=10; last seen in phase step, last finished step 4): frozen, or its "
        "node is cut off or lost")
    # in a long phase, answer_timeout_s bounds the wait for an answer
    assert _watch([("compile", 1.0), ("compile", 1.0)], [None, 59.0], spec).hung() is None
    assert "(cluster.answer_timeout_s=60; last seen in phase compile," in _watch(
        [("compile", 1.0), ("compile", 1.0)], [None, 61.0], spec).hung()


def test_a_frozen_worker_is_caught_within_hang_timeout_s_in_any_phase_by_default():
    """A worker frozen while it saves (or compiles) answers no query: by default the wait for
    an answer is hang_timeout_s (at most 300 s), not the long phase's limit."""
    spec = ClusterSpec(num_hosts=2, hang_timeout_s=8)
    assert spec.answer_limit() == (8, "hang_timeout_s")
    assert ClusterSpec(num_hosts=2).answer_limit() == (300, "answer_timeout_s")
    assert ClusterSpec(num_hosts=2, hang_timeout_s=8, answer_timeout_s=30).answer_limit() == (
        30, "answer_timeout_s")
    for phase in ("checkpoint", "compile", "eval", "restore", "planning"):
        assert _watch([(phase, 1.0), (phase, 1.0)], [None, 7.0], spec).hung() is None
        assert _watch([(phase, 1.0), (phase, 1.0)], [None, 9.0], spec).hung() == (
            f"worker 1 (pid 1 on 10.0.0.1) did not answer the driver for 9 s (cluster."
            f"hang_timeout_s=8; last seen in phase {phase}, last finished step 4): frozen, or "
            "its node is cut off or lost")
    # a worker that answers may stay in a long phase past hang_timeout_s
    assert _watch([("checkpoint", 100.0), ("checkpoint", 100.0)], [None, 1.0], spec).hung() is None


def test_phase_limits_and_their_keys():
    spec = ClusterSpec(num_hosts=2, startup_timeout_s=50, hang_timeout_s=20,
                       phase_timeout_s={"restore": 99})
    assert [spec.phase_limit(p) for p in ("start-up", "step", "restore", "compile")] == [50, 20, 99, 3600]
    with pytest.raises(ClusterError, match="phase_timeout_s names 'step'; its limit is hang_timeout_s"):
        ClusterSpec(num_hosts=2, phase_timeout_s={"step": 5})
    with pytest.raises(ClusterError, match="the phases with a limit of their own are planning, "
                                           "compile, restore, eval, checkpoint"):
        ClusterSpec(num_hosts=2, phase_timeout_s={"warmup": 5})


@pytest.fixture
def fresh_progress(monkeypatch):
    monkeypatch.setattr(_progress, "_progress", _progress._Progress())
    return _progress


def test_workers_at_different_steps_agree_to_stop_after_the_same_one():
    """Three workers had dispatched 3, 5 and 4 steps when the stop request came; each runs on
    to one past the furthest (6) and stops there, none beyond it."""
    workers = [_progress._Progress() for _ in range(3)]
    reached, go = {}, threading.Event()

    def train(i, steps_before):
        for step in range(1, steps_before + 1):
            assert workers[i].should_stop(step) is None
        go.wait()
        step = steps_before
        while step < 100:
            step += 1
            name = workers[i].should_stop(step)  # waits here until the stop step is known
            if name is not None:
                reached[i] = (step, name)
                return

    threads = [threading.Thread(target=train, args=(i, n)) for i, n in enumerate([3, 5, 4])]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while [w.position for w in workers] != [3, 5, 4] and time.monotonic() < deadline:
        time.sleep(0.01)
    asked = [w.request_stop("SIGTERM") for w in workers]
    assert asked == [3, 5, 4]
    go.set()
    time.sleep(0.2)  # each worker now waits at its next boundary
    assert [w.position for w in workers] == [4, 6, 5]
    for w in workers:
        w.set_stop_step(max(asked) + 1)
    for t in threads:
        t.join(timeout=10)
    assert reached == {0: (6, "SIGTERM"), 1: (6, "SIGTERM"), 2: (6, "SIGTERM")}


def test_a_step_beats_once_its_result_is_computed(fresh_progress):
    assert fresh_progress.should_stop(7) is None  # no stop requested: no wait
    fresh_progress.heartbeat(2, ready=jax.numpy.ones(()))  # outside a worker: beats at once
    assert fresh_progress.report()["step"] == 2
    fresh_progress.watch_steps()  # in a worker
    release = threading.Event()

    class Loss:  # a step's result, computed once `release` is set
        def block_until_ready(self):
            release.wait(10)

    fresh_progress.heartbeat(3, ready=Loss())
    time.sleep(0.3)
    assert fresh_progress.report()["step"] == 2  # dispatched, not finished
    release.set()
    deadline = time.monotonic() + 5
    while fresh_progress.report()["step"] != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    report = fresh_progress.report()
    assert (report["phase"], report["step"]) == ("step", 3)  # the first step ends start-up
    with fresh_progress.phase("eval"):
        assert fresh_progress.report()["phase"] == "eval"
    assert fresh_progress.report()["phase"] == "step"


def test_restarts_count_within_the_window():
    budget = RestartBudget(max_restarts=2, window_s=100)
    assert [budget.take(t) for t in (0, 10, 50)] == [1, 2, None]
    assert budget.take(101) == 2  # the restart at 0 left the window
    assert budget.take(109) is None and budget.take(111) == 2


def test_workers_get_the_drivers_compiler_and_nccl_settings_and_the_users_own():
    environ = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8",
               "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth1", "JAX_ENABLE_X64": "1",
               "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8", "HOME": "/root", "PYTHONPATH": "/x"}
    spec = ClusterSpec(num_hosts=2, devices_per_host=4, env={"MY_FLAG": "on", "NCCL_DEBUG": "WARN"},
                       compilation_cache_dir="/w/compile-cache")
    env = _checks.worker_env(spec, environ)
    assert env["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                "--xla_force_host_platform_device_count=4")
    assert {k: env[k] for k in ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "JAX_ENABLE_X64", "MY_FLAG",
                                "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")} == {
        "NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth1", "JAX_ENABLE_X64": "1",
        "MY_FLAG": "on", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": "/w/compile-cache"}
    assert "HOME" not in env and "JAX_NUM_CPU_DEVICES" not in env
    assert env["PYTHONPATH"].split(":")[0] == str(_checks.ROOT) and "/x" in env["PYTHONPATH"]
    gpu = _checks.worker_env(ClusterSpec(num_hosts=2, gpus_per_host=8), environ)
    assert gpu["JAX_PLATFORMS"] == "cuda"
    assert gpu["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    rocm = _checks.worker_env(ClusterSpec(num_hosts=2, gpus_per_host=8, env={"JAX_PLATFORMS": "rocm"}), {})
    assert rocm["JAX_PLATFORMS"] == "rocm"


def test_devices_other_than_asked_for_are_named():
    # this process has 8 CPU devices (conftest)
    who = "worker 1 (pid 7 on 10.0.0.2)"
    assert _checks.device_problem(ClusterSpec(num_hosts=2, devices_per_host=8), who) is None
    assert _checks.device_problem(ClusterSpec(num_hosts=2, devices_per_host=4), who).startswith(
        "worker 1 (pid 7 on 10.0.0.2) has 8 cpu device(s) but was asked for "
        "cluster.devices_per_host=4 CPU device(s)")
    assert _checks.device_problem(ClusterSpec(num_hosts=2, gpus_per_host=8), who).startswith(
        "worker 1 (pid 7 on 10.0.0.2) has 8 cpu device(s) (JAX_PLATFORMS=cpu) but was asked for "
        "cluster.gpus_per_host=8 GPU(s)")


def test_versions_differing_in_anything_are_named():
    mine = _checks.versions()
    assert _checks.version_problem(mine, dict(mine), "worker 1") is None
    theirs = dict(mine, jax="0.9.0")
    assert _checks.version_problem(mine, theirs, "worker 1") == (
        f"worker 1 runs jax 0.9.0 but the driver runs jax {mine['jax']}; install the same "
        "versions on every node (the same virtualenv)")


def test_a_workdir_a_worker_cannot_see_is_named(tmp_path):
    token = _checks.write_marker(tmp_path)
    assert _checks.marker_problem(str(tmp_path), token, "worker 1") is None
    assert _checks.marker_problem(str(tmp_path / "elsewhere"), token, "worker 1") == (
        f"worker 1 does not see the workdir the driver uses: {tmp_path}/elsewhere/.shardax-cluster "
        "(written by the driver) is missing there; put the workdir on a filesystem every node "
        "mounts at the same path (NFS, a cloud file share)")


# ----- rows per process ---------------------------------------------------------------------
@pytest.mark.parametrize("dataset", [
    SyntheticImages(8, 5, seed=3, stream=1),
    SyntheticRegression(6, 2, seed=3, stream=1),
    TokenDataset(np.arange(500, dtype=np.int32) % 97, 16, seed=3),
], ids=["images", "regression", "tokens"])
def test_every_builtin_source_builds_a_row_range_equal_to_slicing_its_batch(dataset):
    whole = dataset.batch(5, 12)
    for rows in (slice(0, 4), slice(4, 12), slice(7, 8), slice(3, 3)):
        part = dataset.batch_rows(5, 12, rows)
        for key in whole:
            np.testing.assert_array_equal(part[key], whole[key][rows])


class _Rows:
    """A user's dataset: ``batch`` and optionally ``batch_rows``, with its calls recorded."""

    def __init__(self, ranged: bool, wrong_rows: bool = False):
        self.calls, self.wrong_rows = [], wrong_rows
        if ranged:
            self.batch_rows = self._batch_rows

    def batch(self, index, batch_size):
        self.calls.append(("batch", index, batch_size))
        return {"x": np.arange(batch_size) + 100 * index, "y": np.ones((batch_size, 2))}

    def _batch_rows(self, index, batch_size, rows):
        self.calls.append(("batch_rows", index, batch_size, rows.start, rows.stop))
        stop = rows.stop + 1 if self.wrong_rows else rows.stop
        return {"x": np.arange(rows.start, stop) + 100 * index, "y": np.ones((stop - rows.start, 2))}


def _second_half_rows():
    """Rows a process holding the second half of the batch devices would feed."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = process_rows({"x": NamedSharding(mesh, PartitionSpec("data")),
                         "y": NamedSharding(mesh, PartitionSpec("data"))},
                        {"x": jax.ShapeDtypeStruct((16,), np.int32),
                         "y": jax.ShapeDtypeStruct((16, 2), np.float32)})
    assert rows == {"x": slice(0, 16), "y": slice(0, 16)}  # one process holds all here
    return {"x": slice(8, 16), "y": slice(8, 16)}


def test_a_user_dataset_with_batch_rows_is_asked_for_its_rows_only():
    dataset = _Rows(ranged=True)
    share = ProcessShare(dataset, _second_half_rows(), 16, "train_data()")
    batch = share.batch(3, 16)
    np.testing.assert_array_equal(batch["x"], np.arange(8, 16) + 300)
    assert share.note is None
    assert dataset.calls == [("batch_rows", 3, 16, 8, 16)]
    assert share.batch(0, 1)["x"].tolist() == [0]  # other sizes (shape examples) come whole
    with pytest.raises(DataError, match=r"train_data\(\).batch_rows\(3, 16, slice\(8, 16\)\) "
                                        r"returned \(9,\) rows in leaf \['x'\], expected 8"):
        ProcessShare(_Rows(ranged=True, wrong_rows=True), _second_half_rows(), 16,
                     "train_data()").batch(3, 16)


def test_a_user_dataset_without_batch_rows_is_sliced_with_a_note():
    dataset = _Rows(ranged=False)
    share = ProcessShare(dataset, _second_half_rows(), 16, "eval_data()")
    np.testing.assert_array_equal(share.batch(2, 16)["x"], np.arange(8, 16) + 200)
    assert dataset.calls == [("batch", 2, 16)]
    assert share.note == (
        "eval_data() (_Rows) has no batch_rows(index, batch_size, rows), so each process builds "
        "whole batches of 16 rows and keeps its own (process 0: rows 8-15); define batch_rows "
        "to build only those")


# ----- failure causes -----------------------------------------------------------------------
class _QuietWatch:
    def __init__(self, silent=()):
        self._silent = list(silent)

    def poll(self):
        pass

    def silent(self, within_s):
        return self._silent


def _cause(monkeypatch, reports, number=0, silent=(), lost=()):
    """What ends an attempt whose workers report ``reports`` ([(worker, exception)], in the
    order they arrive; the first ends the attempt, the others come in during the grace);
    ``lost``: the hosts Ray counts as dead."""
    import ray

    from parallel.cluster import _attempt
    from parallel.cluster._attempt import Attempt
    from trainer._errors import USER_ERRORS

    wrapped = {}
    for worker, error in reports:
        if not isinstance(error, ray.exceptions.RayActorError):
            error = ray.exceptions.RayTaskError("run", "traceback", error)
        wrapped[f"ref{worker}"] = error
    later = [f"ref{w}" for w, _ in reports[1:]]

    def wait(pending, num_returns=1, timeout=None):
        return pending[:1], pending[1:]

    def get(ref):
        raise wrapped[ref]

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(_attempt, "_lost_hosts", lambda: set(lost))
    attempt = Attempt(number, spec=ClusterSpec(num_hosts=2), log_dir=Path("/logs"),
                      shared_dir=None, token="", versions={}, out=None, stop=None)
    attempt.where = ["pid 10 on 10.0.0.1", "pid 11 on 10.0.0.2"]
    attempt.hosts = ["10.0.0.1", "10.0.0.2"]
    first = f"ref{reports[0][0]}"
    return attempt._failure({f"ref{w}": w for w in (0, 1)}, first, wrapped[first], later,
                            USER_ERRORS, _QuietWatch(silent))


def _raised(exception, progressed=True):
    exception.shardax_progressed = progressed
    return exception


def test_a_frozen_or_dead_peer_outranks_errors_reported_around_it(monkeypatch):
    import ray

    import parallel
    from parallel.cluster._attempt import WorkerFailure
    from trainer.config import ConfigError

    save_failed = _raised(parallel.CheckpointError("saving step 4 failed"))
    failure = _cause(monkeypatch, [(0, save_failed)], silent=[1])
    assert isinstance(failure, WorkerFailure)
    assert str(failure) == (
        "worker 1 (pid 11 on 10.0.0.2) stopped answering the driver (frozen, or its node is cut "
        "off or lost) (after which worker 0 raised CheckpointError: saving step 4 failed)")
    died = ray.exceptions.RayActorError(error_msg="Worker exit detail: killed by SIGKILL. More.")
    failure = _cause(monkeypatch, [(0, _raised(ConfigError("bad key"))), (1, died)])
    assert isinstance(failure, WorkerFailure)
    assert str(failure) == ("worker 1 (pid 11 on 10.0.0.2) died: killed by SIGKILL (after which "
                            "worker 0 raised ConfigError: bad key)")
    # JAX's distributed service ends worker 0 when frozen worker 1 sends no heartbeats
    ended = ray.exceptions.RayActorError(error_msg="Worker exit detail: exit code 1. More.")
    failure = _cause(monkeypatch, [(0, ended)], silent=[1])
    assert str(failure) == (
        "worker 1 (pid 11 on 10.0.0.2) stopped answering the driver (frozen, or its node is cut "
        "off or lost) (after which worker 0 died: exit code 1)")
    # Both died, the survivor's end reported first: the worker whose node Ray lost is named.
    node_lost = ray.exceptions.RayActorError(error_msg="Worker exit detail: node died. More.")
    failure = _cause(monkeypatch, [(0, ended), (1, node_lost)], lost=["10.0.0.2"])
    assert str(failure) == ("worker 1 (pid 11 on 10.0.0.2) died: node died (after which "
                            "worker 0 died: exit code 1)")
    failure = _cause(monkeypatch, [(0, ended), (1, node_lost)])  # no node lost: first report
    assert str(failure) == ("worker 0 (pid 10 on 10.0.0.1) died: exit code 1 (after which "
                            "worker 1 died: node died)")


def test_without_a_lost_peer_a_user_mistake_or_a_failing_save_ends_the_run(monkeypatch):
    import parallel
    from trainer.config import ConfigError

    mistake = _raised(ConfigError("model.width must be positive"))
    assert _cause(monkeypatch, [(0, mistake), (1, _raised(RuntimeError("gloo")))]) is mistake
    disk_full = _raised(parallel.CheckpointError("No space left on device"))
    assert _cause(monkeypatch, [(1, disk_full)]) is disk_full


def test_an_error_before_the_first_step_restarts_only_a_restarted_attempt(monkeypatch):
    from parallel.cluster._attempt import WorkerFailure

    error = _raised(RuntimeError("gloo: connection reset by peer"), progressed=False)
    first = _cause(monkeypatch, [(0, error)], number=0)
    assert isinstance(first, ClusterError)
    assert str(first) == (
        "worker 0 (pid 10 on 10.0.0.1) raised RuntimeError: gloo: connection reset by peer "
        "before its first step, so it was not restarted (a fresh start would fail the same "
        "way); its traceback is in /logs/worker-0.log")
    again = _cause(monkeypatch, [(0, error)], number=1)
    assert isinstance(again, WorkerFailure)
    assert str(again) == "worker 0 (pid 10 on 10.0.0.1) raised RuntimeError: gloo: connection reset by peer"


def test_the_first_signal_to_the_driver_asks_to_stop_the_second_unwinds():
    from parallel.cluster._driver import _StopSignal

    stop = _StopSignal()
    previous = signal.getsignal(signal.SIGINT)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between two bytecodes of this thread
        assert stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt, match="received SIGTERM twice"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is previous
