"""Typed configuration: YAML files plus ``key.path=value`` overrides, parsed into frozen dataclasses.

A config has one frozen dataclass per section (``model``, ``data``, ``optimizer``, ``train``,
``parallel``, ``cluster``) and a top-level ``workdir``. YAML is read with ``yaml.safe_load`` only.
Unknown keys are rejected with the nearest valid key; values are type-checked and range-checked
here, so a bad config fails before anything is built or written.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from parallel.profiles import PUBLISHED

from trainer._errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# The registry model the base ``Trainer`` trains when a config names none.
DEFAULT_MODEL = "gpt"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``name`` picks a model from the registry; ``options`` are that model's own settings.

    ``name`` may be None: a ``Trainer`` subclass that builds its own model needs none, and
    the base ``Trainer`` then trains ``DEFAULT_MODEL`` with its default options.

    ``from_pretrained`` is a Hugging Face model directory: ``name`` and ``options`` come from its
    ``config.json`` (keys given as well must agree with it) and training starts from its weights.
    """

    name: Optional[str] = None
    options: types.MappingProxyType = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    from_pretrained: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # stdlib | text | tokens | synthetic
    path: Optional[str] = None
    seq_len: int = 128
    eval_fraction: float = 0.05
    image_size: int = 32
    num_classes: int = 10
    max_bytes: int = 32 * 2**20
    # text: a directory with tokenizer.json (or the file itself), "bytes" for bytes; None: the
    # tokenizer of model.from_pretrained's directory when it has one, else bytes
    tokenizer: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | sgd | momentum | lion | muon
    learning_rate: float = 3e-3
    adam_learning_rate: Optional[float] = None  # muon: of the non-matrix params; None: learning_rate
    schedule: str = "cosine"  # constant | cosine | linear
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9
    grad_clip: Optional[float] = 1.0
    decay_steps: Optional[int] = None  # the step the schedule ends at; None: train.steps


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: only at the end of training
    keep_checkpoints: int = 3
    keep_every: Optional[int] = None
    grad_accum_steps: int = 1
    compute_dtype: str = "float32"  # float32 | bfloat16 | float16
    resume: bool = True
    overwrite: bool = False
    allow_config_change: bool = False  # resume even if keys that change the math differ
    sample_tokens: int = 200


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    method: str = "auto"  # auto | data | zero2 | zero3 | manual | shard | pipeshard
    mesh: Optional[dict] = None
    rules: Optional[dict] = None
    num_micro_batches: int = 1
    memory_budget_bytes: Optional[int] = None
    profile: Optional[str] = None  # the device plans are made for: cpu | h100 | a100 | v100
    stages: Any = None  # pipeshard: "auto" (default) or a number of stages
    schedule: Optional[str] = None  # pipeshard: 1f1b (default) | gpipe | interleaved
    virtual_stages: int = 1  # pipeshard, schedule=interleaved: model chunks per stage (>= 2)
    remat: bool = False  # pipeshard: recompute each stage's forward in its backward


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Workers on a Ray cluster (``num_hosts`` > 1); with 1 host Ray is not used at all."""

    num_hosts: int = 1
    address: str = ""  # "": a local Ray instance; "auto", "host:port", "ray://host:port"
    devices_per_host: Optional[int] = None  # CPU devices each worker simulates
    gpus_per_host: int = 0
    cpus_per_host: int = 1
    max_restarts: int = 3  # within restart_window_s
    restart_window_s: float = 3600.0
    startup_timeout_s: float = 120.0
    hang_timeout_s: float = 600.0  # the step phase's limit
    phase_timeout_s: Optional[dict] = None  # planning/compile/restore/eval/checkpoint: seconds
    answer_timeout_s: Optional[float] = None  # unanswered query: hung (default hang_timeout_s, <= 300)
    capacity_timeout_s: float = 600.0
    env: Optional[dict] = None  # environment variables for every worker
    compilation_cache: bool = True  # JAX's persistent compilation cache in workdir/compile-cache


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    cluster: ClusterConfig = ClusterConfig()

    def to_dict(self) -> dict:
        """The resolved config as plain YAML-able data (the model's options flattened in)."""
        out = {"workdir": self.workdir}
        for section in _SECTIONS:
            value = getattr(self, section)
            if section == "model":
                name = {"name": value.name} if value.name is not None else {}
                pretrained = ({"from_pretrained": value.from_pretrained}
                              if value.from_pretrained is not None else {})
                out["model"] = {**name, **pretrained, **dict(value.options)}
            else:
                out[section] = dataclasses.asdict(value)
        return out


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "cluster": ClusterConfig,
}
_CHOICES = {
    ("data", "source"): ("stdlib", "text", "tokens", "synthetic"),
    ("optimizer", "name"): ("adamw", "adam", "sgd", "momentum", "lion", "muon"),
    ("optimizer", "schedule"): ("constant", "cosine", "linear"),
    ("train", "compute_dtype"): ("float32", "bfloat16", "float16"),
    ("parallel", "method"): ("auto", "data", "zero2", "zero3", "manual", "shard", "pipeshard"),
    ("parallel", "profile"): ("cpu", *sorted(PUBLISHED)),
    ("parallel", "schedule"): ("1f1b", "gpipe", "interleaved"),
}
_POSITIVE = {
    ("data", "seq_len"), ("data", "image_size"), ("data", "num_classes"), ("data", "max_bytes"),
    ("train", "steps"), ("train", "batch_size"),
    ("train", "log_every"), ("train", "eval_batches"), ("train", "keep_checkpoints"),
    ("train", "grad_accum_steps"), ("parallel", "num_micro_batches"), ("cluster", "num_hosts"),
    ("train", "keep_every"), ("optimizer", "decay_steps"),
    ("cluster", "devices_per_host"), ("cluster", "cpus_per_host"), ("cluster", "startup_timeout_s"),
    ("cluster", "hang_timeout_s"), ("cluster", "restart_window_s"), ("cluster", "answer_timeout_s"),
    ("cluster", "capacity_timeout_s"),
}
_NON_NEGATIVE = {
    ("optimizer", "learning_rate"),  # 0: the params stay as they are (an evaluation run)
    ("optimizer", "adam_learning_rate"),
    ("optimizer", "warmup_steps"), ("optimizer", "weight_decay"), ("optimizer", "min_lr_ratio"),
    ("train", "eval_every"), ("train", "checkpoint_every"), ("train", "sample_tokens"),
    ("data", "eval_fraction"), ("cluster", "gpus_per_host"), ("cluster", "max_restarts"),
}


