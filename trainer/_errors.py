"""The errors that mean "the user asked for something that cannot run", and nothing else.

The command line (``trainer.cli``) turns exactly these into one line and exit code 2; the
cluster driver ends a run on them instead of restarting it. Any other exception, a bare
``ValueError`` included, is a bug and keeps its traceback.
"""
from __future__ import annotations

import models
import parallel
from parallel import cluster

from trainer._steps import ModelError
from trainer.config import ConfigError
from trainer.data import DataError


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the state of that step is never saved."""


USER_ERRORS = (ConfigError, DataError, ModelError, FileNotFoundError, NotADirectoryError,
               PermissionError, parallel.PlanError, parallel.CheckpointError,
               cluster.ClusterError, TrainingDiverged, models.hf.HFError)
