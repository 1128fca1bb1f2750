"""Data-parallel training under `torchrun`: process-group setup, rank queries and the collectives the loops need.

`torchrun --nproc_per_node N run.py pretrain|train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` then joins
the process group (NCCL on CUDA, gloo on CPU) and pins each rank to its GPU. Without torchrun every helper
answers for a single process, so the training loops need no separate code path.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from envs.errors import UsageError


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (torchrun's RANK before the process group is joined, so start-up prints can ask)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched_size() -> int:
    """How many processes torchrun started (its WORLD_SIZE; 1 without torchrun), known before `setup`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_local_size() -> int:
    """How many of torchrun's processes run on this node (its LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def launched() -> bool:
    """Started by torchrun with more than one process (true before `setup` too, from its environment)."""
    return launched_size() > 1


def check_divides(size: int, key: str) -> None:
    """Refuse, before any work, a size given for all processes together that does not split evenly over them."""
    w = launched_size()
    if size % w:
        raise UsageError(f"{key}={size} does not divide over the {w} processes; pick a multiple of {w}")


def setup(device: str) -> Optional[int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns the local rank or None.

    device "cpu" forces gloo; otherwise NCCL when CUDA is available, each rank on GPU LOCAL_RANK."""
    if not launched():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if active():
        return local
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                               "--nproc_per_node must not exceed the GPUs per node")
        torch.cuda.set_device(local)
    # Rank 0 evaluates while the others wait in their next collective: allow longer than NCCL's 10 min default.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    global _vote_group
    _vote_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    return local


_vote_group = None  # a host-side (gloo) group for StopVote, beside the training's own (NCCL on GPUs)


def can_vote() -> bool:
    """Whether the processes can agree on a step to stop at (`StopVote`): a process group `setup` joined."""
    return active() and _vote_group is not None


class StopVote:
    """The ranks agreeing on the step a signal stops the run at (each rank gets it at another step). Each call sends
    this rank's flag, asynchronously and host-side (no device sync), and returns the largest flag any rank sent at
    the previous call: every rank calls it at the same points, so all stop at the same call, one step after the
    first saw the signal."""

    def __init__(self):
        self._pending: Optional[tuple] = None  # the previous call's (work, tensor)

    def __call__(self, flag: int) -> int:
        agreed = 0
        if self._pending is not None:
            work, t = self._pending
            work.wait()
            agreed = int(t.item())
        self._pending = None
        if not agreed:
            t = torch.tensor([flag], dtype=torch.int64)
            self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_vote_group, async_op=True), t)
        return agreed

    def settle(self) -> None:
        """Wait for the last call's vote (every rank sent it), so none is left in flight."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process left (it failed or was stopped), not by its own fault:
    a lost connection (torch's DistNetworkError, gloo's plain RuntimeError naming the peer, NCCL's remote exit). A
    connection of this process's own that a peer reset (a crashed env worker's pipe) is its own failure."""
    text = str(error)
    return isinstance(error, getattr(dist, "DistNetworkError", ())) or (
        isinstance(error, RuntimeError) and (("gloo" in text and "by peer" in text) or "remote process exited" in text))


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` holds on every rank (a collective: all ranks must call it)."""
    if not active():
        return bool(flag)
    t = torch.tensor([0 if flag else 1], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank (a single process gets `[obj]`)."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gathered(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the same shape on each) concatenated along dim 0, in rank order, on every rank (a
    collective; a single process gets `t`). No gradient flows through it."""
    if not active():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def check_shared_folder(path: Path) -> bool:
    """Under torchrun: refuse a run directory that not every process sees (a folder local to each of several nodes),
    before any of them reads a checkpoint or writes a replay shard there. Rank 0 leaves a token file in it (making it
    if need be) and every process looks for that file (collectives: all ranks must call it). Returns whether this
    process made the folder (`RunDir.created`: a run that leaves it empty removes it); a refusal removes it."""
    if not active():
        return False
    path = Path(path)
    token = path / gather_objects(f".shared-{uuid.uuid4().hex}" if is_main() else None)[0]
    made = is_main() and not path.exists()
    try:
        if is_main():
            path.mkdir(parents=True, exist_ok=True)
            token.touch()
        barrier()
        seen = gather_objects(token.exists())
        barrier()
        if is_main():
            token.unlink(missing_ok=True)
        blind = [r for r, s in enumerate(seen) if not s]
        if blind:
            raise UsageError(f"the run directory {path} is not one folder for all processes: rank"
                             f"{'s' * (len(blind) > 1)} {', '.join(map(str, blind))} cannot see the file rank 0 wrote "
                             "there (a folder local to each node?); under torchrun on several nodes, --run-dir must be "
                             "on a file system every node shares")
    except BaseException:  # not writable, or refused: no folder left behind (only if empty)
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return made


def mean_(t: torch.Tensor) -> torch.Tensor:
    """`t` replaced in place by its mean over ranks (a collective); returned for chaining."""
    if active():
        dist.all_reduce(t)
        t /= world_size()
    return t


def mean_scalars(values: dict, device: torch.device) -> dict:
    """Float scalars averaged over ranks (for logging what every rank measured); same keys on all ranks."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world_size()).tolist()))


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module` under torchrun, else `module` itself."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # No buffer broadcast before each forward (the ranks' weights already start equal); newer torch renames the flag.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=ids, **no_sync)


def shard_bounds(size: int, what: str = "global batch size") -> tuple[int, int]:
    """This rank's [lo, hi) share of `size` items counted over all ranks (sizes must divide evenly; `what`
    names the size in the error)."""
    w, r = world_size(), rank()
    if size % w:
        raise UsageError(f"{what}={size} does not divide over {w} processes; pick a multiple of {w}")
    per = size // w
    return r * per, (r + 1) * per
