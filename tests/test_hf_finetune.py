"""Fine-tuning from the command line: a Hugging Face directory in (model.from_pretrained, its
tokenizer.json), train.py, export_hf.py, and transformers reading the result; the reader's host
memory under ZeRO-3; the tokenizer's ids; the one-line refusals."""
import json
import sys
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models

import models
import parallel
from trainer import load_config
from trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import export_hf as export_script  # noqa: E402
import train as train_script  # noqa: E402

TEXT = (ROOT / "README.md").read_text() + (ROOT / "docs" / "configs.md").read_text()
TOKENS = np.random.default_rng(1).integers(0, 300, size=(2, 32)).astype(np.int64)


def bpe(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``text`` (it decodes back to text exactly)."""
    tokenizer = Tokenizer(tokenizer_models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tokenizer


def torch_logits(directory) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny random Llama (vocabulary 320) with a 300-token BPE of the text, and the text."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "model")
    tokenizer = bpe(TEXT, 300)
    tokenizer.save(str(root / "model" / "tokenizer.json"))
    (root / "text.txt").write_text(TEXT)
    return root


def train(pretrained, workdir, *overrides) -> int:
    return train_script.main([
        "--config", "finetune.yaml", f"model.from_pretrained={pretrained / 'model'}",
        "data.source=text", f"data.path={pretrained / 'text.txt'}", f"workdir={workdir}",
        "data.seq_len=32", "train.batch_size=8", "train.log_every=5", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=0", "optimizer.warmup_steps=0", *overrides])


def test_learning_rate_0_round_trip_under_zero3(pretrained, tmp_path, capsys):
    """Loaded into ZeRO-3's shardings on 8 devices, trained with a zero learning rate, saved
    and exported, the model gives the original's logits: every weight made the trip unchanged."""
    assert train(pretrained, tmp_path / "run", "train.steps=1", "optimizer.learning_rate=0",
                 "parallel.method=zero3", "train.sample_tokens=0") == 0
    assert export_script.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                               "--max-shard-gb", "0.00003"]) == 0  # 32 KB files: several
    assert "wrote step 1 of" in capsys.readouterr().out
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (0, 0)  # the original's, not 1, 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    np.testing.assert_allclose(torch_logits(tmp_path / "out"),
                               torch_logits(pretrained / "model"), atol=1e-5, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")  # the run's, along
    assert tokenizer("of the model")["input_ids"] == Tokenizer.from_file(
        str(pretrained / "model" / "tokenizer.json")).encode("of the model").ids


def test_fine_tuning_lowers_the_loss_and_exports_what_it_trained(pretrained, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train(pretrained, workdir, "train.steps=16", "train.log_every=4",
                 "optimizer.learning_rate=0.01", "parallel.method=data", "train.sample_tokens=12") == 0
    err = capsys.readouterr().err
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.3, losses
    # the end-of-run sample is decoded by the BPE: no byte-level markers (U+0100-U+0143 stand
    # for bytes such as the space, "Ġ", in its vocabulary) and some of the text's characters
    sample = err.split("sample:\n", 1)[1]
    assert not any(0x100 <= ord(c) <= 0x143 for c in sample), sample
    assert len(set(sample) & set("abcdefghijklmnopqrstuvwxyz ")) >= 3, sample
    assert export_script.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")]) == 0
    # shardax's own logits: the checkpoint's params through shardax's Llama
    name, config = models.hf.read_config(pretrained / "model")
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host),
                            models.hf.abstract_params(name, config))
    checkpoints = parallel.Checkpointer(workdir / "checkpoints")
    params = checkpoints.restore_part(16, {"params": abstract})["params"]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: models.Llama(config, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    ours = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(TOKENS, jnp.int32)))
    theirs = torch_logits(tmp_path / "out")
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert np.abs(theirs - torch_logits(pretrained / "model")).max() > 0.1  # it did train