def resolve_config_path(name: str | os.PathLike) -> Path:
    """Finds a config: a path as given, else a bare name looked up in ``configs/``."""
    path = Path(name)
    candidates = [path, CONFIG_DIR / path]
    if not path.suffix:
        candidates += [CONFIG_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
    near = difflib.get_close_matches(str(name), shipped, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; shipped configs: {', '.join(shipped[:8])}"
    raise ConfigError(f"config file {str(name)!r} not found (looked in . and {CONFIG_DIR}){hint}")


def load_config(name: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Config:
    """Loads a YAML config, applies ``key.path=value`` overrides and validates everything.

    Args:
      name: a path to a YAML file, or a bare name such as ``gpt.yaml`` found in ``configs/``.
      overrides: strings like ``train.steps=100``; values are parsed as YAML scalars.

    Returns:
      The validated, frozen ``Config``.

    Raises:
      ConfigError: the file is missing or invalid, or a key, type or value is wrong.
    """
    path = resolve_config_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    raw.setdefault("workdir", str(Path("runs") / path.stem))
    return config_from_dict(raw)


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict) -> Config:
    """Builds a validated ``Config`` from plain data (as parsed from YAML)."""
    _check_keys(raw, ("workdir", *_SECTIONS), "")
    sections = {}
    for section, cls in _SECTIONS.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping, got {values!r}")
        sections[section] = _model_section(values) if section == "model" else _section(section, cls, values)
    workdir = raw.get("workdir", Config.workdir)
    if not isinstance(workdir, str) or not workdir:
        raise ConfigError(f"workdir must be a non-empty path string, got {workdir!r}")
    config = Config(workdir=workdir, **sections)
    _check_relations(config)
    return _resolve_tokenizer(config)


def _section(section: str, cls: type, values: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(values, fields, f"{section}.")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        values[key] = _check_type(f"{section}.{key}", value, hints[key])
        if ((section, key) in _CHOICES and values[key] is not None
                and values[key] not in _CHOICES[(section, key)]):
            raise ConfigError(
                f"{section}.{key} must be one of {', '.join(_CHOICES[(section, key)])}; got {value!r}"
            )
        if (section, key) in _POSITIVE and values[key] is not None and values[key] <= 0:
            raise ConfigError(f"{section}.{key} must be positive, got {value!r}")
        if (section, key) in _NON_NEGATIVE and values[key] is not None and values[key] < 0:
            raise ConfigError(f"{section}.{key} must be zero or positive, got {value!r}")
    return cls(**values)


def _model_section(values: dict) -> ModelConfig:
    import models  # the model's own config dataclass validates its options

    values = dict(values)
    name = values.pop("name", None)
    pretrained = values.pop("from_pretrained", None)
    if pretrained is not None:
        from trainer._pretrained import model_section

        name, values = model_section(pretrained, name, values)
    known = models.available_models()
    if name is None:
        if values:
            raise ConfigError(
                f"model options ({', '.join(map(str, values))}) need model.name, the registry "
                f"model they configure ({', '.join(known)}); a Trainer subclass with its own "
                "build_model reads its settings itself, so drop them or name the model")
        return ModelConfig()
    if name not in known:
        near = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"model.name {name!r} is not a known model ({', '.join(known)}){hint}")
    cls = models.get_spec(name).config_cls
    _check_keys(values, [f.name for f in dataclasses.fields(cls)], "model.",
                extra=("name", "from_pretrained"))
    try:
        config = models.make_config(name, values)  # the model's own types and value checks
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model ({name}): {e}") from None
    values = {k: getattr(config, k) for k in values}  # ints widened where floats are wanted
    return ModelConfig(name=name, options=types.MappingProxyType(values),
                       from_pretrained=pretrained)


def _check_keys(values: dict, valid, prefix: str, extra=()) -> None:
    valid = list(valid) + list(extra)
    for key in values:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Returns ``value`` (ints widened to float where a float is wanted) or raises ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    wanted = origin or hint
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        tuple: lambda v: isinstance(v, (list, tuple)),
    }.get(wanted, lambda v: True)
    if not ok(value):
        name = getattr(wanted, "__name__", str(wanted))
        raise ConfigError(f"{key} must be of type {name}, got {value!r} ({type(value).__name__})")
    if wanted is float:
        return float(value)
    if wanted is tuple:
        return tuple(value)
    return value


def _check_relations(config: Config) -> None:
    train = config.train
    if train.batch_size % train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size ({train.batch_size}) must divide by train.grad_accum_steps "
            f"({train.grad_accum_steps}); change one of them"
        )
    _check_pipeline(config)
    opt = config.optimizer
    if opt.adam_learning_rate is not None and opt.name != "muon":
        raise ConfigError(f"optimizer.adam_learning_rate only applies to optimizer.name=muon (got "
                          f"{opt.name}); drop it or use optimizer.learning_rate")
    if not 0 <= config.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {config.data.eval_fraction}")
    block_size = config.model.options.get("block_size")
    if block_size is not None and config.data.seq_len > block_size:
        raise ConfigError(
            f"data.seq_len ({config.data.seq_len}) is longer than model.block_size ({block_size}); "
            "lower data.seq_len or raise model.block_size"
        )
    if train.compute_dtype == "float16":
        raise ConfigError(
            "train.compute_dtype=float16 needs loss scaling, which shardax does not do (float16 "
            "gradients underflow); use bfloat16 (same memory, float32's range) or float32")
    if config.data.source in ("text", "tokens") and not config.data.path:
        raise ConfigError(f"data.source={config.data.source} needs data.path (a file or folder)")
    _check_cluster(config)


