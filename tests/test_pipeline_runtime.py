"""The pipeline runtime: transfers between sub-meshes that never touch the host, and the
values leaving the micro-batches combined as the regions say (the full 4x2 pipeline's
host-free steps and program counts are in test_pipeline_memory.py)."""
import threading

import jax
import numpy as np
import pytest
from jax._src import pjit
from jax._src.array import ArrayImpl
from jax._src.interpreters import pxla

import parallel
from parallel.pipeline import _task_programs
from tests import _pipeline_setups as setups



class Executions:
    """Counts XLA executions. JAX's C++ dispatch skips Python once a program has run, so the
    fast path is turned off before anything is compiled: every execution then passes through
    ``ExecuteReplicated.__call__``."""

    def __init__(self, monkeypatch):
        self.count = 0
        call = pxla.ExecuteReplicated.__call__

        def counted(executable, *args):
            self.count += 1
            return call(executable, *args)

        monkeypatch.setattr(pjit, "_get_fastpath_data", lambda *args, **kwargs: None)
        monkeypatch.setattr(pxla.ExecuteReplicated, "__call__", counted)
        # Programs compiled by earlier tests (shared by content) would keep their fast path.
        monkeypatch.setattr(_task_programs, "_PROGRAMS", {})


class HostReads:
    """Records every read of an array's values into host memory on this thread.

    ``jax.transfer_guard_device_to_host`` does not fire on CPU devices (their buffers are host
    memory), so this wraps ``jax.Array._value``, through which JAX's own slow resharding path
    (``shard_sharded_device_array_slow_path``), ``np.asarray`` and ``jax.device_get`` all go.
    """

    def __init__(self, monkeypatch):
        self.active, self.reads = False, []
        value = ArrayImpl._value

        def guarded(array):
            if self.active and threading.current_thread() is threading.main_thread():
                self.reads.append(array.shape)
            return value.fget(array)

        monkeypatch.setattr(ArrayImpl, "_value", property(guarded))


@pytest.mark.parametrize("source, target", [
    ((("data", 2),), (("data", 1), ("model", 2))),
    ((("data", 4),), (("data", 2),)),
    ((("data", 1),), (("data", 2), ("model", 2))),
])
def test_transfers_between_sub_meshes_stay_on_devices(monkeypatch, source, target):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel import mesh as mesh_lib
    from parallel._transfer import transfer

    host = HostReads(monkeypatch)
    devices = jax.devices()
    n = int(np.prod([size for _, size in source]))
    src = mesh_lib.make_mesh(dict(source), devices[:n])
    dst = mesh_lib.make_mesh(dict(target), devices[n:n + int(np.prod([s for _, s in target]))])
    values = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    x = jax.device_put(values, NamedSharding(src, P(src.axis_names[0])))
    host.active = True
    moved = [transfer(x, NamedSharding(dst, spec)) for spec in (P(), P(dst.axis_names[-1]),
                                                               P(None, dst.axis_names[-1]))]
    jax.block_until_ready(moved)
    host.active = False
    assert host.reads == []
    for y in moved:
        assert y.sharding.mesh == dst
        np.testing.assert_array_equal(np.asarray(y), values)


