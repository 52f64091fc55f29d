"""``Trainer.fit`` on a Ray cluster: every worker runs the same ``fit`` on one global mesh."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from parallel import cluster

from trainer._errors import USER_ERRORS
from trainer.config import ClusterConfig


def cluster_spec(config: ClusterConfig) -> cluster.ClusterSpec:
    """The ``parallel.cluster`` spec the ``cluster`` section of a config asks for."""
    return cluster.ClusterSpec(
        num_hosts=config.num_hosts, address=config.address,
        devices_per_host=config.devices_per_host, gpus_per_host=config.gpus_per_host,
        cpus_per_host=config.cpus_per_host, max_restarts=config.max_restarts,
        startup_timeout_s=config.startup_timeout_s, hang_timeout_s=config.hang_timeout_s)


def fit_on_cluster(trainer) -> dict:
    """Runs ``trainer.fit()`` in ``cluster.num_hosts`` workers; returns worker 0's metrics.

    The trainer (not yet set up) is pickled to every worker. Workers write their output to
    ``workdir/logs/worker-<i>.log``; worker 0's lines are printed here as they come.
    """
    spec = cluster_spec(trainer.config.cluster)
    return cluster.run(_fit_in_worker, (trainer,), spec=spec, log_dir=trainer.workdir / "logs",
                       fatal=USER_ERRORS)


def _fit_in_worker(trainer) -> dict:
    """A worker's part: after a restart the run resumes from its newest checkpoint."""
    if cluster.worker_info().attempt > 0:
        train = dataclasses.replace(trainer.config.train, resume=True, overwrite=False)
        trainer.config = dataclasses.replace(trainer.config, train=train)
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
