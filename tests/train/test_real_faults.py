"""Real faults, not stand-ins: a full file system (a small tmpfs in a private mount namespace),
a second training process in the same run folder, bytes flipped on disk, Ctrl-C (SIGINT) sent to
a real process, a process killed at the worst moment of re-saving a step, malformed run files.

Each test fails without its protection (named in a comment). The tmpfs tests need root and
``unshare``; elsewhere they are skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.build import load_recipe
from diffit_toolkit.runs import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from diffit_toolkit.train import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
CLI = [sys.executable, "-m", "diffit_toolkit.cli"]


def _tmpfs_reason() -> str | None:
    """Why a private tmpfs cannot be mounted here, or ``None`` when it can."""
    if not shutil.which("unshare"):
        return "no unshare command"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /mnt && umount /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"


TMPFS_REASON = _tmpfs_reason()
needs_tmpfs = pytest.mark.skipif(TMPFS_REASON is not None, reason=str(TMPFS_REASON))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def invoke(*args: str):
    """The CLI in this process (fast): ``(exit code, output)``."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    return result.exit_code, result.output


# -- a real full disk ---------------------------------------------------------------------------

FULL_DISK = """
set -e
mount -t tmpfs -o size=14M tmpfs "$MNT"
run="$MNT/run"
cp -r "$FIRST" "$run"                                # a run with its checkpoint at step 2
head -c 200000 /dev/zero > "$MNT/spare"           # room for logs, not for a checkpoint
head -c 100000000 /dev/zero > "$MNT/fill" 2>/dev/null || true   # the file system is now full
rm "$MNT/spare"
set +e
{cli} train "$RECIPE" --device cpu --no-progress --output-dir "$run" --set train.max_steps=4 --set train.ckpt_every=4 > "$OUT/out.txt" 2>&1
echo $? > "$OUT/rc.txt"
ls -a "$run/checkpoints" > "$OUT/ls.txt"
cp -r "$run" "$OUT/copy"
"""


