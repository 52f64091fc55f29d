"""The train loop's runtime: no device reads between log points, NaN checks, cheap start-up,
honest figures, and which errors the CLI shortens."""
import json
import threading
import time

import jax
import numpy as np
import pytest
from jax._src.array import ArrayImpl

import parallel
from parallel import _checkpoint_files as checkpoint_files
from parallel.profiles import PUBLISHED, UnknownDeviceError, allocatable_bytes, running_profile_name
from trainer import Callback, Trainer, TrainingDiverged, cli, load_config
from trainer import trainer as trainer_module
from trainer.config import ConfigError, changed_keys

MLP = ["train.sample_tokens=0", "train.eval_batches=1", "train.batch_size=16"]


class GuardBetweenLogPoints(Callback):
    """Forbids reading any device array on the training thread in the steps that are no log,
    eval, checkpoint or end step; records which steps ran under the guard.

    ``jax.transfer_guard_device_to_host`` does not fire on CPU devices (their buffers are host
    memory), so the guard wraps ``jax.Array._value``, through which every read of an array's
    values goes: ``jax.device_get``, ``np.asarray``, ``float``, ``item``, printing.
    """

    def __init__(self, steps: int, log_every: int, checkpoint_every: int):
        self.steps, self.log_every, self.checkpoint_every = steps, log_every, checkpoint_every
        self.guarded, self.active = [], False

    def syncs(self, step: int) -> bool:
        return (step % self.log_every == 0 or step >= self.steps
                or (self.checkpoint_every and step % self.checkpoint_every == 0))

    def on_step_end(self, trainer, step, metrics):
        if self.active:
            self.guarded.append(step)
        # Step ``step``'s checkpoint comes after this call; step + 1 runs under the new setting.
        self.active = not self.syncs(step) and not self.syncs(step + 1)

    def install(self, monkeypatch):
        value = ArrayImpl._value

        def guarded_value(array):
            if self.active and threading.current_thread() is threading.main_thread():
                raise AssertionError(f"a device array was read in a step between log points "
                                     f"(after step {self.guarded[-1] if self.guarded else 1})")
            return value.fget(array)

        monkeypatch.setattr(ArrayImpl, "_value", property(guarded_value))


class NaNInputs:
    """The regression data with NaN inputs in batch ``bad`` (so step ``bad + 1`` diverges)."""

    def __init__(self, data, bad: int):
        self.data, self.bad = data, bad

    def batch(self, index, batch_size):
        batch = self.data.batch(index, batch_size)
        if index == self.bad:
            batch["inputs"] = np.full_like(batch["inputs"], np.nan)
        return batch


def _guarded_trainer(guard, bad=None):
    class GuardedTrainer(Trainer):
        def callbacks(self):
            return [guard]

        def train_data(self):
            data = super().train_data()
            return data if bad is None else NaNInputs(data, bad)

        def eval_data(self):
            return self._datasets()[1]

    return GuardedTrainer


def test_no_device_reads_between_log_points(tmp_path, monkeypatch):
    guard = GuardBetweenLogPoints(steps=12, log_every=4, checkpoint_every=0)
    guard.install(monkeypatch)
    config = load_config("tiny/mlp.yaml", MLP + [f"workdir={tmp_path}", "train.steps=12",
                                                 "train.log_every=4", "parallel.method=zero2"])
    metrics = _guarded_trainer(guard)(config).fit()
    # steps 2, 6, 10 (after a log step) and 3, 7, 11 (before one) ran with reads forbidden
    assert guard.guarded == [2, 3, 6, 7, 10, 11]
    assert np.isfinite(metrics["loss"])
    guard.active = True  # the guard does catch a read
    with pytest.raises(AssertionError, match="a device array was read"):
        jax.device_get(jax.numpy.ones(2) + 1)
    guard.active = False


