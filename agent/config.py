"""Typed configuration of `run.py train`: environment, world model, actor-critic, replay and the loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from envs import ENV_DEFAULTS
from world_model.config import ModelConfig, VQConfig, WMEncoderConfig
from world_model.dynamics import DynamicsConfig
from world_model.frame_tokenizer import FrameTokenizerConfig

from .actor_critic import ActorCriticConfig


@dataclass
class EnvConfig:
    name: str = "crafter"  # crafter | nethack
    num_envs: int = 4  # all processes together under torchrun (split evenly over the ranks)
    envs_per_worker: int = 1
    asynchronous: bool = True  # worker processes (crash-resilient); false = in-process
    size: int = 64  # image side in pixels
    max_episode_steps: int = 0  # 0 = the wrappers' default, ENV_DEFAULTS (10000 for either; NLE's own is 5000)
    task: str = ENV_DEFAULTS["task"]  # NetHack only: score (NetHackScore) | challenge (NetHackChallenge)
    crop: int = ENV_DEFAULTS["crop"]  # NetHack only: map cells a side of the window around the player (odd)


@dataclass
class ReplayConfig:
    capacity: int = 1_000_000  # steps (all ranks together under torchrun; each rank keeps its own share)
    on_device: bool = False  # keep the steps in the training device's memory (GPU): batches are gathered there
    # instead of on the host and copied over every update; 1M 64x64 RGB frames take 12.3 GB


@dataclass
class LoopConfig:
    env_steps: int = 1_000_000  # total env steps (all envs together)
    prefill: int = 5000  # uniform-random env steps before the first update (their updates then run at once)
    train_ratio: float = 32.0  # replayed steps per env step: updates x batch_size x seq_len / env steps
    batch_size: int = 16  # replayed segments per update, all ranks together (split evenly under torchrun)
    seq_len: int = 64
    imag_starts: int = 256  # imagined trajectories per update from replayed states, all ranks together
    wm_lr: float = 1e-4
    wm_grad_clip: float = 100.0
    log_every: int = 1000  # env steps
    eval_every: int = 50_000  # env steps; 0 = only at the end
    eval_episodes: int = 4
    ckpt_every: int = 10_000  # env steps
    keep_checkpoints: bool = False  # also keep each evaluation's checkpoint (checkpoints/step_<env step>.pt)
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False  # torch.compile the parts that see every frame (WorldModel.compile_frame_parts)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune
    threads: int = 0


@dataclass
class AgentConfig:
    """`run.py train`: an object-centric world-model agent trained end to end on Crafter or NetHack."""

    env: EnvConfig = field(default_factory=EnvConfig)
    encoder: WMEncoderConfig = field(default_factory=lambda: WMEncoderConfig(
        mode="joint", model=ModelConfig(num_slots=8, vq=VQConfig(enabled=True))))
    frame: FrameTokenizerConfig = field(default_factory=FrameTokenizerConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    actor_critic: ActorCriticConfig = field(default_factory=ActorCriticConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


def env_kwargs(cfg: AgentConfig, stats_path: Optional[Path]) -> dict:
    """The env constructor's keyword arguments a run's config gives (episode stats written to `stats_path`)."""
    kwargs = {"size": cfg.env.size, "stats_path": str(stats_path) if stats_path else None}
    if cfg.env.max_episode_steps:
        kwargs["max_episode_steps"] = cfg.env.max_episode_steps
    if cfg.env.name == "nethack":
        kwargs.update(task=cfg.env.task, crop=cfg.env.crop)
    return kwargs
