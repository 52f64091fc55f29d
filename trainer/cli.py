"""What the scripts share: user mistakes become one line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys
import traceback

from trainer._errors import USER_ERRORS
from trainer.config import load_config


def run(fn) -> int:
    """Runs ``fn``; a user mistake prints ``error: ...`` (no traceback) and returns 2.

    Set ``SHARDAX_DEBUG=1`` to see the traceback as well.
    """
    try:
        fn()
    except USER_ERRORS as e:
        if os.environ.get("SHARDAX_DEBUG"):
            traceback.print_exc()
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def train(config_name: str, overrides) -> dict:
    from trainer.trainer import Trainer

    return Trainer(load_config(config_name, overrides)).fit()


def plan(config_name: str, overrides, profile=None) -> str:
    """The plan table and cost report of a config, built from abstract shapes only.

    ``profile`` (a device profile name) sets ``parallel.profile``: the solver plans for that
    device and the report prices the plan with it.
    """
    import parallel
    from trainer.trainer import Trainer

    overrides = [*overrides, f"parallel.profile={profile}"] if profile else list(overrides)
    config = load_config(config_name, overrides)
    trainer = Trainer(config).build()
    report = trainer.step_fn.analyze(trainer.abstract_state, trainer.batch_spec,
                                     profile=config.parallel.profile)
    header = f"model: {trainer.model_name} with {trainer.num_params():,} parameters"
    return header + "\n" + parallel.format_plan(trainer.plan, report)
