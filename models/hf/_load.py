"""Hugging Face weights -> shardax params, tensor by tensor, straight into their shardings.

Each parameter is made with ``jax.make_array_from_callback``: for every device's shard the
callback reads just that block of the Hugging Face tensor (the index ranges a shard covers in
shardax's layout are mapped back to the Hugging Face layout, read, and transposed). Nothing
beyond one tensor is read before it is placed, and a process reads only its own devices' blocks.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx

from models import _registry
from models.hf import _config, _layout
from models.hf._config import HFError
from models.hf._safetensors import WeightFiles


def abstract_params(name: str, config) -> dict:
    """The params of registry model ``name`` as a pure dict of ``jax.ShapeDtypeStruct`` (no
    allocation)."""
    spec = _registry.get_spec(name)
    model = nnx.eval_shape(lambda: spec.build(config, nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _ranges(sizes: tuple, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The flat index ranges (in order) of the block ``spans`` of a row-major array ``sizes``."""
    if len(sizes) == 1:
        return [spans[0]]
    inner = int(np.prod(sizes[1:]))
    sub = _ranges(sizes[1:], spans[1:])
    if sub == [(0, inner)]:
        return [(spans[0][0] * inner, spans[0][1] * inner)]
    return [(i * inner + a, i * inner + b) for i in range(*spans[0]) for a, b in sub]


def read_block(files: WeightFiles, tensor: _layout.Tensor, name: str, index: tuple,
               dtype) -> np.ndarray:
    """The block ``index`` (slices in shardax's layout) of ``tensor``, in shardax's layout."""
    spans_ours = [s.indices(size)[:2] for s, size in zip(index, _shardax_shape(tensor))]
    spans_view = [None] * len(tensor.view)
    for ours, view_dim in enumerate(tensor.perm):
        spans_view[view_dim] = spans_ours[ours]
    ranges = [_ranges(tuple(tensor.view[d] for d in group), [spans_view[d] for d in group])
              for group in tensor.groups()]
    block = files.read(name, ranges)
    block = block.reshape([b - a for a, b in spans_view]).transpose(tensor.perm)
    return block.astype(dtype, copy=False)


def _shardax_shape(tensor: _layout.Tensor) -> tuple:
    return tuple(tensor.view[d] for d in tensor.perm)


def load_params(directory, name: str, config, shardings: Any = None,
                on_read: Optional[Callable[[str, int], None]] = None) -> dict:
    """Reads the weights in ``directory`` as the params of registry model ``name``.

    Args:
      directory: a Hugging Face model directory (``*.safetensors``, optionally an index).
      name, config: the registry model and its config dataclass (see ``read_config``).
      shardings: a pytree matching the params of ``jax.sharding.Sharding`` (e.g. a plan's); None
        puts every param on the default device.
      on_read: ``(tensor name, bytes)`` for every block read (to count what is read).

    Returns:
      The params as a pure dict of ``jax.Array`` (``nnx.replace_by_pure_dict`` takes it).

    Raises:
      HFError: a tensor is missing, has another shape than the config gives (named, with both
        shapes), or is not used by the model.
    """
    abstract = abstract_params(name, config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    params: dict = {}
    with WeightFiles(directory, on_read) as files:
        found = _match(directory, name, config, files)  # every problem before any read
        for tensor, stored in found:
            leaf = _get(abstract, tensor.path)
            assert tuple(leaf.shape) == _shardax_shape(tensor), (tensor, leaf.shape)
            cache: dict = {}

            def callback(index, tensor=tensor, stored=stored, leaf=leaf, cache=cache):
                key = tuple(s.indices(n)[:2] for s, n in zip(index, leaf.shape))
                if key not in cache:  # devices holding the same block share one read
                    cache[key] = read_block(files, tensor, stored, index, leaf.dtype)
                return cache[key]

            _set(params, tensor.path, jax.make_array_from_callback(
                tuple(leaf.shape), _get(shardings, tensor.path), callback))
            cache.clear()
    return params


def _match(directory, name: str, config, files: WeightFiles) -> list[tuple[_layout.Tensor, str]]:
    """Each tensor the model needs with its name in the files, checked: present, of the shape
    the config gives, and no stored tensor left without a place."""
    available, out = set(files.names()), []
    for tensor in _layout.layout(name, config):
        stored = next((n for n in _layout.prefixes(tensor.name) if n in available), None)
        if stored is None:
            raise HFError(f"{directory} has no tensor {tensor.name!r}, which the config's "
                          f"{name} model needs (shape {tensor.hf_shape}); is config.json the "
                          "one these weights were saved with?")
        shape = files.shape(stored)
        if shape != tensor.hf_shape:
            raise HFError(f"tensor {stored!r} has shape {shape} in {directory}, but config.json "
                          f"gives {tensor.hf_shape}; the weights and config.json disagree")
        out.append((tensor, stored))
    used = {stored for _, stored in out}
    extra = sorted(n for n in available - used if not n.endswith(_layout.IGNORED_SUFFIXES)
                   and not (n.endswith("lm_head.weight") and _ties(config)))
    if extra:
        raise HFError(f"{directory} holds tensors the {name} model built from its config.json "
                      f"has no place for: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}"
                      "; shardax would compute something else than the checkpoint's model")
    return out


def _ties(config) -> bool:
    return bool(getattr(config, "tie_embeddings", False))


def read_config(directory) -> tuple[str, Any]:
    """``(registry name, config dataclass)`` of the model in a Hugging Face directory."""
    name, options = _config.to_options(_config.read_json(directory))
    try:
        return name, _registry.make_config(name, options)
    except (TypeError, ValueError) as e:
        raise HFError(f"{directory}/config.json gives a {name} model shardax cannot build: {e}") from None


def from_pretrained(directory, shardings: Any = None) -> nnx.Module:
    """The shardax model of a Hugging Face directory, with its weights.

    Args:
      directory: ``config.json`` and ``*.safetensors`` of a llama, mistral, qwen2, qwen3 or
        gpt2 model.
      shardings: optional pytree of shardings matching the params (default: one device).

    Returns:
      An ``nnx.Module`` (``models.Llama`` or ``models.GPT``); ``model(tokens)`` gives the
      logits the Hugging Face model gives.
    """
    name, config = read_config(directory)
    params = load_params(directory, name, config, shardings)
    spec = _registry.get_spec(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: spec.build(config, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def from_state_dict(state_dict: dict, hf_config) -> nnx.Module:
    """The shardax model of an in-memory Hugging Face model (``model.state_dict()``, config).

    Args:
      state_dict: tensor name -> torch tensor or numpy array.
      hf_config: the model's ``transformers`` config object, or its ``config.json`` dict.
    """
    raw = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    name, options = _config.to_options(raw)
    config = _registry.make_config(name, options)
    weights = {k: _numpy(v) for k, v in state_dict.items()}
    params: dict = {}
    for tensor in _layout.layout(name, config):
        found = next((n for n in _layout.prefixes(tensor.name) if n in weights), None)
        if found is None:
            raise HFError(f"state_dict has no {tensor.name!r}; pass the state_dict of the model "
                          "built from this config")
        array = weights[found]
        if tuple(array.shape) != tensor.hf_shape:
            raise HFError(f"tensor {found!r} has shape {tuple(array.shape)}, but the config gives "
                          f"{tensor.hf_shape}; the weights and the config disagree")
        _set(params, tensor.path, jax.numpy.asarray(tensor.to_shardax(array).astype(np.float32)))
    spec = _registry.get_spec(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: spec.build(config, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch tensor
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor)
