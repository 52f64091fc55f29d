from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import models
from trainer.config import CONFIG_DIR, DEFAULT_MODEL, ConfigError, dump_config, load_config

SHIPPED = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))


def needed_overrides(name: str, tmp_path) -> list[str]:
    """finetune.yaml needs a Hugging Face directory and a text: a tiny Llama written here."""
    if name != "finetune.yaml":
        return []
    config = models.make_config("llama", dict(vocab_size=300, num_layers=1, hidden_size=16,
                                              num_heads=2, intermediate_size=16, block_size=1024))
    models.hf.save_pretrained(tmp_path / "hf", "llama", config, lambda path: np.zeros(
        _leaf(models.hf.abstract_params("llama", config), path).shape,
        np.float32))
    (tmp_path / "text.txt").write_text("some text " * 100)
    return [f"model.from_pretrained={tmp_path / 'hf'}", f"data.path={tmp_path / 'text.txt'}"]


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_parses_and_builds_its_model(name, tmp_path):
    config = load_config(name, needed_overrides(name, tmp_path))
    model_name = config.model.name or DEFAULT_MODEL  # tiny/custom.yaml names none
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: models.create_model(
            model_name, dict(config.model.options), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    spec = models.get_spec(model_name)
    assert count == spec.num_params(spec.config_cls(**config.model.options)) > 0


def test_overrides_and_defaults():
    config = load_config("tiny/gpt.yaml", ["train.steps=7", "optimizer.learning_rate=1",
                                           "parallel.mesh={data: 2, model: 4}", "model.num_layers=3"])
    assert config.train.steps == 7
    assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
    assert config.parallel.mesh == {"data": 2, "model": 4}
    assert config.model.options["num_layers"] == 3
    assert config.workdir == "runs/tiny-gpt"
    assert load_config("gpt.yaml").workdir == "runs/gpt"


@pytest.mark.parametrize("name", ["tiny/gpt.yaml", "tiny/custom.yaml"])
def test_resolved_config_round_trips(name, tmp_path):
    config = load_config(name, ["train.steps=9"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config.model.name == {"tiny/gpt.yaml": "gpt", "tiny/custom.yaml": None}[name]


@pytest.mark.parametrize("overrides, message", [
    (["train.step=5"], "unknown config key 'train.step'; did you mean 'train.steps'?"),
    (["trian.steps=5"], "unknown config key 'trian'; did you mean 'train'?"),
    (["model.num_layer=5"], "unknown config key 'model.num_layer'; did you mean 'model.num_layers'?"),
    (["train.steps=abc"], "train.steps must be of type int, got 'abc' (str)"),
    (["train.steps=0"], "train.steps must be positive, got 0"),
    (["train.batch_size=-4"], "train.batch_size must be positive, got -4"),
    (["optimizer.learning_rate=-0.1"], "optimizer.learning_rate must be zero or positive, got -0.1"),
    (["optimizer.name=adamm"], "optimizer.name must be one of adamw, adam, sgd, momentum, lion, muon; got 'adamm'"),
    (["data.seq_len=64"], "data.seq_len (64) is longer than model.block_size (32)"),
    (["data.source=text"], "data.source=text needs data.path"),
    (["model.name=gtp"], "model.name 'gtp' is not a known model"),
    (["model.name=null"], "model options (vocab_size, block_size, num_layers, num_heads, "
                          "hidden_size) need model.name"),
    (["parallel.profile=tpu"], "parallel.profile must be one of cpu, a100, h100, v100; got 'tpu'"),
    (["train.batch_size=10", "train.grad_accum_steps=4"], "train.batch_size (10) must divide by train.grad_accum_steps (4)"),
])
def test_bad_values_name_the_problem(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny/gpt.yaml", overrides)
    assert message in str(info.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*bad.yaml at line 3"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("workdir: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(unsafe)
