"""shardax trainer: configs, the ``Trainer`` base class, data, optimizers and logging."""
from trainer._errors import ModelError as ModelError
from trainer.config import Config as Config
from trainer.config import ConfigError as ConfigError
from trainer.config import load_config as load_config
from trainer.data import DataError as DataError
from trainer.optim import build_optimizer as build_optimizer
from trainer.optim import learning_rate_schedule as learning_rate_schedule
from trainer.trainer import Callback as Callback
from trainer.trainer import Trainer as Trainer
from trainer._errors import TrainingDiverged as TrainingDiverged
