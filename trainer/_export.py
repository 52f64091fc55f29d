"""A run's checkpoint -> a Hugging Face directory (``scripts/export_hf.py``).

The model comes from the resolved config saved with the checkpoint; its parameters are read one
block at a time (never the optimizer state), onto the host, and written as ``safetensors``.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

import models
import parallel
from trainer.config import DEFAULT_MODEL, ConfigError


def export_hf(workdir, out, step: int | None = None, dtype: str = "float32",
              max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes checkpoint ``step`` (default: the newest valid one) of run ``workdir`` to ``out``.

    Returns:
      A line saying what was written.

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoints.
      CheckpointError: the step is missing or corrupt.
      ConfigError: the run did not train a registry model.
      HFError: the model has no Hugging Face equivalent (named).
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} holds no checkpoints/ directory; pass the workdir of "
                                "a training run (it has config.yaml and checkpoints/)")
    checkpointer = parallel.Checkpointer(directory)
    if step is None:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory} holds no committed checkpoint yet")
    saved = (checkpointer.extras(step).get("config") or {})
    model = dict(saved.get("model") or {})
    if not saved:
        raise ConfigError(f"checkpoint {step} of {workdir} carries no config (it was not written "
                          "by shardax's Trainer), so its model is unknown")
    name = model.pop("name", None) or DEFAULT_MODEL
    source = model.pop("from_pretrained", None)  # its token ids and generation config, if there
    config = models.make_config(name, model)
    models.hf.check_exportable(name, config)  # before reading anything
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = models.hf.abstract_params(name, config)
    cache: dict = {}

    def get_param(path: tuple) -> np.ndarray:
        group = path[:2] if path[0] == "blocks" else path[:1]  # one block's params per read
        if group not in cache:
            cache.clear()
            part = abstract
            for key in group:
                part = part[key]
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host), part)
            for key in reversed(group):
                target = {key: target}
            cache[group] = checkpointer.restore_part(step, {"params": target})["params"]
        leaf = cache[group]
        for key in path:
            leaf = leaf[key]
        return np.asarray(leaf)

    tokenizer = (saved.get("data") or {}).get("tokenizer")
    tokenizer = None if tokenizer in (None, "bytes") else tokenizer
    if tokenizer is not None and not Path(tokenizer).exists():
        raise FileNotFoundError(f"the run's data.tokenizer {tokenizer} is gone; export needs it "
                                "to write the tokenizer files along")
    files = models.hf.save_pretrained(out, name, config, get_param, dtype=dtype,
                                      max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer,
                                      source_dir=source if source and Path(source).is_dir() else None)
    kind = models.hf.hf_config(name, config)["model_type"]
    return (f"wrote step {step} of {workdir} as a Hugging Face {kind} model ({dtype}) to {out}: "
            f"{', '.join(files)}")
