"""Atomic file writes (temporary file, fsync, rename), and the check that an output folder can be made, torch-free so
that episode datasets and run directories share one implementation."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import UsageError


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(file)` into a temporary file beside `path`, synced, then renamed over it: readers see the old
    file or the new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, widened to what a plain open would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_folder(path: str | Path, what: str, error: type[Exception] = UsageError) -> Path:
    """`path` as a folder to write into (made later, with its parents): refused before any work, naming `what` (the
    flag or key), where it or a folder above it is an existing file or a symbolic link to nothing, or where the
    nearest existing folder cannot be written (a read-only file system, no permission)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            where = "is" if p == path else f"is inside {p}, which is"
            raise error(f"{what} {path} {where} a symbolic link to {os.readlink(p)}, which does not exist (or a link "
                        "loop): create its target or choose another path")
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"is inside {p}, which is a file"
                raise error(f"{what} {path} {where}: choose a folder path")
            try:  # a file made and removed: the kernel's answer, which permission bits alone do not give
                tempfile.TemporaryFile(dir=p).close()
            except OSError as e:
                where = "is" if p == path else f"would be made in {p}, which is"
                raise error(f"{what} {path} {where} not writable ({e.strerror}): choose another path") from None
            break
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
