"""The bundled trainer: distributed setup, EMA, logging and the training loop (checkpoints and
run folders are [`diffit_toolkit.runs`][diffit_toolkit.runs])."""

from diffit_toolkit.train.distributed import DistEnv, setup_distributed
from diffit_toolkit.train.state import TrainState
from diffit_toolkit.train.trainer import StepStats, Trainer, TrainingError, TrainResult, train

__all__ = ["DistEnv", "StepStats", "TrainResult", "TrainState", "Trainer", "TrainingError", "setup_distributed", "train"]
