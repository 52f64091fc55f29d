"""The model registry: ``model.name`` in a config -> config dataclass, constructor, counts."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Callable, Optional

from flax import nnx

TASKS = ("lm", "classify", "regress")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the Trainer and the tools need to know about a registered model.

    Attributes:
      name: the registry name (``model.name`` in a config).
      config_cls: frozen dataclass of the model's options; it validates them.
      task: ``"lm"``, ``"classify"`` or ``"regress"`` (selects the Trainer's loss and data).
      build: ``(config, rngs) -> nnx.Module``.
      num_params: ``config -> int``, the exact number of parameters (closed form).
      flops_per_example: ``(config, seq_len or None) -> float``, training FLOPs (forward and
        backward) for one example; ``0.0`` when there is no closed form (ask XLA instead).
    """

    name: str
    config_cls: type
    task: str
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    num_params: Callable[[Any], int]
    flops_per_example: Callable[[Any, Optional[int]], float]


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Adds ``spec`` to the registry under ``spec.name`` and returns it."""
    if spec.task not in TASKS:
        raise ValueError(f"model {spec.name!r} has task {spec.task!r}; expected one of {TASKS}")
    if spec.name in _REGISTRY:
        raise ValueError(f"a model named {spec.name!r} is already registered; pick another name")
    _REGISTRY[spec.name] = spec
    return spec


def available_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """Returns the ``ModelSpec`` registered as ``name``; raises ValueError naming the nearest one."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown model {name!r} (known: {', '.join(available_models())}){hint}")
    return _REGISTRY[name]


def make_config(name: str, options: dict):
    """Builds the config dataclass of model ``name`` from ``options``, checking keys and types.

    Raises:
      ValueError: an unknown key (the message names the nearest valid key) or a bad value.
      TypeError: a value whose type does not match the field (named with value and type).
    """
    cls = get_spec(name).config_cls
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in options.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid options: {', '.join(fields)}"
            raise ValueError(f"unknown option {key!r} for model {name!r}{hint}")
        values[key] = _check_type(name, key, value, hints[key])
    return cls(**values)


def create_model(name: str, options: dict, rngs: nnx.Rngs) -> nnx.Module:
    """Creates the registered model ``name`` with ``options`` (the YAML ``model:`` section minus name).

    Params carry logical axis names as metadata; they are not placed on any mesh here,
    ``parallel`` decides placement later.

    Args:
      name: registry name, e.g. ``"gpt"``.
      options: the model's options; validated by its config dataclass.
      rngs: the random streams for initialization (``params`` is used).

    Returns:
      An ``nnx.Module`` with ``forward(x, train=False) -> (out, aux_losses)`` and ``__call__``.
    """
    return get_spec(name).build(make_config(name, dict(options)), rngs)


def _check_type(model: str, key: str, value: Any, hint: Any) -> Any:
    """Returns ``value`` (an int widened to float where a float is wanted) or raises TypeError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        hint = args[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    wanted = typing.get_origin(hint) or hint
    if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
        raise TypeError(f"model {model!r} option {key!r} must be {getattr(wanted, '__name__', wanted)}, "
                        f"got {value!r} of type {type(value).__name__}")
    return value
