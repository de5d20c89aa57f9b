"""Real ``torchrun`` launches of the ``train`` command (two gloo processes on the CPU) in the shape
every shipped recipe has: ``max_steps`` a multiple of ``ckpt_every``, so the last step is also a
checkpoint step. Every rank must leave the loop on the same path (no second checkpoint on some
ranks while others sample the final grid), exit 0 and leave the final checkpoint and grid."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffit_toolkit.runs import list_checkpoints, load_checkpoint

from .test_trainer import _free_port


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize(("max_steps", "ckpt_every"), [(4, 2), (5, 2)])
def test_torchrun_train_ends_cleanly_with_its_final_checkpoint(tmp_path, tiny_recipe, strategy, max_steps, ckpt_every):
    recipe = tiny_recipe(tmp_path, "run", max_steps=max_steps, ckpt_every=ckpt_every, keep_last=5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "diffit_toolkit.cli", "train", str(recipe), "--device", "cpu", "--no-progress",
           "--set", f"train.strategy={strategy}", "--set", "sample.num_images=4"]
    try:
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired as exc:  # the ranks disagreed on the path out of the loop
        pytest.fail(f"torchrun {strategy} hung at the end of the run: {str(exc.stderr)[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = sorted({*range(ckpt_every, max_steps + 1, ckpt_every), max_steps})
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [f"step_{s:07d}" for s in steps]
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["state"]["step"] == max_steps
    assert (tmp_path / "run" / "samples.png").is_file() and (tmp_path / "run" / "loss.png").is_file()
