"""What a resumed run checks against the checkpoint it continues: its config and its plan."""
from __future__ import annotations

from pathlib import Path

import parallel
from trainer.config import Config, ConfigError, changed_keys


def check_config(saved: dict, config: Config, step: int, workdir: Path) -> list[str]:
    """Compares the checkpoint's resolved config with ``config``; returns lines to print.

    Raises:
      ConfigError: a key that changes the math differs (named with both values), unless
        ``train.allow_config_change`` is set.
    """
    keys, note = changed_keys(saved, config)
    notes = [note] if note else []
    if not keys:
        return notes
    now = config.to_dict()
    changes = ", ".join(f"{k} {_lookup(saved, k)!r} -> {_lookup(now, k)!r}" for k in keys)
    if not config.train.allow_config_change:
        raise ConfigError(
            f"the checkpoint of step {step} in {workdir} was trained with other values of keys "
            f"that change the math: {changes}; rerun with the checkpoint's values, pass "
            "train.allow_config_change=true to continue anyway, or use another workdir")
    return notes + [f"continuing with changed config (train.allow_config_change): {changes}"]


def reuse_plan(step_fn: parallel.ParallelStep, plan: parallel.Plan, saved_parallel: dict,
               config: Config, *args) -> str:
    """Gives ``step_fn`` the checkpoint's plan for ``args`` if it still applies (no solve).

    Returns:
      The line saying whether the plan is reused or why the run plans anew.
    """
    now = config.to_dict()["parallel"]
    changed = sorted(k for k in set(now) | set(saved_parallel) if now.get(k) != saved_parallel.get(k))
    try:
        if changed:
            raise parallel.PlanError(f"parallel.{', parallel.'.join(changed)} changed")
        step_fn.set_plan(plan, *args)
    except parallel.PlanError as e:
        return f"planning anew ({e})"
    return f"reusing the saved plan ({plan.method} on mesh {plan.mesh_shape})"


def _lookup(raw: dict, dotted: str):
    """The value of ``section.key`` in a ``Config.to_dict()`` (None when absent)."""
    section, _, key = dotted.partition(".")
    return (raw.get(section) or {}).get(key)