def test_batched_copies_keep_values_and_layouts_without_device_put(monkeypatch):
    """``copy_all``: shards that move whole (as many devices) go through the runtime's batched
    copy, not ``jax.device_put``'s slower checks; other moves still arrive replicated. Values
    are exact and nothing is read into host memory."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel import _transfer, mesh as mesh_lib

    devices = jax.devices()
    src = mesh_lib.make_mesh({"data": 1, "model": 2}, devices[:2])
    dst = mesh_lib.make_mesh({"data": 2, "model": 1}, devices[2:4])
    one = mesh_lib.make_mesh({"data": 1, "model": 1}, devices[4:5])
    values = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    split = jax.device_put(values, NamedSharding(src, P(None, "model")))
    whole = jax.device_put(values + 1, NamedSharding(src, P()))
    host = HostReads(monkeypatch)
    puts = []
    device_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: puts.append(a) or device_put(*a, **k))
    host.active = True
    moved = _transfer.copy_all([split, whole], dst)
    jax.block_until_ready(moved)
    assert puts == []  # both move shard by shard
    to_one = _transfer.copy_all([split, whole], one)
    jax.block_until_ready(to_one)
    host.active = False
    assert host.reads == []
    assert [tuple(d.id for d in y.sharding.mesh.devices.flat) for y in moved] == [(2, 3)] * 2
    assert moved[0].sharding.spec == P(None, "model") and moved[0].sharding.mesh.axis_names == (
        "data", "model") and moved[0].sharding.mesh.devices.shape == (1, 2)
    assert [y.sharding.spec for y in to_one] == [P(), P()]
    for y, want in zip(moved + to_one, [values, values + 1] * 2):
        np.testing.assert_array_equal(np.asarray(y), want)


def test_values_leaving_the_micro_batches_combine_as_regions_say():
    """The runtime side of ``Regions.combine``: per-example values concatenated in micro-batch
    order, sums summed, weighted means weighted, the rest averaged."""
    import dataclasses

    import jax.numpy as jnp

    from parallel.pipeline._runtime import StageRunner

    def step(w, batch):
        def loss(w):
            h = parallel.mark_pipeline_boundary(jnp.tanh(batch["x"] @ w["a"]))
            per_example = jnp.mean((h @ w["b"]) ** 2, axis=1)  # (B,)
            weight = jnp.sum((batch["x"][:, 0] > 0).astype(jnp.float32))
            return jnp.mean(per_example), (per_example, jnp.sum(per_example), weight)

        (value, (per_example, total, weight)), grads = jax.value_and_grad(
            loss, has_aux=True)(w)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, w, grads)
        return new, {"loss": value, "per_example": per_example, "total": total,
                     "weight": weight}

    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(4, 8)).astype(np.float32),
         "b": rng.normal(size=(8, 3)).astype(np.float32)}
    batch = {"x": rng.normal(size=(8, 4)).astype(np.float32)}
    method = parallel.PipeshardParallel(4, stage_option=2, intra_op="data")
    pipelined = parallel.parallelize(step, method=method).compile(w, batch)
    r = pipelined.runner
    names = ["a", "b", "loss", "per_example", "total", "weight"]  # the flat outputs
    out = dict(zip(names, r.program.outputs))
    # The mean is a sum over the micro-batch (crossing) divided by the batch size in the update.
    divide = next(op for op in r.program.ops if out["loss"] in op.outputs)
    assert divide.prim.name == "div" and divide.inputs[0] in r.regions.crossing
    combine = {out["per_example"]: "concat", out["total"]: "sum",
               divide.inputs[0]: ("weighted", out["weight"]), out["weight"]: "sum"}
    runner = StageRunner(r.program, dataclasses.replace(r.regions, combine=combine),
                         r.placement, r.meshes, 4, "1f1b", r.output_stage, specs=r.specs,
                         same_as=r.same_as)
    flat = [jnp.asarray(x) for x in jax.tree.leaves((w, batch))]
    got = dict(zip(names, runner(flat)))
    per_example = np.mean((np.tanh(batch["x"] @ w["a"]) @ w["b"]) ** 2, axis=1)
    np.testing.assert_allclose(np.asarray(got["per_example"]), per_example, rtol=1e-6)
    np.testing.assert_allclose(float(got["total"]), per_example.sum(), rtol=1e-6)
    # The division runs in the update with the global batch's 8 (traced on the global batch).
    micro_sums = per_example.reshape(4, 2).sum(1)
    weights = (batch["x"][:, 0] > 0).reshape(4, 2).sum(1)
    assert float(got["weight"]) == weights.sum()
    np.testing.assert_allclose(float(got["loss"]),
                               (micro_sums * weights).sum() / weights.sum() / 8, rtol=1e-6)


def test_steps_whose_stage_meshes_differ_only_in_shape_get_their_own_programs():
    """Task programs are shared by content across steps in a process; two steps with the same
    stages on the same devices but intra-op meshes of other shapes (data 1 x model 4 against
    data 2 x model 2, where ``P(None, 'model')`` means different layouts) must not share them
    (seen: the second step's compile failed with a jit sharding mismatch)."""
    import jax.numpy as jnp

    from parallel.pipeline._dp import StageLayout

    def step(w, batch):
        def loss(w):
            h = parallel.mark_pipeline_boundary(jnp.tanh(batch["x"] @ w["a"]))
            return jnp.mean((h @ w["b"] - batch["y"]) ** 2)

        value, grads = jax.value_and_grad(loss)(w)
        return jax.tree.map(lambda p, g: p - 0.1 * g, w, grads), {"loss": value}

    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(64, 256)).astype(np.float32) * 0.1,
         "b": rng.normal(size=(256, 64)).astype(np.float32) * 0.1}
    batch = {"x": rng.normal(size=(16, 64)).astype(np.float32),
             "y": rng.normal(size=(16, 64)).astype(np.float32)}
    want_w, want = jax.jit(step)(w, batch)
    for shape in ({"data": 1, "model": 4}, {"data": 2, "model": 2}):
        layout = StageLayout(2, (0, 1), (4, 4), (shape, shape), (0.0, 0.0), 0.0)
        parallel_step = parallel.parallelize(step, method=parallel.PipeshardParallel(
            2, stage_option=layout))
        got_w, got = parallel_step(w, batch)
        np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
        for k in w:
            np.testing.assert_allclose(np.asarray(got_w[k]), np.asarray(want_w[k]), rtol=1e-5,
                                       atol=1e-6)


def test_stages_of_one_device_issue_without_waiting_and_match_the_plain_step():
    """On CPU a stage program with collectives is waited for before the next but one is issued
    (XLA's rendezvous can starve otherwise); stages of one device have no collective, so their
    programs are issued without waiting. The result is the plain step's, step after step."""
    import jax.numpy as jnp

    def step(w, batch):
        def loss(w):
            h = parallel.mark_pipeline_boundary(jnp.tanh(batch["x"] @ w["a"]))
            h = parallel.mark_pipeline_boundary(jnp.tanh(h @ w["b"]))
            return jnp.mean((h @ w["c"] - batch["y"]) ** 2)

        value, grads = jax.value_and_grad(loss)(w)
        return jax.tree.map(lambda p, g: p - 0.1 * g, w, grads), {"loss": value}

    rng = np.random.default_rng(1)
    w = {k: (rng.normal(size=shape) * 0.3).astype(np.float32)
         for k, shape in (("a", (8, 16)), ("b", (16, 16)), ("c", (16, 4)))}
    batch = {"x": rng.normal(size=(16, 8)).astype(np.float32),
             "y": rng.normal(size=(16, 4)).astype(np.float32)}
    plain = jax.jit(step)
    for devices, waits in ((jax.devices()[:3], None), (jax.devices()[:6], 1)):
        pipelined = parallel.parallelize(step, method=parallel.PipeshardParallel(
            4, stage_option=3), devices=devices)
        want_w, got_w = w, w
        for _ in range(3):
            want_w, want = plain(want_w, batch)
            got_w, got = pipelined(got_w, batch)
        assert pipelined.compile(w, batch).runner.in_flight == waits
        np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
        for k in w:
            np.testing.assert_allclose(np.asarray(got_w[k]), np.asarray(want_w[k]), rtol=1e-5,
                                       atol=1e-7)
