"""`run.py eval`: evaluation episodes of a trained agent, or of a uniform random policy in the same format."""
from __future__ import annotations

import torch

from world_model.config import load_run_config
from world_model.rundir import RunDir, resolve_device

from .train import build_agent, evaluate_agent


def evaluate_run(checkpoint: str, episodes: int, policy: str = "agent", device: str = "cpu") -> dict:
    """Crafter: success rates and score (crafter_score) of `episodes` new episodes; NetHack: mean score and
    depth. policy="random" plays uniform random actions in the run's env."""
    if episodes < 1:
        raise ValueError(f"--episodes must be positive, got {episodes}")
    run = RunDir(checkpoint)
    cfg = load_run_config("train", checkpoint)
    dev = resolve_device(device)
    wm = ac = None
    step = 0
    if policy == "agent":
        state = run.load_checkpoint(map_location=dev)
        cfg.encoder.checkpoint = None  # the agent checkpoint holds the encoder's weights
        wm, ac = build_agent(cfg, state["num_actions"], dev)
        run.restore(wm, state, "wm")
        run.restore(ac, state, "ac")
        wm.eval()
        ac.eval()
        step = state["counters"]["env_steps"]
    stats_path = run.path / ("eval_stats.jsonl" if policy == "agent" else "random_stats.jsonl")
    with torch.no_grad():
        summary = evaluate_agent(wm, ac, cfg, dev, episodes, stats_path)
    return {"policy": policy, "env": cfg.env.name, "env_steps": step, **summary}
