"""Sharded checkpoints: save on one mesh, restore on another, detect torn files, keep policy."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import parallel
from parallel import _checkpoint_files as files
from parallel.checkpoint import Checkpointer, CheckpointError, CheckpointInfo

AUTO = jax.sharding.AxisType.Auto


def mesh_of(shape, names, num_devices):
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape), devices=jax.devices()[:num_devices])


def make_state(step=7):
    """A train state like the Trainer's: params, adam state, empty model state, a typed key."""
    params = {"dense": {"kernel": jnp.arange(128, dtype=jnp.float32).reshape(16, 8) / 10,
                        "bias": jnp.arange(8, dtype=jnp.float32) - 3},
              "blocks": {0: {"scale": jnp.full((8,), 2.5, jnp.float32)}}}
    opt = optax.adam(0.1)
    opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)[1]
    return {"step": jnp.int32(step), "params": params, "opt_state": opt_state, "model_state": {},
            "rng": jax.random.key(42)}


def zero3_shardings(state, mesh):
    """Every leaf whose first dim divides the mesh is split on it (params and optimizer state)."""
    size = mesh.devices.size
    return jax.tree.map(
        lambda x: NamedSharding(mesh, P("data") if x.ndim and x.shape[0] % size == 0 else P()), state)


def placed(state, shardings):
    return jax.tree.map(jax.device_put, state, shardings)


