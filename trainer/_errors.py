"""The errors that mean "the user asked for something that cannot run", and nothing else.

The command line (``trainer.cli``) turns exactly these into one line and exit code 2; the
cluster driver ends a run on them instead of restarting it. Any other exception, a bare
``ValueError`` included, is a bug and keeps its traceback. This module imports nothing else of
``trainer``, so every module can raise these without an import circle.
"""
from __future__ import annotations

import parallel
from parallel import cluster


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message says what to change."""


class DataError(ValueError):
    """The data the config points at is missing, empty or too short; the message says which."""


class ModelError(TypeError):
    """A hook returned something the Trainer cannot train; the message names it and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the state of that step is never saved."""


USER_ERRORS = (ConfigError, DataError, ModelError, FileNotFoundError, NotADirectoryError,
               PermissionError, parallel.PlanError, parallel.CheckpointError,
               cluster.ClusterError, TrainingDiverged)
