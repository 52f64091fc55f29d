"""Reading slices of, and writing, the ``*.safetensors`` files of a Hugging Face directory.

Reads go through ``safetensors.safe_open(...).get_slice``: only the bytes of the requested block
are read from disk. numpy has no bfloat16, so bfloat16 (and float8) tensors are read through
safetensors' flax reader onto the host CPU device, then viewed as numpy (ml_dtypes) arrays.
Pickled checkpoints (``pytorch_model.bin``) are never opened: unpickling runs code.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from safetensors import safe_open

from models.hf._config import HFError

INDEX = "model.safetensors.index.json"
_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightFiles:
    """The tensors of a directory's ``*.safetensors`` files (with or without an index).

    Use as a context manager (files stay open inside it). ``on_read(name, nbytes)``, if given,
    is called for every block read (tests count the bytes read this way).
    """

    def __init__(self, directory, on_read: Optional[Callable[[str, int], None]] = None):
        self.directory = Path(directory)
        self.on_read = on_read
        self.where = _tensor_files(self.directory)
        self._stack = contextlib.ExitStack()
        self._handles: dict[tuple[str, str], object] = {}

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self.where)

    def _handle(self, name: str, framework: str = "numpy"):
        file = self.where[name]
        key = (file, framework)
        if key not in self._handles:
            self._handles[key] = self._stack.enter_context(
                safe_open(str(self.directory / file), framework=framework))
        return self._handles[key]

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code, e.g. ``"BF16"``."""
        return self._handle(name).get_slice(name).get_dtype()

    def read(self, name: str, ranges: list[list[tuple[int, int]]]) -> np.ndarray:
        """The block of ``name`` made of, per dim, the index ranges ``ranges[dim]`` (in order).

        Each combination of ranges is one ``get_slice`` read; they are concatenated.
        """
        def block(dim: int, chosen: tuple):
            if dim == len(ranges):
                return self._slice(name, tuple(slice(a, b) for a, b in chosen))
            parts = [block(dim + 1, chosen + (r,)) for r in ranges[dim]]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=dim)

        return block(0, ())

    def _slice(self, name: str, index: tuple) -> np.ndarray:
        view = self._handle(name).get_slice(name)
        if view.get_dtype() in _NUMPY_DTYPES:
            array = np.asarray(view[index] if index else view[...])
        else:  # bfloat16 / float8: numpy cannot name them; read as jax arrays on the host
            with jax.default_device(jax.devices("cpu")[0]):
                flax_view = self._handle(name, "flax").get_slice(name)
                array = np.asarray(flax_view[index] if index else flax_view[...])
        if self.on_read is not None:
            self.on_read(name, array.nbytes)
        return array


def _tensor_files(directory: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index file or from every ``*.safetensors`` file."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise HFError(f"{index} names files that are not in {directory}: {', '.join(missing)}")
        return dict(weight_map)
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt*"))
        hint = (f"; it holds {', '.join(pickled)}, pickled weights, which shardax never opens "
                "(unpickling runs code): save them as safetensors with "
                "model.save_pretrained(DIR, safe_serialization=True)") if pickled else ""
        raise HFError(f"{directory} holds no *.safetensors weights{hint}")
    where = {}
    for file in files:
        with safe_open(str(directory / file), framework="numpy") as f:
            for key in f.keys():
                where[key] = file
    return where


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def write(directory: Path, sizes: list[tuple[str, int]], fetch: Callable[[str], np.ndarray],
          max_shard_bytes: int) -> list[str]:
    """Writes tensors as ``model.safetensors`` or numbered shards plus ``INDEX``.

    Args:
      directory: where to write (exists).
      sizes: ``(name, bytes)`` of every tensor, in writing order.
      fetch: ``name -> numpy array``, called once per tensor while its file is written, so at
        most one file's tensors are in memory.
      max_shard_bytes: the largest file (a tensor bigger than it gets a file of its own).

    Returns:
      The file names written.
    """
    from safetensors.numpy import save_file

    shards = plan_shards(sizes, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(names, shards):
        tensors = {name: np.ascontiguousarray(fetch(name)) for name in shard}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        del tensors
    if len(shards) > 1:
        total = sum(size for _, size in sizes)
        (directory / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        names.append(INDEX)
    return names


def itemsize(code: str) -> int:
    if code not in ITEMSIZE:
        raise HFError(f"safetensors dtype {code} is not supported")
    return ITEMSIZE[code]


def numel(shape) -> int:
    return math.prod(shape)
