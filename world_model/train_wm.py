"""`run.py train-wm` / `eval-wm`: train the slot-token world model on collected episodes, and evaluate
its open-loop predictions against a copy-the-last-frame baseline.

Training batch i is drawn with seed f(seed, i) from a replay buffer of the dataset's training episodes,
so `--resume` continues exactly; the last episodes (data.eval_fraction of the steps) are held out.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from agent.replay import ReplayBuffer
from envs import ENV_DEFAULTS, STATUS_NAMES
from envs.atomic import atomic_write
from envs.errors import DataError, UsageError
from envs.episodes import (STEP_KEYS, check_recorded_root, episode_length, episode_paths, held_out_episodes,
                           load_episode, more_episodes_command, read_meta)

from . import distributed
from .config import (DERIVED, ConfigError, WMDataConfig, WMEncoderConfig, WMEvalConfig, WMTrainConfig,
                     WorldModelConfig, check_against_checkpoint, continued_anneal, encoder_run_config, load_run_config,
                     schema_command)
from .dynamics import DynamicsConfig
from .frame_tokenizer import FrameTokenizerConfig, frame_token_size, status_vars
from .pretrain import load_run
from .sources import TRAIN_STREAM, stream_seed
from .stopping import StepStops
from .updates import SkipStreak, StepMeans, autocast, guarded_update, lr_factor, tally_update
from .perception import SlotAutoencoder
from .rundir import (MetricLogger, RunDir, check_out_dir, claimed_run, evaluation_due, fixed_rng, resumed_length,
                     resolve_device, rng_state, set_rng_state, shown, step_suffix, stopped_evaluation)
from .visualize import prediction_grid, save_png
from .wm import Encoded, WorldModel, frames_to_input

SEGMENT_SEED = 2025  # every evaluation draws the same held-out segments, with the same sampling noise
SEGMENT_CHUNK = 32  # held-out segments evaluated at once


def dataset_meta(cfg: WorldModelConfig) -> dict:
    """The meta.json of the config's episode dataset, or a one-line error: no data.root, no dataset there, or one
    without an action count."""
    root = cfg.data.root
    if not root:
        raise UsageError("train-wm needs data.root=DIR (or --data DIR): an episode dataset from `run.py collect`")
    meta = read_meta(root)
    if not isinstance(meta.get("num_actions"), int) or meta["num_actions"] < 1:
        raise DataError(f"{root}/meta.json gives no action count (num_actions): collect the dataset again with "
                        "`run.py collect`")
    return meta


def split_dataset(cfg: WorldModelConfig, seed: int = 0, all_held_out: bool = False, training: bool = True
                  ) -> tuple[ReplayBuffer, ReplayBuffer, dict]:
    """Replay buffers of the training and held-out episodes of an episode dataset, and its meta (plus `held_out`:
    the held-out episodes' file names, `status_vars`: the status tokens beside each frame, or 0, and `left_out`:
    the training steps beyond `data.capacity`, the oldest, which are not loaded). `all_held_out`: every episode
    is held out (a world model that never trained on the dataset, an agent's), none trains. `training`: a run's
    eval.* settings may change (not in `eval-wm`, which evaluates as the run trained)."""
    root, meta = cfg.data.root, dataset_meta(cfg)
    paths = episode_paths(root)
    lengths = [episode_length(p) for p in paths]
    n_eval = len(paths) if all_held_out else held_out_episodes(lengths, cfg.data.eval_fraction)
    n_train = len(paths) - n_eval
    start, kept = n_train, 0  # the newest training episodes that fill data.capacity (the oldest of them in part)
    while start > 0 and kept < cfg.data.capacity:
        start -= 1
        kept += lengths[start]
    first = load_episode(paths[0])
    spec = episode_spec(first)
    keys = (*spec, *STEP_KEYS)
    train = ReplayBuffer(cfg.data.capacity, spec, seed=seed)
    held_out = ReplayBuffer(max(sum(lengths[n_train:]), 1), spec, seed=seed)
    for i, path in enumerate(paths[start:], start):
        ep = first if i == 0 else load_episode(path)
        if ep["image"].shape[1:] != first["image"].shape[1:]:
            raise DataError(f"{path} holds frames of shape {ep['image'].shape[1:]}, {paths[0].name} of "
                            f"{first['image'].shape[1:]}: a dataset's frames must have one size")
        missing = [k for k in keys if k not in ep]
        extra = sorted(set(ep) - set(first))
        if missing or extra:
            raise DataError(f"{path} {'lacks ' + ', '.join(missing) if missing else 'holds ' + ', '.join(extra)}, "
                            f"unlike {paths[0].name}: a dataset's episodes must come from one env")
        ep = {k: ep[k] for k in keys}
        actions, rewards = np.asarray(ep["action"]), np.asarray(ep["reward"])
        in_range = not actions.size or 0 <= actions.min() <= actions.max() < meta["num_actions"]
        if actions.dtype.kind not in "iu" or not in_range:
            raise DataError(f"{path} holds actions outside the env's {meta['num_actions']} (meta.json num_actions): "
                            "an episode of another env, or a damaged file")
        if rewards.dtype.kind not in "fiu" or not np.isfinite(rewards).all():
            raise DataError(f"{path} holds non-finite rewards: every update would be skipped; remove the episode")
        try:
            (held_out if i >= n_train else train).add_episode(ep)
        except ValueError as e:  # wrong dtypes or lengths, as ReplayBuffer checks them
            raise DataError(f"{path} is not an episode in the layout `run.py collect` writes: {e}") from None
    if n_eval == 0:
        raise DataError(f"{root} holds {len(paths)} episode(s): a world model needs at least 2, the last ones held out "
                        f"for evaluation; collect more into it with {more_episodes_command(root)}")
    # training segments are padded past episode ends, but need one target
    if not all_held_out and train.longest_episode() < 2:
        raise DataError(f"{root}: the training episodes are single steps; a world model learns from two or more")
    length, keys = cfg.eval.context + max(cfg.eval.horizons), "eval.context + max(eval.horizons)"
    if held_out.longest_episode() < length:  # evaluation windows are whole
        which = "the episodes" if all_held_out else f"the held-out (the last {n_eval}) episodes"
        fix = "or lower eval.context" if training else "(this run evaluates with the context and horizons it has)"
        raise DataError(f"{root}: {which} are at most {held_out.longest_episode()} steps long, shorter than the "
                        f"{length} steps of {keys}; collect longer episodes {fix}")
    return train, held_out, {**meta, "held_out": [p.name for p in paths[n_train:]], "status_vars": status_vars(spec),
                             "left_out": sum(lengths[:n_train]) - min(kept, cfg.data.capacity)}


def episode_spec(episode: dict) -> dict:
    """What a world model reads of a dataset's episodes, as {key: (shape, dtype)}: the frames, and the env's status
    tokens beside each frame (NetHack) when they were collected."""
    spec = {"image": (episode["image"].shape[1:], np.uint8)}
    if "status" in episode:
        spec["status"] = (episode["status"].shape[1:], np.uint8)
    return spec


def check_trained_positions(last: int, what: str, seq_key: str, seq_len: int, fix: str) -> None:
    """Refuse a prediction from time position `last` or earlier that reaches past the positions training segments of
    `seq_len` steps teach the dynamics: 0..seq_len-2 (a segment's last step predicts nothing, so its time embedding
    learns nothing, nor does any later one)."""
    if last > seq_len - 2:
        raise UsageError(f"{what} predicts from time positions up to {last}; {seq_key}={seq_len} segments train the "
                         f"dynamics at positions 0..{seq_len - 2} only (a segment's last step predicts nothing): {fix}")


def fit_eval_window(context: int, horizons: Sequence[int], seq_len: int) -> tuple[int, list[int]]:
    """An open-loop evaluation's context and horizons fitted into the time positions a dynamics trained on
    `seq_len`-step segments has learned: the context at most half a segment, the horizons at most what is left."""
    context = min(context, seq_len // 2)
    return context, sorted({min(h, seq_len - context) for h in horizons})


def check_max_steps(dyn: DynamicsConfig, longest: tuple[int, str]) -> None:
    """Refuse a dynamics too short for `longest` (steps, and the keys that set them)."""
    if dyn.max_steps < longest[0]:
        raise UsageError(f"dynamics.max_steps={dyn.max_steps} is shorter than the longest sequence it must hold "
                         f"({longest[0]} steps: {longest[1]})")


def check_encoder(enc: WMEncoderConfig, pre=None) -> None:
    """The world model predicts slot codes: its encoder must be a VQ discovery encoder, `encoder.checkpoint`'s (as its
    config.yaml says, where it is still there: a resumed run's may have moved) or the config's own fresh one. Called
    before a run prints its config; `pre`: the checkpoint's config where the caller has read it already (the model's
    build)."""
    if enc.checkpoint:
        if pre is None and not (Path(enc.checkpoint) / "config.yaml").is_file():
            return
        pre = pre or encoder_run_config(enc.checkpoint)
        if pre.task != "discovery":
            raise UsageError(f"encoder.checkpoint={enc.checkpoint} is a {pre.task} run; the world model needs a "
                             "discovery run (run.py pretrain --data DIR model.vq.enabled=true)")
        if not pre.model.vq.enabled:
            raise UsageError(f"the world model needs a VQ slot encoder; encoder.checkpoint={enc.checkpoint} was "
                             "pretrained without one: pretrain with model.vq.enabled=true")
    elif not enc.model.vq.enabled:
        raise UsageError("the world model needs a VQ slot encoder: encoder.model.vq.enabled=false would give it none")


def check_typed_mode(enc: WMEncoderConfig, overrides: Sequence[str]) -> None:
    """encoder.mode=frozen typed on the command line with nothing to freeze (no encoder.checkpoint) is refused: the
    fresh encoder would train jointly, as a preset's frozen default gives without one."""
    from omegaconf import OmegaConf

    typed = [o for o in overrides if o.split("=", 1)[0] == "encoder.mode"]
    if typed and not enc.checkpoint and OmegaConf.from_dotlist(typed[-1:]).encoder.mode == "frozen":
        raise UsageError("encoder.mode=frozen needs encoder.checkpoint=RUN, a pretrained encoder to freeze; without "
                         "one the fresh encoder trains jointly with the world model")


