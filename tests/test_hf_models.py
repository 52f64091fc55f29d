"""Hugging Face directories -> shardax: logits equal transformers' for Llama, Mistral, Qwen2,
Qwen3 and GPT-2 (tiny random models saved with save_pretrained), on one device and in the
shardings of an automatic and a ZeRO-3 plan on 8 devices; sharded files with an index; config.json
as transformers 4.x and 5.x write it; bfloat16 files; and the one-line refusals."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import models
import parallel

SEQ = 24
TOKENS = np.random.default_rng(0).integers(0, 101, size=(8, SEQ)).astype(np.int32)  # 8 rows: 8 devices
COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
ARCHS = {
    # Llama 3.1's frequency scaling over a short original context, so the scaled band matters
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=8, head_dim=16)),  # a window shorter than the sequence
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=8, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                   attention_bias=True)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, None),
}


def hf_model(arch, dtype=torch.float32):
    torch.manual_seed(0)
    config_cls, model_cls, extra = ARCHS[arch]
    if arch == "gpt2":
        config = config_cls(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                            eos_token_id=0)
    else:
        config = config_cls(**COMMON, **extra, bos_token_id=0, eos_token_id=0)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomize every weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.float()(torch.from_numpy(TOKENS).long()).logits.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (directory, torch logits)."""
    out = {}
    for arch in ARCHS:
        model = hf_model(arch)
        directory = tmp_path_factory.mktemp(arch)
        model.save_pretrained(directory)
        out[arch] = (directory, torch_logits(model))
    return out


_call = nnx.jit(lambda model, tokens: model(tokens))  # compiled once per architecture


def logits_of(model) -> np.ndarray:
    return np.asarray(_call(model, TOKENS))


def assert_close(ours, theirs, atol=1e-4, arch=""):
    assert ours.shape == theirs.shape == (8, SEQ, 101), arch
    assert np.abs(theirs).max() > 0.1, arch  # not a comparison of near-zero arrays
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0, err_msg=arch)


def test_logits_one_device(saved):
    for arch in ARCHS:
        model = models.hf.from_pretrained(saved[arch][0])
        assert type(model) is (models.GPT if arch == "gpt2" else models.Llama)
        assert_close(logits_of(model), saved[arch][1], arch=arch)


def test_options_read_from_config(saved):
    name, config = models.hf.read_config(saved["qwen3"][0])
    assert name == "llama"
    assert (config.family, config.num_kv_heads, config.head_dim, config.qk_norm, config.qkv_bias,
            config.out_bias, config.sliding_window, config.sliding_window_start) == (
        "qwen3", 2, 8, True, True, True, 6, 1)
    _, config = models.hf.read_config(saved["llama"][0])
    assert (config.rope_type, config.rope_theta, config.rope_factor,
            config.rope_original_max_position) == ("llama3", 500.0, 4.0, 16)
    _, config = models.hf.read_config(saved["qwen2"][0])
    assert (config.qkv_bias, config.out_bias, config.tie_embeddings, config.sliding_window) == (
        True, False, True, None)


@pytest.mark.parametrize("method", ["auto", "zero3"])
def test_logits_in_a_plans_shardings_on_8_devices(saved, method):
    """Every architecture's weights read straight into the shardings a plan gives its params.

    The five models run as one program (one plan, one compile). ``auto`` chooses the plan of
    this forward pass itself (for models this small, weights whole on every device and the batch
    split: nothing to communicate); ``zero3`` splits the weights over the 8 devices, so every
    architecture's blocks are read and transposed per device."""
    assert jax.device_count() == 8
    configs = [models.hf.read_config(saved[arch][0]) for arch in ARCHS]
    graphdefs = [nnx.graphdef(nnx.eval_shape(lambda: models.get_spec(n).build(c, nnx.Rngs(0))))
                 for n, c in configs]
    abstract = [models.hf.abstract_params(n, c) for n, c in configs]
    forward = lambda params, tokens: [nnx.merge(g, p)(tokens) for g, p in zip(graphdefs, params)]
    step = parallel.parallelize(forward, method=parallel.make_method(method), batch_argnums=(1,),
                                donate_argnums=(0,))  # ZeRO-3 splits what is donated
    tokens = jax.ShapeDtypeStruct(TOKENS.shape, jnp.int32)
    shardings = step.input_shardings(abstract, tokens)[0]
    params = [models.hf.load_params(saved[arch][0], n, c, sh)
              for arch, (n, c), sh in zip(ARCHS, configs, shardings)]
    split = [x for x in jax.tree.leaves(params) if x.addressable_shards[0].data.size < x.size]
    if method == "zero3":
        assert len(split) >= len(jax.tree.leaves(params)) // 3  # the weights really are split
    for arch, ours in zip(ARCHS, step(params, TOKENS)):
        assert_close(np.asarray(ours), saved[arch][1], arch=arch)