def _resolve_tokenizer(config: Config) -> Config:
    """``data.tokenizer`` checked, and set to the pretrained model's directory when unset."""
    from trainer._pretrained import resolve_tokenizer

    tokenizer = resolve_tokenizer(config.data, config.model.from_pretrained)
    if tokenizer == config.data.tokenizer:
        return config
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=tokenizer))


def _check_cluster(config: Config) -> None:
    """Cluster keys act only with several hosts, and the batch and mesh must split across them."""
    cluster, hosts = config.cluster, config.cluster.num_hosts
    if hosts == 1:
        unused = [f"cluster.{f.name}={getattr(cluster, f.name)!r}" for f in dataclasses.fields(cluster)
                  if f.name != "num_hosts" and getattr(cluster, f.name) != f.default]
        if unused:
            raise ConfigError(
                f"{', '.join(unused)} does nothing with cluster.num_hosts=1 (no Ray, one process); "
                "set cluster.num_hosts to the number of hosts, or drop the key (simulate CPU "
                "devices in one process with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return
    if cluster.devices_per_host is not None and cluster.gpus_per_host:
        raise ConfigError(
            f"cluster.devices_per_host={cluster.devices_per_host} simulates CPU devices, but "
            f"cluster.gpus_per_host={cluster.gpus_per_host} asks for GPUs; drop devices_per_host "
            "(each worker uses the GPUs Ray gives it)")
    _check_cluster_maps(cluster)
    if config.train.batch_size % hosts:
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) must divide by cluster.num_hosts "
            f"({hosts}): each host feeds an equal share of the rows; change one of them")
    mesh = config.parallel.mesh
    if mesh and cluster.devices_per_host is not None:
        size, devices = math.prod(int(v) for v in mesh.values()), hosts * cluster.devices_per_host
        if size != devices:
            raise ConfigError(
                f"parallel.mesh {dict(mesh)} covers {size} devices but cluster.num_hosts x "
                f"cluster.devices_per_host = {hosts} x {cluster.devices_per_host} = {devices}; "
                "make them equal")


