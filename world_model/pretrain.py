"""Slot-encoder pretraining: object discovery or set-property prediction on generated CLEVR-like scenes (rendered
per batch, or from a pool kept on the device), a CLEVR v1.0 directory, or game frames of an episode dataset.

A run is fully determined by its config: training batch i is scene seed f(seed, i) (generated data) or
index draw f(seed, i) (CLEVR on disk, frames), and the model's own randomness (slot init noise, Gumbel noise)
comes from the torch RNG saved in every checkpoint, so `--resume` continues bit-exactly on the CPU.
"""
from __future__ import annotations

import functools
import itertools
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.clevr import ClevrDataset, SceneGenerator
from envs.errors import DataError, UsageError
from envs.episodes import load_frames, read_meta

from . import distributed
from .config import PretrainConfig, check_against_checkpoint, load_run_config, save_config
from .losses import hungarian_huber_loss
from .metrics import clevr_ap_table, fg_ari, setpred_accuracy
from .perception import SetPredictor, SlotAutoencoder
from .rundir import (MetricLogger, RunDir, evaluation_due, fixed_rng, mixed_seed, note_if_finished, restore_rng,
                     rng_states, start_run, stopped_evaluation)
from .slots.vq import temperature
from .visualize import decomposition_grid, upscale

TRAIN_STREAM, EVAL_STREAM, POOL_STREAM, SHARD_STREAM = 0, 1, 2, 3
EVAL_SEED = 2024  # held-out generated scenes are the same for every run, whatever its training seed
EVAL_CHUNK = 64


def stream_seed(seed: int, stream: int, index: int) -> int:
    """The seed of item `index` of a named random stream."""
    return mixed_seed(seed, stream, index)


def build_model(cfg: PretrainConfig) -> nn.Module:
    """The pretraining model of `cfg.task`: a SetPredictor (setpred) or a SlotAutoencoder (discovery)."""
    if cfg.task not in ("setpred", "discovery"):
        raise ValueError(f"task={cfg.task!r} is not one of setpred, discovery")
    if cfg.task == "setpred":
        return SetPredictor(cfg.model)
    return SlotAutoencoder(cfg.model, cfg.data.resolution)