def as_target(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved(tmp_path, steps=(1, 2, 3), name="ckpt", **kwargs):
    """A directory holding ``steps``, each saved from an 8-way sharded state with step = its number."""
    mesh = mesh_of((8,), ("data",), 8)
    ckpt = Checkpointer(tmp_path / name, **kwargs)
    for step in steps:
        state = make_state(step)
        ckpt.save(step, placed(state, zero3_shardings(state, mesh)), {"data_index": step})
    ckpt.close()
    return tmp_path / name


def test_saved_on_8_devices_restores_on_4_and_1_with_other_shardings(tmp_path):
    state = make_state()
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(7, placed(state, zero3_shardings(state, mesh_of((8,), ("data",), 8))),
              {"data_index": 7, "plan": {"method": "zero3"}})
    ckpt.wait()

    mesh4 = mesh_of((2, 2), ("data", "model"), 4)
    specs = {"dense": {"kernel": P(None, "model"), "bias": P("model")}, "blocks": {0: {"scale": P()}}}
    shardings4 = jax.tree.map(lambda _: NamedSharding(mesh4, P()), state)
    shardings4["params"] = jax.tree.map(lambda s: NamedSharding(mesh4, s), specs)
    restored, extras = ckpt.restore(7, as_target(state, shardings4))
    assert_trees_equal(restored, state)
    assert extras == {"data_index": 7, "plan": {"method": "zero3"}}
    kernel = restored["params"]["dense"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh4, P(None, "model"))
    assert [s.data.shape for s in kernel.addressable_shards] == [(16, 4)] * 4
    assert restored["opt_state"][0].mu["dense"]["kernel"].sharding == NamedSharding(mesh4, P())

    mesh1 = mesh_of((1,), ("data",), 1)
    restored1, _ = ckpt.restore(7, as_target(state, jax.tree.map(lambda _: NamedSharding(mesh1, P()), state)))
    assert_trees_equal(restored1, state)
    assert restored1["params"]["dense"]["bias"].devices() == {jax.devices()[0]}
    np.testing.assert_array_equal(np.asarray(restored1["params"]["dense"]["bias"]),
                                  [-3, -2, -1, 0, 1, 2, 3, 4])
    ckpt.close()


def _tiny_step(state, batch):
    def loss_fn(params):
        pred = jnp.tanh(batch["inputs"] @ params["dense"]["kernel"] + params["dense"]["bias"])
        return jnp.mean((pred * params["blocks"][0]["scale"] - batch["targets"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optax.adam(0.1).update(grads, state["opt_state"], state["params"])
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                     opt_state=opt_state)
    return new_state, {"loss": loss}


def test_zero3_state_resumes_under_data_parallel_on_4_devices_and_1(tmp_path):
    batch = {"inputs": jnp.linspace(-1, 1, 8 * 16, dtype=jnp.float32).reshape(8, 16),
             "targets": jnp.linspace(0, 1, 64, dtype=jnp.float32).reshape(8, 8)}
    init = lambda key: make_state(0)
    zero3 = parallel.parallelize(_tiny_step, method=parallel.Zero3Parallel(min_shard_elements=8),
                                 donate_argnums=(0,))
    state = zero3.init_state(init, jax.random.key(0), batch)
    for _ in range(2):
        state, _ = zero3(state, batch)
    kernel_sharding = state["params"]["dense"]["kernel"].sharding
    assert not kernel_sharding.is_fully_replicated
    expected = jax.device_get(state)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, state, {"data_index": 2})
    state, metrics = zero3(state, batch)  # donates the saved buffers while orbax writes
    ckpt.wait()

    for devices in (jax.devices()[:4], jax.devices()[:1]):
        data = parallel.parallelize(_tiny_step, method=parallel.DataParallel(), donate_argnums=(0,),
                                    devices=devices)
        target = data.abstract_inputs(jax.eval_shape(init, jax.random.key(0)), batch)[0]
        restored, extras = ckpt.restore(ckpt.latest_step(), target)
        assert extras == {"data_index": 2}
        assert int(restored["step"]) == 2
        assert_trees_equal(jax.device_get(restored), expected)
        assert restored["params"]["dense"]["kernel"].sharding.mesh.devices.size == len(devices)
        _, resumed_metrics = data(restored, batch)
        np.testing.assert_allclose(float(resumed_metrics["loss"]), float(metrics["loss"]), rtol=1e-6)
    ckpt.close()


def test_save_returns_before_writing_and_the_arrays_may_be_deleted(tmp_path):
    state = placed(make_state(), zero3_shardings(make_state(), mesh_of((8,), ("data",), 8)))
    expected = jax.device_get(state)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=True)
    assert ckpt.save(7, state, {}) is True
    jax.tree.map(lambda x: x.delete(), state)  # what donating the state to the next step does
    ckpt.wait()
    assert (tmp_path / "ckpt" / "7" / files.MANIFEST_NAME).is_file()
    target = as_target(expected, jax.tree.map(lambda _: NamedSharding(mesh_of((1,), ("data",), 1), P()), expected))
    assert_trees_equal(jax.device_get(ckpt.restore(7, target)[0]), expected)
    ckpt.close()


def test_keeps_the_last_n_and_every_kth(tmp_path):
    directory = saved(tmp_path, steps=range(1, 8), max_to_keep=2, keep_every=3)
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [3, 6, 7]
    infos = Checkpointer(directory).list()
    assert [(i.step, i.valid, i.problem) for i in infos] == [(3, True, None), (6, True, None), (7, True, None)]
    assert all(i.size_bytes > 1000 for i in infos)


def test_saving_a_step_twice_writes_it_once(tmp_path):
    directory = saved(tmp_path, steps=(5,))
    mtime = (directory / "5" / files.MANIFEST_NAME).stat().st_mtime_ns
    ckpt = Checkpointer(directory)
    state = placed(make_state(5), zero3_shardings(make_state(5), mesh_of((8,), ("data",), 8)))
    assert ckpt.save(5, state, {}) is False
    ckpt.close()
    assert (directory / "5" / files.MANIFEST_NAME).stat().st_mtime_ns == mtime


def test_synchronous_save_is_verified_on_return(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    state = make_state(3)
    ckpt.save(3, placed(state, zero3_shardings(state, mesh_of((8,), ("data",), 8))), {"a": [1, 2]})
    assert files.verify(files.StepDir(3, tmp_path / "ckpt" / "3", True)) is None
    ckpt.close()


def _largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != files.MANIFEST_NAME),
               key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _largest_file(step_dir)
    path.write_bytes(path.read_bytes()[:10])
    return path.relative_to(step_dir)


def _flip_byte(step_dir):
    path = _largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _delete_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def _delete_manifest(step_dir):
    (step_dir / files.MANIFEST_NAME).unlink()


@pytest.mark.parametrize("damage, problem", [
    (_truncate, "is truncated or overwritten: 10 bytes, expected"),
    (_flip_byte, "is corrupt: its CRC32 differs from the manifest"),
    (_delete_metadata, "file state/_METADATA is missing"),
    (_delete_manifest, "no shardax_manifest.json: the save was interrupted before it was verified"),
])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage, problem):
    directory = saved(tmp_path)
    damage(directory / "3")
    ckpt = Checkpointer(directory)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {directory / '3'}: .*resuming from step 2"):
        assert ckpt.latest_step() == 2
    info = ckpt.list()[-1]
    assert (info.step, info.valid) == (3, False) and problem in info.problem
    with pytest.raises(CheckpointError, match=f"checkpoint {directory / '3'} is not valid"):
        ckpt.restore(3, make_state())
    mesh = mesh_of((4,), ("data",), 4)
    state, extras = ckpt.restore(2, as_target(make_state(), zero3_shardings(make_state(), mesh)))
    assert int(state["step"]) == 2 and extras == {"data_index": 2}
    assert (directory / "3").is_dir() and (directory / "1").is_dir()


