"""Exact comparison of two runs' checkpoints and logs, for the tests that resume or repeat a run."""
import json
from pathlib import Path

import numpy as np
import torch


def assert_same_state(a, b, where: str = "checkpoint") -> None:
    """Nested checkpoint contents (dicts, lists, tensors, arrays, numbers, strings) equal bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def checkpoint(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "latest.pt", weights_only=False)


def metric_rows(run_dir: Path, after: int = -1) -> list[dict]:
    """metrics.jsonl's rows past step `after`, without the wall-clock fields (time, rates per second, and the seconds
    a process took to its first step, which a resumed run logs again)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    clock = ("time", "train/first_step_s")
    return [{k: v for k, v in r.items() if k not in clock and not k.endswith("per_s")}
            for r in rows if r["step"] > after]
