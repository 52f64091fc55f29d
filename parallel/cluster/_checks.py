"""Start-up checks: every worker runs the driver's code on the devices asked for, or none starts.

A misconfigured worker does not fail later in a confusing way (or, worse, train on the wrong
devices): it is refused before the mesh forms, with one line naming the worker, what it saw
and what was asked.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import sys
from pathlib import Path

from parallel.cluster._spec import ClusterSpec

ROOT = Path(__file__).resolve().parents[2]  # the directory holding `parallel`
MARKER = ".shardax-cluster"  # written by the driver in the shared directory, read by workers
PACKAGES = ("parallel", "trainer", "models")
# Passed from the driver to every worker: the compiler's and NCCL's settings, and JAX's own
# (x64, matmul precision...), which change what is computed. Not these: they say where this
# process runs and are set per worker.
FORWARDED_PREFIXES = ("XLA_FLAGS", "NCCL_", "JAX_")
NOT_FORWARDED = {"JAX_PLATFORMS", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS",
                 "JAX_LOCAL_DEVICE_IDS", "JAX_NUM_CPU_DEVICES", "JAX_PROCESS_ID",
                 "JAX_NUM_PROCESSES", "JAX_COMPILATION_CACHE_DIR"}
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def versions() -> dict:
    """What must be equal on the driver and every worker: Python, JAX, jaxlib and shardax.

    shardax is identified by a hash of its sources, so an out-of-date checkout on one node
    is caught even when the version number agrees. Imports no JAX backend.
    """
    import jax
    import jaxlib

    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return {"python": sys.version.split()[0], "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "shardax": f"source {digest.hexdigest()[:12]} at {ROOT}"}


def version_problem(mine: dict, theirs: dict, who: str) -> str | None:
    """One line naming the first version ``who`` differs in from the driver, or None."""
    for name in ("python", "jax", "jaxlib", "shardax"):
        if mine.get(name) != theirs.get(name):
            fix = ("put the same shardax checkout on every node (a shared filesystem, or the "
                   "same commit everywhere)" if name == "shardax" else
                   "install the same versions on every node (the same virtualenv)")
            return (f"{who} runs {name} {theirs.get(name)} but the driver runs {name} "
                    f"{mine.get(name)}; {fix}")
    return None


def write_marker(shared_dir: Path) -> str:
    """Writes a fresh token into ``shared_dir``; each worker must read it back (``read_marker``)."""
    shared_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    (shared_dir / MARKER).write_text(token)
    return token


def marker_problem(shared_dir: str, token: str, who: str) -> str | None:
    """Why ``who`` cannot see the driver's ``shared_dir`` (None: it reads the driver's token)."""
    path = Path(shared_dir) / MARKER
    try:
        seen = path.read_text()
    except OSError as e:
        seen = f"unreadable ({e.strerror or e})"
    if seen == token:
        return None
    what = "missing" if not path.exists() else f"holds {seen!r} instead of the driver's token"
    return (f"{who} does not see the workdir the driver uses: {path} (written by the driver) "
            f"is {what} there; put the workdir on a filesystem every node mounts at the same "
            "path (NFS, a cloud file share)")


def worker_env(spec: ClusterSpec, environ=os.environ) -> dict:
    """Environment of a worker process, set before it starts (so before JAX is imported).

    ``PYTHONPATH`` finds this code; ``XLA_FLAGS``, ``NCCL_*`` and ``JAX_*`` come from the
    driver, then ``spec.env`` (the user's own, winning); the platform (``JAX_PLATFORMS``: cpu,
    or cuda for GPU workers unless ``spec.env`` names one) and the simulated CPU device count
    are set by the spec.
    """
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    paths = [str(ROOT), os.getcwd(), *([str(Path(main).resolve().parent)] if main else []),
             *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {key: value for key, value in environ.items()
           if key.startswith(FORWARDED_PREFIXES) and key not in NOT_FORWARDED}
    env.update(spec.env)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [*paths, *filter(None, spec.env.get("PYTHONPATH", "").split(os.pathsep))]))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    if not spec.gpus_per_host and spec.devices_per_host is not None:
        flags.append(f"{DEVICE_COUNT_FLAG}={spec.devices_per_host}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = spec.env.get("JAX_PLATFORMS", "cuda" if spec.gpus_per_host else "cpu")
    if spec.compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = spec.compilation_cache_dir
    return env


def device_problem(spec: ClusterSpec, who: str) -> str | None:
    """Why this worker's JAX devices are not what ``spec`` asks for (None: they are).

    Starts JAX's backend: call it after ``jax.distributed.initialize``.
    """
    import jax

    platforms = os.environ.get("JAX_PLATFORMS", "")
    want = "gpu" if spec.gpus_per_host else "cpu"
    asked = (f"cluster.gpus_per_host={spec.gpus_per_host} GPU(s)" if spec.gpus_per_host else
             f"cluster.devices_per_host={spec.devices_per_host} CPU device(s)"
             if spec.devices_per_host is not None else "CPU devices")
    try:
        devices = jax.local_devices()
    except Exception as e:  # noqa: BLE001 (JAX raises RuntimeError, or asserts with no GPU seen)
        message = " ".join(str(e).split())[:300] or "no device of that platform is visible"
        return (f"{who} was asked for {asked} but JAX could not start JAX_PLATFORMS={platforms} "
                f"({type(e).__name__}: {message}); install jax[cuda12] and check the GPUs on "
                "every node, or ask for CPU workers")
    platform = devices[0].platform
    seen = f"{len(devices)} {platform} device(s)"
    if (platform == "cpu") != (want == "cpu"):
        return (f"{who} has {seen} (JAX_PLATFORMS={platforms}) but was asked for {asked}; "
                "install jax[cuda12] on every node or ask for CPU workers")
    count = spec.gpus_per_host or spec.devices_per_host
    if count is not None and len(devices) != count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        extra = f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""
        return (f"{who} has {seen}{extra} but was asked for {asked}; ask for what each node has "
                "(or check what overrides the device count in its environment)")
    return None
