"""Slot-encoder pretraining: object discovery or set-property prediction on generated CLEVR-like scenes (rendered
per batch, or from a pool kept on the device), a CLEVR v1.0 directory, or game frames of an episode dataset.

A run is fully determined by its config: training batch i is scene seed f(seed, i) (generated data) or
index draw f(seed, i) (CLEVR on disk, frames), and the model's own randomness (slot init noise, Gumbel noise)
comes from the torch RNG saved in every checkpoint, so `--resume` continues bit-exactly on the CPU.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.clevr import check_layout
from envs.clevr_layout import ATTRIBUTE_SLICES, ATTRIBUTES
from envs.episodes import check_recorded_root, read_meta
from envs.errors import DataError, UsageError

from . import distributed
from .config import ConfigError, PretrainConfig, check_against_checkpoint, load_run_config, slot_module
from .losses import hungarian_huber_loss
from .metrics import clevr_ap_table, fg_ari, setpred_accuracy
from .perception import SetPredictor, SlotAutoencoder
from .rundir import (MetricLogger, RunDir, claimed_run, evaluation_due, fixed_rng, process_age, resolve_device,
                     resumed_length, restore_rng, rng_states, shown, stopped_evaluation, this_ranks)
from .slots.vq import temperature
from .sources import (EVAL_CHUNK, EVAL_SEED, ClevrScenes, EpisodeFrames, check_source, eval_batches, make_source,
                      train_batches, use_clevr_root)
from .stopping import StepStops
from .updates import Diverged, SkipStreak, StepMeans, autocast, guarded_update, lr_factor, tally_update
from .visualize import annotated, decomposition_picture

def build_model(cfg: PretrainConfig) -> nn.Module:
    """The pretraining model of `cfg.task`: a SetPredictor (setpred) or a SlotAutoencoder (discovery)."""
    if cfg.task not in ("setpred", "discovery"):
        raise ValueError(f"task={cfg.task!r} is not one of setpred, discovery")
    if cfg.task == "setpred":
        return SetPredictor(cfg.model)
    return SlotAutoencoder(cfg.model, cfg.data.resolution)


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


def preflight(cfg: PretrainConfig) -> list[str]:
    """What pretraining would refuse only once it builds its data or reaches its first batch, refused before the run
    prints its config and starts (under torchrun, before the processes join: rank 0 reports it for all); returns
    notes on what it allows but a user likely did not mean."""
    check_source(cfg)
    if cfg.data.source == "clevr":  # the root, then both splits' folders and scenes files
        if not Path(cfg.data.root).is_dir():
            check_layout(Path(cfg.data.root), cfg.data.split)
        for key, split in (("data.split", cfg.data.split), ("data.eval_split", cfg.data.eval_split)):
            try:
                check_layout(Path(cfg.data.root), split)
            except DataError as e:
                raise DataError(f"{key}={split}: {e}") from None
    distributed.check_divides(cfg.train.batch_size, "train.batch_size")
    if cfg.task == "setpred" and cfg.model.num_slots < cfg.data.max_objects:  # else refused at the first such scene
        raise ConfigError(f"model.num_slots={cfg.model.num_slots} is fewer than data.max_objects="
                          f"{cfg.data.max_objects}: set prediction gives each object a slot of its own; set "
                          "model.num_slots >= data.max_objects, or lower data.max_objects")
    if cfg.task == "discovery" and cfg.data.source != "frames" and cfg.model.num_slots <= cfg.data.max_objects:
        return [f"note: model.num_slots={cfg.model.num_slots} holds at most {cfg.model.num_slots - 1} objects beside "
                f"the background, and scenes have up to data.max_objects={cfg.data.max_objects}: objects will share "
                "slots, which lowers FG-ARI (the paper's CLEVR6: 7 slots, 6 objects)"]
    return []


@torch.no_grad()
def evaluate(model: nn.Module, cfg: PretrainConfig, device: torch.device, n_images: int,
             batches: Optional[Iterator[dict]] = None, progress: bool = False, picture: bool = False) -> dict:
    """AP table (set prediction) or FG-ARI + MSE (discovery) on held-out scenes, plus the mean number of
    near-empty slots per image; RNG-neutral for training. `progress`: a bar over the images; `picture`: also
    "_picture", the decomposition of the first PICTURE_IMAGES of them (`held_out_picture`)."""
    from tqdm import tqdm

    batches = batches if batches is not None else eval_batches(cfg, device, n_images)
    was_training = model.training
    model.eval()
    preds, targets, aris, sq_err, pixels, count, empty, shown_first = [], [], [], 0.0, 0, 0, 0.0, None
    bar = tqdm(total=n_images, desc="evaluating", unit="image", disable=not progress, leave=False)
    with fixed_rng(EVAL_SEED, device), bar:
        for batch in batches:
            with autocast(device, cfg.train.amp):
                enc, out = model(batch["images"])
            count += batch["images"].shape[0]
            bar.update(batch["images"].shape[0])
            if picture and shown_first is None:
                shown_first = held_out_picture(cfg.task, batch["images"][:PICTURE_IMAGES], enc, out)
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
        if not np.isfinite(preds).all():  # the metric would refuse them: say why
            raise Diverged(f"the model's set predictions are not finite: its weights diverged; lower train.lr (now "
                           f"{cfg.train.lr:g}) and train again")
        result.update(clevr_ap_table(preds, targets))
        result.update(setpred_accuracy(preds, targets))
    else:
        result["mse"] = sq_err / max(pixels, 1)
        if aris:
            result["fg_ari"] = float(np.nanmean(np.concatenate(aris)) * 100)
    if picture:
        result["_picture"] = shown_first
    return result


PICTURE_IMAGES = 4  # held-out images in each evaluation's `slots/held_out` picture


def held_out_picture(task: str, images: torch.Tensor, enc, out) -> torch.Tensor:
    """`slots/held_out`: held-out images' decompositions (`decomposition_picture`); for set prediction each slot's
    cell also says what it predicts for that image: its confidence, colour and shape."""
    n = images.shape[0]
    if task == "discovery":
        return decomposition_picture(images, out.masks[:n].squeeze(2), out.recon[:n], out.rgb[:n])
    picture = decomposition_picture(images, enc.attn_maps(images.shape[-2:])[:n], max_images=n)
    rows = out[:n].float().cpu()  # n k 19
    said = [[None, None] + [f"{float(row[-1]):.2f} {_argmax_name(row, 'color')} {_argmax_name(row, 'shape')}"
                            for row in slots] for slots in rows]
    return annotated(picture, said, images.shape[-1])


def _argmax_name(row: torch.Tensor, attribute: str) -> str:
    return ATTRIBUTES[attribute][int(row[ATTRIBUTE_SLICES[attribute]].argmax())]


def log_images(logger: MetricLogger, step: int, cfg: PretrainConfig, batch: dict, outputs: tuple) -> None:
    enc, out = outputs
    images = batch["images"]
    if cfg.task == "discovery":
        picture = decomposition_picture(images, out.masks.squeeze(2), out.recon, out.rgb)
    else:
        picture = decomposition_picture(images, enc.attn_maps(images.shape[-2:]))
    logger.image(step, "slots/decomposition", picture)


def _open_data(cfg: PretrainConfig, device: torch.device, resume: bool, progress: bool, step: int):
    """The training data, a CLEVR eval split's held-out scenes (read once for every evaluation; None for the other
    sources) and what a checkpoint records of env frames, checked, with notes on what they hold (rank 0, new runs)."""
    source = make_source(cfg, device, sharded=True, progress=progress and distributed.is_main(), first_step=step)
    held_out = None  # a CLEVR eval split's scenes, read once for every evaluation
    if cfg.data.source == "clevr":  # the eval split's scenes and first image too: a bad split fails now, not at the end
        try:
            held_out = ClevrScenes(cfg, cfg.data.eval_split, device, max_images=cfg.data.eval_images)
            first_held_out = next(held_out.sequential(1))
        except DataError as e:
            raise DataError(f"the evaluation split (data.eval_split={cfg.data.eval_split}): {e}") from None
        if len(held_out) < cfg.data.eval_images and distributed.is_main() and not resume:
            print(f"note: split {cfg.data.eval_split} of {cfg.data.root} holds {len(held_out)} "
                  f"scene{'s' * (len(held_out) != 1)} of "
                  f"{cfg.data.min_objects}-{cfg.data.max_objects} objects, fewer than data.eval_images="
                  f"{cfg.data.eval_images}: the evaluations score those", file=sys.stderr)
        if cfg.task == "discovery" and first_held_out.get("masks") is None and distributed.is_main() and not resume:
            print(f"note: {cfg.data.root} holds no instance masks for split {cfg.data.eval_split} (real CLEVR ships "
                  "none; `run.py generate` writes them): the evaluations score the reconstruction (mse), not FG-ARI",
                  file=sys.stderr)
    if cfg.data.source == "clevr" and cfg.data.split == cfg.data.eval_split and distributed.is_main() and not resume:
        print(f"note: data.split and data.eval_split are both {cfg.data.split!r}: the run evaluates on the images it "
              "trains on; set data.eval_split to a held-out split", file=sys.stderr)
    if cfg.data.source == "frames" and cfg.data.crop and distributed.is_main() and not resume:
        print("note: data.crop=true cuts CLEVR's object-discovery window; game frames are used whole (a CLEVR preset's "
              "setting)", file=sys.stderr)
    held = (len(source) if isinstance(source, (ClevrScenes, EpisodeFrames))
            else source.pool.size if source.pool is not None else None)  # generated scenes without a pool: no end
    if held is not None and held < distributed.world_size():
        raise UsageError(f"the training data holds {held} images, fewer than the {distributed.world_size()} processes")
    if held is not None and held < cfg.train.batch_size and distributed.is_main():
        split = distributed.world_size() > 1 and held % distributed.world_size()
        print(f"note: the training data holds {held} images, fewer than train.batch_size={cfg.train.batch_size}: each "
              f"batch holds all of them" + (f" but {split}, which would not split over the processes" if split else ""),
              file=sys.stderr)
    frames = {"env": getattr(source, "env", None), "split": getattr(source, "split", None),  # env frames only
              "held_out_by": getattr(source, "held_out_by", None)}
    in_data, out_held = frames["split"] or (1, 0)  # held out by whole episodes: a few long ones hold out more
    if out_held > 2 * cfg.data.eval_fraction * in_data and not resume and distributed.is_main():
        print(f"note: the held-out episodes of {cfg.data.root} hold {out_held} of its {in_data} frames ({out_held / in_data:.0%}, "
              f"data.eval_fraction={cfg.data.eval_fraction}): collect more episodes to train on more of them",
              file=sys.stderr)
    return source, held_out, frames


def pretrain(cfg: PretrainConfig, run_dir: str, resume: bool = False, progress: bool = True) -> dict:
    """Train (or continue) a run; returns the last evaluation (rank 0's, under torchrun).

    Under torchrun the model is wrapped in DistributedDataParallel and train.batch_size is the global batch,
    split evenly over the ranks; rank 0 evaluates, logs and writes checkpoints, which hold every rank's RNG
    state, so a run resumes at any world size (exactly when the world size is unchanged)."""
    t = cfg.train
    preflight(cfg)  # `run.py pretrain` has run it already; a caller from Python has not
    with claimed_run(run_dir, resume, t.device, t.threads, t.seed) as (run, device, cleanup):
        return _pretrain(cfg, run, device, resume, progress, cleanup)


def _pretrain(cfg: PretrainConfig, run: RunDir, device: torch.device, resume: bool, progress: bool,
              cleanup: contextlib.ExitStack) -> dict:
    """The body of `pretrain`, in a run directory it has claimed; `cleanup` closes what it opens."""
    from tqdm import tqdm

    t = cfg.train
    model = build_model(cfg).to(device, memory_format=torch.channels_last)  # `bench pretrain`: faster on CPU and GPU
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    step, skipped = 0, 0
    means = StepMeans()  # the updates since the last log row
    if resume:
        state = run.load_checkpoint(map_location=device, keys=("model", "optimizer", "step", "skipped", "rng"))
        check_against_checkpoint(cfg, state, run.path)
        run.restore(model, state, "model")
        run.restore_optimizer(opt.load_state_dict, state, "optimizer")
        step, skipped = state["step"], state["skipped"]
        restore_rng(state["rng"], t.seed, step)
        means.load_state_dict(this_ranks(state.get("log_means"), {}))
        t.steps = resumed_length(step, t.steps, "train.steps", state)
        was = state.get("world_size", 1)
        if was != distributed.world_size() and distributed.is_main():
            rendered = cfg.data.source == "generated" and not cfg.data.pool  # per rank, from its own seed
            print(f"note: the run stopped with {was} process{'es' * (was > 1)} and goes on with "
                  f"{distributed.world_size()}: each step takes train.batch_size images, split among them"
                  + (" (generated scenes, rendered by each process from its own seed: other scenes than one process "
                     "would render)" if rendered else ", the same images at any world size"), file=sys.stderr)
    # the data first: a bad data path fails before the run directory gets a config
    source, held_out, frames = _open_data(cfg, device, resume, progress, step)
    settings = {"frames": frames, "eval_images": cfg.data.eval_images}  # what the evaluations depend on
    checkpointed = None
    if resume:
        check_frames_resume(state.get("frames", frames), frames, cfg.data.root)
        checkpointed = {"frames": state.get("frames", frames),
                        "eval_images": state.get("config", {}).get("data", {}).get("eval_images")}
    run.stage_config(cfg, resume)  # a resume's: with its first checkpoint

    parallel = distributed.wrap(model, device)
    step_model = torch.compile(parallel, mode=cfg.train.compile_mode) if cfg.train.compile else parallel
    logger = MetricLogger(run, start_step=step, config=cfg)
    cleanup.callback(logger.close)
    last_eval: dict = {}

    def checkpoint(evaluated: bool = False) -> None:
        """`evaluated`: the checkpoint an evaluation follows, kept as step_<step>.pt with train.keep_checkpoints."""
        run.save_checkpoint({"step": step, "skipped": skipped, "model": model.state_dict(),
                             "optimizer": opt.state_dict(), "rng": rng_states(), "config": asdict(cfg),
                             "world_size": distributed.world_size(), "frames": frames,
                             "log_means": distributed.gather_objects(means.state_dict())},
                            keep_step=step if evaluated and cfg.train.keep_checkpoints else None)
        logger.flush()

    bar = tqdm(total=cfg.train.steps, initial=step, desc=f"pretrain {cfg.task}/{slot_module(cfg.model)}",
               disable=not progress or not distributed.is_main(), dynamic_ncols=True)
    cleanup.callback(bar.close)
    t_last, images = time.perf_counter(), 0  # images trained on since the last log row, over all ranks
    stream = train_batches(source, cfg, step)
    cleanup.callback(stream.close)  # its DataLoader's workers, which ignore SIGTERM, shut down on an error too
    pool = getattr(source, "pool", None)

    def evaluated() -> dict:
        """Evaluate on held-out images: the scores and picture logged, and said in a line."""
        with shown(bar, "evaluating on held-out images", f"step {step}"):
            result = evaluate(model, cfg, device, cfg.data.eval_images, progress=not bar.disable, picture=True,
                              batches=held_out.sequential(EVAL_CHUNK) if held_out is not None else None)
        logger.image(step, "slots/held_out", result.pop("_picture"))
        logger.evaluation(step, result, settings)
        bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
        return result

    if distributed.is_main() and stopped_evaluation(logger, step, cfg.train.eval_every, cfg.train.steps):
        evaluated()  # the one a stopped run did not finish
    # Ctrl-C / SIGTERM: stop after a step, with a checkpoint (under torchrun: the step the processes agree on)
    streak = SkipStreak("pretraining", f"train.lr (now {cfg.train.lr:g})")
    started, unlogged = step, {}  # this process starts at `step`; its first step's time waits for a log row
    params = list(model.parameters())
    with StepStops() as stops:
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
            problem = guarded_update(loss, params, opt, cfg.train.grad_clip, stats)
            skipped = tally_update(problem, stats, means, skipped, step + 1, logger, bar)
            streak(problem, step + 1)
            step += 1
            bar.update(1)
            if step == started + 1:  # this process's first step, done on the device: the time to get here
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                unlogged["first_step_s"] = process_age()
                if distributed.is_main():
                    bar.write(f"first step done {unlogged['first_step_s']:.1f} s after the process started")
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                stats = distributed.mean_scalars(means.pop(), device)  # every rank skipped the same updates: same keys
                stats.update(lr=opt.param_groups[0]["lr"], images_per_s=images / (now - t_last))
                stats.update(unlogged)  # in this process's first row only
                unlogged.clear()
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
            due = step % cfg.train.ckpt_every == 0 or evaluating  # also before each evaluation: Ctrl-C or a crash
            if due:                                                # there loses no training step
                checkpoint(evaluated=evaluating)
            stops.poll(checkpoint, saved=due)
            if evaluating and distributed.is_main():
                with stops.at_once():
                    last_eval = evaluated()
    if not last_eval and distributed.is_main():  # a finished run resumed, or one stopped during its final evaluation
        last_eval = logger.final_evaluation(step, settings, checkpointed)  # not run and logged twice
        if not last_eval:
            last_eval = evaluated()
    run.write_config()  # a finished run resumed writes no checkpoint: its evaluation's settings
    return last_eval


def check_frames_resume(before: dict, now: dict, root: Optional[str]) -> None:
    """A run on env frames resumes on frames of the same game; a note when its held-out frames moved (`split_note`)."""
    if before.get("env") != now.get("env"):
        raise DataError(f"this run trained on {before.get('env') or 'generated or CLEVR'} frames; data.root={root} "
                        f"holds {now.get('env') or 'none'}: a resume goes on with the same game's frames")
    note = split_note(before, now, root)
    if note and distributed.is_main():
        print(f"note: {note}: evaluations from here on use the new split", file=sys.stderr)


def split_note(before: Optional[dict], now: dict, root: Optional[str]) -> Optional[str]:
    """What moved a frames run's held-out frames since its checkpoint (`frames` records: "split" [frames in the
    dataset, the last ones held out], "held_out_by"), or None: the dataset changed, or (a run from before whole
    episodes were held out) the rule; frames evaluated on before are trained on now, or the other way round."""
    if not before or not before.get("split") or not now.get("split") or list(before["split"]) == list(now["split"]):
        return None
    (total, held), (total_was, held_was) = now["split"], before["split"]
    if total == total_was and before.get("held_out_by") != now.get("held_out_by"):
        return (f"the last {held} frames of {root} are held out, whole episodes holding data.eval_fraction of them (this "
                f"run, from before that rule, held out its last {held_was} frames)")
    return (f"{root} now holds {total} frames, the last {held} held out (at this run's last checkpoint {total_was}, the "
            f"last {held_was})")


def evaluate_run(run_dir: str, data: Optional[str] = None, clevr_root: Optional[str] = None,
                 split: Optional[str] = None, images: Optional[int] = None, device: str = "auto",
                 progress: bool = False, step: Optional[int] = None) -> dict:
    """`run.py eval-ap`: a pretraining run's last checkpoint evaluated on `images` held-out images (default: its
    data.eval_images) of its own data, or of episodes `data` (a frames run), or of the CLEVR v1.0 root `clevr_root`
    (e.g. moved since training) at `split` (default: its data.eval_split). The scores, with what was evaluated on
    ("data", "source", "split"), the run's step, task, slots and vq; notes on what it could not score go to stderr.
    `progress`: a bar over the images; `step`: the checkpoint kept at that evaluation instead of the last one. AP,
    accuracies and FG-ARI are in percent (`world_model.metrics` returns fractions)."""
    if images is not None and images < 1:
        raise UsageError(f"images={images}: evaluate at least one image (None: the run's data.eval_images)")
    torch_device = resolve_device(device)
    cfg, model, state = load_run(run_dir, torch_device, step)
    if data:
        if clevr_root or split:
            raise UsageError(f"--data and {'--clevr-root' if clevr_root else '--split'} name two datasets to "
                             "evaluate on: pass one (--split picks a split of a CLEVR root)")
        if cfg.data.source != "frames":
            raise UsageError(f"--data is for a run pretrained on game frames (`run.py pretrain --data DIR`); "
                             f"{run_dir} trained on data.source={cfg.data.source}: for CLEVR scenes on disk pass "
                             "--clevr-root DIR")
        trained, given = (state.get("frames") or {}).get("env"), read_meta(data)["env"]
        if trained and given != trained:
            raise DataError(f"{data} holds {given} episodes; {run_dir} was trained on {trained} frames")
        cfg.data.root = data
    elif cfg.data.source == "frames" and not clevr_root:
        check_recorded_root(cfg.data.root, run_dir, "pass --data DIR")
    if split and not clevr_root and cfg.data.source != "clevr":
        raise UsageError(f"--split picks a split of a CLEVR v1.0 root and {run_dir} trained on "
                         f"data.source={cfg.data.source}: pass --clevr-root DIR too")
    if clevr_root or cfg.data.source == "clevr":
        use_clevr_root(cfg, clevr_root, run_dir, split)
    if split:
        cfg.data.eval_split = split
    n = images or cfg.data.eval_images
    result = evaluate(model, cfg, torch_device, n, batches=eval_batches(cfg, torch_device, n), progress=progress)
    source = {"generated": "held-out generated scenes, the same seeded stream for every run",
              "clevr": f"CLEVR {cfg.data.root} split {cfg.data.eval_split}, scenes of {cfg.data.min_objects}-"
                       f"{cfg.data.max_objects} objects",
              "frames": f"held-out frames of {cfg.data.root}"}.get(cfg.data.source, cfg.data.source)
    result.update(step=state["step"], data=source, source=cfg.data.source, task=cfg.task, slots=cfg.model.slots,
                  vq=cfg.model.vq.enabled, split=cfg.data.eval_split if cfg.data.source == "clevr" else None)
    if cfg.task == "discovery" and "fg_ari" not in result:
        why = ("game frames come without them" if cfg.data.source == "frames" else
               "real CLEVR ships none; `run.py generate` writes them under masks/")
        print(f"note: no FG-ARI: {result['data']} hold no instance masks ({why}), so only the reconstruction is "
              "scored", file=sys.stderr)
    if cfg.data.source == "frames" and not data:  # the run's own dataset: its held-out frames as it recorded them?
        held = EpisodeFrames(cfg, "eval", torch_device)
        note = split_note(state.get("frames"), {"split": held.split, "held_out_by": held.held_out_by}, cfg.data.root)
        if note:
            print(f"note: {note}: evaluated on the new split", file=sys.stderr)
    if result["images"] < n:
        asked = "--images" if images else "data.eval_images"
        print(f"note: {result['data']} hold {result['images']} images, fewer than the {n} asked for ({asked}): "
              "evaluated on those", file=sys.stderr)
    return result


def load_run(run_dir: str, device: torch.device | str, step: Optional[int] = None,
             made_by: str = "") -> tuple[PretrainConfig, nn.Module, dict]:
    """Model and config of a pretraining run directory (for evaluation and visualization): its latest checkpoint, or
    the one kept at evaluation step `step` (train.keep_checkpoints). `made_by`: the commands whose runs the caller
    takes, as a missing run's error names them. `device`: a torch.device or auto, cpu, cuda, cuda:N."""
    device = resolve_device(str(device), "device")  # "auto", or CUDA on a machine without it: said as such
    run = RunDir(run_dir, step)
    cfg = load_run_config("pretrain", run_dir, made_by=made_by)
    state = run.load_checkpoint(map_location=device, keys=("model", "step"))
    check_against_checkpoint(cfg, state, run_dir, evaluating=True)
    model = build_model(cfg).to(device)
    run.restore(model, state, "model")
    model.eval()
    return cfg, model, state