def build_world_model(enc: WMEncoderConfig, frame: FrameTokenizerConfig, dyn: DynamicsConfig, num_actions: int,
                      device: torch.device, longest: tuple[int, str], status_vars: int = 0,
                      restoring: Optional[str | Path] = None, env: Optional[str] = None) -> WorldModel:
    """Encoder from a pretrained run (or fresh), frame tokenizer and dynamics sized to match. The configs given are
    left as they are; the returned model's `encoder_cfg` is the completed encoder config (a pretrained run's model,
    joint: its VQ anneal continued, `continued_anneal`; a fresh encoder's mode joint) and its `dynamics.cfg` the
    completed dynamics config. `longest`: the longest sequence (in steps) the dynamics must hold,
    and the keys that set it; `status_vars`: the env's status tokens beside each frame (0: none), appended to the frame
    codes unless frame.status=false. `restoring`: the run directory whose checkpoint the weights come from; its
    config.yaml then gives a pretrained encoder's model (encoder.checkpoint is not read: it may have moved). `env`: the
    game the run trains on (a note when the encoder learned another's)."""
    enc = copy.deepcopy(enc)
    if enc.checkpoint and restoring:  # the run recorded the pretrained encoder's model; its weights follow
        saved = load_run_config(schema_command(Path(restoring) / "config.yaml"), restoring).encoder
        enc.model, enc.resolution = saved.model, saved.resolution
        autoencoder, joint = SlotAutoencoder(enc.model, enc.resolution), enc.mode == "joint"
    elif enc.checkpoint:
        try:
            pre_cfg, autoencoder, pre_state = load_run(enc.checkpoint, device)
        except ConfigError as e:  # the key may come from a preset: name it (as `encoder_run_config` does)
            raise ConfigError(f"encoder.checkpoint={enc.checkpoint}: {e}") from None
        check_encoder(enc, pre_cfg)
        learned_on = (pre_state.get("frames") or {}).get("env")
        if env and learned_on and learned_on != env and distributed.is_main():
            print(f"note: encoder.checkpoint={enc.checkpoint} was pretrained on {learned_on} frames; this run is on "
                  f"{env}: its slots may not fit {env}'s objects", file=sys.stderr)
        # the checkpoint's encoder replaces the config's (a preset's sizes for a fresh encoder; `run.py` refuses typed
        # ones and prints the config with the checkpoint's)
        enc.model, enc.resolution, joint = pre_cfg.model, pre_cfg.data.resolution, enc.mode == "joint"
        if joint:  # its VQ temperature anneals on from where pretraining left it
            enc.model = continued_anneal(enc.model, pre_state["step"])
    else:  # a fresh encoder can only train with the world model: `enc` (and the run's config.yaml) says joint
        check_encoder(enc)
        autoencoder, joint, enc.mode = SlotAutoencoder(enc.model, enc.resolution), True, "joint"
    status, frame_vars, frame_codes = frame_token_size(frame, status_vars)
    derived = dict(num_slots=enc.model.num_slots, num_vars=enc.model.vq.num_vars, num_codes=enc.model.vq.num_codes,
                   frame_vars=frame_vars, frame_codes=frame_codes, num_actions=num_actions)
    # A preset's value for one of them, unless the default or what the run sets (`run.py config` prints that), would
    # be replaced without a word (an override is refused when the config loads).
    default = DynamicsConfig()
    conflicts = [f"dynamics.{k}={getattr(dyn, k)} (the run sets {v}, from {DERIVED['dynamics.' + k]})"
                 for k, v in derived.items() if getattr(dyn, k) not in (getattr(default, k), v)]
    if conflicts and not restoring:
        raise UsageError(f"the config sets {'; '.join(conflicts)}: remove {'them' if conflicts[1:] else 'it'} (from "
                         "Python: a config filled in for another env, as a loaded run's is; build from a fresh one, "
                         "e.g. copy.deepcopy(cfg) before filling it)")
    dyn = replace(dyn, **derived)
    check_max_steps(dyn, longest)
    wm = WorldModel(autoencoder, enc.resolution, frame, dyn, joint, enc.carry_grad, status).to(device)
    wm.encoder_cfg = enc
    return wm