@needs_tmpfs
def test_a_real_full_disk_is_one_line_and_leaves_no_temp_folder(tmp_path, tiny_recipe):
    # protection: save_checkpoint catches what safetensors / torch raise for ENOSPC (not OSError)
    # and removes its temporary folder
    recipe = tiny_recipe(tmp_path, "first", max_steps=2, ckpt_every=2)
    train(load_recipe(recipe), device="cpu", progress=False)
    (tmp_path / "mnt").mkdir()
    script = FULL_DISK.format(cli=" ".join(CLI))
    env = {**ENV, "MNT": str(tmp_path / "mnt"), "RECIPE": str(recipe), "OUT": str(tmp_path), "FIRST": str(tmp_path / "first")}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = (tmp_path / "out.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "1", out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "could not write checkpoint" in errors[0] and "step_0000004 (No space left on device)" in errors[0]
    assert "step_0000002 is intact" in errors[0]
    assert (tmp_path / "ls.txt").read_text().split() == [".", "..", "step_0000002"]  # no .tmp-* left
    assert load_checkpoint(tmp_path / "copy" / "checkpoints" / "step_0000002")["state"]["step"] == 2  # verifies


# -- two trainings in one run folder ------------------------------------------------------------


def start(recipe: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "train", str(recipe), "--device", "cpu", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def test_a_second_training_in_the_same_run_folder_stops_naming_the_holder(tmp_path, tiny_recipe, wait_for_steps):
    # protection: run_lock (fcntl.flock on run/.lock) taken before the run folder is read
    recipe = tiny_recipe(tmp_path, "run", max_steps=100_000, ckpt_every=1, keep_last=2)
    first = start(recipe)
    try:
        wait_for_steps(tmp_path / "run", 3, first)
        code, output = invoke("train", str(recipe), "--device", "cpu", "--no-progress", "--set", "train.seed=7")
        assert code == 1
        lines = error_lines(output)
        assert len(lines) == 1 and lines[0].startswith("error: run folder")
        assert f"in use by another training (PID {first.pid}" in lines[0]
        assert first.poll() is None  # the first one goes on undisturbed
        wait_for_steps(tmp_path / "run", 6, first)
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert "stopped by SIGTERM" in out
    newest = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    # once the holder has gone, the folder is free again (the lock dies with its process)
    code, output = invoke("train", str(recipe), "--device", "cpu", "--no-progress",
                          "--set", f"train.max_steps={newest['state']['step'] + 1}")
    assert code == 0, output


def test_a_writer_removes_only_its_own_or_dead_writers_temp_folders(tmp_path):
    # protection: _remove_stale_tmp checks each temporary folder's writer (PID, host) is gone
    import socket

    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        root = tmp_path / "checkpoints"
        root.mkdir()
        in_flight = root / f".tmp-step_0000009-{live.pid}-{host}"
        abandoned = root / f".tmp-step_0000008-{dead.pid}-{host}"
        for folder in (in_flight, abandoned):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"partial")
        state = {"w": torch.ones(3)}
        save_checkpoint(tmp_path, 1, state, state, {"step": 1}, {}, keep_last=3)
        assert in_flight.is_dir() and (in_flight / "model.safetensors").read_bytes() == b"partial"
        assert not abandoned.exists()
    finally:
        live.kill()
        live.wait()


# -- re-saving a step: killed at the worst moment ---------------------------------------------------

RESAVE = """
import os, shutil, signal, sys, torch
from diffit_toolkit.runs import checkpoint as c


def resave(run, mode):
    c.save_checkpoint(run, 5, {"w": torch.zeros(3)}, {"w": torch.zeros(3)}, {"step": 5}, {"v": "old"}, keep_last=1)
    real_rmtree, real_replace, calls = shutil.rmtree, os.replace, {"replace": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def rmtree_then_die(path, *args, **kwargs):   # the first folder removal is the last thing done
        real_rmtree(path, *args, **kwargs)
        die()

    def die_at_second_rename(src, dst):           # killed between moving the old aside and the new in
        calls["replace"] += 1
        if calls["replace"] == 2:
            die()
        real_replace(src, dst)

    if mode != "exchange":
        c._exchange = lambda a, b: False           # a file system without renameat2(RENAME_EXCHANGE)
    if mode == "between-renames":
        c.os.replace = die_at_second_rename
    else:
        c.shutil.rmtree = rmtree_then_die
    c.save_checkpoint(run, 5, {"w": torch.ones(3)}, {"w": torch.ones(3)}, {"step": 5}, {"v": "new"}, keep_last=1)


for run, mode in zip(sys.argv[1::2], sys.argv[2::2]):  # one forked child per mode: one interpreter start
    pid = os.fork()
    if pid == 0:
        resave(run, mode)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(mode, "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else "not killed")
"""
MODES = ["exchange", "fallback", "between-renames"]


@pytest.fixture(scope="module")
def resaved(tmp_path_factory):
    """Run folders in which a process died at the worst moment of re-saving step 5, per mode."""
    root = tmp_path_factory.mktemp("resave")
    script = root / "resave.py"
    script.write_text(RESAVE)
    args = [a for mode in MODES for a in (str(root / mode), mode)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [w for mode in MODES for w in (mode, "killed")], proc.stdout
    return root


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("mode", MODES)
def test_resaving_a_step_never_leaves_the_run_without_it(resaved, tmp_path, mode):
    # protection: _move_into_place swaps the new folder in before the old one is removed
    run = tmp_path / "run"
    shutil.copytree(resaved / mode, run, symlinks=True)
    newest = latest_checkpoint(run)
    assert newest is not None, sorted(p.name for p in (run / "checkpoints").iterdir())
    ckpt = load_checkpoint(newest)
    assert ckpt["state"]["step"] == 5
    expected = "old" if mode == "between-renames" else "new"
    assert ckpt["config"]["v"] == expected
    if mode == "between-renames":  # a save of another step that fails must not take the only step 5 with it
        import diffit_toolkit.runs.checkpoint as c

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        original, c.save_file = c.save_file, full
        try:
            with pytest.raises(CheckpointError):
                save_checkpoint(run, 6, {"w": torch.ones(3)}, {"w": torch.ones(3)}, {"step": 6}, {}, keep_last=1)
        finally:
            c.save_file = original
        assert load_checkpoint(latest_checkpoint(run))["config"]["v"] == "old"
    # the next save of that step cleans up after the dead writer and leaves one clean step_5
    state = {"w": torch.full((3,), 2.0)}
    save_checkpoint(run, 5, state, state, {"step": 5}, {"v": "next"}, keep_last=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000005"]
    assert load_checkpoint(latest_checkpoint(run))["config"]["v"] == "next"


# -- silent corruption: bytes flipped on disk --------------------------------------------------------


def flip_bytes(path: Path, at: float = 0.6, count: int = 4) -> None:
    """Flip ``count`` bytes in place at a fraction ``at`` of the file (as a bad disk would)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, tiny_recipe):
    """A run of 4 steps with checkpoints at steps 2 and 4 (trained once, copied per test)."""
    folder = tmp_path_factory.mktemp("four")
    train(load_recipe(tiny_recipe(folder, "run", max_steps=4, ckpt_every=2)), device="cpu", progress=False)
    return folder / "run"


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "state.pt"])
def test_flipped_bytes_are_caught_and_resume_falls_back_to_the_newest_good_checkpoint(tmp_path, tiny_recipe, name,
                                                                                       four_steps, capsys):
    # protection: checksums.json (SHA-256 per file) verified by load_checkpoint; load_newest_verified
    recipe = tiny_recipe(tmp_path, "run", max_steps=4, ckpt_every=2)
    shutil.copytree(four_steps, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step_0000004"
    flip_bytes(newest / name)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(newest)
    assert "\n" not in str(err.value) and f"{name} does not match the SHA-256" in str(err.value)
    capsys.readouterr()
    resumed = train(load_recipe(recipe, ["train.max_steps=5"]), device="cpu", progress=False)
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert f"warning: skipping checkpoint {newest}" in text and "resumed from" in text and "step_0000002 at step 2" in text
    assert resumed.step == 5
    assert torch.isfinite(torch.cat([p.flatten() for p in resumed.model.parameters()])).all()


def test_when_no_checkpoint_verifies_the_run_stops_with_one_line(tmp_path, tiny_recipe, four_steps):
    recipe = tiny_recipe(tmp_path, "run", max_steps=4, ckpt_every=2)
    shutil.copytree(four_steps, tmp_path / "run")
    for ckpt in list_checkpoints(tmp_path / "run"):
        flip_bytes(ckpt / "model.safetensors")
    code, output = invoke("train", str(recipe), "--device", "cpu", "--no-progress", "--set", "train.max_steps=6")
    assert code == 1
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint of" in errors[0] and "(2 tried)" in errors[0]


# -- malformed run files ----------------------------------------------------------------------


@pytest.fixture
def trained(tmp_path, tiny_recipe, four_steps):
    recipe = tiny_recipe(tmp_path, "run", max_steps=4, ckpt_every=2)
    shutil.copytree(four_steps, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_0000004")
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    (ckpt / "checksums.json").unlink()  # as a checkpoint written by hand or by an older version
    return recipe, ckpt


def _rewrite_state(ckpt: Path, edit) -> None:
    state = torch.load(ckpt / "state.pt", weights_only=True)
    torch.save(edit(state), ckpt / "state.pt")


@pytest.mark.parametrize("edit, expected", [
    (lambda s: {"step": s["step"]}, "state.pt lacks optimizer"),
    (lambda s: {**s, "step": "two"}, "holds step 'two', not a step count"),
    (lambda s: {**s, "step": 10**12}, "not a step count"),
    (lambda s: {**s, "step": 7}, "holds step 7 but the folder is step 2"),
    (lambda s: {**s, "optimizer": {"state": 3}}, "state.pt is malformed"),
    (lambda s: [1, 2], "holds a list, not a training state"),
])
def test_a_malformed_state_is_one_line(trained, edit, expected):
    # protection: check_train_state and the guarded restore in train()
    recipe, ckpt = trained
    _rewrite_state(ckpt, edit)
    code, output = invoke("train", str(recipe), "--device", "cpu", "--no-progress", "--resume", str(ckpt),
                          "--set", "train.max_steps=3")
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], output


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_pickle_without_checksums_still_never_runs(trained, tmp_path):
    # protection: torch.load(weights_only=True) behind the checksum (a checkpoint without checksums.json)
    import pickle

    _, ckpt = trained
    marker = tmp_path / "pwned.txt"
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"step": 2, "payload": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_a_checkpoint_beyond_max_steps_is_refused(trained):
    recipe, ckpt = trained
    code, output = invoke("train", str(recipe), "--device", "cpu", "--no-progress", "--set", "train.max_steps=1")
    assert code == 1 and "is at step 2, beyond train.max_steps (1)" in output


@pytest.mark.parametrize("config, expected", [
    ([1, 2], "config.json holds a list"),
    ({"recipe": {}, "data": {}}, "config.json has no model"),
])
def test_a_malformed_config_is_one_line_for_sample(trained, config, expected):
    # protection: load_checkpoint's type check, load_pipeline's key check
    _, ckpt = trained
    (ckpt / "config.json").write_text(json.dumps(config))
    code, output = invoke("sample", str(ckpt), "--num", "2", "--steps", "2", "--device", "cpu")
    assert code == 1 and output.count("\n") == 1 and expected in output, output  # a damaged checkpoint, as for train


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, tiny_recipe, four_steps):
    # protection: logging._truncate_after drops lines that do not parse
    recipe = tiny_recipe(tmp_path, "run", max_steps=4, ckpt_every=2)
    shutil.copytree(four_steps, tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # a process killed in the middle of writing a line
    result = train(load_recipe(recipe, ["train.max_steps=5"]), device="cpu", progress=False)
    assert result.step == 5
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


# -- Ctrl-C ------------------------------------------------------------------------------------------


def test_ctrl_c_checkpoints_and_stops_like_sigterm(tmp_path, tiny_recipe, wait_for_steps):
    # protection: SIGINT in trainer.STOP_SIGNALS
    recipe = tiny_recipe(tmp_path, "run", max_steps=100_000)
    proc = start(recipe)
    wait_for_steps(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGINT at step" in out and "Traceback" not in out
    logged = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    newest = latest_checkpoint(tmp_path / "run")
    assert newest is not None and int(newest.name.split("_")[1]) in (logged, logged + 1)
    load_checkpoint(newest)


# -- where a run may write ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["root", "home", "file", "foreign"])
def test_output_folders_that_are_not_runs_are_refused(tmp_path, tiny_recipe, monkeypatch, case):
    # protection: check_run_dir, called before anything is written
    recipe = tiny_recipe(tmp_path, "run", max_steps=1)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    target = {"root": Path("/"), "home": home, "file": tmp_path / "notes.txt", "foreign": tmp_path / "photos"}[case]
    if case == "file":
        target.write_text("keep me")
    if case == "foreign":
        target.mkdir()
        (target / "a.jpg").write_bytes(b"x")
    before = sorted(os.listdir(target)) if target.is_dir() else None
    code, output = invoke("train", str(recipe), "--device", "cpu", "--no-progress", "--output-dir", str(target))
    assert code == 2, output  # a usage error: a folder you named, refused before anything runs
    assert output.startswith("error: output folder") and output.count("\n") == 1, output
    assert {"root": "file-system root", "home": "home folder", "file": "existing file",
            "foreign": "is not a run folder"}[case] in output
    if before is not None:
        assert sorted(os.listdir(target)) == before  # nothing written
    else:
        assert target.read_text() == "keep me"


def test_resuming_with_another_seed_says_so(tmp_path, tiny_recipe, four_steps, capsys):
    # a different seed in the same folder continues the recorded run; the log says so instead of silence
    recipe = tiny_recipe(tmp_path, "run", max_steps=4, ckpt_every=2)
    shutil.copytree(four_steps, tmp_path / "run")
    capsys.readouterr()
    train(load_recipe(recipe, ["train.max_steps=5", "train.seed=7"]), device="cpu", progress=False)
    logged = capsys.readouterr()
    assert "was written with train.seed=0; continuing that run" in (logged.out + logged.err).replace("\n", "")


# -- an ablation asked to stop ------------------------------------------------------------------------


def test_sigterm_stops_an_ablation_without_scoring_the_half_trained_run(tmp_path, tiny_recipe, wait_for_steps):
    # protection: run_ablation raises AblationStopped when train() returns with stopped_by, and
    # the ablate command turns it into one line (it used to score the half-trained run and go on)
    recipe = tiny_recipe(tmp_path, "abl", max_steps=100_000)
    out = tmp_path / "study"
    cmd = ["ablate", str(recipe), "--seeds", "0", "--num-images", "2", "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen([*CLI, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    wait_for_steps(out / "abl" / "seed_0", 3, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    errors = error_lines(output)[-1:]
    assert errors[0].startswith("error: abl seed 0 stopped by SIGTERM at step"), output
    assert "run the same command to resume" in errors[0] and "Traceback" not in output
    assert not (out / "curves.csv").exists()  # nothing scored
    stopped_at = load_checkpoint(latest_checkpoint(out / "abl" / "seed_0"))["state"]["step"]
    # the same command (with a budget just past the stop) resumes the run and scores it
    code, output = invoke(*cmd, "--set", f"train.max_steps={stopped_at + 2}")
    assert code == 0, output
    rows = (out / "curves.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(f"abl,tmsa,0,{stopped_at + 2},")


# -- exports: whole or not at all -----------------------------------------------------------------

FULL_DISK_EXPORT = """
set -e
mount -t tmpfs -o size=300k tmpfs "$MNT"
set +e
{cli} export "$RUN" "$MNT/exported" > "$OUT/out.txt" 2>&1
echo $? > "$OUT/rc.txt"
ls -a "$MNT" > "$OUT/ls.txt"
"""


@needs_tmpfs
def test_an_export_to_a_full_disk_leaves_nothing_and_a_retry_works(tmp_path, tiny_recipe):
    # protection: export_model writes a temporary folder and renames it once complete
    recipe = tiny_recipe(tmp_path, "run", max_steps=1)
    train(load_recipe(recipe, ["model.hidden_size=96", "model.num_heads=4", "model.depth=2"]), device="cpu",
          progress=False)
    (tmp_path / "mnt").mkdir()
    env = {**ENV, "MNT": str(tmp_path / "mnt"), "RUN": str(tmp_path / "run"), "OUT": str(tmp_path)}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", FULL_DISK_EXPORT.format(cli=" ".join(CLI))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = (tmp_path / "out.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "1" and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write" in errors[0] and "nothing was written" in errors[0], out
    assert (tmp_path / "ls.txt").read_text().split() == [".", ".."]  # no partial folder to block a retry
    code, output = invoke("export", str(tmp_path / "run"), str(tmp_path / "exported"))
    assert code == 0, output


def test_non_finite_weights_are_refused_by_sample_and_export(tmp_path, tiny_recipe):
    # protection: check_finite_weights in load_pipeline and export_model
    from safetensors.torch import load_file, save_file

    train(load_recipe(tiny_recipe(tmp_path, "run", max_steps=1)), device="cpu", progress=False)
    code, output = invoke("export", str(tmp_path / "run"), str(tmp_path / "exported"))
    assert code == 0, output
    weights = tmp_path / "exported" / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[3]
    state[name][0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    code, output = invoke("sample", str(tmp_path / "exported"), "--num", "2", "--steps", "2", "--device", "cpu",
                          "--no-progress", "--out", str(tmp_path / "g.png"))
    assert code != 0 and f"1 weight tensor(s) hold inf or nan (first: {name})" in output, output
    assert not (tmp_path / "g.png").exists()
    # a checkpoint whose EMA weights are damaged this way (checksums rewritten to match)
    ckpt = latest_checkpoint(tmp_path / "run")
    ema = load_file(str(ckpt / "ema.safetensors"))
    ema[name][0] = float("inf")
    save_file(ema, str(ckpt / "ema.safetensors"))
    (ckpt / "checksums.json").unlink()
    code, output = invoke("sample", str(tmp_path / "run"), "--num", "2", "--steps", "2", "--device", "cpu",
                          "--no-progress", "--out", str(tmp_path / "g.png"))
    assert code != 0 and "(ema weights): 1 weight tensor(s) hold inf or nan" in output, output
    code, output = invoke("export", str(tmp_path / "run"), str(tmp_path / "again"))
    assert code != 0 and "hold inf or nan" in output and not (tmp_path / "again").exists(), output


def test_an_export_without_settings_says_how_it_samples_and_refuses_model_weights(tmp_path, tiny_recipe):
    train(load_recipe(tiny_recipe(tmp_path, "run", max_steps=1)), device="cpu", progress=False)
    code, output = invoke("export", str(tmp_path / "run"), str(tmp_path / "exported"))
    assert code == 0, output
    code, output = invoke("sample", str(tmp_path / "exported"), "--weights", "model", "--num", "2", "--steps", "2",
                          "--device", "cpu", "--no-progress", "--out", str(tmp_path / "g.png"))
    assert code == 2 and "drop --weights" in output, output
    (tmp_path / "exported" / "sampling.json").unlink()
    code, output = invoke("sample", str(tmp_path / "exported"), "--num", "2", "--steps", "2", "--device", "cpu",
                          "--no-progress", "--out", str(tmp_path / "g.png"))
    assert code == 0, output
    assert "warning:" in output and "carries no sampling settings (sampling.json)" in output and "--recipe" in output


# -- damaged model folders and model files --------------------------------------------------------


def _damage(data: bytes, how: str) -> bytes:
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    if how == "empty":
        return b""
    if how in ("length_2_63", "length_100_MiB"):
        return struct.pack("<Q", 2**63 if how == "length_2_63" else 100 << 20) + data[8:]
    if how == "past_the_end":
        header[names[0]]["data_offsets"] = [0, 10**9]
    else:  # overlapping
        header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_recipe):
    tmp = tmp_path_factory.mktemp("exported")
    train(load_recipe(tiny_recipe(tmp, "run", max_steps=1)), device="cpu", progress=False)
    code, output = invoke("export", str(tmp / "run"), str(tmp / "exported"))
    assert code == 0, output
    return tmp


@pytest.mark.parametrize("how", ["empty", "length_2_63", "length_100_MiB", "past_the_end", "overlapping"])
def test_a_damaged_model_folder_is_one_line_for_sample_and_init_from(exported, tmp_path, tiny_recipe, how):
    # protection: read_safetensors on every folder path (from_pretrained, read_weights)
    folder = tmp_path / "exported"
    shutil.copytree(exported / "exported", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(_damage(weights.read_bytes(), how))
    code, output = invoke("sample", str(folder), "--num", "2", "--steps", "2", "--device", "cpu", "--no-progress",
                          "--out", str(tmp_path / "g.png"))
    assert code == 2 and f"cannot read '{weights}' as safetensors" in output and "Traceback" not in output, output
    code, output = invoke("train", str(tiny_recipe(tmp_path, "tuned", max_steps=1)), "--device", "cpu",
                          "--no-progress", "--init-from", str(folder))
    assert code == 2 and f"cannot read '{weights}' as safetensors" in output and "Traceback" not in output, output


@pytest.mark.parametrize("edit, expected", [
    (lambda c: {**c, "depth": 100_000_000}, "config.json: model.depth: 100000000 is beyond the limit of 1024"),
    (lambda c: {**c, "hidden_size": 10**9}, "config.json: model.hidden_size: 1000000000 is beyond the limit"),
])
def test_sizes_in_a_model_folders_config_are_bounded_before_building(exported, tmp_path, edit, expected):
    # protection: build_backbone checks the recipe bounds on any config it is given
    folder = tmp_path / "exported"
    shutil.copytree(exported / "exported", folder)
    config = folder / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    start = time.perf_counter()
    code, output = invoke("sample", str(folder), "--num", "2", "--device", "cpu", "--no-progress")
    assert code == 2 and expected in output, output
    assert time.perf_counter() - start < 20


def test_a_model_file_whose_header_config_is_not_an_object_is_one_line(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffit_toolkit.runs.model_file import CONFIG_KEY

    state = load_file(str(exported / "exported" / "model.safetensors"))
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={CONFIG_KEY: "[1, 2]"})
    code, output = invoke("sample", str(path), "--num", "2", "--device", "cpu", "--no-progress",
                          "--out", str(tmp_path / "g.png"))
    assert code == 2 and "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    from diffit_toolkit.runs import load_model_file

    with pytest.raises(ValueError, match="the model config in its header is not a JSON object"):
        load_model_file(path)
