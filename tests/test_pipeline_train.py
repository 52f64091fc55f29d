"""``parallel.method=pipeshard`` through the Trainer and CLI: same losses as data parallelism,
checkpoints restored onto a pipeline and onto a non-pipelined plan."""
import json

import jax
import numpy as np
import pytest

from scripts.train import main as train_main

# A constant learning rate, so that runs stopping at different train.steps follow one schedule.
ARGS = ["--config", "tiny/gpt.yaml", "train.log_every=1", "train.eval_batches=1",
        "train.sample_tokens=0", "optimizer.schedule=constant", "optimizer.warmup_steps=0"]
PIPE = ["parallel.method=pipeshard", "parallel.num_micro_batches=4"]


def _losses(workdir) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _train(workdir, steps, *extra) -> int:
    return train_main([*ARGS, f"workdir={workdir}", f"train.steps={steps}", *extra])


@pytest.fixture(scope="module")
def data_losses(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("data")
    assert _train(workdir, 4, "parallel.method=data") == 0
    return _losses(workdir)


def test_pipeshard_trains_like_data_and_resumes_on_any_plan(tmp_path, data_losses):
    assert len(jax.devices()) == 8
    workdir = tmp_path / "pipe"
    assert _train(workdir, 2, *PIPE) == 0               # pipelined, checkpoint at step 2
    plan = json.loads((workdir / "plan.json").read_text())
    assert plan["method"] == "pipeshard"
    assert [s["devices"] for s in plan["extras"]["stages"]] and sum(
        len(s["devices"]) for s in plan["extras"]["stages"]) == 8
    assert _train(workdir, 3, *PIPE, "parallel.schedule=gpipe") == 0  # pipelined -> pipelined
    assert _train(workdir, 4, "parallel.method=data") == 0             # pipelined -> data
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses[s] for s in range(1, 5)],
                               [data_losses[s] for s in range(1, 5)], rtol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["parallel.method=pipeshard", "parallel.num_micro_batches=3"],
     "train.batch_size (16) must divide by parallel.num_micro_batches (3)"),
    (["parallel.method=data", "parallel.stages=2"],
     "parallel.stages only apply to parallel.method=pipeshard"),
    (["parallel.method=pipeshard", "parallel.stages=16"],
     "stage_option=16 stages but only 8 devices"),
    (["parallel.method=pipeshard", "parallel.stages=2", "parallel.virtual_stages=2"],
     "virtual_stages=2 needs schedule='interleaved'"),
])
def test_bad_pipeline_options_exit_2(tmp_path, capsys, extra, message):
    assert _train(tmp_path / "bad", 1, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_plan_script_prints_the_stages(capsys):
    from scripts.plan import main as plan_main

    assert plan_main(["--config", "tiny/gpt.yaml", "parallel.method=pipeshard",
                      "parallel.num_micro_batches=4"]) == 0
    out = capsys.readouterr().out
    assert "pipeline: 2 stages, schedule 1f1b, 4 micro-batches, bubble 20.0%" in out
    table = out[out.rindex("pipeline: 2 stages"):].splitlines()
    assert table[1].split()[:5] == ["stage", "layers", "devices", "intra-op", "mesh"]
    assert [row.split()[2] for row in table[2:4]] == ["0,1,2,3", "4,5,6,7"]
    assert "in flight" in table[1]