class ScenePool:
    """A fixed set of generated scenes, rendered chunk by chunk as training reaches them and kept as uint8.

    Chunk c always comes from pool-stream seed c, so the pool's scenes do not depend on when they were rendered:
    a run that fills the pool as it trains holds the same scenes as one that rendered it whole."""

    CHUNK = 256  # scenes rendered together; changing it changes the pool

    def __init__(self, gen: SceneGenerator, size: int, seed: int):
        self.gen, self.size, self.seed = gen, size, seed
        self.filled = 0
        self.data: dict = {}  # images (n 3 h w), targets (n k d), masks (n h w), allocated at the first chunk

    def fill(self, n: int, progress: bool = False) -> None:
        """Render chunks until the pool holds its first min(n, size) scenes (whole chunks, so possibly more)."""
        from tqdm import tqdm

        starts = range(self.filled, min(n, self.size), self.CHUNK)
        if not starts:
            return
        for start in tqdm(starts, desc=f"rendering scenes {self.filled}..{min(starts[-1] + self.CHUNK, self.size)} "
                          f"of a pool of {self.size}", unit="chunk", disable=not progress, dynamic_ncols=True):
            count = min(self.CHUNK, self.size - start)
            sb = self.gen.generate(count, stream_seed(self.seed, POOL_STREAM, start // self.CHUNK))
            # uint8 as stored, so only one chunk is ever held at full precision (float images and int64 masks
            # of a 70k pool would take ~21 GiB)
            chunk = {"images": (sb.images * 255).round().to(torch.uint8), "targets": sb.targets,
                     "masks": sb.masks.to(torch.uint8)}
            if not self.data:
                self.data = {k: v.new_empty((self.size, *v.shape[1:])) for k, v in chunk.items()}
            for k, v in chunk.items():
                self.data[k][start:start + count] = v
            self.filled = start + count

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
        self.pool = ScenePool(self.gen, d.pool, cfg.train.seed) if d.pool > 0 else None
        if self.pool is not None and first_step > 0:
            self.pool.fill(self.pool.needs(first_step, cfg.train.batch_size), progress)

    def batch(self, size: int, seed: int, step: Optional[int] = None) -> dict:
        """Batch `size` from `seed`; sharded under torchrun, this rank's share of it. A pool's batch is training
        step `step`'s (uniform over the whole pool when None), the same global batch at any world size; generated
        scenes are rendered per rank (from a per-rank seed), so no rank renders the others' share."""
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


def _share(indices: np.ndarray, sharded: bool) -> np.ndarray:
    """This rank's slice of a global batch's indices when `sharded` (all of them otherwise). A batch that a small
    dataset capped at its size drops the few indices that would not split evenly over the ranks."""
    if not sharded:
        return indices
    indices = indices[:len(indices) - len(indices) % distributed.world_size()]
    lo, hi = distributed.shard_bounds(len(indices))
    return indices[lo:hi]


class ClevrScenes:
    """A CLEVR v1.0 directory; training batch i draws indices from seed f(seed, i)."""

    def __init__(self, cfg: PretrainConfig, split: str, device: torch.device, max_images: Optional[int] = None,
                 sharded: bool = False):
        d = cfg.data
        self.sharded = sharded
        check_source(cfg)
        self.dataset = ClevrDataset(d.root, split=split, resolution=(d.resolution, d.resolution), crop=d.crop,
                                    max_images=max_images, min_objects=d.min_objects, max_objects=d.max_objects)
        self.device = device
        self.num_workers = d.num_workers

    def _load(self, indices) -> dict:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, list(indices)),
                                             batch_size=len(indices), num_workers=self.num_workers)
        items = next(iter(loader))
        out = {"images": items["image"], "targets": items["target"], "masks": items.get("mask")}
        return {k: (v.to(self.device) if v is not None else None) for k, v in out.items()}

    def _indices(self, size: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return _share(rng.choice(len(self.dataset), size=min(size, len(self.dataset)), replace=False), self.sharded)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, size: int, seed: int) -> dict:
        return self._load(self._indices(size, seed))

    def batches(self, size: int, seeds: Iterator[int]) -> Iterator[dict]:
        """Training batches for a stream of seeds through ONE DataLoader (its workers live for the whole run
        and decode ahead), batch i being exactly `batch(size, seeds[i])`."""
        sampler = (self._indices(size, seed).tolist() for seed in seeds)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                             prefetch_factor=2 if self.num_workers else None)
        for items in loader:
            out = {"images": items["image"], "targets": items["target"], "masks": items.get("mask")}
            yield {k: (v.to(self.device) if v is not None else None) for k, v in out.items()}

    def sequential(self, batch_size: int) -> Iterator[dict]:
        for start in range(0, len(self.dataset), batch_size):
            yield self._load(range(start, min(start + batch_size, len(self.dataset))))


@functools.lru_cache(maxsize=2)
def _dataset_frames(root: str) -> torch.Tensor:
    return torch.from_numpy(load_frames(root)).permute(0, 3, 1, 2).contiguous()  # n 3 h w uint8


