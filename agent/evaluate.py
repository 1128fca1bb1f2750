"""`run.py eval`: evaluation episodes of a trained agent, or of a uniform random policy in the same format."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from world_model.config import load_config
from world_model.rundir import RunDir, resolve_device

from .config import AgentConfig
from .train import build_agent, evaluate_agent


def evaluate_run(checkpoint: str, episodes: int, policy: str = "agent", device: str = "cpu") -> dict:
    """Crafter: success rates and score (crafter_score) of `episodes` new episodes; NetHack: mean score and
    depth. policy="random" plays uniform random actions in the run's env."""
    if episodes < 1:
        raise ValueError(f"--episodes must be positive, got {episodes}")
    run = RunDir(checkpoint)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.config_path} not found: --checkpoint must be a run made by `run.py train`")
    cfg = load_config(AgentConfig, run.config_path)
    dev = resolve_device(device)
    wm = ac = None
    step = 0
    if policy == "agent":
        state = run.load_checkpoint(map_location=dev)
        cfg.encoder.checkpoint = None  # the agent checkpoint holds the encoder's weights
        wm, ac = build_agent(cfg, state["num_actions"], dev)
        wm.load_state_dict(state["wm"])
        ac.load_state_dict(state["ac"])
        wm.eval()
        ac.eval()
        step = state["counters"]["env_steps"]
    stats_path = run.path / ("eval_stats.jsonl" if policy == "agent" else "random_stats.jsonl")
    before = _lines(stats_path)
    with torch.no_grad():
        evaluate_agent(wm, ac, cfg, dev, episodes, stats_path)
    records = [json.loads(line) for line in _lines(stats_path)[len(before):]]
    result = {"policy": policy, "env": cfg.env.name, "env_steps": step, "episodes": len(records)}
    if cfg.env.name == "crafter":
        from envs.crafter import crafter_score

        result.update(crafter_score(records))
    else:
        from envs.nethack import nethack_summary

        result.update(nethack_summary(records))
    return result


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