def test_a_nan_between_log_points_is_named_and_never_saved(tmp_path, monkeypatch):
    guard = GuardBetweenLogPoints(steps=12, log_every=5, checkpoint_every=5)
    guard.install(monkeypatch)
    config = load_config("tiny/mlp.yaml", MLP + [f"workdir={tmp_path}", "train.steps=12",
                                                 "train.log_every=5", "train.checkpoint_every=5"])
    with pytest.raises(TrainingDiverged, match="loss became nan at step 7; that state was not saved"):
        _guarded_trainer(guard, bad=6)(config).fit()
    assert guard.guarded == [2, 3, 4, 7, 8, 9]  # the NaN of step 7 is found at the step-10 check
    assert parallel.Checkpointer(tmp_path / "checkpoints").latest_step() == 5


def test_start_up_reads_the_bytes_of_one_checkpoint_of_five(tmp_path, monkeypatch):
    overrides = MLP + [f"workdir={tmp_path}", "train.steps=5", "train.checkpoint_every=1",
                       "train.keep_checkpoints=5", "train.log_every=5"]
    Trainer(load_config("tiny/mlp.yaml", overrides)).fit()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2, 3, 4, 5]
    read = []
    real_crc = checkpoint_files._crc32
    monkeypatch.setattr(checkpoint_files, "_crc32",
                        lambda path: read.append(path.stat().st_size) or real_crc(path))
    trainer = Trainer(load_config("tiny/mlp.yaml", overrides + ["train.steps=6"])).setup()
    newest = tmp_path / "checkpoints" / "5"
    one_step = sum(p.stat().st_size for p in newest.rglob("*")
                   if p.is_file() and p.name != checkpoint_files.MANIFEST_NAME)
    assert sum(read) == one_step
    assert int(trainer.state["step"]) == 5
    # the listing tool reads nothing unless asked to verify contents
    read.clear()
    assert all(info.valid for info in parallel.Checkpointer(tmp_path / "checkpoints").list(verify=False))
    assert read == []


def test_config_comparison_keys_and_schedule_note():
    old = load_config("tiny/gpt.yaml", ["train.steps=600"])
    saved = old.to_dict()
    assert changed_keys(saved, old) == ([], None)
    cadence = load_config("tiny/gpt.yaml", ["train.steps=600", "train.log_every=7", "workdir=x",
                                            "train.eval_every=3", "parallel.method=zero3"])
    assert changed_keys(saved, cadence) == ([], None)
    math = load_config("tiny/gpt.yaml", ["train.steps=600", "model.num_layers=3", "train.seed=1",
                                         "train.compute_dtype=bfloat16", "data.seq_len=16"])
    assert changed_keys(saved, math)[0] == ["data.seq_len", "model.num_layers",
                                            "train.compute_dtype", "train.seed"]
    longer = load_config("tiny/gpt.yaml", ["train.steps=1200"])
    keys, note = changed_keys(saved, longer)
    assert keys == [] and "optimizer.decay_steps=600" in note
    fixed = load_config("tiny/gpt.yaml", ["train.steps=1200", "optimizer.decay_steps=600"])
    assert changed_keys(saved, fixed) == ([], None)
    other = load_config("tiny/gpt.yaml", ["train.steps=1200", "optimizer.decay_steps=900"])
    assert changed_keys(saved, other) == (["optimizer.decay_steps"], None)


def test_decay_steps_fixes_the_schedule_apart_from_the_run_length():
    from trainer.optim import learning_rate_schedule

    short = load_config("tiny/gpt.yaml", ["train.steps=100"])
    fixed = load_config("tiny/gpt.yaml", ["train.steps=300", "optimizer.decay_steps=100"])
    a = learning_rate_schedule(short.optimizer, 100)
    b = learning_rate_schedule(fixed.optimizer, 300)
    for step in (0, 3, 50, 99, 100):
        assert float(a(step)) == float(b(step))
    assert float(b(250)) == pytest.approx(0.01 * 0.1)  # stays at the end of the decay


def test_float16_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="float16 needs loss scaling.*use bfloat16"):
        load_config("tiny/gpt.yaml", ["train.compute_dtype=float16"])