def test_written_back_transformers_reads_the_same_model(saved, tmp_path):
    """Each architecture read into shardax and written out again (config.json and weights in
    the Hugging Face layout): transformers loads it as the same class with the same logits."""
    for arch in ARCHS:
        model = models.hf.from_pretrained(saved[arch][0])
        name, config = models.hf.read_config(saved[arch][0])
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

        def get_param(path):
            leaf = params
            for key in path:
                leaf = leaf[key]
            return np.asarray(leaf)

        files = models.hf.save_pretrained(tmp_path / arch, name, config, get_param)
        assert files == ["model.safetensors", "config.json"]
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
        assert type(reloaded) is ARCHS[arch][1], arch
        np.testing.assert_allclose(torch_logits(reloaded), saved[arch][1], atol=1e-5, rtol=0,
                                   err_msg=arch)


def test_sharded_files_with_an_index(saved, tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert_close(logits_of(models.hf.from_pretrained(tmp_path)), saved["llama"][1])


def test_transformers_4_config_loads_like_5(saved, tmp_path):
    """config.json with top-level rope_theta and rope_scaling (4.x) reads as rope_parameters (5.x)."""
    directory, expected = saved["llama"]
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope  # {"rope_type": "llama3", "factor": 4.0, ...}
    raw["transformers_version"] = "4.46.0"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert models.hf.read_config(tmp_path) == models.hf.read_config(directory)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(torch_logits(reloaded), expected, atol=1e-6)  # transformers agrees
    assert_close(logits_of(models.hf.from_pretrained(tmp_path)), expected)


def test_bfloat16_files(tmp_path):
    model = hf_model("qwen2", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    expected = torch_logits(model)  # float32 math on the bfloat16-rounded weights
    assert_close(logits_of(models.hf.from_pretrained(tmp_path)), expected)


def test_bad_directories_are_refused_naming_the_problem(saved, tmp_path):
    directory = saved["llama"][0]
    with pytest.raises(models.hf.HFError, match="has no config.json"):
        models.hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(models.hf.HFError, match=r"holds no \*\.safetensors weights; it holds "
                       "pytorch_model.bin, pickled weights, which shardax never opens"):
        models.hf.from_pretrained(tmp_path)
    shutil.copyfile(directory / "model.safetensors", tmp_path / "model.safetensors")
    raw = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, model_type="bert")))
    with pytest.raises(models.hf.HFError, match=r"model_type 'bert' \(LlamaForCausalLM\) is not "
                       "supported; shardax reads llama, mistral, qwen2, qwen3, gpt2"):
        models.hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, intermediate_size=40)))
    with pytest.raises(models.hf.HFError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has "
                       r"shape \(48, 32\) .* but config.json gives \(40, 32\)"):
        models.hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, num_hidden_layers=1)))
    with pytest.raises(models.hf.HFError, match="has no place for: model.layers.1"):
        models.hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0})))
    with pytest.raises(models.hf.HFError, match="RoPE scaling 'longrope' is not supported"):
        models.hf.from_pretrained(tmp_path)
