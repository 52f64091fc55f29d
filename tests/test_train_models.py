"""Each registry model trains from its tiny config under the automatic method on 8 devices."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train as train_script  # noqa: E402


@pytest.mark.parametrize("name, steps, extra_key", [
    ("moe", 30, "moe_aux_loss"),
    ("wide_resnet", 20, "accuracy"),
    ("mlp", 30, None),
])
def test_tiny_model_loss_falls_under_shard(name, steps, extra_key, tmp_path):
    assert train_script.main(["--config", f"tiny/{name}.yaml", f"workdir={tmp_path}",
                              "parallel.method=shard", f"train.steps={steps}", "train.log_every=5",
                              "train.sample_tokens=0"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    if extra_key:
        assert all(extra_key in line for line in train)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == "shard"
