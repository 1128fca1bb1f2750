"""Pretraining's data sources: generated CLEVR-like scenes (rendered per batch, or a pool kept on the device), a
CLEVR v1.0 directory, or the frames of an episode dataset; their training batches (batch i from a seed f(seed, i),
so a run is reproducible and resumes exactly) and held-out batches (the same for every run)."""
from __future__ import annotations

import contextlib
import functools
import itertools
import signal
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from envs.clevr import ClevrDataset, SceneGenerator
from envs.clevr_layout import MAX_OBJECTS, PROPERTY_DIM
from envs.errors import DataError, UsageError
from envs.episodes import (check_recorded_root, episode_paths, held_out_episodes, load_frames, more_episodes_command,
                           read_meta)

from . import distributed
from .config import PretrainConfig
from .rundir import mixed_seed

TRAIN_STREAM, EVAL_STREAM, POOL_STREAM, SHARD_STREAM = 0, 1, 2, 3
EVAL_SEED = 2024  # held-out generated scenes and evaluation slot noise are the same for every run, whatever its seed
EVAL_CHUNK = 64


def stream_seed(seed: int, stream: int, index: int) -> int:
    """The seed of item `index` of a named random stream."""
    return mixed_seed(seed, stream, index)


class ScenePool:
    """A fixed set of generated scenes, rendered chunk by chunk as training reaches them and kept as uint8.

    Chunk c always comes from pool-stream seed c, so the pool's scenes do not depend on when or where they were
    rendered: a run that fills the pool as it trains holds the same scenes as one that rendered it whole. `sharded`
    under torchrun: the pool fills in rounds of a chunk per rank (ahead of what a step needs by up to world size - 1
    chunks), each rank renders its chunk and the ranks exchange them, so the pool costs each rank 1 / world size of
    its rendering (collectives: every rank fills at the same steps)."""

    CHUNK = 256  # scenes rendered together; changing it changes the pool

    def __init__(self, gen: SceneGenerator, size: int, seed: int, sharded: bool = False):
        self.gen, self.size, self.seed = gen, size, seed
        self.share = sharded and distributed.world_size() > 1
        self.filled = 0
        self.data: dict = {}  # images (n 3 h w), targets (n k d), masks (n h w), allocated at the first chunk

    def _empty(self, n: int) -> dict:
        """Storage for n scenes: uint8 images and masks as stored, so only one chunk is ever held at full precision
        (float images and int64 masks of a 70k pool would take ~21 GiB)."""
        h, w = self.gen.resolution
        return {"images": torch.zeros(n, 3, h, w, dtype=torch.uint8, device=self.gen.device),
                "targets": torch.zeros(n, MAX_OBJECTS, PROPERTY_DIM, device=self.gen.device),
                "masks": torch.zeros(n, h, w, dtype=torch.uint8, device=self.gen.device)}

    def _render(self, start: Optional[int]) -> dict:
        """The chunk that begins at scene `start`, padded to CHUNK scenes (all padding for None)."""
        chunk = self._empty(self.CHUNK)
        if start is not None:
            count = min(self.CHUNK, self.size - start)
            sb = self.gen.generate(count, stream_seed(self.seed, POOL_STREAM, start // self.CHUNK))
            chunk["images"][:count] = (sb.images * 255).round()
            chunk["targets"][:count] = sb.targets
            chunk["masks"][:count] = sb.masks
        return chunk

    def fill(self, n: int, progress: bool = False) -> None:
        """Render chunks until the pool holds its first min(n, size) scenes (whole chunks, so possibly more)."""
        from tqdm import tqdm

        ranks, me = (distributed.world_size(), distributed.rank()) if self.share else (1, 0)
        if n > self.filled:  # whole rounds, a chunk for every rank: a step usually needs only one more chunk
            n = max(n, self.filled + ranks * self.CHUNK)
        starts = range(self.filled, min(n, self.size), self.CHUNK)
        if not starts:
            return
        if not self.data:
            self.data = self._empty(self.size)
        rounds = range(0, len(starts), ranks)  # round i: chunk starts[i + r] from rank r
        for first in tqdm(rounds, desc=f"rendering scenes {self.filled}..{min(starts[-1] + self.CHUNK, self.size)} "
                          f"of a pool of {self.size}", unit="round" if self.share else "chunk", disable=not progress,
                          dynamic_ncols=True):
            group = starts[first:first + ranks]
            chunk = self._render(group[me] if me < len(group) else None)
            if self.share:
                chunk = {k: distributed.gathered(v) for k, v in chunk.items()}  # the ranks' chunks, in rank order
            for i, start in enumerate(group):
                count = min(self.CHUNK, self.size - start)
                for k, v in chunk.items():
                    self.data[k][start:start + count] = v[i * self.CHUNK:i * self.CHUNK + count]
            self.filled = group[-1] + min(self.CHUNK, self.size - group[-1])

    def needs(self, step: int, size: int) -> int:
        """How many of the pool's first scenes training step `step` (batches of `size`) reads."""
        return min(self.size, (step + 1) * size)

    def batch(self, size: int, seed: int, step: Optional[int], sharded: bool) -> dict:
        """Training step `step`'s batch (this rank's share when sharded). While the pool fills, scenes
        step*size .. (step+1)*size - 1 in order, so each is seen once, as fresh scenes would be; once it is full
        (or for step None), `size` distinct scenes drawn uniformly from `seed`."""
        if step is not None and (step + 1) * size <= self.size:
            self.fill(self.needs(step, size))
            idx = np.arange(step * size, (step + 1) * size)
        else:
            self.fill(self.size)
            idx = np.random.default_rng(seed).choice(self.size, size=min(size, self.size), replace=False)
        idx = torch.from_numpy(_share(idx, sharded)).to(self.data["images"].device)
        return {"images": self.data["images"][idx].float() / 255, "targets": self.data["targets"][idx],
                "masks": self.data["masks"][idx].long()}


class GeneratedScenes:
    """Procedural CLEVR-like scenes rendered on the training device, batch i from seed f(seed, i).

    With `data.pool=N`, training uses a fixed pool of N scenes (pool stream of `train.seed`), like a finite
    dataset. The pool is rendered as training reaches it: the first N / batch steps train on its scenes in order,
    each once (as with fresh scenes), and later steps draw their batches uniformly from the full pool. So the first
    step waits for one chunk of scenes, not for the whole pool, and a step's batch depends only on its index (a
    resumed run first renders what its first step needs).
    """

    def __init__(self, cfg: PretrainConfig, device: torch.device, sharded: bool = False, progress: bool = False,
                 first_step: int = 0):
        d = cfg.data
        self.sharded = sharded
        self.gen = SceneGenerator(resolution=(d.resolution, d.resolution), min_objects=d.min_objects,
                                  max_objects=d.max_objects, crop=d.crop, supersample=d.supersample, device=device)
        self.pool = ScenePool(self.gen, d.pool, cfg.train.seed, sharded) if d.pool > 0 else None
        if self.pool is not None and first_step > 0:
            self.pool.fill(self.pool.needs(first_step, cfg.train.batch_size), progress)

    def batch(self, size: int, seed: int, step: Optional[int] = None) -> dict:
        """Batch `size` from `seed`; sharded under torchrun, this rank's share of it. A pool's batch is training
        step `step`'s (uniform over the whole pool when None), the same global batch at any world size, the pool's
        rendering split among the ranks; generated scenes are rendered per rank (from a per-rank seed), so no rank
        renders the others' share."""
        if self.pool is not None:
            return self.pool.batch(size, seed, step, self.sharded)
        if self.sharded and distributed.world_size() > 1:
            lo, hi = distributed.shard_bounds(size)
            size, seed = hi - lo, stream_seed(seed, SHARD_STREAM, distributed.rank())
        sb = self.gen.generate(size, seed=seed)
        return {"images": sb.images, "targets": sb.targets, "masks": sb.masks}


def check_source(cfg: PretrainConfig) -> None:
    """Refuse a data source the config cannot feed: a CLEVR or frames source without its root, frames for set
    prediction."""
    d = cfg.data
    if d.source == "clevr" and not d.root:
        raise UsageError("data.source=clevr needs data.root=DIR pointing at a CLEVR v1.0 root (`eval-ap` takes it as "
                         "--clevr-root DIR)")
    if d.source == "frames" and not d.root:
        raise UsageError("data.source=frames needs data.root=DIR (or --data DIR) made by `run.py collect`")
    if d.source == "frames" and cfg.task != "discovery":
        raise UsageError("env frames have no object labels: pretrain on them with task=discovery")
    if d.source == "frames":  # an episode dataset of 2 or more episodes, or a one-line error before the config prints
        read_meta(d.root)
        if len(episode_paths(d.root)) < 2:  # (none: its own error) an evaluation on no frames would score perfectly
            raise DataError(f"{d.root} holds 1 episode: pretraining needs at least 2, the last ones held out for "
                            f"evaluation; collect more into it with {more_episodes_command(d.root)}")


def _share(indices: np.ndarray, sharded: bool) -> np.ndarray:
    """This rank's slice of a global batch's indices when `sharded` (all of them otherwise). A batch that a small
    dataset capped at its size drops the few indices that would not split evenly over the ranks."""
    if not sharded:
        return indices
    indices = indices[:len(indices) - len(indices) % distributed.world_size()]
    lo, hi = distributed.shard_bounds(len(indices))
    return indices[lo:hi]


def _leave_signals_to_the_run(worker_id: int) -> None:
    """A DataLoader worker ignores Ctrl-C and SIGTERM, which the terminal or a scheduler sends to every process of
    the run: the run stops after its step (`world_model.stopping`) and its workers with it, rather than a worker
    dying under a batch first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def _worker_errors() -> Iterator[None]:
    """A DataError raised in a DataLoader worker (a damaged or wrong-size image) as the one line it is without
    workers: torch raises it again in the run with the worker's traceback in its message."""
    try:
        yield
    except BaseException as e:  # Ctrl-C too
        # Torch's re-raise holds the exception in a frame of its traceback, a cycle that would keep the loader's
        # workers alive to the interpreter's exit, whose SIGTERM they ignore (`_leave_signals_to_the_run`): that
        # exit would wait on them forever. Cleared, the loader goes now and takes its workers with it.
        traceback.clear_frames(e.__traceback__)
        text, said = str(e), "DataError: "
        if isinstance(e, DataError) and text.startswith("Caught DataError in DataLoader worker") and said in text:
            raise DataError(text[text.rindex(said) + len(said):].strip()) from None
        raise


class ClevrScenes:
    """A CLEVR v1.0 directory; training batch i draws indices from seed f(seed, i). Its DataLoaders draw their seeds
    from a generator of their own: from torch's global one, each new loader would shift the slots' initial noise, so a
    resumed run (which makes loaders an uninterrupted one does not) or an evaluation would depend on how it was fed."""

    def __init__(self, cfg: PretrainConfig, split: str, device: torch.device, max_images: Optional[int] = None,
                 sharded: bool = False):
        d = cfg.data
        self.sharded = sharded
        check_source(cfg)
        self.dataset = ClevrDataset(d.root, split=split, resolution=(d.resolution, d.resolution), crop=d.crop,
                                    max_images=max_images, min_objects=d.min_objects, max_objects=d.max_objects)
        if cfg.task == "setpred" and not self.dataset.named:
            raise DataError(f"{d.root} was converted from CLEVR with masks (`run.py convert-clevr-masks`), whose "
                            "attributes are codes of undocumented meaning: set prediction needs a CLEVR v1.0 root; "
                            "this one is for object discovery (task=discovery)")
        self.device = device
        self.num_workers = d.num_workers

    def _stream(self, batch_sampler: Iterable[list[int]]) -> Iterator[dict]:
        """The batches of the index lists `batch_sampler` gives, on the device, through ONE DataLoader (its workers
        live for the whole stream and decode ahead)."""
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                                             worker_init_fn=_leave_signals_to_the_run,
                                             prefetch_factor=2 if self.num_workers else None,
                                             generator=torch.Generator())
        with _worker_errors():
            for items in loader:
                out = {"images": items["image"], "targets": items["target"], "masks": items.get("mask")}
                yield {k: (v.to(self.device) if v is not None else None) for k, v in out.items()}

    def _indices(self, size: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return _share(rng.choice(len(self.dataset), size=min(size, len(self.dataset)), replace=False), self.sharded)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, size: int, seed: int) -> dict:
        with contextlib.closing(self._stream([self._indices(size, seed).tolist()])) as stream:
            return next(stream)

    def batches(self, size: int, seeds: Iterator[int]) -> Iterator[dict]:
        """Training batches for a stream of seeds, batch i being exactly `batch(size, seeds[i])`."""
        return self._stream(self._indices(size, seed).tolist() for seed in seeds)

    def sequential(self, batch_size: int) -> Iterator[dict]:
        n = len(self.dataset)
        return self._stream(list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size))


