"""The same tiny GPT trained with each parallel method on 8 devices gives data parallelism's losses."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train as train_script  # noqa: E402

COMMON = ["train.steps=4", "train.log_every=1", "train.eval_batches=1", "train.sample_tokens=0",
          "data.max_bytes=200000"]


def losses(workdir, *overrides):
    assert train_script.main(["--config", "tiny/gpt.yaml", f"workdir={workdir}", *COMMON, *overrides]) == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.fixture(scope="module")
def data_parallel_losses(tmp_path_factory):
    return losses(tmp_path_factory.mktemp("data"), "parallel.method=data")


@pytest.mark.parametrize("overrides", [
    ["parallel.method=zero3"],
    ["parallel.method=zero2"],
    ["parallel.method=manual", "parallel.mesh={data: 4, model: 2}"],  # Megatron rules by default
])
def test_loss_curve_matches_data_parallel(overrides, data_parallel_losses, tmp_path):
    got = losses(tmp_path, *overrides)
    assert len(got) == 4
    np.testing.assert_allclose(got, data_parallel_losses, rtol=1e-5)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == overrides[0].split("=")[1]