def longest_sequence(cfg: WorldModelConfig) -> tuple[int, str]:
    """The longest sequence the dynamics must hold, and the key that sets it: a training segment (an evaluation
    window fits in one, `check_eval_window`)."""
    return cfg.data.seq_len, "data.seq_len"


def check_eval_window(cfg: WorldModelConfig) -> None:
    """Open-loop evaluation predicts at the time positions training teaches the dynamics, never past them."""
    c = cfg.eval
    window = c.context + max(c.horizons)
    context, horizons = fit_eval_window(c.context, c.horizons, cfg.data.seq_len)
    fitted = (f"eval.horizons=[{','.join(map(str, horizons))}]" if context == c.context else
              f"eval.context={context} eval.horizons=[{','.join(map(str, horizons))}]")
    check_trained_positions(window - 2, f"eval.context + max(eval.horizons) = {c.context} + {max(c.horizons)}",
                            "data.seq_len", cfg.data.seq_len,
                            f"evaluate within them ({fitted}; a resume may change eval.*), or train on longer "
                            f"segments (a new run with data.seq_len={window})")


def preflight(cfg: WorldModelConfig) -> None:
    """What `train-wm` would refuse only once it reads its data or builds the model, refused before the run prints
    and starts."""
    check_eval_window(cfg)
    check_max_steps(cfg.dynamics, longest_sequence(cfg))
    check_encoder(cfg.encoder)
    dataset_meta(cfg)