class EpisodeFrames:
    """Frames of an episode dataset (`run.py collect`): the last 10% (at most data.eval_images) are held
    out for evaluation, training batch i draws frames from seed f(seed, i); frames are resized to
    data.resolution with area averaging when their size differs."""

    def __init__(self, cfg: PretrainConfig, split: str, device: torch.device, sharded: bool = False):
        d = cfg.data
        self.sharded = sharded
        check_source(cfg)
        frames = _dataset_frames(str(Path(d.root).resolve()))
        n_eval = min(d.eval_images, len(frames) // 10)
        if n_eval < 1:  # an evaluation on no frames would report a perfect score
            raise DataError(f"{d.root} holds {len(frames)} frames: too few to hold out the last 10% for evaluation "
                            "(collect at least 10 frames)")
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


def make_source(cfg: PretrainConfig, device: torch.device, split: Optional[str] = None, max_images=None,
                sharded: bool = False, progress: bool = False, first_step: int = 0):
    """The training data; `sharded`: each batch is this rank's share of the global batch (under torchrun);
    `first_step`: where training starts (a scene pool renders what that step needs first, with a progress bar
    when `progress`)."""
    if cfg.data.source == "clevr":
        return ClevrScenes(cfg, split or cfg.data.split, device, max_images, sharded)
    if cfg.data.source == "frames":
        return EpisodeFrames(cfg, split or "train", device, sharded)
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


def compute_loss(model: nn.Module, task: str, batch: dict, beta: float) -> tuple[torch.Tensor, dict, tuple]:
    images = batch["images"]
    if task == "setpred":
        enc, pred = model(images)
        loss, _ = hungarian_huber_loss(pred, batch["targets"])
        stats = {"set_loss": loss.detach()}
        outputs = (enc, pred)
    else:
        enc, dec = model(images)
        loss = F.mse_loss(dec.recon, images.float())
        stats = {"mse": loss.detach()}
        outputs = (enc, dec)
    if enc.kl is not None:
        stats["kl"] = enc.kl.detach()
        loss = loss + beta * enc.kl
    stats["loss"] = loss.detach()
    return loss, stats, outputs


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def guarded_update(loss: torch.Tensor, params: list, opt: torch.optim.Optimizer, grad_clip: float,
                   stats: dict) -> Optional[str]:
    """Backward, clip and step unless the loss or the gradient is non-finite: such an update never reaches the
    weights (or a checkpoint). Returns None, or what was non-finite ("loss" / "gradient"). Under DDP the
    gradient (all-reduced in backward) and hence the decision are the same on every rank."""
    opt.zero_grad(set_to_none=True)
    # Under torchrun every rank must take the same branch (backward all-reduces gradients), so ask all of them.
    if not distributed.all_true(bool(torch.isfinite(loss)), loss.device):
        return "loss"
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        return "gradient"
    opt.step()
    stats["grad_norm"] = grad_norm
    return None


def preflight(cfg: PretrainConfig) -> None:
    """What pretraining would refuse only once it builds its data or reaches its first batch, refused before the run
    prints its config and starts (under torchrun, before the processes join: rank 0 reports it for all)."""
    check_source(cfg)
    distributed.check_divides(cfg.train.batch_size, "train.batch_size")


class StepMeans:
    """Per-key means of the training stats of the updates since the last log row, summed on the device (no host sync
    per step); the caller leaves a skipped update's stats out, so a row after only skipped updates holds none."""

    def __init__(self):
        self.sums: dict = {}  # key -> (sum on the device, updates that reported it)

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            total, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + v.detach().float(), n + 1)

    def pop(self) -> dict:
        means = {k: float(total) / n for k, (total, n) in self.sums.items()}
        self.sums = {}
        return means


@torch.no_grad()
def evaluate(model: nn.Module, cfg: PretrainConfig, device: torch.device, n_images: int,
             batches: Optional[Iterator[dict]] = None) -> dict:
    """AP table (set prediction) or FG-ARI + MSE (discovery) on held-out scenes, plus the mean number of
    near-empty slots per image; RNG-neutral for training."""
    batches = batches if batches is not None else eval_batches(cfg, device, n_images)
    was_training = model.training
    model.eval()
    preds, targets, aris, sq_err, pixels, count, empty = [], [], [], 0.0, 0, 0, 0.0
    with fixed_rng(EVAL_SEED, device):
        for batch in batches:
            with autocast(device, cfg.train.amp):
                enc, out = model(batch["images"])
            count += batch["images"].shape[0]
            # Slot collapse detector: slots holding < 1% of the assignment mass of their image.
            empty += (enc.attn.float().mean(-1) < 0.01).sum().item()
            if cfg.task == "setpred":
                preds.append(out.float().cpu().numpy())
                targets.append(batch["targets"].float().cpu().numpy())
            else:
                sq_err += F.mse_loss(out.recon.float(), batch["images"].float(), reduction="sum").item()
                pixels += batch["images"].numel()
                if batch.get("masks") is not None:
                    aris.append(fg_ari(batch["masks"].cpu(), out.masks.squeeze(2).argmax(1).cpu()))
    model.train(was_training)
    result: dict = {"images": count, "empty_slots": empty / max(count, 1)}
    if cfg.task == "setpred":
        preds, targets = np.concatenate(preds), np.concatenate(targets)
        result.update(clevr_ap_table(preds, targets))
        result.update(setpred_accuracy(preds, targets))
    else:
        result["mse"] = sq_err / max(pixels, 1)
        if aris:
            result["fg_ari"] = float(np.nanmean(np.concatenate(aris)) * 100)
    return result


