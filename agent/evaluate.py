"""`run.py eval`: evaluation episodes of a trained agent, or of a uniform random policy in the same format."""
from __future__ import annotations

from pathlib import Path

import torch

from envs.errors import UsageError

from world_model.config import load_run_config
from world_model.rundir import RunDir, resolve_device
from world_model.wm import WorldModel

from .actor_critic import ActorCritic
from .config import AgentConfig
from .train import EVAL_SEED, build_agent, evaluate_agent


def load_agent_run(checkpoint: str, device: torch.device) -> tuple[AgentConfig, WorldModel, ActorCritic, dict]:
    """Config, world model, actor-critic (in eval mode) and checkpoint state of an agent run directory."""
    run = RunDir(checkpoint)
    cfg = load_run_config("train", checkpoint)
    state = run.load_checkpoint(map_location=device, keys=("wm", "ac", "num_actions", "counters"))
    wm, ac = build_agent(cfg, state["num_actions"], device, state.get("status_vars", 0), restoring=checkpoint)
    run.restore(wm, state, "wm")
    run.restore(ac, state, "ac")
    return cfg, wm.eval(), ac.eval(), state


def evaluate_run(checkpoint: str, episodes: int, policy: str = "agent", device: str = "cpu", seed: int = EVAL_SEED,
                 progress: bool = False) -> dict:
    """Crafter: success rates and score (crafter_score) of `episodes` new episodes; NetHack: mean score and
    depth. policy="random" plays uniform random actions in the run's env. Seeded (`evaluate_agent`), on the run's
    `train.threads` CPU threads."""
    if episodes < 1:
        raise UsageError(f"--episodes must be positive, got {episodes}")
    dev = resolve_device(device)
    wm = ac = None
    step = 0
    if policy == "agent":
        cfg, wm, ac, state = load_agent_run(checkpoint, dev)
        step = state["counters"]["env_steps"]
    else:
        cfg = load_run_config("train", checkpoint)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    # this evaluation's episodes, beside its eval_<policy>.json (the training run's evaluations: eval_stats.jsonl)
    stats_path = Path(checkpoint) / f"eval_{policy}_stats.jsonl"
    with torch.no_grad():
        summary = evaluate_agent(wm, ac, cfg, dev, episodes, stats_path, seed, progress, append=False)
    return {"policy": policy, "env": cfg.env.name, "env_steps": step, "seed": seed, **summary}
