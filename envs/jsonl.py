"""JSON-lines files that envs and runs append to (episode statistics, metrics)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional, Union

from .atomic import atomic_write
from .errors import DataError


def read_records(path: Union[str, Path], valid: Optional[Callable[[dict], bool]] = None) -> list[dict]:
    """One dict per line. A torn last line, what a writer killed mid-row leaves, is skipped; a bad line before it
    is an error naming the file and line, unless `valid` is given (a log that a resumed run rewrites): then every
    line that is not a JSON object passing `valid` is dropped, with a warning that counts them."""
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    records, dropped = [], 0
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if valid is not None and not (isinstance(record, dict) and valid(record)):
                raise ValueError
            records.append(record)
        except ValueError:  # json.JSONDecodeError is one
            if valid is not None:
                dropped += i < len(lines) - 1
            elif i < len(lines) - 1:
                raise DataError(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
    if dropped:
        print(f"warning: {path}: dropped {dropped} damaged line(s)", file=sys.stderr)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    """Replace a JSON-lines file by `records`, atomically."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def blank_damaged(path: Path) -> None:
    """Overwrite, in place and byte for byte, each line of a JSON-lines file that is not a JSON object (a hand edit, a
    disk that filled, a torn last line) with spaces, with a warning: a resumed run that goes on appending to and
    reading the file is not stopped by them at its first read, readers skip blank lines, and the byte offsets a
    checkpoint recorded into the file stay valid."""
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    damaged, offset = [], 0
    for line in lines:
        if line.strip() and not _is_object(line):
            damaged.append((offset, len(line)))
        offset += len(line) + 1
    if damaged:
        with open(path, "r+b") as f:
            for start, length in damaged:
                f.seek(start)
                f.write(b" " * length)
        print(f"warning: {path}: dropped {len(damaged)} damaged line(s)", file=sys.stderr)


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # also a UnicodeDecodeError
        return False