def lr_factor(step: int, warmup: int, decay_rate: float = 1.0, decay_steps: int = 1) -> float:
    """The learning rate's factor at `step`: linear warmup over `warmup` steps, then exponential decay by `decay_rate`
    every `decay_steps` (Slot Attention's schedule; the world model warms up only)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return warm * decay_rate ** (step / decay_steps)


def log_images(logger: MetricLogger, step: int, cfg: PretrainConfig, batch: dict, outputs: tuple) -> None:
    enc, out = outputs
    images = batch["images"]
    if cfg.task == "discovery":
        grid = decomposition_grid(images, out.masks.squeeze(2), out.recon, out.rgb)
    else:
        grid = decomposition_grid(images, enc.attn_maps(images.shape[-2:]))
    logger.image(step, "slots/decomposition", upscale(grid, images.shape[-1]))


def pretrain(cfg: PretrainConfig, run_dir: str, resume: bool = False, progress: bool = True) -> dict:
    """Train (or continue) a run; returns the last evaluation (rank 0's, under torchrun).

    Under torchrun the model is wrapped in DistributedDataParallel and train.batch_size is the global batch,
    split evenly over the ranks; rank 0 evaluates, logs and writes checkpoints, which hold every rank's RNG
    state, so a run resumes at any world size (exactly when the world size is unchanged)."""
    from tqdm import tqdm

    t = cfg.train
    preflight(cfg)  # `run.py pretrain` has run it already; a caller from Python has not
    run, device = start_run(run_dir, resume, t.device, t.threads, t.seed)
    model = build_model(cfg).to(device, memory_format=torch.channels_last)  # `bench pretrain`: faster on CPU and GPU
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    step, skipped = 0, 0
    if resume:
        state = run.load_checkpoint(map_location=device, keys=("model", "optimizer", "step", "skipped", "rng"))
        check_against_checkpoint(cfg, state, run.path)
        run.restore(model, state, "model")
        opt.load_state_dict(state["optimizer"])
        step, skipped = state["step"], state["skipped"]
        restore_rng(state["rng"], t.seed, step)
        t.steps = note_if_finished(step, t.steps, "train.steps", state)
    # the data first: a bad data path fails before the run directory gets a config
    source = make_source(cfg, device, sharded=True, progress=progress and distributed.is_main(), first_step=step)
    if cfg.data.source == "clevr":  # the eval split's scenes and first image too: a bad split fails now, not at the end
        next(eval_batches(cfg, device, 1))
    if cfg.data.source == "clevr" and cfg.data.split == cfg.data.eval_split and distributed.is_main() and not resume:
        print(f"note: data.split and data.eval_split are both {cfg.data.split!r}: the run evaluates on the images it "
              "trains on; set data.eval_split to a held-out split", file=sys.stderr)
    held = len(source) if isinstance(source, (ClevrScenes, EpisodeFrames)) else None  # generated: no end
    if held is not None and held < distributed.world_size():
        raise UsageError(f"the training data holds {held} images, fewer than the {distributed.world_size()} processes")
    if held is not None and held < cfg.train.batch_size and distributed.is_main():
        split = distributed.world_size() > 1 and held % distributed.world_size()
        print(f"note: the training data holds {held} images, fewer than train.batch_size={cfg.train.batch_size}: each "
              f"batch holds all of them" + (f" but {split}, which would not split over the processes" if split else ""),
              file=sys.stderr)
    frames = {"env": getattr(source, "env", None), "split": getattr(source, "split", None)}  # env frames only
    settled = False  # a resume whose final evaluation, if the stopped run made it, still holds
    if resume:
        check_frames_resume(state.get("frames", frames), frames, cfg.data.root)
        settled = (state.get("frames", frames) == frames
                   and state.get("config", {}).get("data", {}).get("eval_images") == cfg.data.eval_images)
    save_config(cfg, run.config_path)

    parallel = distributed.wrap(model, device)
    step_model = torch.compile(parallel, mode=cfg.train.compile_mode) if cfg.train.compile else parallel
    logger = MetricLogger(run, start_step=step)
    last_eval: dict = {}

    def checkpoint() -> None:
        run.save_checkpoint({"step": step, "skipped": skipped, "model": model.state_dict(),
                             "optimizer": opt.state_dict(), "rng": rng_states(), "config": asdict(cfg),
                             "world_size": distributed.world_size(), "frames": frames})

    bar = tqdm(total=cfg.train.steps, initial=step, desc=f"pretrain {cfg.task}/{cfg.model.slots}",
               disable=not progress or not distributed.is_main(), dynamic_ncols=True)
    t_last, images = time.perf_counter(), 0  # images trained on since the last log row, over all ranks
    means = StepMeans()
    stream = train_batches(source, cfg, step)
    pool = getattr(source, "pool", None)
    if distributed.is_main() and stopped_evaluation(logger, step, cfg.train.eval_every, cfg.train.steps):
        logger.scalars(step, evaluate(model, cfg, device, cfg.data.eval_images), prefix="eval/")
    while step < cfg.train.steps:
        batch = next(stream)
        images += len(batch["images"]) * distributed.world_size()
        if not torch.isfinite(batch["images"]).all():
            raise UsageError(f"non-finite pixel values in training batch {step}: check the data source")
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)  # as the model's weights
        for group in opt.param_groups:
            group["lr"] = cfg.train.lr * lr_factor(step, cfg.train.warmup_steps, cfg.train.decay_rate,
                                                     cfg.train.decay_steps)
        vq = model.encoder.vq
        if vq is not None:
            v = cfg.model.vq
            vq.set_temperature(temperature(step, v.tau_start, v.tau_end, v.anneal_steps))
        with autocast(device, cfg.train.amp):
            loss, stats, outputs = compute_loss(step_model, cfg.task, batch, cfg.model.vq.beta)
        problem = guarded_update(loss, list(model.parameters()), opt, cfg.train.grad_clip, stats)
        if problem:
            skipped += 1
            logger.scalars(step, {"skipped_updates": skipped}, prefix="train/")
            if distributed.is_main():
                bar.write(f"step {step}: non-finite {problem}, update skipped ({skipped} so far)")
        else:
            means.add(stats)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            now = time.perf_counter()
            stats = distributed.mean_scalars(means.pop(), device)  # every rank skipped the same updates: same keys
            stats.update(lr=opt.param_groups[0]["lr"], images_per_s=images / (now - t_last))
            if vq is not None:
                stats["tau"] = float(vq.tau)
            if pool is not None:
                stats["pool_scenes"] = pool.filled
            t_last, images = now, 0
            logger.scalars(step, stats, prefix="train/")
            if "loss" in stats:  # not when every update since the last row was skipped
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                if not progress and distributed.is_main():  # a log file still shows the run moving
                    print(f"step {step}/{cfg.train.steps}: loss={stats['loss']:.4f}, "
                          f"images/s={stats['images_per_s']:.1f}", flush=True)
        if (step % cfg.train.image_every == 0 or step == cfg.train.steps) and distributed.is_main():
            log_images(logger, step, cfg, batch, outputs)  # the last step too: a short run still leaves pictures
        evaluating = evaluation_due(step, cfg.train.eval_every, cfg.train.steps)
        if step % cfg.train.ckpt_every == 0 or evaluating:  # also before each evaluation: Ctrl-C or a crash there
            checkpoint()                                    # loses no training step
            logger.flush()
        if evaluating and distributed.is_main():
            last_eval = evaluate(model, cfg, device, cfg.data.eval_images)
            logger.scalars(step, last_eval, prefix="eval/")
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()))
    if not last_eval and distributed.is_main():  # a finished run resumed, or one stopped during its final evaluation
        last_eval = logger.logged(step, "eval/") if settled else {}  # a finished run's, not run and logged twice
        if not last_eval:
            last_eval = evaluate(model, cfg, device, cfg.data.eval_images)
            logger.scalars(step, last_eval, prefix="eval/")
    bar.close()
    logger.close()
    run.release()
    return last_eval


def check_frames_resume(before: dict, now: dict, root: Optional[str]) -> None:
    """A run on env frames resumes on frames of the same game; a note when its held-out frames moved (the dataset
    grew or shrank, or data.eval_images changed), since frames evaluated on before are trained on now."""
    if before.get("env") != now.get("env"):
        raise DataError(f"this run trained on {before.get('env') or 'generated or CLEVR'} frames; data.root={root} "
                        f"holds {now.get('env') or 'none'}: a resume goes on with the same game's frames")
    if now.get("split") and before.get("split") != now.get("split") and distributed.is_main():
        (total, held), (total_was, held_was) = now["split"], before["split"]
        print(f"note: {root} now holds {total} frames, the last {held} held out (at this run's last checkpoint "
              f"{total_was}, the last {held_was}): evaluations from here on use the new split", file=sys.stderr)


def load_run(run_dir: str, device: torch.device) -> tuple[PretrainConfig, nn.Module, dict]:
    """Model and config of a pretraining run directory (for evaluation and visualization)."""
    run = RunDir(run_dir)
    cfg = load_run_config("pretrain", run_dir)
    state = run.load_checkpoint(map_location=device, keys=("model", "step"))
    check_against_checkpoint(cfg, state, run_dir)
    model = build_model(cfg).to(device)
    run.restore(model, state, "model")
    model.eval()
    return cfg, model, state
