"""JSON-lines files that envs and runs append to (episode statistics, metrics)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Union

from .errors import DataError


def read_records(path: Union[str, Path], skip_damaged: bool = False) -> list[dict]:
    """One dict per line. A torn last line, what a writer killed mid-row leaves, is skipped; a bad line before it
    is an error naming the file and line, unless `skip_damaged` (a log that a resumed run rewrites): then every
    line that is not a JSON object with an integer "step" is dropped, with a warning that counts them."""
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    records, dropped = [], 0
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if skip_damaged and not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError
            records.append(record)
        except ValueError:  # json.JSONDecodeError is one
            if skip_damaged:
                dropped += i < len(lines) - 1
            elif i < len(lines) - 1:
                raise DataError(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
    if dropped:
        print(f"warning: {path}: dropped {dropped} damaged line(s)", file=sys.stderr)
    return records