def build_wm_for(cfg: WorldModelConfig, num_actions: int, device: torch.device, status_vars: int = 0,
                 restoring: Optional[str | Path] = None, env: Optional[str] = None) -> WorldModel:
    """`build_world_model` for a train-wm config (which then records the completed encoder and dynamics configs)."""
    wm = build_world_model(cfg.encoder, cfg.frame, cfg.dynamics, num_actions, device, longest_sequence(cfg),
                           status_vars, restoring, env)
    record_built(cfg, wm)
    return wm


def record_built(cfg, wm: WorldModel) -> None:
    """Into a run's config (train-wm's or an agent's), what building `wm` completed: the encoder config (a pretrained
    run's model) and the dynamics config (the derived sizes), as its config.yaml records them."""
    cfg.encoder, cfg.dynamics = wm.encoder_cfg, wm.dynamics.cfg


def to_batch(sample: dict, resolution: int, device: torch.device) -> dict:
    """Replay segments (numpy `b t ...`) -> model inputs on `device`."""
    out = {k: torch.as_tensor(v, device=device) for k, v in sample.items() if k != "image"}
    out["images"] = frames_to_input(torch.as_tensor(sample["image"], device=device), resolution)
    return out


OPEN_LOOP_COLUMNS = ("code_acc", "code_acc_copy", "frame_mse", "frame_mse_copy_decoded", "frame_mse_copy",
                     "frame_mse_decoder_floor", "reward_mae", "reward_mae_zero", "status_acc", "status_acc_copy")
def open_loop_legend(status: bool) -> str:
    """What `open_loop_table`'s columns mean (the status tokens' only where the env has them)."""
    return textwrap.fill(
        "code_acc: % of the imagined slot codes equal to the real frame's; frame_mse: the imagined codes decoded vs "
        "the real frame (pixels in [0, 1]), in practice no lower than frame_mse_decoder_floor, the real codes "
        "decoded; reward_mae: predicted vs real reward" + "; status_acc: % of the status tokens right" * status
        + ". The baselines: *_copy repeats the last context frame (its codes, its picture" + ", its status" * status
        + "; _decoded: through the decoder), reward_mae_zero predicts 0.", 116)


def open_loop_table(result: dict) -> str:
    """`evaluate_wm`'s metrics as a table: a row per horizon, a column per metric with its baselines beside it; then,
    for an env with status tokens, each token's accuracy (%) per horizon."""
    horizons = sorted({int(k[1:].split("/")[0]) for k in result if k.startswith("h") and "/" in k})
    first = f"h{horizons[0]}/" if horizons else "-"
    cols = [c for c in OPEN_LOOP_COLUMNS if first + c in result]
    tokens = [k.removeprefix(first + "status_acc_") for k in result
              if k.startswith(first + "status_acc_") and k != first + "status_acc_copy"]
    text = _horizon_rows(result, horizons, cols, cols, ".4f")
    if tokens:
        text += "\nstatus tokens, accuracy (%):\n" + _horizon_rows(result, horizons, [f"status_acc_{t}" for t in tokens],
                                                                    tokens, ".1f")
    return text


def _horizon_rows(result: dict, horizons: list, keys: list, names: list, form: str) -> str:
    """A header of `names`, then a row per horizon of result[h<h>/<key>] (nan for a value the logs left out)."""
    widths = [max(10, len(n)) for n in names]
    rows = [f"{'horizon':>7} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    rows += [f"{h:>7} " + " ".join(f"{result.get(f'h{h}/{k}', math.nan):>{w}{form}}" for k, w in zip(keys, widths))
             for h in horizons]
    return "\n".join(rows)


@torch.no_grad()
def evaluate_wm(wm: WorldModel, held_out: ReplayBuffer, cfg: WorldModelConfig, device: torch.device,
                segments: Optional[int] = None, frames: bool = False, progress: bool = False,
                status_names: Sequence[str] = (), amp: bool = False) -> dict:
    """Open-loop prediction on held-out segments: slot-code accuracy, decoded-frame MSE and reward error at
    each horizon (and the status tokens' accuracy, for an env that gives them: all, and each token's under its
    name in `status_names`, by default `token<j>`), beside copying the last context frame (its codes; its picture,
    raw and through the same decoder; reward 0) and the decoder's own error on the real codes; with `frames`, the
    first segment's frames as `_frames` (for `prediction_picture` and `prediction_video`). The segments go through in
    chunks of SEGMENT_CHUNK, so memory does not grow with their number. `amp`: under the bf16 autocast (CUDA) the
    model trained under, so the dynamics is scored on the codes it learned to predict."""
    c = cfg.eval
    n = segments or c.segments
    drawn = held_out.sample(n, c.context + max(c.horizons), np.random.default_rng(SEGMENT_SEED))  # b t ...
    sums, first = {}, None
    was_training = wm.training
    wm.eval()
    with fixed_rng(SEGMENT_SEED, device), autocast(device, amp):
        for start in tqdm(range(0, n, SEGMENT_CHUNK), desc="evaluating open-loop prediction", unit="chunk",
                          disable=not progress, leave=False):
            batch = to_batch({k: v[start:start + SEGMENT_CHUNK] for k, v in drawn.items()}, wm.resolution, device)
            scores, shown_frames = _open_loop_scores(wm, batch, c, frames and start == 0, status_names)
            size = len(batch["action"])
            for key, value in scores.items():  # per-chunk means over equal-sized segments: weighted by segments
                sums[key] = sums.get(key, 0.0) + value * size
            first = shown_frames if shown_frames is not None else first
    wm.train(was_training)
    result: dict = {"segments": n, **{key: total / n for key, total in sums.items()}}
    if frames:
        result["_frames"] = first
    return result


