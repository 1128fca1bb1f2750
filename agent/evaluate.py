"""Evaluation episodes of an agent, or of a uniform random policy in the same format: the training loop's
evaluations and `run.py eval`, with the benchmark summaries (Crafter score, NetHack score and depth) they log."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from envs.atomic import atomic_write
from envs.episodes import obs_dict
from envs.errors import UsageError
from world_model.config import check_against_checkpoint, load_run_config
from world_model.rundir import RunDir, fixed_rng, resolve_device, step_suffix
from world_model.wm import WorldModel

from .actor_critic import ActorCritic
from .config import AgentConfig, env_kwargs
from .policy import SlotPolicy

EVAL_ENV_SEED = 10_000  # evaluation episodes use env seeds EVAL_ENV_SEED, EVAL_ENV_SEED + 1, ...
RECENT_EPISODES = 20  # the `*_recent` training scalars: means over the last this many episodes


@torch.no_grad()
def evaluate_agent(wm: Optional[WorldModel], ac: Optional[ActorCritic], cfg: AgentConfig, device: torch.device,
                   episodes: int, stats_path: Path, seed: int = EVAL_ENV_SEED, progress: bool = False,
                   append: bool = True, tag: Optional[dict] = None) -> dict:
    """`episodes` full episodes in one in-process env with the policy (or uniform random actions when `ac` is
    None); their records, with the fields of `tag` (a training run's evaluation: its env step), are appended to
    `stats_path` (or replace it, atomically, without `append`). Returns their summary (`summarize`). Reproducible: env
    seeds seed, seed+1, ... and the policy's sampling from `seed`, on an RNG forked from the caller's (a training
    run's random stream is left as it was)."""
    from envs.collect import make_env
    from tqdm import tqdm

    stats_path.parent.mkdir(parents=True, exist_ok=True)
    # this call's own episode records (a concurrent `run.py eval`, or a training run's evaluation, has its own)
    fd, name = tempfile.mkstemp(dir=stats_path.parent, prefix=f"{stats_path.stem}.", suffix=".jsonl.tmp")
    os.close(fd)
    tmp = Path(name)
    rng = np.random.default_rng(seed)
    policy = SlotPolicy(wm, ac, device, amp=cfg.train.amp) if ac is not None else None
    env = None
    try:
        env = make_env(cfg.env.name, **env_kwargs(cfg, tmp))
        with fixed_rng(seed, device):
            for e in tqdm(range(episodes), desc="eval episodes", disable=not progress, unit="episode"):
                obs, _ = env.reset(seed=seed + e)
                first, done = True, False
                while not done:
                    if policy is None:
                        action = int(rng.integers(env.action_space.n))
                    else:
                        batched = {k: v[None] for k, v in obs_dict(obs).items()}
                        action = int(policy.act(batched, np.array([first]))[0])
                    obs, _, term, trunc, _ = env.step(action)
                    first, done = False, term or trunc
    finally:
        if env is not None:
            env.close()
        text = tmp.read_text()
        tmp.unlink()
    if tag:
        text = "".join(json.dumps({**json.loads(line), **tag}) + "\n" for line in text.splitlines() if line.strip())
    if append:
        with open(stats_path, "a") as f:
            f.write(text)
    else:
        atomic_write(stats_path, lambda f: f.write(text.encode()))
    return summarize(cfg.env.name, [json.loads(line) for line in text.splitlines() if line.strip()])


def summarize(env: str, records) -> dict:
    """The benchmark summary of episode records (or a stats file): `crafter_score` or `nethack_summary`."""
    if env == "crafter":
        from envs.crafter import crafter_score

        return crafter_score(records)
    from envs.nethack import nethack_summary

    return nethack_summary(records)


def log_keys(summary: dict, env: str, prefix: str) -> dict:
    """The scalars of a summary that go to the logs: Crafter's score, return and the success rate (%) of each of its
    22 achievements (`achievement_<name>`), or NetHack's score, depth and share of episodes ended by death
    (`died_pct`, %; the summary's `died` counts them)."""
    if env == "crafter":
        main = {"crafter_score": summary["score"],
                **{f"achievement_{name}": rate for name, rate in summary["success_rates"].items()}}
    else:
        main = {"score": summary["mean_score"], "depth": summary["mean_depth"],
                "died_pct": 100 * summary["died"] / summary["episodes"]}  # summary["died"]: a count
    return {f"{prefix}{k}": v for k, v in {**main, "return": summary.get("mean_return"), "episodes": summary["episodes"],
                                           "length": summary["mean_length"]}.items() if v is not None}


def stats_scores(records: list[dict], env: str, prefix: str) -> dict:
    """The logged benchmark numbers of a run's episode records (stats.jsonl; {} while there are none): over all of
    them (Crafter's benchmark score is defined so), and the mean return and score of the last RECENT_EPISODES, the
    learning curve."""
    if not records:
        return {}
    recent = summarize(env, records[-RECENT_EPISODES:])
    score = ("crafter_score", recent["score"]) if env == "crafter" else ("score", recent["mean_score"])
    return {**log_keys(summarize(env, records), env, prefix), f"{prefix}return_recent": recent["mean_return"],
            f"{prefix}{score[0]}_recent": score[1]}


def load_agent_run(checkpoint: str, device: torch.device | str,
                   step: Optional[int] = None) -> tuple[AgentConfig, WorldModel, ActorCritic, dict]:
    """Config, world model, actor-critic (in eval mode) and checkpoint state of an agent run directory: its latest
    checkpoint, or the one kept at evaluation env step `step` (train.keep_checkpoints)."""
    from world_model.train_wm import record_built

    from .train import build_agent  # agent.train imports this module

    device = resolve_device(str(device), "device")  # "auto", or CUDA on a machine without it: said as such
    run = RunDir(checkpoint, step)
    cfg = load_run_config("train", checkpoint)
    state = run.load_checkpoint(map_location=device, keys=("wm", "ac", "num_actions", "counters"))
    check_against_checkpoint(cfg, state, checkpoint, evaluating=True)
    wm, ac = build_agent(cfg, state["num_actions"], device, state.get("status_vars", 0), restoring=checkpoint)
    record_built(cfg, wm)
    run.restore(wm, state, "wm")
    run.restore(ac, state, "ac")
    return cfg, wm.eval(), ac.eval(), state


def evaluate_run(checkpoint: str, episodes: int, policy: str = "agent", device: str = "auto", seed: int = EVAL_ENV_SEED,
                 progress: bool = False, step: Optional[int] = None) -> dict:
    """Crafter: success rates and score (crafter_score) of `episodes` new episodes; NetHack: mean score and
    depth. policy="random" plays uniform random actions in the run's env. Seeded (`evaluate_agent`), on the run's
    `train.threads` CPU threads. `step`: the agent of the checkpoint kept at that evaluation (train.keep_checkpoints)
    instead of the last one."""
    if episodes < 1:
        raise UsageError(f"--episodes must be positive, got {episodes}")
    if step is not None and policy != "agent":
        raise UsageError("--step picks the agent of a kept checkpoint; --policy random plays without one")
    dev = resolve_device(device)
    wm = ac = None
    env_steps = 0
    if policy == "agent":
        cfg, wm, ac, state = load_agent_run(checkpoint, dev, step)
        env_steps = state["counters"]["env_steps"]
    else:
        cfg = load_run_config("train", checkpoint)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    # this evaluation's episodes, beside its eval_<policy>.json (the training run's evaluations: eval_stats.jsonl)
    stats_path = Path(checkpoint) / f"eval_{policy}{step_suffix(step)}_stats.jsonl"
    with torch.no_grad():
        summary = evaluate_agent(wm, ac, cfg, dev, episodes, stats_path, seed, progress, append=False)
    return {"policy": policy, "env": cfg.env.name, "env_steps": env_steps, "seed": seed, **summary}
