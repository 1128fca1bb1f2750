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


class JsonlTail:
    """A JSON-lines file that writers append to, read as it grows: each `records()` parses only the lines completed
    since the last call (a torn last line waits for its end), so a long run's log is not reread at every row. A
    file that shrank (rewritten) is read again from its start; a bad line before the end is an error, as in
    `read_records`."""

    def __init__(self, path: Union[str, Path]):
        self.path, self._offset, self._lines, self._records = Path(path), 0, 0, []

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return self._records
        if self.path.stat().st_size < self._offset:
            self._offset, self._lines, self._records = 0, 0, []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        lines = complete.decode(errors="replace").splitlines()
        new = []  # kept only once every new line parsed, so a call after an error starts where this one did
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    new.append(json.loads(line))
                except ValueError:
                    raise DataError(f"{self.path}: line {self._lines + i + 1} is not JSON; the file is damaged") \
                        from None
        self._records += new
        self._offset, self._lines = self._offset + len(complete), self._lines + len(lines)
        return self._records


def write_records(path: Path, records: list[dict]) -> None:
    """Replace a JSON-lines file by `records`, atomically."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def is_episode(record: dict) -> bool:
    """A record of an env's episode statistics (stats.jsonl): Crafter's and NetHack's both give the episode's length."""
    return "length" in record


def count_records(path: Path, valid: Callable[[dict], bool]) -> int:
    """The lines of a JSON-lines file that are JSON objects passing `valid` (0 when there is no file)."""
    if not path.is_file():
        return 0
    return sum(_record(line, valid) for line in path.read_bytes().split(b"\n"))


def keep_records(path: Path, count: Optional[int], valid: Callable[[dict], bool]) -> None:
    """Cut a JSON-lines file that workers append to back to its first `count` valid records (what a checkpoint
    counted; None: all of them), so that a resumed run counts each record once; the lines among the kept ones that
    are not valid records (a hand edit, a disk that filled, a torn line) are blanked in place, with a warning, so
    that they do not stop the run where it reads the file (readers skip blank lines)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    kept, offset, cut, damaged = 0, 0, len(data), []
    for line in data.split(b"\n"):
        if count is not None and kept == count:
            cut = offset
            break
        if _record(line, valid):
            kept += 1
        elif line.strip():
            damaged.append((offset, len(line)))
        offset += len(line) + 1
    with open(path, "r+b") as f:
        for start, length in damaged:
            f.seek(start)
            f.write(b" " * length)
        f.truncate(min(cut, len(data)))
        if 0 < cut <= len(data) and data[cut - 1:cut] != b"\n":  # the last kept record's line, ended
            f.seek(cut)
            f.write(b"\n")
    if damaged:
        print(f"warning: {path}: dropped {len(damaged)} damaged line(s)", file=sys.stderr)


def _record(line: bytes, valid: Callable[[dict], bool]) -> bool:
    """Whether a line is a JSON object passing `valid`."""
    try:
        record = json.loads(line)
    except ValueError:  # also a UnicodeDecodeError
        return False
    return isinstance(record, dict) and valid(record)