def test_only_validation_errors_become_one_line(capsys):
    def bug():
        raise ValueError("an internal bug")

    with pytest.raises(ValueError, match="an internal bug"):  # keeps its traceback
        cli.run(bug)

    def plan_mistake():
        raise parallel.PlanError("global batch size 7 is not divisible")

    assert cli.run(plan_mistake) == 2
    assert capsys.readouterr().err == "error: global batch size 7 is not divisible\n"
    with pytest.raises(parallel.CheckpointError, match="max_to_keep must be a positive int"):
        parallel.Checkpointer("unused", max_to_keep=0)


class FakeDevice:
    platform, id, process_index = "gpu", 0, 0

    def __init__(self, kind, stats=None):
        self.device_kind, self.stats = kind, stats

    def memory_stats(self):
        return self.stats


def test_device_profiles_per_dtype_unknown_devices_and_allocatable_memory():
    h100 = PUBLISHED["h100"]
    assert [h100.peak_flops_for(d) for d in ("bfloat16", "float32")] == [989e12, 494.5e12]
    assert PUBLISHED["a100"].peak_flops_for("float32") == 156e12
    assert running_profile_name(FakeDevice("NVIDIA H100 80GB HBM3")) == "h100"
    with pytest.raises(UnknownDeviceError, match="no device profile for gpu device 'Radeon X'.*"
                                                 "set parallel.profile"):
        running_profile_name(FakeDevice("Radeon X"))
    assert allocatable_bytes(FakeDevice("x", {"bytes_limit": 60 * 2**30})) == 60 * 2**30
    assert allocatable_bytes(FakeDevice("x", None)) is None
    budget = parallel.ShardParallel().default_budget([FakeDevice("x", {"bytes_limit": 12345})])
    assert budget == 12345
    assert parallel.ShardParallel(profile="h100").default_budget([FakeDevice("x", {"bytes_limit": 1})]) \
        == 80 * 2**30  # planning for another device: that device's memory


@pytest.mark.parametrize("dtype, running, profile, peak", [
    ("float32", "h100", None, 494.5e12),
    ("bfloat16", "h100", None, 989e12),
    ("bfloat16", None, None, None),  # unknown accelerator: no mfu rather than a wrong one
    ("float32", None, "a100", 156e12),
])
def test_mfu_peak_follows_the_compute_dtype(dtype, running, profile, peak, monkeypatch, capsys):
    def fake_profile(name=None, num_devices=1):
        name = name or running
        if name is None:
            raise UnknownDeviceError("no device profile for gpu device 'Radeon X'; set parallel.profile")
        return PUBLISHED[name]

    monkeypatch.setattr(trainer_module, "get_profile", fake_profile)
    overrides = [f"train.compute_dtype={dtype}"] + ([f"parallel.profile={profile}"] if profile else [])
    trainer = Trainer(load_config("tiny/gpt.yaml", overrides))
    assert trainer._peak_flops() == peak
    speed = trainer._speed(0.5)
    assert ("mfu" in speed) == (peak is not None)
    if peak is None:
        assert "mfu is not reported: no device profile" in capsys.readouterr().err


class SlowFirstCall:
    """A step whose first call takes ``delay`` seconds more, as compiling does."""

    def __init__(self, step, delay):
        self.step, self.delay, self.calls = step, delay, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.delay)
        return self.step(*args)

    def __getattr__(self, name):
        return getattr(self.step, name)


def test_throughput_windows_leave_out_compilation_and_evals(tmp_path):
    config = load_config("tiny/mlp.yaml", MLP + [f"workdir={tmp_path}", "train.steps=6",
                                                 "train.log_every=3", "train.eval_every=3"])
    trainer = Trainer(config).setup()
    trainer.step_fn = SlowFirstCall(trainer.step_fn, 2.0)
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: time.sleep(2.0) or evaluate()
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "loss" in r]
    assert len(times) == 2 and max(times) < 0.5  # neither 2 s / 3 steps of them