def _check_cluster_maps(cluster: ClusterConfig) -> None:
    from parallel.cluster._spec import LONG_PHASES

    for phase, limit in (cluster.phase_timeout_s or {}).items():
        if phase not in LONG_PHASES:
            where = {"step": "cluster.hang_timeout_s", "start-up": "cluster.startup_timeout_s"}
            hint = (f"its limit is {where[phase]}" if phase in where else
                    f"phases with a limit of their own: {', '.join(LONG_PHASES)}")
            raise ConfigError(f"unknown key 'cluster.phase_timeout_s.{phase}'; {hint}")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
            raise ConfigError(f"cluster.phase_timeout_s.{phase} must be a positive number of "
                              f"seconds, got {limit!r}")
    for key, value in (cluster.env or {}).items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"cluster.env.{key} must be a string (quote it), got {value!r}")


def _check_pipeline(config: Config) -> None:
    par = config.parallel
    stages = par.stages
    if stages is not None and stages != "auto" and (
            not isinstance(stages, int) or isinstance(stages, bool) or stages < 1):
        raise ConfigError(f"parallel.stages must be 'auto' or a positive number of stages, got "
                          f"{stages!r}")
    v = par.virtual_stages
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"parallel.virtual_stages must be a positive integer, got {v!r}")
    if par.method != "pipeshard":
        given = [f"parallel.{k}" for k in ("stages", "schedule") if getattr(par, k) is not None]
        given += ["parallel.remat"] if par.remat else []
        given += ["parallel.virtual_stages"] if v != 1 else []
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to parallel.method=pipeshard (got "
                              f"{par.method}); drop them or set parallel.method=pipeshard")
    elif config.train.grad_accum_steps != 1:
        raise ConfigError(f"parallel.method=pipeshard accumulates over "
                          f"parallel.num_micro_batches; set train.grad_accum_steps=1 (got "
                          f"{config.train.grad_accum_steps}) and parallel.num_micro_batches="
                          f"{config.train.grad_accum_steps * config.parallel.num_micro_batches}")
    if par.method == "pipeshard" and config.train.batch_size % par.num_micro_batches:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) must divide by "
                          f"parallel.num_micro_batches ({par.num_micro_batches}); change one "
                          f"of them")


# Keys that leave a resumed run's math as it was: cadence, places and the run's length.
# Every other key of these sections changes what is computed (sections not listed, such as
# ``parallel`` and ``cluster``, change where it runs: the plan is made again instead).
_COMPARED_SECTIONS = ("model", "data", "optimizer", "train")
_HARMLESS = {
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.keep_every", "train.resume",
    "train.overwrite", "train.allow_config_change", "train.sample_tokens",
    "model.from_pretrained",  # where the first weights came from; a resumed run has its own
}


def changed_keys(saved: dict, config: Config) -> tuple[list[str], str | None]:
    """Compares a checkpoint's resolved config (``Config.to_dict()``) with ``config``.

    Returns:
      ``(keys, note)``: the keys whose change alters the math (``section.key``, sorted), and a
      line to print when only the run's length changed the learning-rate schedule (else None).
    """
    current = config.to_dict()

    def flat(raw: dict) -> dict:
        out = {}
        for section in _COMPARED_SECTIONS:
            for key, value in (raw.get(section) or {}).items():
                out[f"{section}.{key}"] = value
        steps = (raw.get("train") or {}).get("steps")
        if out.get("optimizer.decay_steps") is None:  # the schedule follows train.steps
            out["optimizer.decay_steps"] = steps
        return out

    old, new = flat(saved), flat(current)
    defaults = flat(Config().to_dict())  # keys added since the checkpoint was written
    keys = sorted(k for k in set(old) | set(new) if k not in _HARMLESS
                  and old.get(k, defaults.get(k)) != new.get(k, defaults.get(k)))
    note = None
    if "optimizer.decay_steps" in keys and config.optimizer.decay_steps is None and (
            (saved.get("optimizer") or {}).get("decay_steps") is None):
        keys.remove("optimizer.decay_steps")
        before = old["optimizer.decay_steps"]
        note = (f"train.steps changed from {before} to {config.train.steps}: the learning-rate "
                f"schedule is built from it, so every later learning rate changes; pass "
                f"optimizer.decay_steps={before} to keep the schedule of the run being resumed")
    return keys, note


def dump_config(config: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (loadable again with ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