def prediction_picture(frames: tuple, context: int) -> torch.Tensor:
    """`wm/real_decoded_imagined` of `evaluate_wm`'s `_frames`: every 4th step from the last context frame."""
    real, decoded, imagined = frames  # t 3 r r; decoded and imagined from the last context frame on
    rows = slice(None, None, 4)
    return prediction_grid(real[context - 1:][rows], decoded[rows],
                           torch.cat([torch.ones_like(real[:1]), imagined])[rows], range(len(decoded))[rows])


def prediction_video(frames: tuple, context: int) -> np.ndarray:
    """Video frames (uint8 `t H W 3`) of `evaluate_wm`'s `_frames`, every step: real | decoded real codes |
    imagined, decoded and imagined blank in the context; each under a strip naming the columns, the step and how
    many steps the imagined frame is ahead of the last context frame."""
    from .decompose import VIDEO_SCALE
    from .visualize import video_frame

    real, decoded, imagined = frames
    blank = torch.ones_like(real[0])
    video = []
    for t in range(real.shape[0]):
        j = t - context
        row = torch.stack([real[t], decoded[j + 1] if j >= 0 else blank, imagined[j] if j >= 0 else blank])
        names = ["decoded", f"imagined +{j + 1}"] if j >= 0 else ["context", "context"]
        video.append(video_frame(row.clamp(0, 1), [f"real t={t}", *names], VIDEO_SCALE))
    return np.stack(video)


def _open_loop_scores(wm: WorldModel, batch: dict, c, frames: bool, status_names: Sequence[str] = ()
                      ) -> tuple[dict, Optional[tuple]]:
    """`evaluate_wm`'s scores of one chunk of segments (means over it), and if asked its first segment's frames: real
    `t 3 r r`, and from the last context frame on, decoded from their codes and (after it) imagined."""
    horizon = max(c.horizons)
    enc: Encoded = wm.encode(batch["images"], batch.get("status"))
    imag = wm.open_loop(enc, batch["action"], c.context, horizon)
    real_codes = enc.slot_codes[:, c.context:]  # b h k v
    last_codes = enc.slot_codes[:, c.context - 1:c.context]
    images = batch["images"][:, c.context:]  # b h 3 r r
    b, h = real_codes.shape[:2]
    imagined = wm.decode_codes(imag["slot_codes"].flatten(0, 1)).unflatten(0, (b, h))
    floor = wm.decode_codes(real_codes.flatten(0, 1)).unflatten(0, (b, h))  # the decoder's own error
    last_frame = batch["images"][:, c.context - 1:c.context]
    last_decoded = wm.decode_codes(last_codes[:, 0])[:, None]  # the copy baseline through the same decoder
    reward = batch["reward"][:, c.context:].float()
    result: dict = {}
    for hz in c.horizons:
        i = hz - 1
        mse = lambda x: float(((x[:, i] - images[:, i]) ** 2).mean())  # noqa: E731
        result[f"h{hz}/code_acc"] = float((imag["slot_codes"][:, i] == real_codes[:, i]).float().mean() * 100)
        result[f"h{hz}/code_acc_copy"] = float((last_codes[:, 0] == real_codes[:, i]).float().mean() * 100)
        result[f"h{hz}/frame_mse"] = mse(imagined)
        result[f"h{hz}/frame_mse_copy"] = mse(last_frame.expand_as(images))
        result[f"h{hz}/frame_mse_copy_decoded"] = mse(last_decoded.expand_as(images))
        result[f"h{hz}/frame_mse_decoder_floor"] = mse(floor)
        result[f"h{hz}/reward_mae"] = float((imag["reward"][:, i] - reward[:, i]).abs().mean())
        result[f"h{hz}/reward_mae_zero"] = float(reward[:, i].abs().mean())
        if wm.status_vars:  # the env's status tokens (NetHack's bottom line), the last frame codes
            status, real_status = (codes[:, :, -wm.status_vars:] for codes in (imag["frame_codes"], enc.frame_codes))
            hits = (status[:, i] == real_status[:, c.context + i]).float()  # b m
            result[f"h{hz}/status_acc"] = float(hits.mean() * 100)
            result[f"h{hz}/status_acc_copy"] = float(
                (real_status[:, c.context - 1] == real_status[:, c.context + i]).float().mean() * 100)
            names = status_names or [f"token{j}" for j in range(wm.status_vars)]
            result.update({f"h{hz}/status_acc_{name}": float(acc) for name, acc in zip(names, hits.mean(0) * 100)})
    return result, (batch["images"][0], torch.cat([last_decoded[0], floor[0]]), imagined[0]) if frames else None


