"""JSON-lines files that envs and runs append to (episode statistics, metrics)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from .clevr import DataError


def read_records(path: Union[str, Path]) -> list[dict]:
    """One dict per line. A torn last line, what a writer killed mid-row leaves, is skipped; a bad line before it
    is an error naming the file and line."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DataError(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
    return records