def test_resaving_over_a_torn_step_moves_it_aside(tmp_path):
    directory = saved(tmp_path)
    truncated = _truncate(directory / "3")
    ckpt = Checkpointer(directory)
    state = make_state(3)
    with pytest.warns(UserWarning, match=f"checkpoint {directory / '3'} is not valid .*moved it to "
                                         f"{directory / 'invalid' / '3'}"):
        assert ckpt.save(3, placed(state, zero3_shardings(state, mesh_of((8,), ("data",), 8))), {}) is True
    ckpt.close()
    assert [(i.step, i.valid) for i in Checkpointer(directory).list()] == [(1, True), (2, True), (3, True)]
    assert (directory / "invalid" / "3" / truncated).stat().st_size == 10


def test_an_interrupted_save_is_listed_and_skipped(tmp_path):
    directory = saved(tmp_path)
    (directory / "3").rename(directory / "4.orbax-checkpoint-tmp-1234")
    ckpt = Checkpointer(directory)
    with pytest.warns(UserWarning, match="4.orbax-checkpoint-tmp-1234: uncommitted"):
        assert ckpt.latest_step() == 2
    assert [(i.step, i.valid) for i in ckpt.list()] == [(1, True), (2, True), (4, False)]


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    directory = saved(tmp_path, steps=(1, 2))
    _truncate(directory / "1")
    _delete_manifest(directory / "2")
    with pytest.raises(CheckpointError, match=f"no valid checkpoint in {directory}: {directory / '2'}: no "):
        Checkpointer(directory).latest_step()
    assert Checkpointer(tmp_path / "empty").latest_step() is None
    assert not (tmp_path / "empty").exists()


def test_a_restart_sets_aside_the_saves_its_failure_interrupted(tmp_path):
    """After a failure (a cluster restart) the steps newer than the newest valid one are
    moved to invalid/ (not deleted); with none valid left, the run starts from step 0."""
    directory = saved(tmp_path, steps=(1, 2))
    (directory / "3.orbax-checkpoint-tmp-99").mkdir()
    _delete_manifest(directory / "2")
    with pytest.warns(UserWarning, match="is not valid"):
        assert Checkpointer(directory).set_aside_torn() == [3, 2]
    assert Checkpointer(directory).latest_step() == 1
    assert sorted(p.name for p in (directory / "invalid").iterdir()) == ["2", "3.orbax-checkpoint-tmp-99"]
    _delete_manifest(directory / "1")
    with pytest.warns(UserWarning, match="is not valid"):
        assert Checkpointer(directory).set_aside_torn() == [1]
    assert Checkpointer(directory).latest_step() is None


def test_a_different_model_names_the_first_mismatched_parameter(tmp_path):
    directory = saved(tmp_path, steps=(1,))
    mesh = mesh_of((1,), ("data",), 1)
    state = make_state()
    state["params"]["dense"]["kernel"] = jnp.zeros((16, 4))
    with pytest.raises(CheckpointError, match=r"parameter params/dense/kernel: the checkpoint has shape "
                                              r"\(16, 8\), the model expects shape \(16, 4\)"):
        Checkpointer(directory).restore(1, as_target(state, zero3_shardings(state, mesh)))
    state = make_state()
    state["params"]["extra"] = jnp.zeros(3)
    with pytest.raises(CheckpointError, match=r"parameter params/extra: the checkpoint has none, "
                                              r"the model expects shape \(3,\)"):
        Checkpointer(directory).restore(1, as_target(state, zero3_shardings(state, mesh)))


def test_restore_target_needs_shardings(tmp_path):
    directory = saved(tmp_path, steps=(1,))
    target = jax.eval_shape(lambda: make_state())
    with pytest.raises(ValueError, match="restore target leaf dense|restore target leaf blocks/0/scale"):
        Checkpointer(directory).restore(1, target["params"])


