"""Run folders: training checkpoints, model files, sample grids and loss curves, the setup record.

Below both training and sampling: the trainer writes through it and ``diffit-toolkit sample``
reads through it. Two kinds of weight files live here:

* a **checkpoint** ([`save_checkpoint`][diffit_toolkit.runs.checkpoint.save_checkpoint] /
[`load_checkpoint`][diffit_toolkit.runs.checkpoint.load_checkpoint]): a ``step_*`` folder of a
  run with the model, EMA, optimizer and RNG state and the resolved recipe (for resuming);
* a **model file** ([`save_model_file`][diffit_toolkit.runs.model_file.save_model_file] /
[`load_model_file`][diffit_toolkit.runs.model_file.load_model_file]): one ``.safetensors`` file
  with the model's config in its header (for sharing and converted released weights).
"""

from diffit_toolkit.runs.checkpoint import (
    CheckpointError,
    CheckpointPathError,
    OutputFolderError,
    RunFolderError,
    check_run_dir,
    check_train_state,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_newest_verified,
    run_lock,
    save_checkpoint,
    verify_checkpoint,
)
from diffit_toolkit.runs.files import atomic_output, confined, write_text_atomic
from diffit_toolkit.runs.environment import describe_environment, exactness_differences, parse_device, record_environment
from diffit_toolkit.runs.model_file import check_state_dict, load_model_file, load_weights, read_config, read_state_dict, save_model_file
from diffit_toolkit.runs.outputs import save_grid, save_loss_curve

__all__ = [
    "atomic_output",
    "confined",
    "write_text_atomic",
    "CheckpointError",
    "CheckpointPathError",
    "OutputFolderError",
    "RunFolderError",
    "check_run_dir",
    "check_train_state",
    "checkpoint_step",
    "load_newest_verified",
    "run_lock",
    "verify_checkpoint",
    "check_state_dict",
    "describe_environment",
    "exactness_differences",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_file",
    "load_weights",
    "parse_device",
    "read_config",
    "read_state_dict",
    "record_environment",
    "save_checkpoint",
    "save_grid",
    "save_loss_curve",
    "save_model_file",
]
