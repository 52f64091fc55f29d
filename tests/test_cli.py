"""Bad input on the command line: one line on stderr, exit code 2, nothing written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train as train_script  # noqa: E402


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["--config", "tiny/gpt.yaml", "train.stepz=3"], "did you mean 'train.steps'?"),
    (["--config", "tiny/gpt.yaml", "train.steps=-1"], "train.steps must be positive"),
    (["--config", "tiny/gpt.yaml", "optimizer.learning_rate=zero"], "optimizer.learning_rate must be of type float"),
    (["--config", "tiny/gpt.yaml", "data.source=text", "data.path=/no/such/dir"], "data.path '/no/such/dir' does not exist"),
    (["--config", "tiny/gpt.yaml", "data.source=text", "data.path={empty}"], "holds no text"),
    (["--config", "tiny/gpt.yaml", "data.source=text", "data.path={short}"], "fewer than data.seq_len + 1 = 33"),
])
def test_user_mistakes_exit_2_with_one_line(args, message, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    short = tmp_path / "short.txt"
    short.write_text("x" * 20)
    workdir = tmp_path / "run"
    args = [a.format(empty=empty, short=short) for a in args] + [f"workdir={workdir}"]
    assert train_script.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not workdir.exists()


def test_invalid_yaml_through_a_subprocess(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid YAML in") and "Traceback" not in result.stderr


def test_tiny_gpt_trains_and_its_loss_falls(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train_script.main(["--config", "tiny/gpt.yaml", f"workdir={workdir}", "train.steps=40",
                              "train.checkpoint_every=0"]) == 0
    out = capsys.readouterr()
    sample = (out.out + out.err).split("sample:\n", 1)[1]  # printable: no raw control bytes
    assert len(sample) >= 16 and not any(ord(c) < 32 and c not in "\n\t" or 127 <= ord(c) < 160
                                         for c in sample)
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert train[0]["loss"] < 5.8  # starts near ln(256) = 5.55
    evals = [l for l in lines if "eval_loss" in l]
    assert evals and evals[-1]["step"] == 40
    assert (workdir / "config.yaml").exists() and (workdir / "plan.json").exists()
    assert list((workdir / "tensorboard").iterdir())


def test_overwrite_moves_old_checkpoints_aside(tmp_path):
    workdir = tmp_path / "run"
    args = ["--config", "tiny/gpt.yaml", f"workdir={workdir}", "train.steps=3", "train.sample_tokens=0",
            "data.max_bytes=200000"]
    assert train_script.main(args) == 0
    (workdir / "checkpoints" / "3" / "shardax_manifest.json").unlink()  # the only one is now torn
    assert train_script.main(args + ["train.resume=false", "train.overwrite=true", "train.steps=2"]) == 0
    aside = [p for p in workdir.iterdir() if p.name.startswith("checkpoints.old-")]
    assert len(aside) == 1 and (aside[0] / "3").is_dir()  # kept, not deleted
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    # the logs start afresh too; the old ones are moved aside with their tensorboard events
    logs = [p for p in workdir.iterdir() if p.name.startswith("logs.old-")]
    assert len(logs) == 1 and sorted(p.name for p in logs[0].iterdir()) == ["metrics.jsonl", "tensorboard"]
    old = [json.loads(line)["step"] for line in (logs[0] / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert old == [3, 3] and new == [2, 2]  # the train and eval records of the last step


def test_plan_for_another_device_solves_and_prices_for_it():
    from trainer import cli

    text = cli.plan("tiny/mlp.yaml", ["parallel.method=shard"], profile="h100")
    # The solver planned within an H100's 80 GiB (not this host's memory) ...
    assert "(budget 81920.00 MiB)" in text
    # ... and the report priced the compiled step with the H100 figures.
    assert "on 'h100'" in text
    assert cli.plan("tiny/mlp.yaml", ["parallel.method=shard"]).count("on 'cpu'") == 1