def train_wm(cfg: WorldModelConfig, run_dir: str, resume: bool = False, progress: bool = True) -> dict:
    """Train (or continue) a world-model run; returns the last evaluation."""
    cfg = copy.deepcopy(cfg)  # filled in by the build (the derived sizes), the caller's left as given
    t = cfg.train
    check_eval_window(cfg)  # `run.py train-wm` has checked it; a caller from Python has not
    with claimed_run(run_dir, resume, t.device, t.threads, t.seed) as (run, device, cleanup):
        return _train_wm(cfg, run, device, resume, progress, cleanup)


def _train_wm(cfg: WorldModelConfig, run: RunDir, device: torch.device, resume: bool, progress: bool,
              cleanup: contextlib.ExitStack) -> dict:
    """The body of `train_wm`, in a run directory it has claimed; `cleanup` closes what it opens."""
    t = cfg.train
    train_buf, held_out, meta = split_dataset(cfg, cfg.train.seed)
    if meta["left_out"] and distributed.is_main():
        print(f"note: the oldest {meta['left_out']} of the {meta['left_out'] + cfg.data.capacity} training steps in "
              f"{cfg.data.root} are left out, beyond data.capacity={cfg.data.capacity}; raise it to train on all of "
              "them", file=sys.stderr)
    state = run.load_checkpoint(map_location=device, keys=("model", "optimizer", "step", "skipped", "rng")
                                ) if resume else None
    if state is not None:
        check_against_checkpoint(cfg, state, run.path)
    status = meta["status_vars"]
    if state is not None:  # before the weights are built: another game's action count or status tokens misfit
        if state.get("env", meta["env"]) != meta["env"]:
            raise DataError(f"this run trained on {state['env']} episodes; data.root={cfg.data.root} holds "
                            f"{meta['env']} ones: a resume goes on with the same game")
        status = state.get("status_vars", 0)  # a run from before the env's status tokens goes on without them
        if status > meta["status_vars"]:
            raise DataError(f"this run reads {status} status tokens beside each frame; the episodes of "
                            f"{cfg.data.root} have {meta['status_vars']}: collect them again")
    wm = build_wm_for(cfg, int(meta["num_actions"]), device, status, restoring=run.path if resume else None,
                      env=meta["env"])
    if not resume and not cfg.encoder.checkpoint and distributed.is_main():
        print("note: no encoder.checkpoint: a fresh slot encoder trains jointly with the world model "
              "(encoder.mode=joint), several times slower per step than a frozen pretrained one; `run.py pretrain "
              "--data DIR` (a VQ preset, e.g. frames_discovery_cpu) and then encoder.checkpoint=RUN is the faster "
              "path", file=sys.stderr)
    params = [p for p in wm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.train.lr)
    step = skipped = 0
    settings = {"held_out": meta["held_out"], "eval": asdict(cfg.eval)}  # what the evaluations depend on
    checkpointed = None
    means = StepMeans()  # the updates since the last log row
    if resume:
        checkpointed = {"held_out": state.get("held_out"), "eval": state.get("config", {}).get("eval")}
        run.restore(wm, state, "model")
        run.restore_optimizer(opt.load_state_dict, state, "optimizer")
        step, skipped = state["step"], state["skipped"]
        set_rng_state(state["rng"])
        means.load_state_dict(state.get("log_means", {}))
        t.steps = resumed_length(step, t.steps, "train.steps", state)
        if state.get("held_out", meta["held_out"]) != meta["held_out"]:
            print(f"note: the episodes of {cfg.data.root} changed since this run's last checkpoint, so its held-out "
                  f"split moved (the last {len(meta['held_out'])} episodes now): evaluations from here on use the new "
                  "split", file=sys.stderr)
    run.stage_config(cfg, resume)  # a resume's: with its first checkpoint
    logger = MetricLogger(run, start_step=step, config=cfg)
    cleanup.callback(logger.close)
    vq = cfg.encoder.model.vq
    last_eval: dict = {}

    def checkpoint(evaluated: bool = False) -> None:
        """`evaluated`: the checkpoint an evaluation follows, kept as step_<step>.pt with train.keep_checkpoints."""
        run.save_checkpoint({"step": step, "skipped": skipped, "model": wm.state_dict(), "optimizer": opt.state_dict(),
                             "rng": rng_state(), "config": asdict(cfg), "num_actions": int(meta["num_actions"]),
                             "env": meta["env"], "held_out": meta["held_out"],
                             "status_vars": wm.status_vars, "log_means": means.state_dict()},
                            keep_step=step if evaluated and cfg.train.keep_checkpoints else None)
        logger.flush()

    def evaluate(at: int) -> dict:
        """Evaluate on the held-out episodes; log the scalars and the real | decoded | imagined picture."""
        with shown(bar, "evaluating on held-out segments", f"step {at}"):
            result = evaluate_wm(wm, held_out, cfg, device, frames=True, status_names=STATUS_NAMES.get(meta["env"], ()),
                                 amp=cfg.train.amp)
        logger.image(at, "wm/real_decoded_imagined", prediction_picture(result.pop("_frames"), cfg.eval.context))
        logger.evaluation(at, result, settings)
        bar.write(f"step {at}: open-loop prediction on held-out segments\n{open_loop_table(result)}")
        return result

    bar = tqdm(total=cfg.train.steps, initial=step, desc="train-wm", disable=not progress, dynamic_ncols=True)
    cleanup.callback(bar.close)
    wm.train()
    t_last, n_last = time.perf_counter(), step
    if stopped_evaluation(logger, step, cfg.train.eval_every, cfg.train.steps):
        evaluate(step)
    streak = SkipStreak("the world model", f"train.lr (now {cfg.train.lr:g})")
    with StepStops() as stops:  # Ctrl-C / SIGTERM: stop after a step, with a checkpoint
        while step < cfg.train.steps:
            # batch i: a function of (seed, i)
            rng = np.random.default_rng(stream_seed(cfg.train.seed, TRAIN_STREAM, step))
            batch = to_batch(train_buf.sample(cfg.train.batch_size, cfg.data.seq_len, rng=rng, pad=True), wm.resolution,
                             device)
            for group in opt.param_groups:
                group["lr"] = cfg.train.lr * lr_factor(step, cfg.train.warmup_steps)
            tau = wm.set_vq_temperature(step, vq.tau_start, vq.tau_end, vq.anneal_steps)
            with autocast(device, cfg.train.amp):
                loss, stats, _ = wm.loss(batch, vq.beta)
            problem = guarded_update(loss, params, opt, cfg.train.grad_clip, stats)
            skipped = tally_update(problem, stats, means, skipped, step + 1, logger, bar)
            streak(problem, step + 1)
            step += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                stats = means.pop()
                if tau is not None:
                    stats["vq_tau"] = tau
                stats.update(lr=opt.param_groups[0]["lr"],
                             frames_per_s=(step - n_last) * cfg.train.batch_size * cfg.data.seq_len / (now - t_last))
                t_last, n_last = now, step
                logger.scalars(step, stats, prefix="train/")
                if "loss" in stats:  # not when every update since the last row was skipped
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", code_acc=f"{stats['acc_slots']:.1f}%")
                    if not progress:  # a log file still shows the run moving
                        print(f"step {step}/{cfg.train.steps}: loss={stats['loss']:.4f}, slot-code accuracy "
                              f"{stats['acc_slots']:.1f}%", flush=True)
            evaluating = evaluation_due(step, cfg.train.eval_every, cfg.train.steps)
            due = step % cfg.train.ckpt_every == 0 or evaluating  # also before each evaluation: Ctrl-C or a crash
            if due:                                                # there loses no training step
                checkpoint(evaluated=evaluating)
            stops.poll(checkpoint, saved=due)
            if evaluating:
                with stops.at_once():
                    last_eval = evaluate(step)
    if not last_eval:  # a finished run resumed (its final evaluation is in the log), or one stopped during it
        last_eval = logger.final_evaluation(step, settings, checkpointed)
        if last_eval:
            bar.write(f"step {step}: open-loop prediction on held-out segments (as logged)\n{open_loop_table(last_eval)}")
        else:
            last_eval = evaluate(step)
    run.write_config()  # a finished run resumed writes no checkpoint: its evaluation's settings
    return last_eval


