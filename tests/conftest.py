"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist's ``--dist loadgroup`` (the README's test command runs two
    workers): a module runs whole on one worker, so its module-scoped fixtures are built once,
    and the modules that start Ray clusters run one after another on the same worker (two local
    clusters at once would compete for ports, and ``address=auto`` could find the other one)."""
    import pytest

    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        group = "ray-clusters" if module.startswith("test_cluster") else module
        item.add_marker(pytest.mark.xdist_group(group))
