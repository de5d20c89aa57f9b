"""A trained model as a folder that samples without its run: pretrained weights plus the
sampling settings (``sampling.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffit_toolkit.backbones import save_pretrained
from diffit_toolkit.inference.pipeline import SAMPLING_NAME, Pipeline
from diffit_toolkit.interop.weights import check_finite_weights
from diffit_toolkit.runs import CheckpointError

#: Recipe sections an export keeps: what sampling needs, not the data paths or training options.
EXPORTED_SECTIONS = ("name", "model", "diffusion", "sample")


def write_folder_atomically(out: str | Path, write: Callable[[Path], Any]) -> Path:
    """Create the folder ``out`` by ``write(tmp)`` into a temporary folder beside it, renamed to
    ``out`` once complete: ``out`` never holds a partial folder (a crash or a full disk leaves
    nothing, and a retry is not blocked); ``out`` must not exist or be an empty folder.

    Raises:
        CheckpointError: one line when the folder cannot be written (nothing is left behind).
        ValueError: as ``write`` raises it (nothing is left behind).
    """
    import shutil

    from diffit_toolkit.runs.files import temporary_name, why_write_failed

    out = Path(out)
    tmp = temporary_name(out)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.rename(tmp, out)  # fails rather than replace an existing export
    except ValueError:
        raise
    except Exception as exc:  # safetensors and torch wrap a full disk in their own exceptions
        raise CheckpointError(f"could not write {out} ({why_write_failed(exc, out.parent)}); nothing was written") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_model(pipeline: Pipeline, out: str | Path, extra: Callable[[Path], Any] | None = None) -> Path:
    """Write ``pipeline``'s weights as a pretrained folder plus ``sampling.json`` (the recipe's
    model, diffusion and sample sections and the data facts, with the VAE reference).

    The folder is written as [`write_folder_atomically`][diffit_toolkit.inference.export.write_folder_atomically]
    writes it; ``extra(folder)`` adds more files (the model card) before it gets its name."""
    check_finite_weights(pipeline.model, "the weights to export")

    def write(tmp: Path) -> None:
        save_pretrained(pipeline.model, tmp)
        recipe = pipeline.recipe.to_dict()
        settings = {"recipe": {k: recipe[k] for k in EXPORTED_SECTIONS}, "data": pipeline.facts}
        (tmp / SAMPLING_NAME).write_text(json.dumps(settings, indent=2) + "\n")
        if extra is not None:
            extra(tmp)

    return write_folder_atomically(out, write)
