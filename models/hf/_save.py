"""shardax params -> a Hugging Face directory that ``transformers`` loads with ``from_pretrained``."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from models import _registry
from models.hf import _config, _layout, _safetensors
from models.hf._config import HFError

DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (None, "BF16"), "float16": (np.float16, "F16")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json")
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Options that change how a model is stored or run, not what it computes.
_NOT_IN_HF = {"param_dtype", "dtype", "init_std", "attention", "family"}


def check_exportable(name: str, config) -> dict:
    """The ``config.json`` of the model, after checking it reads back as the same model.

    Raises:
      HFError: the model has settings its Hugging Face class cannot express (named).
    """
    hf = _config.from_options(name, config)
    back_name, back = _config.to_options(hf)
    back_config = _registry.make_config(back_name, back)
    mine, theirs = _canonical(config), _canonical(back_config)
    lost = [f"{k}={mine[k]!r} (written as {theirs.get(k)!r})" for k in mine if mine[k] != theirs.get(k)]
    if back_name != name or lost:
        raise HFError(f"the {name} model cannot be written as a Hugging Face "
                      f"{hf['model_type']} model without changing it: {', '.join(lost)}")
    return hf


def _canonical(config) -> dict:
    """The options that decide what a model computes, with defaults spelled out."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
           if f.name not in _NOT_IN_HF}
    if hasattr(config, "heads_dim"):  # llama: derived sizes, and settings that act only with others
        out.update(head_dim=config.heads_dim, num_kv_heads=config.kv_heads)
        unused = {"default": ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                              "rope_original_max_position"),
                  "linear": ("rope_low_freq_factor", "rope_high_freq_factor",
                             "rope_original_max_position")}.get(config.rope_type, ())
        for key in unused + (("sliding_window_start",) if config.sliding_window is None else ()):
            out.pop(key)
        if "rope_original_max_position" in out:
            out["rope_original_max_position"] = out["rope_original_max_position"] or config.block_size
    return out


def save_pretrained(out, name: str, config, get_param: Callable[[tuple], np.ndarray],
                    dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
                    tokenizer_dir=None, source_dir=None) -> list[str]:
    """Writes a Hugging Face directory of registry model ``name``.

    Args:
      out: the directory to write (created; files of the same names are replaced).
      name, config: the registry model and its config dataclass.
      get_param: ``path -> numpy array`` of one param (a path is a tuple of keys of the params
        pure dict), called once per param while its file is written: a caller holding the
        params sharded fetches one at a time, and one file's worth sits in host memory.
      dtype: ``float32``, ``bfloat16`` or ``float16``: the dtype written.
      max_shard_bytes: files bigger than this are split, with ``model.safetensors.index.json``.
      tokenizer_dir: a directory whose tokenizer files are copied along (``tokenizer.json`` ...).
      source_dir: the Hugging Face directory the model came from, if any: its special token ids
        (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) go into ``config.json`` and its
        ``generation_config.json`` is copied, so generation stops where the original's did.

    Returns:
      The files written.

    Raises:
      HFError: the model cannot be expressed as a Hugging Face model (see ``check_exportable``).
    """
    if dtype not in DTYPES:
        raise HFError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    hf = check_exportable(name, config)
    hf["dtype"] = dtype
    if source_dir is not None and (Path(source_dir) / "config.json").is_file():
        source = _config.read_json(source_dir)
        hf.update({k: source[k] for k in SPECIAL_TOKEN_KEYS if k in source})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {t.name: t for t in _layout.layout(name, config)}
    itemsize = _safetensors.itemsize(DTYPES[dtype][1])
    sizes = [(n, _layout.nbytes(t, itemsize)) for n, t in tensors.items()]

    def fetch(tensor_name: str) -> np.ndarray:
        tensor = tensors[tensor_name]
        array = np.asarray(get_param(tensor.path))
        if array.shape != tuple(tensor.view[d] for d in tensor.perm):
            raise HFError(f"param {'/'.join(map(str, tensor.path))} has shape {array.shape}, the "
                          f"config gives {tuple(tensor.view[d] for d in tensor.perm)}")
        return _cast(tensor.to_hf(array), dtype)

    written = _safetensors.write(out, sizes, fetch, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    written.append("config.json")
    if tokenizer_dir is not None:
        written += copy_tokenizer(tokenizer_dir, out)
    generation = Path(source_dir or ".") / "generation_config.json"
    if source_dir is not None and generation.is_file() and "generation_config.json" not in written:
        shutil.copyfile(generation, out / "generation_config.json")
        written.append("generation_config.json")
    return written


def copy_tokenizer(source, out: Path) -> list[str]:
    """Copies the tokenizer files of ``source`` (a directory or a ``tokenizer.json``) to ``out``;
    writes a minimal ``tokenizer_config.json`` when there is none, so ``AutoTokenizer`` loads it."""
    source = Path(source)
    directory = source.parent if source.is_file() else source
    copied = []
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            shutil.copyfile(directory / name, out / name)
            copied.append(name)
    if source.is_file() and source.name != "tokenizer.json":
        shutil.copyfile(source, out / "tokenizer.json")
        copied.append("tokenizer.json")
    if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
        copied.append("tokenizer_config.json")
    return copied


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(DTYPES[dtype][0])
