"""Run logging: rank 0 only, optional back-ends found and reported in one message style."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from lightning_utilities.core.imports import RequirementCache
from lightning_utilities.core.rank_zero import rank_zero_only

from diffit_toolkit import optional
from diffit_toolkit.optional import MissingDependencyError, missing, require
from diffit_toolkit.train.logging import RunLogger

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_every_optional_dependency_has_an_extra_and_one_message_style(monkeypatch):
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert set(optional.OPTIONAL) == {"xformers", "triton", "tensorboard", "wandb"}
    for name, (_, extra) in optional.OPTIONAL.items():
        assert extra in extras, f"no [{extra}] extra for {name}"
    monkeypatch.setitem(optional.OPTIONAL, "wandb", (RequirementCache("no-such-package-here"), "wandb"))
    assert missing("wandb") == "wandb is not installed: pip install 'diffit-toolkit[wandb]'"
    with pytest.raises(MissingDependencyError) as err:
        require("wandb", "logging.wandb")
    assert str(err.value) == "logging.wandb needs wandb, which is not installed: pip install 'diffit-toolkit[wandb]'"
    assert missing("tensorboard") is None  # installed with [dev]


def test_the_run_logger_writes_on_rank_zero_only(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    logger = RunLogger(tmp_path / "other", total_steps=2, start_step=0, batch_size=4, show_progress=False)
    logger.step(1, 0.5, log=True, lr=1e-3)
    logger.close()
    assert not (tmp_path / "other").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    logger = RunLogger(tmp_path / "main", total_steps=2, start_step=0, batch_size=4, show_progress=False)
    logger.step(1, 0.5, log=True, lr=1e-3)
    logger.close()
    assert (tmp_path / "main" / "metrics.jsonl").read_text().count("\n") == 1


def test_without_tensorboard_the_run_logs_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    monkeypatch.setitem(optional.OPTIONAL, "tensorboard", (RequirementCache("no-such-package-here"), "tensorboard"))
    with pytest.warns(UserWarning, match=r"TensorBoard logging is off: tensorboard is not installed: "
                                         r"pip install 'diffit-toolkit\[tensorboard\]'"):
        logger = RunLogger(tmp_path, total_steps=2, start_step=0, batch_size=4, show_progress=False)
    logger.step(1, 0.5, log=True)
    logger.close()
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "tensorboard").exists()
