"""`run.py visualize`: slot decompositions of env frames or CLEVR-like scenes as PNGs, a video and tensorboard
images, and VQ code edits (decode a frame with one slot's code changed).

Env frames come from seeded play, by an agent run's own policy or by uniform random actions, and are encoded in
order, each frame's slots initialized from the previous frame's, so slot k keeps its color while it follows the
same object; when an episode ends the next one starts afresh, with no slots carried into its first frame.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch

from envs.errors import UsageError

from .perception import SlotAutoencoder
from .pretrain import load_run
from .sources import eval_batches, use_clevr_root
from .rundir import check_out_dir, fixed_rng, resolve_device
from .updates import autocast
from .visualize import (clear_outputs, colorize, decomposition_picture, edit_labels, labeled, mask_confidence, save_png,
                        tile, upscale, video_frame)
from .wm import frames_to_input

VIDEO_SCALE = 4  # frames are upscaled (nearest) so 64x64 games stay legible in the video


def episode_frames(env: str, frames: int, seed: int = 0, act: Optional[Callable[[dict, bool], int]] = None,
                   env_kwargs: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
    """`frames` observations (`t h w 3` uint8) of play in crafter or nethack (made with `env_kwargs`), and which of
    them begin an episode (`t` bool: the first, and each after an episode ended). `act(obs, first)` picks each action
    from the observation dict (an agent's policy); None: uniform random actions."""
    from envs.collect import make_env
    from envs.episodes import obs_dict

    e = make_env(env, **(env_kwargs or {}))
    rng = np.random.default_rng(seed)
    try:
        obs, _ = e.reset(seed=seed)
        out, starts = [obs], [True]
        while len(out) < frames:
            action = int(rng.integers(e.action_space.n)) if act is None else act(obs_dict(obs), starts[-1])
            obs, _, terminated, truncated, _ = e.step(action)
            ended = terminated or truncated
            if ended:
                obs, _ = e.reset()
            out.append(obs)
            starts.append(ended)
    finally:
        e.close()
    return np.stack([o["image"] if isinstance(o, dict) else o for o in out]), np.array(starts)


EDITED_FRAMES = 4  # `visualize --edit`: the first frames' rows


@torch.no_grad()
def decompose(model, images: torch.Tensor, carry: bool, starts: Optional[np.ndarray] = None) -> dict:
    """Encode `t 3 h w` one frame at a time (carrying slots over when `carry`, but into no frame that `starts` `t`
    marks as an episode's first) -> masks `t k h w`, recon `t 3 h w` and rgb `t k 3 h w` (decoder models), codes
    `t k v` (VQ)."""
    prev, masks, recons, rgbs, codes = None, [], [], [], []
    for t, x in enumerate(images.split(1)):
        fresh = not carry or (starts is not None and starts[t])
        enc = model.encoder(x, None if fresh else prev)
        prev = enc.raw_slots
        if isinstance(model, SlotAutoencoder):
            dec = model.decoder(enc.slots)
            masks.append(dec.masks.squeeze(2))
            recons.append(dec.recon)
            rgbs.append(dec.rgb)
        else:
            masks.append(enc.attn_maps(x.shape[-2:]))
        if enc.codes is not None:
            codes.append(enc.codes)
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return {"masks": cat(masks), "recon": cat(recons), "rgb": cat(rgbs), "codes": cat(codes)}


def overlay(images: torch.Tensor, masks: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Input blended with the colored argmax segmentation, by `alpha` times `mask_confidence`: `t 3 h w`."""
    alpha = alpha * mask_confidence(masks)
    return (1 - alpha) * images + alpha * colorize(masks.argmax(1))


def video_frames(images: torch.Tensor, out: dict) -> np.ndarray:
    """One video frame per time step: input | reconstruction (when the model has a decoder) | segmentation overlay,
    upscaled under a strip naming them and the step: `t H W 3` uint8."""
    recon = [out["recon"].clamp(0, 1)] if out["recon"] is not None else []
    cols = [images, *recon, overlay(images, out["masks"])]
    names = ["reconstruction"] * bool(recon) + ["slots"]
    return np.stack([video_frame(torch.stack([c[t] for c in cols]), [f"frame {t}", *names], VIDEO_SCALE)
                     for t in range(images.shape[0])])


def write_video(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """MP4 through imageio-ffmpeg; a GIF (Pillow) when ffmpeg is unavailable. Returns the written path. The ffmpeg
    plugin is named: without imageio-ffmpeg, imageio would pick another plugin for ".mp4" (tifffile, if there)."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()  # the FFMPEG plugin's binary: absent (ImportError, RuntimeError), a GIF

        h, w = frames.shape[1:3]
        pad = ((0, 0), (0, (-h) % 16), (0, (-w) % 16), (0, 0))  # codecs want sizes divisible by 16
        imageio.mimwrite(path.with_suffix(".mp4"), np.pad(frames, pad), format="FFMPEG", fps=fps, macro_block_size=1)
        return path.with_suffix(".mp4")
    except (ImportError, OSError, RuntimeError, ValueError):
        from PIL import Image

        gif = path.with_suffix(".gif")
        images = [Image.fromarray(f) for f in frames]
        images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return gif


def edit_values(model, slot: str, var: str, value: str) -> tuple[int, int, list[int]]:
    """The slot, variable and code values an edit decodes (VALUE "all": every code), after checking that `model` can
    be edited there (SLOT VAR VALUE as typed; anything but an index in range is refused)."""
    vq = model.encoder.vq
    if vq is None or not isinstance(model, SlotAutoencoder):
        raise UsageError("--edit needs a discovery run with a VQ encoder (task=discovery model.vq.enabled=true)")
    k, v, c = model.encoder.cfg.num_slots, vq.num_vars, vq.num_codes
    values = list(range(c)) if value == "all" else [int(value)] if str(value).isdecimal() else [-1]
    slot, var = (int(x) if str(x).isdecimal() else -1 for x in (slot, var))
    if not (0 <= slot < k and 0 <= var < v) or any(not 0 <= x < c for x in values):
        raise UsageError(f"--edit SLOT VAR VALUE out of range: slots 0..{k - 1}, vars 0..{v - 1}, values 0..{c - 1} "
                         "or all")
    return slot, var, values


@torch.no_grad()
def edit_codes(model, images: torch.Tensor, parts: dict, slot: int, var: int, values: list[int]) -> torch.Tensor:
    """VQ editing: decode each image's codes with code `var` of slot `slot` set to each of `values` (see
    `edit_values`). `parts`: `decompose`'s output for the images, whose codes (slots carried from frame to frame in a
    game) are the ones its frame PNGs show, so slot `slot` is the object shown there. Returns a grid: per image a row
    of input, reconstruction, the slot (its masked RGB), then one decoding per value. `images` and `parts`: float, on
    the CPU, as `visualize` holds them."""
    vq, device = model.encoder.vq, next(model.parameters()).device
    rows = []
    for t, x in enumerate(images):
        codes = parts["codes"][t:t + 1].to(device)  # 1 k v
        mask = parts["masks"][t, slot, None]  # 1 h w
        cols = [x, parts["recon"][t].clamp(0, 1), mask * parts["rgb"][t, slot].clamp(0, 1) + 1 - mask]
        for value in values:
            edited = codes.clone()
            edited[:, slot, var] = value
            cols.append(model.decoder(vq.decode_codes(edited)).recon[0].float().clamp(0, 1).cpu())
        rows.append(torch.stack(cols))
    return tile(torch.cat(rows), nrow=len(values) + 3)


def load_slot_model(checkpoint: str, device: torch.device, step: Optional[int] = None) -> SimpleNamespace:
    """The slot model of any run (of its checkpoint kept at evaluation step `step`, if given): a pretraining run's
    model, or the slot autoencoder inside a world-model or agent run. Fields: model, resolution, model_cfg (its
    ModelConfig), step, amp (the run's train.amp: bf16 autocast on CUDA, the codes it learned), trained_env (the
    game whose frames it trained on; None for generated or CLEVR scenes),
    pretrain_cfg (None for the others), agent (an agent run's config, world model and actor-critic; None for the
    others), env_kwargs (the settings of the game it trained on: an agent run's env, or those its dataset recorded;
    {} where unknown)."""
    from .config import schema_command

    command = schema_command(Path(checkpoint) / "config.yaml")
    if command not in ("train-wm", "train"):  # a pretraining run, or none: load_run says which
        cfg, model, state = load_run(checkpoint, device, step, made_by="`run.py pretrain`, `train-wm` or `train`")
        return SimpleNamespace(model=model, resolution=cfg.data.resolution, model_cfg=cfg.model, step=state["step"],
                               amp=cfg.train.amp, trained_env=(state.get("frames") or {}).get("env"), pretrain_cfg=cfg,
                               agent=None,
                               env_kwargs=_recorded_env_kwargs(cfg.data.root if cfg.data.source == "frames" else None))
    if command == "train-wm":
        from .train_wm import load_wm_run

        cfg, wm, state = load_wm_run(checkpoint, device, step)
        at, trained_env, agent, settings = state["step"], state.get("env"), None, _recorded_env_kwargs(cfg.data.root)
    else:
        from agent.config import env_kwargs
        from agent.evaluate import load_agent_run

        cfg, wm, ac, state = load_agent_run(checkpoint, device, step)
        at, trained_env, agent = state["counters"]["env_steps"], cfg.env.name, (cfg, wm, ac)
        settings = {k: v for k, v in env_kwargs(cfg, None).items() if k != "stats_path"}
    return SimpleNamespace(model=wm.autoencoder.eval(), resolution=cfg.encoder.resolution,
                           model_cfg=cfg.encoder.model, step=at, amp=cfg.train.amp, trained_env=trained_env,
                           pretrain_cfg=None,
                           agent=agent, env_kwargs=settings)


def _recorded_env_kwargs(root: Optional[str]) -> dict:
    """The env settings an episode dataset recorded (`collect --size/--crop/--task ...`); {} without one (moved)."""
    from envs.episodes import read_meta

    try:
        return dict(read_meta(root).get("env_kwargs") or {}) if root else {}
    except (ValueError, OSError):
        return {}


def _shown_env(run: SimpleNamespace, env: Optional[str], clevr_root: Optional[str], checkpoint: str
               ) -> tuple[str, Optional[str]]:
    """The frames `visualize` shows a run (`load_slot_model`): `env`, or by default the game it trained on, or
    CLEVR(-like) scenes for a run pretrained on them; a mismatch is refused, or noted (the note returned) where it
    is only unusual."""
    if env is None and clevr_root:
        env = "clevr"
    elif env is None and run.trained_env in ("crafter", "nethack"):
        env = run.trained_env
    elif env is None and run.pretrain_cfg is not None and run.pretrain_cfg.data.source in ("generated", "clevr"):
        env = "clevr"  # pretrained on CLEVR(-like) scenes: shown held-out ones
    if env is None:
        raise UsageError("visualize needs --env crafter|nethack|clevr for this run (or --codes)")
    if clevr_root and run.pretrain_cfg is None:
        raise UsageError(f"--clevr-root shows CLEVR scenes to a pretraining run; {checkpoint} is a world-model or agent "
                         f"run, trained on {run.trained_env or 'game'} frames")
    if clevr_root and env != "clevr":
        raise UsageError(f"--clevr-root shows CLEVR scenes, and this call shows {env} frames: add --env clevr")
    if env == "clevr" and run.pretrain_cfg is None:
        raise UsageError(f"{checkpoint} is a world-model or agent run, trained on {run.trained_env or 'game'} frames: "
                         "show it --env crafter or nethack (--env clevr takes a pretraining run)")
    if run.trained_env and run.trained_env != env:
        return env, f"note: {checkpoint} was trained on {run.trained_env} frames, shown {env} frames here"
    if run.pretrain_cfg is not None and run.pretrain_cfg.data.source in ("generated", "clevr") and env != "clevr":
        return env, f"note: {checkpoint} was trained on CLEVR-like scenes, shown {env} frames here"
    return env, None


def _shown_policy(run: SimpleNamespace, env: str, policy: Optional[str], checkpoint: str) -> Optional[str]:
    """Who plays the game frames `visualize` shows: `policy`, or by default an agent run's own policy (on its game)
    and uniform random actions for the other runs (None for CLEVR scenes); "agent" for a run without one, or on
    another game, is refused."""
    if policy not in (None, "agent", "random"):
        raise UsageError(f"unknown --policy {policy!r}; choose agent or random")
    if env == "clevr":
        if policy:
            raise UsageError("--policy picks who plays game frames; CLEVR scenes are not played")
        return None
    if policy == "agent" and run.agent is None:
        raise UsageError(f"--policy agent plays an agent run's policy; {checkpoint} is not an agent run (`run.py "
                         "train`): its frames come from --policy random")
    if policy == "agent" and env != run.trained_env:
        raise UsageError(f"--policy agent plays {run.trained_env}, the game {checkpoint} trained on; --env {env} "
                         "takes --policy random")
    return policy or ("agent" if run.agent is not None and env == run.trained_env else "random")


def _shown_images(run: SimpleNamespace, env: str, clevr_root: Optional[str], checkpoint: str, frames: int,
                  seed: int, policy: Optional[str], device: torch.device
                  ) -> tuple[torch.Tensor, bool, Optional[np.ndarray]]:
    """`frames` images to decompose (`t 3 r r`, CPU), whether slots carry from one to the next, and the episode
    starts among them: held-out CLEVR(-like) scenes, each afresh, or a seeded episode of the game, played by the
    agent run's policy (in its env's settings) or by uniform random actions."""
    if env == "clevr":
        cfg = run.pretrain_cfg
        use_clevr_root(cfg, clevr_root, checkpoint)
        cfg.data.source = "generated" if cfg.data.source == "frames" else cfg.data.source
        images = torch.cat([b["images"].cpu() for b in eval_batches(cfg, torch.device("cpu"), frames)])
        if len(images) < frames:
            print(f"note: {cfg.data.root} split {cfg.data.eval_split} holds {len(images)} scenes, fewer than the "
                  f"{frames} asked for: shown those", file=sys.stderr)
        return images, False, None  # independent scenes
    if policy == "agent":
        from agent.policy import SlotPolicy

        cfg, wm, ac = run.agent
        acting = SlotPolicy(wm, ac, device, amp=cfg.train.amp)

        def act(obs: dict, first: bool) -> int:
            return int(acting.act({k: v[None] for k, v in obs.items()}, np.array([first]))[0])

        with fixed_rng(seed, device):  # the policy's samples: the same play on every call
            played, starts = episode_frames(env, frames, seed, act, run.env_kwargs)
    else:  # the game the run trained on, in its settings (window, task, size); another game as it comes
        settings = run.env_kwargs if env == run.trained_env else None
        played, starts = episode_frames(env, frames, seed, env_kwargs=settings)
    if starts.sum() > 1:
        print(f"note: the {frames} frames span {int(starts.sum())} episodes; slots start afresh at each episode's "
              "first frame", file=sys.stderr)
    return frames_to_input(torch.from_numpy(played)[None], run.resolution)[0], True, starts


def visualize(checkpoint: str, env: Optional[str], out_dir: str, frames: int = 8, seed: int = 0, device: str = "cpu",
              edit: Optional[tuple[str, str, str]] = None, clevr_root: Optional[str] = None,
              step: Optional[int] = None, policy: Optional[str] = None) -> dict:
    """Write per-frame decomposition PNGs, a video of the sequence and tensorboard images to `out_dir`. The run
    may be a pretraining run, or a world-model or agent run (their slot encoder and decoder). `env` None: the game
    the run trained on, or CLEVR-like scenes for a run pretrained on CLEVR; `clevr_root`: scenes of that CLEVR v1.0
    directory instead (the run's eval split when it trained on CLEVR on disk, else val); `step`: the checkpoint kept
    at that evaluation instead of the latest; `policy` (agent | random): who plays game frames (`_shown_policy`)."""
    if frames < 1:
        raise UsageError(f"--frames must be positive, got {frames}")
    if env not in ("crafter", "nethack", "clevr", None):
        raise UsageError(f"unknown --env {env!r}; choose crafter, nethack or clevr")
    dev = resolve_device(device)
    run = load_slot_model(checkpoint, dev, step)
    env, note = _shown_env(run, env, clevr_root, checkpoint)
    policy = _shown_policy(run, env, policy, checkpoint)
    model = run.model  # on `device`; the frames and pictures stay on the CPU
    parsed = None if edit is None else edit_values(model, *edit)  # before any output
    if note:
        print(note, file=sys.stderr)
    out = check_out_dir(out_dir)
    images, carry, starts = _shown_images(run, env, clevr_root, checkpoint, frames, seed, policy, dev)
    with fixed_rng(seed, dev), autocast(dev, run.amp):  # the same noise on every call; the codes training learned
        result = {k: None if v is None else v.float().cpu() if v.is_floating_point() else v.cpu()
                  for k, v in decompose(model, images.to(dev), carry, starts).items()}
    out.mkdir(parents=True, exist_ok=True)  # now: a call stopped before (Ctrl-C, an env error) leaves no empty folder
    clear_outputs(out)  # an earlier call's, replaced once this one is computed
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tb")) as writer:  # closed, with what it holds written, on an error too
        written = []
        for t in range(images.shape[0]):
            picture = decomposition_picture(images[t:t + 1], result["masks"][t:t + 1],
                                            None if result["recon"] is None else result["recon"][t:t + 1],
                                            None if result["rgb"] is None else result["rgb"][t:t + 1], max_images=1)
            path = out / f"frame_{t:04d}.png"
            save_png(picture, path)
            written.append(path)
            writer.add_image("slots/decomposition", picture, global_step=t)
        video = write_video(video_frames(images, result), out / f"{env}_slots")
        summary = {"checkpoint": checkpoint, "step": run.step, "env": env, "policy": policy, "frames": images.shape[0],
                   "pngs": len(written), "video": str(video), "slots": run.model_cfg.slots,
                   "num_slots": run.model_cfg.num_slots}
        if result["recon"] is None:
            summary["note"] = ("a set-prediction run has no decoder: the masks are the slots' attention maps and "
                               "there is no reconstruction")
        if result["codes"] is not None:
            np.save(out / "codes.npy", result["codes"].numpy())  # t k v
        if parsed is not None:
            slot, var, values = parsed
            with autocast(dev, run.amp):
                grid = edit_codes(model, images[:EDITED_FRAMES], result, slot, var, values)
            path = out / f"edit_slot{slot}_var{var}_{'all' if edit[2] == 'all' else values[0]}.png"
            picture = labeled(upscale(grid, images.shape[-1]), edit_labels(slot, var, values), images.shape[-1])
            save_png(picture, path)
            summary["edit"] = str(path)
            writer.add_image("slots/edit", picture, global_step=0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