def load_wm_run(run_dir: str, device: torch.device | str,
                step: Optional[int] = None) -> tuple[WorldModelConfig, WorldModel, dict]:
    """Config, world model (in eval mode) and checkpoint state of a `run.py train-wm` run directory: its latest
    checkpoint, or the one kept at evaluation step `step` (train.keep_checkpoints). A run that evaluated past the
    time positions it trained (from before that was refused) has its eval.context and eval.horizons fitted into
    them, which the state's `note` says."""
    device = resolve_device(str(device), "device")  # "auto", or CUDA on a machine without it: said as such
    run = RunDir(run_dir, step)
    cfg = load_run_config("train-wm", run_dir)
    state = run.load_checkpoint(map_location=device, keys=("model", "num_actions"))
    check_against_checkpoint(cfg, state, run_dir, evaluating=True)
    wm = build_wm_for(cfg, state["num_actions"], device, state.get("status_vars", 0), restoring=run_dir)
    run.restore(wm, state, "model")
    wm.eval()
    seq_len, asked = cfg.data.seq_len, (cfg.eval.context, list(cfg.eval.horizons))
    if asked[0] + max(asked[1]) > seq_len:
        cfg.eval.context, cfg.eval.horizons = fit_eval_window(*asked, seq_len)
        state["note"] = (f"note: this world model trained on data.seq_len={seq_len} segments (time positions 0.."
                         f"{seq_len - 2}); its eval.context {asked[0]} and horizons {', '.join(map(str, asked[1]))} "
                         f"reach past them: context {cfg.eval.context}, horizons "
                         f"{', '.join(map(str, cfg.eval.horizons))}")
    return cfg, wm, state