def test_text_is_tokenized_as_tokenizers_does_and_cached(pretrained, tmp_path):
    config = load_config("finetune.yaml", [
        f"model.from_pretrained={pretrained / 'model'}", f"data.path={pretrained / 'text.txt'}",
        "data.seq_len=32", "data.eval_fraction=0.1", f"workdir={tmp_path}"])
    assert config.data.tokenizer == str(pretrained / "model")  # the model's own, by default
    train_set, eval_set = Trainer(config)._datasets()
    expected = Tokenizer.from_file(str(pretrained / "model" / "tokenizer.json")).encode(TEXT).ids
    assert len(expected) < 0.8 * len(TEXT)  # BPE merges, not bytes
    np.testing.assert_array_equal(np.concatenate([train_set.tokens, eval_set.tokens]), expected)
    cached = list(pretrained.glob("text.txt.tokens-*.npy"))
    assert len(cached) == 1  # beside the data, read again (memory-mapped) by the next run
    again = Trainer(config)._datasets()[0].tokens
    assert isinstance(again, np.memmap) and np.array_equal(again, train_set.tokens)


def test_reading_a_sharded_checkpoint_under_zero3_holds_one_tensor_at_a_time(tmp_path):
    """Host memory while loading a model written in 1 MB files onto 8 devices with ZeRO-3:
    at most one tensor's bytes beyond the shards the devices keep, and each read is one
    device's block of a tensor (not the tensor, not the file)."""
    options = dict(vocab_size=1024, block_size=64, num_layers=2, hidden_size=256, num_heads=4,
                   num_kv_heads=2, intermediate_size=512)
    config = models.make_config("llama", options)
    abstract = models.hf.abstract_params("llama", config)
    rng = np.random.default_rng(0)
    models.hf.save_pretrained(tmp_path, "llama", config,
                              lambda path: rng.standard_normal(_get(abstract, path).shape, np.float32),
                              max_shard_bytes=2**20)
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.Llama(config, nnx.Rngs(0))))
    step = parallel.parallelize(lambda p, x: nnx.merge(graphdef, p)(x), method=parallel.Zero3Parallel(),
                                batch_argnums=(1,), donate_argnums=(0,))
    shardings = step.input_shardings(abstract, jax.ShapeDtypeStruct((8, 16), jnp.int32))[0]
    reads = []
    tracemalloc.start()
    try:
        params = models.hf.load_params(tmp_path, "llama", config, shardings,
                                       on_read=lambda name, n: reads.append((name, n)))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    sizes = {t.name: 4 * int(np.prod(t.hf_shape)) for t in models.hf._layout.layout("llama", config)}
    total, largest = sum(sizes.values()), max(sizes.values())  # 6,820,864 and 1,048,576 bytes
    assert (total, largest) == (6_820_864, 1_048_576)
    assert peak - current <= largest + 256 * 1024, (peak, current)  # transient: one tensor
    assert sum(n for _, n in reads) == total  # every element read once, by its own device
    split = {name for name, n in reads if n < sizes[name]}
    assert all(n * 8 == sizes[name] for name, n in reads if name in split)  # one device's block
    assert len(split) >= 14  # the 2-D weights are split over the 8 devices
    for leaf in jax.tree.leaves(params):
        held = sum(s.data.size for s in leaf.addressable_shards)
        assert held in (leaf.size, 8 * leaf.size)  # each element once, or on every device


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=64"], "model.hidden_size=64 (config.json gives 32) contradicts "
     "model.from_pretrained="),
    (["model.name=gpt"], "model.name=gpt contradicts model.from_pretrained="),
    (["model.from_pretrained={root}"], "has no config.json"),
    (["data.tokenizer={root}/small"], "has 400 tokens but model.vocab_size is 320"),
    (["data.tokenizer={root}"], "data.tokenizer: {root} has no tokenizer.json"),
    (["data.source=stdlib"], "data.source=stdlib is byte-level, but model.from_pretrained="),
])
def test_user_mistakes_exit_2_with_one_line(pretrained, tmp_path, capsys, overrides, message):
    (pretrained / "small").mkdir(exist_ok=True)
    bpe(TEXT, 400).save(str(pretrained / "small" / "tokenizer.json"))
    overrides = [o.format(root=pretrained) for o in overrides]
    assert train(pretrained, tmp_path / "run", "train.steps=1", *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message.format(root=pretrained) in err, err
    assert len(err.splitlines()) == 1


def test_export_refusals(pretrained, tmp_path, capsys):
    assert export_script.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "holds no checkpoints/ directory" in capsys.readouterr().err
    config = models.make_config("llama", dict(num_layers=1, hidden_size=16, num_heads=2,
                                              intermediate_size=16, family="mistral", qkv_bias=True))
    with pytest.raises(models.hf.HFError, match="a mistral model cannot have attention biases"):
        models.hf.check_exportable("llama", config)
