"""Atomic file writes (temporary file, fsync, rename), and the checks that an output folder can be made and is not
another kind of output, torch-free so that episode datasets, CLEVR roots and run directories share one
implementation."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

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


FOLDER_KINDS = {"dataset": "an episode dataset (meta.json, episodes/)", "run": "a run directory",
                "clevr": "a CLEVR root (images/, scenes/)"}  # `folder_kind`'s answers, as messages name them


def folder_kind(path: Path) -> Optional[str]:
    """What an existing folder holds that an output of another kind must not be mixed into (its files replaced or
    taken for its own): "dataset", "run" or "clevr" (FOLDER_KINDS), from the marks each leaves; else None."""
    if (path / "meta.json").is_file():
        return "dataset"
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file() or (path / "train.pid").is_file():
        return "run"
    if (path / "images").is_dir() and (path / "scenes").is_dir():
        return "clevr"
    return None


def check_clevr_out(path: str | Path) -> Path:
    """`check_folder` for a CLEVR root to write (`generate`, `convert-clevr-masks`): also refused where it is an
    episode dataset or a run directory."""
    root = check_folder(path, "--out")
    kind = folder_kind(root)
    if kind in ("dataset", "run"):
        raise UsageError(f"--out {root} is {FOLDER_KINDS[kind]}, not a CLEVR root; choose another --out")
    return root


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
