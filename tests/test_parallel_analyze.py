"""``step.analyze``: memory, communication and FLOPs of compiled steps, checked by arithmetic."""
import json

import jax
import pytest
from jax.sharding import PartitionSpec as P

import parallel
from _parallel_setups import mlp_setup
from parallel import profiles

WIDTH, LAYERS, BATCH = 512, 4, 16
KERNEL_BYTES = LAYERS * WIDTH * WIDTH * 4
GRAD_BYTES = KERNEL_BYTES + LAYERS * WIDTH * 4  # kernels + biases, float32


def abstract_args(setup):
    state = jax.eval_shape(setup.init, jax.random.key(0))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in setup.batch.items()}
    return state, batch


@pytest.fixture(scope="module")
def reports():
    """Reports of a parameter-heavy MLP (4 x 512x512, batch 16), from abstract arguments only."""
    setup = mlp_setup(sizes=(WIDTH,) * (LAYERS + 1), batch_size=BATCH)
    args = abstract_args(setup)
    out = {}
    for name in ("data", "zero2", "zero3"):
        step = parallel.parallelize(setup.train_step, method=parallel.make_method(name))
        out[name] = step.analyze(*args)
    out["data_h100"] = step_h100 = parallel.parallelize(
        setup.train_step, method=parallel.DataParallel()).analyze(*args, profile="h100")
    assert step_h100.profile == "h100"
    return out


def test_data_parallel_sends_one_all_reduce_of_the_gradients(reports):
    report = reports["data"]
    assert report.method == "data" and report.mesh_shape == {"data": 8}
    all_reduce = report.collectives["all-reduce"]
    # everything reduced is the gradients (plus the scalar loss): within 10% of their bytes
    assert abs(all_reduce["payload_bytes"] - GRAD_BYTES) <= 0.1 * GRAD_BYTES
    # and a ring all-reduce sends 2 (n-1)/n of it per device
    assert report.communication_bytes == pytest.approx(2 * 7 / 8 * GRAD_BYTES, rel=0.1)
    assert sum(c["count"] for k, c in report.collectives.items() if k != "all-reduce") == 0


def test_zero_memory_and_communication(reports):
    data, zero2, zero3 = reports["data"], reports["zero2"], reports["zero3"]
    # params + grads + Adam mu and nu, all whole on every device
    assert data.per_device_memory_bytes >= 4 * GRAD_BYTES
    assert zero3.per_device_memory_bytes <= 0.3 * data.per_device_memory_bytes
    # ZeRO-2 keeps 1/8 of the kernels' mu and nu per device: 2 * 7/8 of the kernel bytes saved
    saved = data.per_device_memory_bytes - zero2.per_device_memory_bytes
    assert saved == pytest.approx(2 * 7 / 8 * KERNEL_BYTES, rel=0.02)
    # ZeRO-2 gathers the updated (sharded) kernels back to every device after the update
    assert zero2.collectives["all-gather"]["payload_bytes"] == pytest.approx(KERNEL_BYTES, rel=0.01)
    assert zero3.shardings[0]["params"]["dense_0"]["kernel"] == P("data")
    assert zero2.shardings[0]["params"]["dense_0"]["kernel"] == P()
    assert data.shardings[1] == {"x": P("data"), "y": P("data")}


def test_flops_and_estimated_time(reports):
    data, zero2 = reports["data"], reports["zero2"]
    # forward + backward matmuls on this device's 2 examples: 6 * (B/8) * kernel parameters
    matmul_flops = 6 * (BATCH // 8) * LAYERS * WIDTH * WIDTH
    assert data.flops >= matmul_flops
    assert data.flops <= matmul_flops + 40 * GRAD_BYTES // 4  # + a few dozen per param (Adam)
    assert zero2.flops < data.flops  # the optimizer update runs on 1/8 of the state
    h100 = reports["data_h100"]
    peak = profiles.get_profile("h100")
    compute = max(h100.flops / peak.peak_flops, h100.bytes_accessed / peak.memory_bandwidth)
    comm = sum(c["count"] * peak.link_latency_s + c["sent_bytes"] / peak.link_bandwidth
               for c in h100.collectives.values())
    assert h100.estimated_step_time_s == pytest.approx(compute + comm, rel=1e-9)
    assert data.profile == "cpu" and data.estimated_step_time_s > 0
    assert data.compile_time_s > 0 and data.solve_time_s >= 0 and data.stages is None
    assert "per-device memory" in data.format()
    saved = json.loads(json.dumps(data.to_dict()))
    assert saved["communication_bytes"] == data.communication_bytes and "shardings" not in saved


def test_a_model_too_large_for_this_machine_is_analyzed_without_allocating():
    width = 32768  # 4 layers of 32768^2 float32: 16 GiB of params, 64 GiB with grads and Adam
    setup = mlp_setup(sizes=(width,) * 5, batch_size=8)
    state, batch = abstract_args(setup)
    kernel_bytes = 4 * width * width * 4
    report = parallel.parallelize(setup.train_step, method=parallel.Zero3Parallel()).analyze(
        state, batch, profile="h100")
    # each device holds 1/8 of params, mu and nu (3/8 of kernel bytes) plus gathered weights
    assert 3 / 8 * kernel_bytes <= report.per_device_memory_bytes <= 2 * kernel_bytes
    assert report.per_device_memory_bytes < profiles.get_profile("h100").memory_bytes
    data = parallel.parallelize(setup.train_step, method=parallel.DataParallel()).analyze(
        state, batch, profile="h100")
    assert data.per_device_memory_bytes >= 4 * kernel_bytes  # 64 GiB: more than this host has
