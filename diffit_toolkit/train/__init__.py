"""The bundled trainer: distributed setup, checkpoints, EMA, logging and the training loop."""

from diffit_toolkit.train.checkpoint import (
    CheckpointError,
    RunFolderError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from diffit_toolkit.train.distributed import DistEnv, setup_distributed
from diffit_toolkit.train.trainer import TrainingError, TrainResult, train

__all__ = [
    "CheckpointError",
    "DistEnv",
    "RunFolderError",
    "TrainResult",
    "TrainingError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "setup_distributed",
    "train",
]