@functools.lru_cache(maxsize=2)
def _dataset_frames(root: str) -> tuple[torch.Tensor, list[int]]:
    """A dataset's frames `n 3 h w` uint8, and the frame count of each episode, in order."""
    frames, lengths = load_frames(root)
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), lengths


class EpisodeFrames:
    """Frames of an episode dataset (`run.py collect`): the last episodes (data.eval_fraction of the frames, split as
    `run.py train-wm` splits the dataset) are held out for evaluation, which reads at most data.eval_images of them;
    training batch i draws frames from seed f(seed, i); frames are resized to data.resolution when their size differs
    (`mode="area"`: averaging when they shrink, nearest-pixel copies when they grow)."""

    held_out_by = "episodes"  # recorded in checkpoints: runs from before whole episodes were held out lack it

    def __init__(self, cfg: PretrainConfig, split: str, device: torch.device, sharded: bool = False):
        d = cfg.data
        self.sharded = sharded
        check_source(cfg)
        frames, lengths = _dataset_frames(str(Path(d.root).resolve()))
        n_eval = sum(lengths[len(lengths) - held_out_episodes(lengths, d.eval_fraction):])
        self.frames = frames[len(frames) - n_eval:] if split == "eval" else frames[:len(frames) - n_eval]
        self.env = read_meta(d.root)["env"]
        self.split = [len(frames), n_eval]  # frames in the dataset, the last ones held out
        self.resolution, self.device = d.resolution, device

    def _load(self, indices) -> dict:
        images = self.frames[torch.as_tensor(indices)].to(self.device).float() / 255
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="area")
        return {"images": images}

    def batch(self, size: int, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        return self._load(_share(rng.choice(len(self.frames), size=min(size, len(self.frames)), replace=False),
                                 self.sharded))

    def __len__(self) -> int:
        return len(self.frames)

    def sequential(self, batch_size: int, max_images: Optional[int] = None) -> Iterator[dict]:
        n = len(self.frames) if max_images is None else min(max_images, len(self.frames))
        for start in range(0, n, batch_size):
            yield self._load(range(start, min(start + batch_size, n)))


def use_clevr_root(cfg: PretrainConfig, clevr_root: Optional[str], run_dir: str, split: Optional[str] = None) -> None:
    """Point a pretraining run's evaluation data at `clevr_root`, a CLEVR v1.0 directory (split `split`, else the run's
    data.eval_split when it trained on CLEVR on disk, else val); without one, check that a run trained on CLEVR on
    disk still finds its data, and name the way on if it moved."""
    if clevr_root:
        cfg.data.eval_split = split or (cfg.data.eval_split if cfg.data.source == "clevr" else "val")
        cfg.data.source, cfg.data.root = "clevr", clevr_root
    elif cfg.data.source == "clevr":
        whose = "" if split else ", the run's data.eval_split,"
        check_recorded_root(cfg.data.root, run_dir, f"pass --clevr-root DIR (its split {split or cfg.data.eval_split}"
                            f"{whose} is read there)")


def make_source(cfg: PretrainConfig, device: torch.device, sharded: bool = False, progress: bool = False,
                first_step: int = 0):
    """The training data; `sharded`: each batch is this rank's share of the global batch (under torchrun);
    `first_step`: where training starts (a scene pool renders what that step needs first, with a progress bar
    when `progress`)."""
    if cfg.data.source == "clevr":
        return ClevrScenes(cfg, cfg.data.split, device, sharded=sharded)
    if cfg.data.source == "frames":
        return EpisodeFrames(cfg, "train", device, sharded)
    return GeneratedScenes(cfg, device, sharded, progress, first_step)


def train_batches(source, cfg: PretrainConfig, first_step: int) -> Iterator[dict]:
    """Training batches i = first_step, first_step + 1, ...: batch i from seed f(train.seed, i) (a scene pool's
    batch i from its step index while it fills)."""
    size = cfg.train.batch_size
    seeds = (stream_seed(cfg.train.seed, TRAIN_STREAM, i) for i in itertools.count(first_step))
    if isinstance(source, ClevrScenes):
        yield from source.batches(size, seeds)
    elif isinstance(source, GeneratedScenes):
        for step, seed in enumerate(seeds, first_step):
            yield source.batch(size, seed, step)
    else:
        for seed in seeds:
            yield source.batch(size, seed)


def eval_batches(cfg: PretrainConfig, device: torch.device, n_images: int) -> Iterator[dict]:
    """Held-out data in fixed chunks of EVAL_CHUNK images: generated scenes from the eval stream, the CLEVR eval
    split, or an episode dataset's held-out frames. Fixed chunks, so an evaluation's slot-initialization noise,
    and hence its result, is the same however it is called, and the first N images are the same for every N."""
    if cfg.data.source == "clevr":
        yield from ClevrScenes(cfg, cfg.data.eval_split, device, max_images=n_images).sequential(EVAL_CHUNK)
        return
    if cfg.data.source == "frames":
        yield from EpisodeFrames(cfg, "eval", device).sequential(EVAL_CHUNK, n_images)
        return
    source = GeneratedScenes(replace(cfg, data=replace(cfg.data, pool=0)), device)
    for i, start in enumerate(range(0, n_images, EVAL_CHUNK)):
        batch = source.batch(EVAL_CHUNK, stream_seed(EVAL_SEED, EVAL_STREAM, i))
        yield {k: v[:n_images - start] for k, v in batch.items()}
