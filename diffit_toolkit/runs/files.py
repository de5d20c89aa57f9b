"""Writing files so that a run writes only inside its folder and a reader never sees half a file.

Every file the toolkit writes goes through [`atomic_output`][diffit_toolkit.runs.files.atomic_output]
(or [`write_text_atomic`][diffit_toolkit.runs.files.write_text_atomic]): the content goes to a
temporary name unique to the writer (process, host, random suffix) beside the target and is
renamed over it once complete. A rename replaces a symbolic link rather than following it, so a
link planted at the target's name is replaced, never the file it points to; two writers of one
path never share a temporary file; a crash or a full disk leaves the previous file and no
temporary one. Inside a run folder, [`confined`][diffit_toolkit.runs.files.confined] also refuses a
path whose folders are links (``checkpoints/`` or ``samples/`` pointing elsewhere), and the files
that are appended to or locked in place are opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from diffit_toolkit.errors import RunFailure

_HOST = socket.gethostname()


class RunFolderError(RunFailure, RuntimeError):
    """A run folder that cannot be used (taken by another run, not a run, a dangerous path)."""


def _link_error(link: Path, root: Path) -> RunFolderError:
    return RunFolderError(f"{link} is a symbolic link; a run writes only inside its folder {root}: remove the link "
                          f"(or copy what it points to into the folder)")


def confined(root: str | Path, path: str | Path) -> Path:
    """``path``, after checking that no existing part of it below ``root`` is a symbolic link
    (``root`` itself may be one: a run folder placed on another disk). Raises a one-line
    [`RunFolderError`][diffit_toolkit.runs.files.RunFolderError] naming the link."""
    root, path = Path(root), Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise RunFolderError(f"{path} is not inside the run folder {root}") from None
    if ".." in parts:
        raise RunFolderError(f"{path} leaves the run folder {root}")
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise _link_error(current, root)
    return path


def temporary_name(path: Path) -> Path:
    """A name beside ``path`` that no other writer uses (``.<stem>.tmp-<pid>-<host>-<random><suffix>``:
    the suffix stays, so writers that pick a format by it, or append one, keep working)."""
    tag = f".tmp-{os.getpid()}-{_HOST[:40]}-{secrets.token_hex(4)}{path.suffix}"
    return path.with_name(f".{path.stem[: max(1, 250 - len(tag))]}{tag}")  # within a file system's 255


@contextlib.contextmanager
def atomic_output(path: str | Path, root: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is synced and renamed
    over ``path``, on any error (or interrupt) it is removed and ``path`` is left as it was.

    Args:
        path: the file to write (its folder is created).
        root: the run folder it must stay inside ([`confined`][diffit_toolkit.runs.files.confined]);
            ``None`` for a path the user named.
    """
    path = Path(path)
    if root is not None:
        confined(root, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        with contextlib.suppress(OSError), open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str, root: str | Path | None = None) -> Path:
    """Write ``text`` to ``path`` through [`atomic_output`][diffit_toolkit.runs.files.atomic_output]."""
    with atomic_output(path, root) as tmp:
        tmp.write_text(text)
    return Path(path)


def open_no_follow(path: str | Path, flags: int, root: str | Path, mode: int = 0o644) -> int:
    """``os.open`` of a file inside ``root`` that is refused when it or a folder above it is a
    link (for files written in place: the append-only log, the lock)."""
    path = confined(root, path)
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(path, Path(root)) from None
        raise


def why_write_failed(exc: BaseException, folder: Path | None = None) -> str:
    """What went wrong, in a few words. safetensors and torch wrap ``ENOSPC`` in their own
    exceptions (``SafetensorError: ... os error 28``; torch's ``RuntimeError: unexpected pos``
    with the ``OSError`` as its context), so the OS reason is looked for in the chain and the
    text, and, failing that, in the free space of ``folder``."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "No space left" in text or "StorageFull" in text or "os error 28" in text or "code: 28" in text:
        return os.strerror(errno.ENOSPC)
    if "Disk quota" in text or "QuotaExceeded" in text or "os error 122" in text:
        return os.strerror(errno.EDQUOT)
    first = text.strip().splitlines()[0] if text.strip() else ""
    described = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if folder is not None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 1 << 20:
                return f"{os.strerror(errno.ENOSPC)}: {described}"
    return described
