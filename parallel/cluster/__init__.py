"""Running one program on many hosts with Ray: one global JAX mesh, restarts on failure.

``run(fn, args, spec=ClusterSpec(num_hosts=N), log_dir=...)`` places one Ray actor per host,
forms the mesh with ``jax.distributed`` and calls ``fn(*args)`` in every worker. Inside ``fn``,
``phase``, ``heartbeat`` and ``should_stop`` tell the driver what the worker does and let it
stop every worker after the same step. Ray is imported only when ``run`` is called.
"""
from parallel.cluster._attempt import WorkerFailure as WorkerFailure
from parallel.cluster._driver import run as run
from parallel.cluster._progress import heartbeat as heartbeat
from parallel.cluster._progress import phase as phase
from parallel.cluster._progress import should_stop as should_stop
from parallel.cluster._spec import PHASES as PHASES
from parallel.cluster._spec import ClusterError as ClusterError
from parallel.cluster._spec import ClusterSpec as ClusterSpec
from parallel.cluster._worker import WorkerInfo as WorkerInfo
from parallel.cluster._worker import worker_info as worker_info
