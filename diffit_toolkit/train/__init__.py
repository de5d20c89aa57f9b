"""The bundled trainer: distributed setup, EMA, logging and the training loop (checkpoints and
run folders are [`diffit_toolkit.runs`][diffit_toolkit.runs])."""

from diffit_toolkit.train.distributed import DistEnv, setup_distributed
from diffit_toolkit.train.trainer import TrainingError, TrainResult, train

__all__ = ["DistEnv", "TrainResult", "TrainingError", "setup_distributed", "train"]
