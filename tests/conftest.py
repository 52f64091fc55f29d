"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# JAX's persistent compilation cache, one per test session, shared by this process, the xdist
# workers and every subprocess the tests start (they inherit the environment): many tests compile
# the same programs (tiny/gpt.yaml under the same plans, in-process and through scripts/train.py).
# A size limit turns on JAX's file lock, so two processes never read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="shardax-tests-jax-cache-")
    os.environ["SHARDAX_TESTS_OWN_JAX_CACHE"] = "1"
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    """The session's compilation cache goes with the process that made it."""
    if not hasattr(config, "workerinput") and os.environ.pop("SHARDAX_TESTS_OWN_JAX_CACHE", None):
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The slowest tests (``SLOW``) are marked ``slow``; the longest modules (``FIRST``) run
    first, so that with two workers neither ends the run alone on a long module."""
    import pytest

    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)

    def rank(item) -> int:
        name = os.path.basename(item.nodeid.split("::", 1)[0])
        return next((i for i, prefix in enumerate(FIRST) if name.startswith(prefix)), len(FIRST))

    items.sort(key=rank)  # stable: the order within each module is kept


# Modules that took a minute or more in the last full runs (setup and calls), run first in this
# order; the Ray-cluster modules are one unit of work (see ``_scope``).
FIRST = ("test_cluster", "test_checkpoint_resume", "test_pipeline_memory", "test_pipeline.py",
         "test_resume_plans", "test_train_models", "test_pipeline_exact")


def _scope(nodeid: str) -> str:
    """The unit of work one xdist worker takes whole: a test module, so its module-scoped
    fixtures are built once; the modules that start Ray clusters form one unit and run one after
    another on one worker (two local clusters at once would compete for ports, and
    ``address=auto`` could find the other one)."""
    module = nodeid.split("::", 1)[0]
    return "ray-clusters" if os.path.basename(module).startswith("test_cluster") else module


def _make_scheduler(config, log):
    """pytest-xdist's scheduler for the README's ``-n 2`` run, whatever ``--dist`` says: whole
    modules (``_scope``) in collection order. xdist's own ``loadgroup`` does not group on pytest
    9.2 (it renames ``item._nodeid``, which pytest 9.2 no longer reads), so tests of one module
    ran on both workers and built its fixtures twice."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


try:
    import xdist  # noqa: F401  (the hook exists only with pytest-xdist installed)
except ImportError:
    pass
else:
    import pytest as _pytest

    pytest_xdist_make_scheduler = _pytest.hookimpl(optionalhook=True)(_make_scheduler)


# The slowest tests (minutes each on a 2-core machine): the solver-chosen plan on two Ray workers,
# the Wide-ResNet and MoE training runs and the killed-run resumes under zero3 and auto. The
# README's test command (CI, 25 minutes) leaves them out with -m "not slow"; run them with
# -m slow before a release.
SLOW = (
    "tests/test_cluster_train.py::test_a_solver_chosen_plan_on_two_workers_trains_like_one_process",
    "tests/test_train_models.py::test_tiny_model_loss_falls_under_shard[wide_resnet",
    "tests/test_train_models.py::test_tiny_model_loss_falls_under_shard[moe",
    "tests/test_resume_plans.py::test_a_killed_run_reruns_on_its_saved_plan_with_identical_losses[",
)