def test_unwritable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    ckpt = Checkpointer(tmp_path / "file" / "ckpt")
    with pytest.raises(CheckpointError, match=f"cannot create the checkpoint directory {tmp_path / 'file' / 'ckpt'}"):
        ckpt.save(1, make_state(), {})


_DISK_FULL = """
import resource, signal, sys
import jax, jax.numpy as jnp, numpy as np
from parallel.checkpoint import Checkpointer, CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))  # larger files: EFBIG
noise = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)  # 1 MiB, incompressible
ckpt = Checkpointer(sys.argv[1])
try:
    ckpt.save(2, {"step": jnp.int32(2), "params": {"w": jnp.asarray(noise)}}, {})
    ckpt.wait()
except CheckpointError as e:
    print(e)
"""


def test_disk_full_during_a_background_write_keeps_committed_steps(tmp_path):
    """A write that fails midway (file size limit, as on a full disk) leaves step 1 intact.

    Runs in a subprocess: the size limit is process-wide, and orbax's abandoned writer tasks
    report their errors whenever they are garbage collected.
    """
    directory = saved(tmp_path, steps=(1,))
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", _DISK_FULL, str(directory)], capture_output=True,
                            text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(root)))
    assert re.match(f"saving checkpoint step 2 to {directory} failed: .*File too large.*The disk may be "
                    r"full or the directory not writable; .*intact \(steps \[1\]\)", result.stdout), result.stderr
    with pytest.warns(UserWarning, match=r"2.orbax-checkpoint-tmp: uncommitted.*resuming from step 1"):
        assert Checkpointer(directory).latest_step() == 1
    assert Checkpointer(directory).list()[0] == CheckpointInfo(
        1, files.size_bytes(directory / "1"), True, None, str(directory / "1"))


def test_extras_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="extras for checkpoint step 1 are not JSON-serializable"):
        Checkpointer(tmp_path / "ckpt").save(1, make_state(), {"bad": object()})


def test_start_over_moves_old_checkpoints_aside(tmp_path):
    directory = saved(tmp_path, steps=(1,))
    with pytest.warns(UserWarning, match="moved the previous checkpoints"):
        fresh = Checkpointer.start_over(directory, max_to_keep=2)
    assert fresh.latest_step() is None and fresh.max_to_keep == 2
    (aside,) = tmp_path.glob("ckpt.old-*")
    assert [i.step for i in Checkpointer(aside).list() if i.valid] == [1]


def test_manifest_records_every_file(tmp_path):
    directory = saved(tmp_path, steps=(1,))
    manifest = json.loads((directory / "1" / files.MANIFEST_NAME).read_text())
    on_disk = {p.relative_to(directory / "1").as_posix() for p in (directory / "1").rglob("*")
               if p.is_file() and p.name != files.MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk
    assert {"state/_METADATA", "extras/metadata", "layout/metadata"} <= on_disk
    layout = json.loads((directory / "1" / "layout" / "metadata").read_text())["leaves"]
    assert ["params/dense/kernel", [16, 8], "float32"] in layout
    assert ["rng", [], "key<fry>"] in layout


def _run_list_tool(capsys, *argv):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "checkpoints.py"
    spec = importlib.util.spec_from_file_location("checkpoints_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(list(argv))
    out, err = capsys.readouterr()
    return tool, code, out, err


def test_list_tool_prints_step_size_and_validity(tmp_path, capsys):
    directory = saved(tmp_path, steps=(1, 2), name="checkpoints")  # a workdir's layout
    _delete_metadata(directory / "2")
    tool, code, out, _ = _run_list_tool(capsys, str(tmp_path))
    size1 = tool.human_size(files.size_bytes(directory / "1"))
    size2 = tool.human_size(files.size_bytes(directory / "2"))
    assert code == 0
    assert out.splitlines() == [
        f"checkpoints in {directory}",
        "      step        size  status",
        f"         1  {size1:>10}  valid",
        f"         2  {size2:>10}  INVALID: file state/_METADATA is missing",
        "latest valid step: 1",
    ]
    assert [tool.human_size(n) for n in (0, 1023, 1536, 5 * 1024 ** 2, 3 * 1024 ** 4)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 TiB"]


def test_list_tool_bad_path_is_one_line_and_exit_2(tmp_path, capsys):
    _, code, out, err = _run_list_tool(capsys, str(tmp_path / "missing"))
    assert code == 2 and out == ""
    assert err == f"error: {tmp_path / 'missing'} does not exist; pass a training workdir or its checkpoints/ directory\n"
