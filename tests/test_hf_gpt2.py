"""GPT-2 from an in-memory Hugging Face model: ``models.hf.from_state_dict`` (directories: test_hf_models.py)."""
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import models


def hf_model(**overrides):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0, **overrides)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # the default init leaves biases and norms at 0/1: randomize all of them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, config


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


def test_logits_match_hugging_face():
    # GPT-2 as released is in tests/test_hf_models.py; here its untied, exact-GELU variant
    model, config = hf_model(tie_word_embeddings=False, activation_function="gelu")
    gpt = models.hf.from_state_dict(model.state_dict(), config)
    tokens = np.random.default_rng(0).integers(0, 97, size=(3, 24)).astype(np.int32)
    expected = hf_logits(model, tokens)
    logits = np.asarray(nnx.jit(lambda gpt, x: gpt(x))(gpt, tokens))
    assert logits.shape == (3, 24, 97)
    assert np.abs(logits - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero arrays


def test_converted_config_and_count():
    model, config = hf_model(tie_word_embeddings=False)
    gpt = models.hf.from_state_dict(model.state_dict(), config)
    assert gpt.config == models.GPTConfig(vocab_size=97, block_size=24, num_layers=2, num_heads=4,
                                          hidden_size=32, mlp_ratio=4, tie_embeddings=False)
    hf_count = sum(p.numel() for p in model.parameters())
    shardax_count = sum(x.size for x in jax.tree.leaves(nnx.state(gpt, nnx.Param)))
    assert shardax_count == hf_count == models.gpt.num_params(gpt.config)
    assert gpt.blocks[1].attn.qkv_kernel.get_metadata()["out_sharding"] == ("embed", None, "heads", "kv")


def test_rejects_what_it_cannot_convert():
    model, config = hf_model()
    config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(models.hf.HFError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        models.hf.from_state_dict(model.state_dict(), config)
    model, config = hf_model()
    state = model.state_dict()
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"][:, :64]
    with pytest.raises(models.hf.HFError, match=r"'transformer.h.1.mlp.c_fc.weight' has shape \(32, 64\).*gives \(32, 128\)"):
        models.hf.from_state_dict(state, config)
