"""Fine-tuning from a Hugging Face directory: ``model.from_pretrained: DIR``.

The model's registry name and options come from ``DIR/config.json``; a state starts from the
directory's weights, each read straight into the plan's sharding of its parameter.
"""
from __future__ import annotations

from pathlib import Path

import jax

import models
from trainer._errors import ConfigError


def hf_error(error: Exception, what: str) -> ConfigError:
    return ConfigError(f"{what}: {error}")


def own_model_error(trainer) -> ConfigError:
    return ConfigError(f"model.from_pretrained loads a registry model, but "
                       f"{type(trainer).__name__} builds its own (build_model); load the weights "
                       "in build_model with models.hf.load_params instead")


def model_section(directory: str, name, values: dict) -> tuple[str, dict]:
    """``(name, options)`` of the ``model:`` section with ``from_pretrained: directory``.

    Raises:
      ConfigError: the directory cannot be read, or ``model.name`` or a ``model.*`` key
        contradicts its ``config.json`` (both values named).
    """
    if not isinstance(directory, str) or not directory:
        raise ConfigError(f"model.from_pretrained must be a directory path, got {directory!r}")
    try:
        hf_name, options = models.hf.to_options(models.hf.read_json(directory))
    except models.hf.HFError as e:
        raise hf_error(e, "model.from_pretrained") from None
    if name is not None and name != hf_name:
        raise ConfigError(f"model.name={name} contradicts model.from_pretrained={directory}, a "
                          f"{hf_name} model (its config.json); drop model.name")
    clashes = [f"model.{k}={v!r} (config.json gives {options[k]!r})" for k, v in values.items()
               if k in options and v != options[k] and not _same_number(v, options[k])]
    if clashes:
        raise ConfigError(f"{', '.join(clashes)} contradicts model.from_pretrained={directory}; "
                          "drop these keys (the pretrained weights fix them) or use another directory")
    return hf_name, {**options, **values}


def _same_number(a, b) -> bool:
    return (isinstance(a, (int, float)) and isinstance(b, (int, float))
            and not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b))


def resolve_tokenizer(data, pretrained) -> str | None:
    """The ``data.tokenizer`` a run uses (see ``DataConfig``); checks the combination.

    Raises:
      ConfigError: a tokenizer for data that is not ``text``, a directory without
        ``tokenizer.json``, or byte-level stdlib data for a model whose directory has a tokenizer.
    """
    tokenizer = data.tokenizer
    if tokenizer == "bytes":
        return tokenizer
    if tokenizer is None:
        if pretrained is None or not (Path(pretrained) / "tokenizer.json").is_file():
            return None
        if data.source == "stdlib":
            raise ConfigError(
                f"data.source=stdlib is byte-level, but model.from_pretrained={pretrained} has its "
                "own tokenizer; fine-tune on your text with data.source=text data.path=FILE (it is "
                "tokenized with that tokenizer), or pass data.tokenizer=bytes to train on bytes anyway")
        if data.source != "text":
            return None
        tokenizer = pretrained
    if data.source != "text":
        raise ConfigError(f"data.tokenizer applies to data.source=text, not {data.source}; drop "
                          "data.tokenizer (token files are already tokenized)")
    from trainer._tokenizer import tokenizer_file

    tokenizer_file(tokenizer)  # exists and holds tokenizer.json
    return tokenizer


def pretrained_state(trainer):
    """The first train state of a run with ``model.from_pretrained``: the directory's weights,
    each read straight into the plan's sharding of its parameter, and the rest of the state
    (optimizer state, step, RNG) made for them.

    No initializer runs for the params: the state function is compiled with the loaded params as
    its input, so XLA drops the random initializers (compiling them costs more than the run of a
    small model). A pipeline's params live on several sub-meshes: its state is made as usual and
    the params replaced leaf by leaf.
    """
    cfg = trainer.config
    key = jax.random.key(cfg.train.seed)
    shardings = trainer.step_fn.input_shardings(trainer.abstract_state, trainer.batch_spec)[0]
    name, config = trainer.spec.name, trainer.spec.config_cls(**cfg.model.options)
    optimizer = trainer.build_optimizer()
    if len({getattr(s, "mesh", None) for s in jax.tree.leaves(shardings)}) > 1:
        state = trainer.step_fn.init_state(trainer.fns.init, key, trainer.batch_spec)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        if _depends_on_values(optimizer, state["params"]):
            raise ConfigError("this optimizer's state depends on the params' values, which a "
                              "pipelined fine-tuning cannot make again on its stages; use "
                              "another parallel.method or an optimizer whose state starts at zero")
    params = _load(cfg.model.from_pretrained, name, config, shardings["params"])
    if len({getattr(s, "mesh", None) for s in jax.tree.leaves(shardings)}) > 1:
        jax.tree.map(lambda x: x.delete(), state["params"])
        return {**state, "params": params}

    def init_with(key, params):
        state = trainer.fns.init(key)
        return {**state, "params": params, "opt_state": optimizer.init(params)}

    return jax.jit(init_with, out_shardings=shardings, donate_argnums=1)(key, params)


def _load(directory, name, config, shardings):
    try:
        return models.hf.load_params(directory, name, config, shardings)
    except models.hf.HFError as e:
        raise hf_error(e, "model.from_pretrained") from None


def _depends_on_values(optimizer, params) -> bool:
    """Whether ``optimizer.init``'s outputs read the params' values (not only their shapes)."""
    jaxpr = jax.make_jaxpr(optimizer.init)(params).jaxpr
    inputs = set(map(id, jaxpr.invars))
    return any(id(v) in inputs for eqn in jaxpr.eqns for v in eqn.invars) or any(
        id(v) in inputs for v in jaxpr.outvars)
