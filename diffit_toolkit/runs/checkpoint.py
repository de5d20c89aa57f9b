"""Checkpoints: safetensors weights plus a ``weights_only``-loadable training state, written
atomically (a temporary folder renamed into place), checksummed, the last k kept; and the run
folder itself (its lock, and the checks on where a run may write).

Layout of ``<run>/checkpoints/step_0001000/``:

* ``model.safetensors``, ``ema.safetensors``: the weights (nothing pickled);
* ``state.pt``: optimizer, scheduler, step, RNG and data-position state (tensors and plain
  Python values only, so ``torch.load(..., weights_only=True)`` reads it);
* ``config.json``: the resolved recipe and the model's config;
* ``checksums.json``: the SHA-256 of each file above, verified before anything is loaded.

A folder named ``step_*`` exists only once every file in it is complete: a crash while writing
leaves a ``.tmp-step_*-PID-HOST`` folder that loading ignores and the next save removes once
its writer is gone. Re-saving an existing step swaps the new folder in atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffit_toolkit.errors import RunFailure, UsageError
from diffit_toolkit.runs.files import RunFolderError, confined, open_no_follow
from diffit_toolkit.runs.files import why_write_failed as _why

CHECKPOINT_DIR = "checkpoints"
#: The run folder's lock file (``fcntl.flock``; holds the holder's PID and host).
LOCK_FILE = ".lock"
#: Per-file SHA-256 digests of a checkpoint.
CHECKSUMS = "checksums.json"
#: The files of a complete checkpoint (besides `CHECKSUMS`).
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.json")
#: Largest step a checkpoint may claim (a 10-digit step is beyond any real run).
MAX_STEP = 10**10
#: A temporary folder of another host is taken for abandoned after this long.
FOREIGN_TMP_AGE_S = 24 * 3600

_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_TMP_DIR = re.compile(r"^\.(?:tmp|old)-step_\d+-(\d+)(?:-(.*))?$")
_OLD_DIR = re.compile(r"^\.old-step_(\d{7,})-")
_HOST = socket.gethostname()


class CheckpointError(RunFailure, RuntimeError):
    """A checkpoint that cannot be written or read; one line naming the file."""


class CheckpointPathError(UsageError, CheckpointError):
    """A path given as a checkpoint that is none: no such file or folder, a run folder without a
    complete checkpoint, a folder that lacks a checkpoint's files. A usage error (fix the path),
    and still a [`CheckpointError`][diffit_toolkit.runs.checkpoint.CheckpointError] for code that
    catches those."""


class OutputFolderError(UsageError, RunFolderError):
    """An output folder a run may not use, refused before anything is written: the file-system
    root, the home folder, an existing file, a folder of other files. A usage error (give another
    folder), and still a ``RunFolderError`` for code that catches those."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _state_dict_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; the copies are cheap next to the file write.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _writer_alive(pid: int, host: str | None, folder: Path) -> bool:
    """Whether the process that named a temporary folder may still be writing it."""
    if host is not None and host != _HOST:
        try:
            return time.time() - folder.stat().st_mtime < FOREIGN_TMP_AGE_S
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(root: Path) -> None:
    """Remove this process's and dead writers' temporary folders; leave live writers' alone. An
    ``.old-step_N-*`` folder is removed only once ``step_N`` exists (until then it is step N)."""
    for folder in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        m = _TMP_DIR.match(folder.name)
        if m is None:
            continue
        old = _OLD_DIR.match(folder.name)
        if old is not None and not (root / f"step_{old.group(1)}").is_dir():
            continue
        pid, host = int(m.group(1)), m.group(2)
        mine = pid == os.getpid() and host in (None, _HOST)
        if mine or not _writer_alive(pid, host, folder):
            shutil.rmtree(folder, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is replaced without ever being absent
    (swapped atomically where the file system allows, else moved aside only after the new one is
    complete and removed only after the new one is in place)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):  # tmp now holds the old checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = tmp.with_name(".old-" + tmp.name[len(".tmp-"):])  # listed as step_N until removed
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder's name claims (``step_0001000`` -> 1000), else ``None``."""
    m = _STEP_DIR.match(path.name) or _OLD_DIR.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first.

    A step whose folder was moved aside while being replaced (a crash between the two renames on
    a file system without atomic exchange) is listed under its ``.old-*`` name."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        if p.is_dir() and (m := _STEP_DIR.match(p.name)):
            found[int(m.group(1))] = p
    for p in root.iterdir():
        if p.is_dir() and (m := _OLD_DIR.match(p.name)):
            found.setdefault(int(m.group(1)), p)
    return [found[k] for k in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``.

    On any error (a full disk, say, whatever safetensors or torch raise for it) the partial
    folder is removed, the previous checkpoints are untouched, and a
    [`CheckpointError`][diffit_toolkit.runs.checkpoint.CheckpointError]
    says what failed in one line. Checkpoints newer than ``step`` are never pruned.
    """
    root = confined(run_dir, Path(run_dir) / CHECKPOINT_DIR)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{_HOST}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp.mkdir()
        save_file(_state_dict_for_safetensors(model_state), str(tmp / "model.safetensors"))
        save_file(_state_dict_for_safetensors(ema_state), str(tmp / "ema.safetensors"))
        with open(tmp / "state.pt", "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / "config.json", "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True))
        sums = {}
        for name in CHECKPOINT_FILES:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            sums[name] = _sha256(tmp / name)
        with open(tmp / CHECKSUMS, "w") as f:
            f.write(json.dumps({"sha256": sums}, indent=2, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, final)
        _fsync_dir(root)
        _remove_stale_tmp(root)  # an .old-* copy of this step left by a dead writer is redundant now
    except BaseException as exc:
        why = _why(exc, root) if isinstance(exc, Exception) else ""
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: cleaned up, passed on
        previous = [p for p in list_checkpoints(run_dir) if p.name != final.name or final.is_dir()]
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {final} ({why}){kept}") from None
    older = [p for p in list_checkpoints(run_dir) if (checkpoint_step(p) or 0) < step]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> None:
    """Raise [`CheckpointError`][diffit_toolkit.runs.checkpoint.CheckpointError] unless every file
    of the checkpoint matches the SHA-256
    recorded when it was written (checkpoints written before checksums existed pass)."""
    path = Path(path)
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        return
    try:
        sums = json.loads(sums_file.read_text())["sha256"]
        if not isinstance(sums, dict):
            raise TypeError("not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {CHECKSUMS} is damaged ({_why(exc)})") from None
    for name in CHECKPOINT_FILES:
        if name not in sums:
            raise CheckpointError(f"could not read checkpoint {path}: {CHECKSUMS} has no entry for {name}")
        try:
            actual = _sha256(path / name)
        except OSError as exc:
            raise CheckpointError(f"could not read checkpoint {path}: {name} is unreadable ({_why(exc)})") from None
        if actual != sums[name]:
            raise CheckpointError(
                f"could not read checkpoint {path}: {name} does not match the SHA-256 recorded when it was "
                f"written (the file changed on disk); resume from an older checkpoint"
            )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder: ``model``, ``ema`` (state dicts), ``state`` and ``config``.

    Every file is checked against its recorded SHA-256 first; nothing is unpickled beyond
    tensors and plain values (``weights_only=True``). Any problem is a
    [`CheckpointError`][diffit_toolkit.runs.checkpoint.CheckpointError].
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    missing = [n for n in CHECKPOINT_FILES if not (path / n).is_file()]
    if missing:
        raise CheckpointPathError(f"{path} is not a complete checkpoint (missing {', '.join(missing)}): pass a step_* folder")
    verify_checkpoint(path)
    try:
        ckpt = {
            "model": load_file(str(path / "model.safetensors"), device=str(map_location)),
            "ema": load_file(str(path / "ema.safetensors"), device=str(map_location)),
            "state": torch.load(path / "state.pt", map_location=map_location, weights_only=True),
            "config": json.loads((path / "config.json").read_text()),
            "path": path,
        }
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {_why(exc)}") from None
    if not isinstance(ckpt["state"], dict):
        raise CheckpointError(f"checkpoint {path}: state.pt holds a {type(ckpt['state']).__name__}, not a training state")
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"checkpoint {path}: config.json holds a {type(ckpt['config']).__name__}, not an object")
    return ckpt


def check_train_state(state: dict[str, Any], path: Path, required: Sequence[str] = ("step",)) -> int:
    """The step of a training state read from ``path``, after checking it holds the ``required``
    keys (the trainer's layout, [`TrainState`][diffit_toolkit.train.state.TrainState]); a malformed
    state is a one-line [`CheckpointError`][diffit_toolkit.runs.checkpoint.CheckpointError]."""
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: state.pt lacks {', '.join(missing)}; it was not written by this "
                              f"trainer: resume from another checkpoint")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"checkpoint {path}: state.pt holds step {step!r}, not a step count (0..{MAX_STEP})")
    named = checkpoint_step(path)
    if named is not None and named != step:
        raise CheckpointError(f"checkpoint {path}: state.pt holds step {step} but the folder is step {named}")
    return step


def load_newest_verified(run_dir: str | Path, map_location: str | torch.device = "cpu",
                         warn=None, required: Sequence[str] = ("step",)) -> dict[str, Any] | None:
    """The newest checkpoint of ``run_dir`` that verifies and reads, or ``None`` when there is none.

    A checkpoint that fails (damaged, unreadable, a state without the ``required`` keys) is skipped with ``warn``
    naming it and why, and the next older one is tried; when every one fails the newest error
    is raised."""
    errors: list[CheckpointError] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = load_checkpoint(path, map_location)
            check_train_state(ckpt["state"], path, required)
        except CheckpointError as exc:
            errors.append(exc)
            if warn is not None:
                warn(f"skipping checkpoint {path}: {exc}")
            continue
        ckpt["skipped"] = errors
        return ckpt
    if errors:
        raise CheckpointError(f"no checkpoint of {run_dir} can be read ({len(errors)} tried); newest: {errors[0]}")
    return None


# -- the run folder ---------------------------------------------------------------------------

#: Names whose presence marks a folder as a run folder (so training may continue in it).
RUN_MARKERS = (CHECKPOINT_DIR, "recipe.yaml", "metrics.jsonl", LOCK_FILE)
#: Everything a run writes at the top of its folder; none of them may be a symbolic link.
RUN_OUTPUTS = (*RUN_MARKERS, "environment.json", "samples.png", "loss.png", "samples", "tensorboard",
               "wandb", "wandb_id.txt")


def check_run_dir(run_dir: str | Path) -> Path:
    """Refuse run folders that would scatter a run over unrelated files: the file-system root,
    the home folder (or a folder above it), an existing file, a non-empty folder that is not a
    run, a run folder in which one of the names a run writes is a symbolic link (the run would
    write through it, outside its folder). Returns the folder."""
    path = Path(run_dir).expanduser()
    resolved = path.resolve()
    home = Path.home().resolve()
    if resolved == Path(resolved.anchor) or resolved == home or resolved in home.parents:
        raise OutputFolderError(f"output folder {path} is {'the file-system root' if resolved == Path(resolved.anchor) else 'the home folder or above it'}; "
                                f"give a folder of its own, e.g. runs/<name>")
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"output folder {path} is an existing file; give a folder path")
    if path.is_dir():
        try:
            entries = {p.name for p in path.iterdir()}
        except OSError as exc:
            raise RunFolderError(f"output folder {path} cannot be read ({_why(exc)})") from None
        if entries and not entries & set(RUN_MARKERS):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputFolderError(f"output folder {path} holds other files ({shown}) and is not a run folder; "
                                    f"give an empty or new folder")
        for name in RUN_OUTPUTS:
            if name in entries:
                confined(path, path / name)
    return path


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir/.lock`` (``fcntl.flock``) for the whole run: a second training in the same
    folder stops at once with a line naming the holder's PID. The lock goes with the process
    (a killed run leaves no stale lock)."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = open_no_follow(path, os.O_RDWR | os.O_CREAT, run_dir)
    except OSError as exc:
        raise RunFolderError(f"cannot use output folder {run_dir} ({_why(exc)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            who = f"PID {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise RunFolderError(f"run folder {run_dir} is in use by another training ({who}); wait for it to "
                                 f"finish or give another --output-dir") from None
        except OSError as exc:
            raise RunFolderError(f"cannot lock run folder {run_dir} ({_why(exc)})") from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {_HOST}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
