"""``Trainer.fit`` on a Ray cluster: every worker runs the same ``fit`` on one global mesh."""
from __future__ import annotations

import dataclasses
import signal
import sys

import jax
import numpy as np

import parallel
from parallel import cluster

from trainer._errors import USER_ERRORS
from trainer.config import ClusterConfig

COMPILE_CACHE = "compile-cache"  # under the workdir


def cluster_spec(config: ClusterConfig, workdir=None) -> cluster.ClusterSpec:
    """The ``parallel.cluster`` spec the ``cluster`` section of a config asks for.

    ``workdir`` (absolute) holds the compilation cache when ``config.compilation_cache``.
    """
    env = {key: str(value) for key, value in (config.env or {}).items()}
    cache = (str(workdir / COMPILE_CACHE) if workdir is not None and config.compilation_cache
             else None)
    return cluster.ClusterSpec(
        num_hosts=config.num_hosts, address=config.address,
        devices_per_host=config.devices_per_host, gpus_per_host=config.gpus_per_host,
        cpus_per_host=config.cpus_per_host, max_restarts=config.max_restarts,
        restart_window_s=config.restart_window_s, startup_timeout_s=config.startup_timeout_s,
        hang_timeout_s=config.hang_timeout_s,
        phase_timeout_s=dict(config.phase_timeout_s or {}),
        answer_timeout_s=config.answer_timeout_s, capacity_timeout_s=config.capacity_timeout_s,
        env=env, compilation_cache_dir=cache)


def fit_on_cluster(trainer) -> dict:
    """Runs ``trainer.fit()`` in ``cluster.num_hosts`` workers; returns worker 0's metrics.

    The trainer (not yet set up) is pickled to every worker, with its workdir made absolute:
    every worker must see it (checked before the mesh forms). Workers write their output to
    ``workdir/logs/worker-<i>.log``; worker 0's lines are printed here as they come.
    """
    config = trainer.config
    trainer.workdir = trainer.workdir.absolute()
    if not config.train.checkpoint_every:
        print(f"cluster: train.checkpoint_every=0 saves only at the end (step "
              f"{config.train.steps}): a worker lost before then restarts the run from its "
              "beginning; set train.checkpoint_every", file=sys.stderr, flush=True)
    spec = cluster_spec(config.cluster, trainer.workdir)
    return cluster.run(_fit_in_worker, (trainer,), spec=spec, log_dir=trainer.workdir / "logs",
                       fatal=USER_ERRORS, shared_dir=trainer.workdir)


def _fit_in_worker(trainer) -> dict:
    """A worker's part: after a restart the run resumes from its newest checkpoint (saves the
    failure interrupted are moved aside; without a valid one it starts again from step 0)."""
    if cluster.worker_info().attempt > 0:
        train = dataclasses.replace(trainer.config.train, resume=True, overwrite=False)
        trainer.config = dataclasses.replace(trainer.config, train=train)
        with cluster.phase("restore"):
            parallel.Checkpointer(trainer.workdir / "checkpoints").set_aside_torn()
    return trainer.fit()


def read_everywhere(x: jax.Array) -> np.ndarray:
    """A replicated array's value in every process, also where other processes hold it (a
    pipeline stage's devices may all sit in one process)."""
    holders = {d.process_index for d in x.sharding.device_set}
    if len(holders) == jax.process_count():
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    source = jax.process_index() == min(holders)
    value = np.asarray(x.addressable_shards[0].data) if source else np.zeros(x.shape, x.dtype)
    return np.asarray(multihost_utils.broadcast_one_to_all(value, is_source=source))


class StopSignals:
    """Why training stops early: SIGTERM/SIGINT to this process (one process), or the cluster
    driver's request, which every worker honours after the same step.

    ``stop(step)`` is called after dispatching each step and returns the signal's name
    from the step training must stop at (then that step is saved), else None.
    """

    def __init__(self):
        self.name, self.previous = None, {}

        def handler(signum, _frame):
            self.name = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (a cluster worker): the driver signals
                pass

    def stop(self, step: int) -> str | None:
        if self.name is None:
            self.name = cluster.should_stop(step)
        return self.name

    def restore(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