def load_agent_wm(run_dir: str, data: Optional[str], device: torch.device,
                  step: Optional[int] = None) -> tuple[WorldModelConfig, WorldModel, dict]:
    """An agent run's world model as `eval_wm` scores it: a world-model config of its encoder, frame tokens and
    dynamics on the episodes of `data` (an agent run keeps no dataset), with eval.context and eval.horizons fitted
    into the time positions its training segments taught it; the state gives the step (env steps), env, action
    count and a note saying how they were fitted (None where they were not)."""
    from agent.evaluate import load_agent_run

    game = load_run_config("train", run_dir).env.name
    if not data:
        raise UsageError(f"{run_dir} is an agent run, which keeps no episode dataset: pass --data DIR, {game} "
                         f"episodes (run.py collect --env {game} --frames 5000 --out DIR)")
    agent_cfg, wm, _, state = load_agent_run(run_dir, device, step)
    seq_len, default = agent_cfg.train.seq_len, WMEvalConfig()
    context, horizons = fit_eval_window(default.context, default.horizons, seq_len)
    fitted = None if (context, horizons) == (default.context, default.horizons) else (
        f"note: this agent's world model trained on train.seq_len={seq_len} segments (time positions 0.."
        f"{seq_len - 2}): context {context}, horizons {', '.join(map(str, horizons))}")
    cfg = WorldModelConfig(encoder=agent_cfg.encoder, frame=agent_cfg.frame, dynamics=agent_cfg.dynamics,
                           data=WMDataConfig(root=data), eval=WMEvalConfig(context=context, horizons=horizons),
                           train=WMTrainConfig(amp=agent_cfg.train.amp))
    return cfg, wm, {"step": state["counters"]["env_steps"], "env": game, "num_actions": state["num_actions"],
                     "note": fitted, "settings": {"task": agent_cfg.env.task, "crop": agent_cfg.env.crop}}


def eval_wm(checkpoint: str, out: Optional[str] = None, segments: Optional[int] = None, device: str = "cpu",
            data: Optional[str] = None, progress: bool = False, step: Optional[int] = None) -> dict:
    """`run.py eval-wm`: the horizon table on held-out episodes and a real-vs-imagined video, of a `run.py train-wm`
    run or of an agent run's world model (on `data`); `step`: the checkpoint kept at that evaluation."""
    from .decompose import write_video

    if out:
        check_out_dir(out)  # before the evaluation
    dev = resolve_device(device)
    command = schema_command(Path(checkpoint) / "config.yaml")
    if command == "pretrain":
        raise UsageError(f"{checkpoint} is a pretraining run (`run.py pretrain`): eval-wm scores a world model, of a "
                         "`run.py train-wm` run or an agent run (`run.py train`, with --data DIR); `run.py eval-ap` "
                         "evaluates a slot encoder")
    agent = command == "train"
    cfg, wm, state = load_agent_wm(checkpoint, data, dev, step) if agent else load_wm_run(checkpoint, dev, step)
    if data:
        cfg.data.root = data
    else:
        check_recorded_root(cfg.data.root, checkpoint, "pass --data DIR")
    meta = read_meta(cfg.data.root)  # the right game first, then enough of it (split_dataset)
    trained_on = state.get("env", meta["env"])  # runs from before the env was recorded: the action count only
    if (meta["env"], meta.get("num_actions")) != (trained_on, state["num_actions"]):
        raise DataError(f"{cfg.data.root} holds {meta['env']} episodes with {meta.get('num_actions')} actions; this "
                        f"world model was trained on {trained_on} with {state['num_actions']}")
    if agent and meta["env"] == "nethack":  # the window and task the agent played in
        recorded = {**ENV_DEFAULTS, **(meta.get("env_kwargs") or {})}
        differ = [k for k in ("task", "crop") if recorded[k] != state["settings"][k]]
        if differ:
            held = ", ".join(f"{k} {recorded[k]}" for k in differ)
            played = state["settings"]
            raise DataError(f"{cfg.data.root} holds NetHack episodes of {held}; this agent played with env.{differ[0]}="
                            f"{played[differ[0]]}: collect its episodes with "
                            + " ".join(f"--{k} {played[k]}" for k in differ))
    _, held_out, split_meta = split_dataset(cfg, cfg.train.seed, all_held_out=agent, training=False)  # an agent
    # trained on none
    if wm.status_vars > split_meta["status_vars"]:
        raise DataError(f"this world model reads {wm.status_vars} status tokens beside each frame; the episodes of "
                        f"{cfg.data.root} have {split_meta['status_vars']} (collected before the env gave them)")
    seen = sorted(set(split_meta["held_out"]) - set(state.get("held_out", split_meta["held_out"])))
    if seen:  # the dataset grew or shrank since: some held-out episodes now were training episodes then
        print(f"note: {cfg.data.root}'s held-out split moved since this run trained (the last "
              f"{len(split_meta['held_out'])} episodes now): {', '.join(seen[:3])}{' ...' if len(seen) > 3 else ''} "
              "may have been trained on", file=sys.stderr)
    if state.get("note"):  # once the data is known to fit
        print(state["note"], file=sys.stderr)
    result = evaluate_wm(wm, held_out, cfg, dev, segments=segments, frames=True, progress=progress, amp=cfg.train.amp,
                         status_names=STATUS_NAMES.get(meta["env"], ()))
    result.update(held_out_episodes=held_out.num_episodes, held_out_steps=len(held_out), agent=agent)
    # another dataset's evaluation goes beside the run's own, not over it
    named = f"eval_wm_data_{Path(os.path.abspath(data)).name}" if data else "eval_wm"  # a kept checkpoint's: beside
    out_dir = check_out_dir(out) if out else Path(checkpoint) / f"{named}{step_suffix(step)}"  # the latest one's
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = result.pop("_frames")
    result["video"] = str(write_video(prediction_video(frames, cfg.eval.context), out_dir / "real_vs_imagined"))
    save_png(prediction_picture(frames, cfg.eval.context), out_dir / "real_decoded_imagined.png")
    result["picture"] = str(out_dir / "real_decoded_imagined.png")
    result["step"] = state["step"]
    atomic_write(out_dir / "eval_wm.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    return result

