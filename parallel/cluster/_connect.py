"""Connecting to Ray: a private local instance on loopback, or an existing cluster."""
from __future__ import annotations

import math
import os
import socket
import threading

from parallel.cluster._spec import ClusterError, ClusterSpec


def connect(spec: ClusterSpec) -> None:
    """Starts a local Ray instance (``spec.address`` empty) or connects to an existing one.

    A local instance listens on 127.0.0.1 only, has no dashboard, as many CPUs as the workers
    ask for and the GPUs Ray finds on this machine. ``ray.shutdown()`` stops it again.

    Raises:
      ClusterError: nothing answers at ``spec.address`` within ``spec.startup_timeout_s``.
    """
    if not spec.address:
        # Ray would otherwise advertise (and bind) the machine's public address.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if not spec.address and ray._private.ray_constants.ENABLE_RAY_CLUSTER:
        raise ClusterError("ray was imported before parallel.cluster could keep a local Ray "
                           "instance on loopback; import ray after starting the run")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if spec.address:
        _probe(spec.address, spec.startup_timeout_s)
        kwargs = dict(address=spec.address)
    else:
        kwargs = dict(num_cpus=spec.num_hosts * spec.cpus_per_host, include_dashboard=False,
                      _node_ip_address="127.0.0.1", object_store_memory=100 * 2**20)
    if not spec.address:
        # In this thread: Ray ties the processes it starts to the life of the starting thread.
        ray.init(log_to_driver=False, configure_logging=False, **kwargs)
        return
    done, failure = threading.Event(), []

    def init():
        try:
            ray.init(log_to_driver=False, configure_logging=False, **kwargs)
        except Exception as e:  # ray raises ConnectionError, RuntimeError, ValueError...
            failure.append(e)
        done.set()

    # A thread bounds the wait: ray.init retries an unresponsive address for minutes.
    threading.Thread(target=init, daemon=True, name="ray-init").start()
    where = f"cluster.address={spec.address!r}"
    if not done.wait(spec.startup_timeout_s):
        raise ClusterError(f"could not connect to {where} within cluster.startup_timeout_s="
                           f"{spec.startup_timeout_s}; check that `ray start --head` runs there")
    if failure:
        message = " ".join(str(failure[0]).split())[:300]
        raise ClusterError(f"could not connect to {where}: {type(failure[0]).__name__}: {message}")


def _probe(address: str, timeout_s: float) -> None:
    """Fails fast when nothing listens at ``host:port`` (``ray.init`` would retry for minutes)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"cluster.address {address!r} must be 'auto', 'host:port' (the head's "
                           "GCS port, 6379 by default) or 'ray://host:port' (Ray Client)")
    if address.startswith("ray://"):
        try:
            import grpc  # noqa: F401  (Ray Client's transport)
        except ImportError:
            raise ClusterError(f"cluster.address {address!r} uses Ray Client, which needs "
                               "`pip install 'ray[client]'`; or give the head's GCS address "
                               "host:port from a machine of the cluster") from None
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout_s, 10)):
            pass
    except OSError as e:
        raise ClusterError(f"no Ray cluster answers at cluster.address={address!r} "
                           f"({e.strerror or e}); start one with `ray start --head` there, or "
                           "leave cluster.address empty for a local instance") from None


def bundle(spec: ClusterSpec) -> dict:
    """The resources one worker (one placement-group bundle) asks for."""
    need = {"CPU": float(spec.cpus_per_host)}
    if spec.gpus_per_host:
        need["GPU"] = float(spec.gpus_per_host)
    return need


def check_resources(spec: ClusterSpec) -> None:
    """Fails with a clear message when the cluster cannot place ``spec.num_hosts`` bundles.

    Workers on an existing cluster go one per node (``STRICT_SPREAD``); a local instance packs
    them on this machine.
    """
    import ray

    need = bundle(spec)
    fits_per_node = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits = min(math.floor(have.get(k, 0.0) / v) for k, v in need.items())
        fits_per_node.append(fits if not spec.address else min(fits, 1))
    fits = sum(fits_per_node)
    if fits < spec.num_hosts:
        total = ray.cluster_resources()
        have = ", ".join(f"{k}: {total.get(k, 0):g}" for k in need)
        per = "one per node, " if spec.address else ""
        raise ClusterError(
            f"cluster.num_hosts={spec.num_hosts} but the cluster can place {fits} worker(s) "
            f"({per}each needs {_fmt(need)}; {len(fits_per_node)} node(s) with {have} in all); "
            "lower cluster.num_hosts or cluster.gpus_per_host, or add nodes")


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"
