"""`run.py train`: the whole agent loop — vectorized env workers collect with the current policy into a
replay buffer; the world model and the actor-critic (in imagination) train at a fixed train ratio; periodic
evaluation episodes; everything in one run directory, resumable at the same env step.

Run directory: config.yaml, checkpoints/latest.pt (models, optimizers, counters, RNG),
replay/<step>-<updates>-rank<r>.npz (each rank's replay state at that checkpoint, written first) and the chunk files
of frames it names, stats.jsonl (every training episode, crafter's schema for Crafter), eval_stats.jsonl (the
episodes of the run's evaluations; `run.py eval` writes its own eval_<policy>_stats.jsonl), metrics.jsonl and tb/.

Under torchrun each rank runs its share of the env workers into its own replay buffer; the world model and the
actor-critic are wrapped in DistributedDataParallel, so every update averages the ranks' gradients and the
weights stay identical. Sizes in the config (env.num_envs, replay.capacity, train.batch_size, train.imag_starts)
are totals over all ranks; counters (env steps, updates) are global. Rank 0 logs, evaluates and checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import torch
from torch.profiler import record_function

from envs import ENV_DEFAULTS
from envs.collect import Collector, env_fn
from envs.errors import DataError, UsageError
from envs.jsonl import JsonlTail, count_records, is_episode, keep_records
from envs.vector import crowding_note, make_vector_env
from world_model import distributed
from world_model.config import check_against_checkpoint
from world_model.stopping import StepStops
from world_model.updates import SkipStreak, StepMeans, autocast, guarded_update
from world_model.rundir import (MetricLogger, RunDir, claimed_run, evaluation_due, fixed_rng, resumed_length,
                                rank_seed, restore_rng, rng_states, rollback_appended, shown, stopped_evaluation,
                                this_ranks)
from world_model.frame_tokenizer import status_vars
from world_model.train_wm import (build_world_model, check_encoder, check_max_steps, check_trained_positions,
                                  record_built, to_batch)
from world_model.wm import WorldModel, WorldModelLoss

from .actor_critic import ActorCritic
from .config import AgentConfig, env_kwargs
from .evaluate import evaluate_agent, log_keys, stats_scores
from .imagination import imagine
from .policy import SlotPolicy
from .replay import ReplayBuffer

BAR_SCORES = {"train/crafter_score_recent": "score_recent", "train/score_recent": "score_recent",
              "train/return_recent": "return_recent"}  # what the bar shows of the training episodes: the last 20's


def longest_sequence(cfg: AgentConfig) -> tuple[int, str]:
    """The longest sequence the dynamics must hold, and the key that sets it: a training segment. Imagination's
    actor_critic.horizon steps from one replayed state (the slots carry what the agent needs) fit in one, at the time
    positions training teaches the dynamics (`preflight`)."""
    return cfg.train.seq_len, "train.seq_len"


def preflight(cfg: AgentConfig) -> list[str]:
    """What `train` would refuse only once it builds things, refused before the run prints its config and starts;
    returns notes on what it allows but a user likely did not mean."""
    horizon, seq_len = cfg.actor_critic.horizon, cfg.train.seq_len
    check_trained_positions(horizon - 1, f"imagination of actor_critic.horizon={horizon} steps", "train.seq_len",
                            seq_len, f"raise train.seq_len to {horizon + 1} (a resume may; dynamics.max_steps="
                            f"{cfg.dynamics.max_steps} must hold it), or lower actor_critic.horizon below {seq_len} (a "
                            "new run)")
    check_max_steps(cfg.dynamics, longest_sequence(cfg))
    check_encoder(cfg.encoder)
    if cfg.env.name != "nethack":
        given = [f"env.{k}={getattr(cfg.env, k)}" for k in ("task", "crop") if getattr(cfg.env, k) != ENV_DEFAULTS[k]]
        if given:
            raise UsageError(f"{' and '.join(given)}: NetHack's (env.name=nethack); {cfg.env.name} has none")
    if cfg.env.crop % 2 == 0:
        raise UsageError(f"env.crop={cfg.env.crop}: an odd number of map cells, so the player is the centre one")
    ranks = distributed.launched_size()
    shared = {"env.num_envs": cfg.env.num_envs, "train.batch_size": cfg.train.batch_size,
              "train.imag_starts": cfg.train.imag_starts, "replay.capacity": cfg.replay.capacity}  # split over ranks
    for key, size in shared.items():
        distributed.check_divides(size, key)
    if cfg.replay.capacity // ranks < cfg.train.seq_len:  # (episodes shorter than a segment train: segments are padded)
        each = f", {cfg.replay.capacity // ranks} steps for each of the {ranks} processes," if ranks > 1 else ""
        raise UsageError(f"replay.capacity={cfg.replay.capacity}{each} is less than one training segment "
                         f"(train.seq_len={cfg.train.seq_len}): raise it")
    if cfg.env.asynchronous and cfg.env.num_envs % (ranks * cfg.env.envs_per_worker):
        raise UsageError(f"env.num_envs={cfg.env.num_envs} must be a multiple of env.envs_per_worker="
                         f"{cfg.env.envs_per_worker} (each worker process runs that many envs)"
                         + (f" times the {ranks} processes" if ranks > 1 else ""))
    notes = []
    if cfg.replay.capacity < cfg.train.prefill:
        notes.append(f"note: replay.capacity={cfg.replay.capacity} holds fewer steps than train.prefill="
                     f"{cfg.train.prefill}: the first {cfg.train.prefill - cfg.replay.capacity} random steps are "
                     "overwritten before the first update")
    if cfg.env.asynchronous:
        local = distributed.launched_local_size()  # the processes on this node, whose workers share its cores
        crowded = crowding_note(cfg.env.num_envs // ranks // cfg.env.envs_per_worker * local,
                                f"env.num_envs={cfg.env.num_envs} with env.envs_per_worker={cfg.env.envs_per_worker}"
                                + (f" over {ranks} processes ({local} on this node)" if ranks > 1 else ""))
        notes += [f"{crowded} (env.envs_per_worker)"] if crowded else []
    if cfg.train.prefill >= cfg.train.env_steps:
        notes.append(f"note: train.prefill={cfg.train.prefill} is not below train.env_steps={cfg.train.env_steps}: "
                     "the run plays random actions only and never updates its models; lower train.prefill or raise "
                     "train.env_steps")
    return notes


def build_agent(cfg: AgentConfig, num_actions: int, device: torch.device, status_vars: int = 0,
                restoring: Optional[str | Path] = None) -> tuple[WorldModel, ActorCritic]:
    """The world model and actor-critic of `cfg` for an env with `num_actions` actions and `status_vars` status
    tokens beside its frames (0: none); `restoring`: the run directory whose checkpoint their weights come from.
    `cfg` is left as given; the completed encoder config is `wm.encoder_cfg` (a pretrained run's model), the sizes
    derived from the encoder and env are in `wm.dynamics.cfg`."""
    wm = build_world_model(cfg.encoder, cfg.frame, cfg.dynamics, num_actions, device, longest_sequence(cfg),
                           status_vars, restoring, cfg.env.name)
    if cfg.train.compile:
        wm.compile_frame_parts(cfg.train.compile_mode)
    return wm, ActorCritic(wm.dynamics.cfg, cfg.actor_critic).to(device)


def resumed_replay(run: RunDir, state: dict, cfg: AgentConfig, counters: dict, capacity: int, spec: dict,
                   device: Optional[torch.device], new_replay: bool) -> ReplayBuffer:
    """A resumed run's replay: its saved shards (split anew among another number of processes), or with
    `new_replay` an empty one, after whose refill the train ratio holds again (`counters["ratio_from"]`)."""
    t, main = cfg.train, distributed.is_main()
    seed = rank_seed(t.seed, counters["vector_steps"])
    if new_replay:
        counters["ratio_from"] = [counters["env_steps"] + t.prefill, counters["replayed"]]
        if main and counters["env_steps"] < t.env_steps:
            print(f"note: --new-replay: the replay starts empty (a saved one is not read); updates pause until env "
                  f"step {counters['ratio_from'][0]} (train.prefill={t.prefill} steps of the agent's play), then keep "
                  "train.train_ratio", file=sys.stderr)
        return ReplayBuffer(capacity, spec, seed=seed, device=device)
    try:
        replay = load_replay_shards(run.path, state, capacity, seed, device)
    except (DataError, FileNotFoundError) as e:
        raise DataError(f"{e}: `run.py train --resume {run.path} --new-replay` goes on from the checkpoint with an "
                        "empty replay") from None
    shards = len(state.get("replays") or [state["replay"]])
    if shards != distributed.world_size() and main:
        print(f"note: the run stopped with {shards} process{'es' * (shards > 1)} and goes on with "
              f"{distributed.world_size()}: its replay is split among them anew, each holding whole episodes",
              file=sys.stderr)
    return replay


def updates_due(env_steps: int, cfg: AgentConfig) -> int:
    """Updates owed after `env_steps` so that replayed steps / env steps = train_ratio (after prefill), for a run
    whose train.* settings never changed (`updates_owed` is what the loop asks)."""
    return updates_owed(env_steps, 0, cfg)


def updates_owed(env_steps: int, replayed: int, cfg: AgentConfig, since: Sequence[int] = (0, 0)) -> int:
    """How many updates are owed after `env_steps` env steps and `replayed` replayed steps (train.batch_size x
    train.seq_len per update, as each ran): after prefill, the replayed steps since `since` (env steps, replayed
    steps: where train.train_ratio last changed) stay within train_ratio x the env steps since then. So a resume
    that changes the batch, the segment length or the ratio keeps the (new) ratio from there, with no burst or
    pause."""
    t = cfg.train
    if env_steps < t.prefill:
        return 0
    return max(0, int(((env_steps - since[0]) * t.train_ratio - (replayed - since[1])) // (t.batch_size * t.seq_len)))


def local_share(total: int, what: str) -> int:
    """This rank's share of a size the config gives for all ranks together."""
    lo, hi = distributed.shard_bounds(total, what)
    return hi - lo


def train_step(wm: WorldModel, ac: ActorCritic, wm_opt: torch.optim.Optimizer, replay: ReplayBuffer,
               cfg: AgentConfig, device: torch.device, update: int, wm_parallel: Optional[torch.nn.Module] = None,
               ac_parallel: Optional[torch.nn.Module] = None) -> dict:
    """Update number `update` (global, from 0): one world-model update on a replayed batch, then one actor-critic
    update in imagination from its states. A jointly trained VQ encoder's Gumbel temperature follows its anneal over
    updates (`wm.encoder_cfg.model.vq`: a pretrained encoder's, continued). `wm_parallel` / `ac_parallel`: the
    DistributedDataParallel wrappers under torchrun (gradients averaged). Returns the stats as tensors on the device (no
    host sync for them) or numbers (wm/skipped, ac/skipped, wm/vq_tau). As `train` builds them: `wm, ac =
    build_agent(cfg, num_actions, device)`, `wm_opt = torch.optim.Adam([p for p in wm.parameters() if p.requires_grad],
    lr=cfg.train.wm_lr)`, and `replay = ReplayBuffer(capacity, replay_spec(obs_spec(env.observation_space), wm))`
    holding episodes of at least `train.seq_len` steps (`add_episode`); the actor-critic keeps its own optimizers.
    Leaves `wm` in eval mode (it updates in train mode)."""
    t, vq = cfg.train, wm.encoder_cfg.model.vq
    tau = wm.set_vq_temperature(update, vq.tau_start, vq.tau_end, vq.anneal_steps)
    batch_size, starts_n = t.batch_size // distributed.world_size(), t.imag_starts // distributed.world_size()
    wm.step_begin()
    with record_function("replay_sample"):  # profiler labels (agent/bench.py); free when no profiler runs
        batch = to_batch(replay.sample(batch_size, t.seq_len, pad=True), wm.resolution, device)
    with record_function("wm_update"):
        wm.train()
        with autocast(device, t.amp):
            loss, stats, enc = (wm_parallel or WorldModelLoss(wm))(batch, vq.beta)
        problem = guarded_update(loss, wm_opt.param_groups[0]["params"], wm_opt, t.wm_grad_clip, stats)
        stats = {f"wm/{k}": v for k, v in stats.items()}
    stats["wm/skipped"] = float(problem is not None)
    if tau is not None:
        stats["wm/vq_tau"] = tau
    wm.eval()
    starts = imagination_starts(batch["valid"], starts_n)
    frames = enc.frame_codes.flatten(0, 1)[starts, None] if enc.frame_codes is not None else None  # n 1 g
    context = SimpleNamespace(slot_codes=enc.slot_codes.flatten(0, 1)[starts, None], frame_codes=frames)  # n 1 k v
    with autocast(device, t.amp):
        with record_function("imagination"):
            traj = imagine(wm.dynamics, ac.actor, context, None, cfg.actor_critic.horizon)
            traj.start_continues = 1.0 - batch["is_terminal"].flatten(0, 1)[starts].float()
        with record_function("ac_update"):
            stats.update({f"ac/{k}": v for k, v in ac.update(traj, ac_parallel).items()})
    stats["ac/imagined_reward"] = traj.rewards.mean()
    return stats


def imagination_starts(valid: torch.Tensor, n: int) -> torch.Tensor:
    """`n` random valid steps of a replayed batch to imagine from, as flat indices into `valid` `b t`: distinct
    while the batch holds `n` valid steps, else each valid step about equally often, never a padded one (padded
    starts would count in the return scale and the logged stats). A fixed count, with no host sync, keeps the
    shapes static for compiled imagination."""
    valid = valid.flatten()
    order = (torch.rand(valid.numel(), device=valid.device) + (~valid).float()).argsort()  # valid steps first
    return order[torch.arange(n, device=valid.device) % valid.sum()]


def replay_spec(spec: dict, wm: WorldModel) -> dict:
    """What the replay keeps of an env's observations (`obs_spec`): the frames, and the status tokens when the world
    model reads them; nothing else is sampled into a training batch (NetHack's raw `stats` stay out)."""
    return {k: v for k, v in spec.items() if k == "image" or (k == "status" and wm.status_vars)}


def obs_spec(space) -> dict:
    """An env's observation space as {key: (shape, dtype)}; an image-only env's key is "image"."""
    import gymnasium as gym

    spaces = space.spaces if isinstance(space, gym.spaces.Dict) else {"image": space}
    return {k: (s.shape, s.dtype) for k, s in spaces.items()}


def train(cfg: AgentConfig, run_dir: str, resume: bool = False, progress: bool = True,
          new_replay: bool = False) -> dict:
    """Train (or continue) an agent run; returns the last evaluation (rank 0's under torchrun). `new_replay`: a
    resume starts with an empty replay instead of the saved one, and updates wait until the agent has played
    train.prefill steps into it."""
    from tqdm import tqdm

    cfg = copy.deepcopy(cfg)  # filled in below (the derived sizes), the caller's left as given
    t = cfg.train
    preflight(cfg)  # `run.py train` has run it already; a caller from Python has not
    # the envs, logs and bar closed and the claim released, on an error too
    with claimed_run(run_dir, resume, t.device, t.threads, t.seed) as (run, device, cleanup):
        main = distributed.is_main()
        num_envs = local_share(cfg.env.num_envs, "env.num_envs")
        venv = make_vector_env(env_fn(cfg.env.name, **env_kwargs(cfg, run.path / "stats.jsonl")), num_envs,
                               envs_per_worker=cfg.env.envs_per_worker, asynchronous=cfg.env.asynchronous)
        cleanup.callback(venv.close)
        num_actions = int(venv.single_action_space.n)
        state = run.load_checkpoint(map_location=device, keys=("wm", "ac", "wm_opt", "ac_opt", "counters", "rng")
                                    ) if resume else None
        if state is not None:
            check_against_checkpoint(cfg, state, run.path)
        spec = obs_spec(venv.single_observation_space)
        # a run from before the env gave status tokens (NetHack) goes on without them: its model and replay had none
        status = status_vars(spec) if state is None else state.get("status_vars", 0)
        wm, ac = build_agent(cfg, num_actions, device, status, restoring=run_dir if resume else None)
        record_built(cfg, wm)
        spec = replay_spec(spec, wm)
        wm_opt = torch.optim.Adam([p for p in wm.parameters() if p.requires_grad], lr=t.wm_lr, eps=1e-8)
        # replayed steps, and the (env steps, replayed steps) from which train.train_ratio holds (`updates_owed`)
        fresh = {"env_steps": 0, "updates": 0, "episodes": 0, "vector_steps": 0, "replayed": 0, "ratio_from": [0, 0],
                 "skipped_wm": 0, "skipped_ac": 0, "env_restarts": 0}
        counters = dict(fresh)
        capacity = local_share(cfg.replay.capacity, "replay.capacity")
        replay_device = device if cfg.replay.on_device else None
        replay = ReplayBuffer(capacity, spec, seed=rank_seed(t.seed), device=replay_device)
        interval = StepMeans()  # the updates since the last log row
        if resume:
            run.restore(wm, state, "wm")
            run.restore(ac, state, "ac")
            run.restore_optimizer(wm_opt.load_state_dict, state, "wm_opt")
            run.restore_optimizer(ac.load_optimizer_state, state, "ac_opt")
            counters = {**fresh, **state["counters"]}  # an older checkpoint lacks the counters added since
            was = state.get("config", {}).get("train", {})
            if "replayed" not in state["counters"]:  # a checkpoint from before replayed steps were counted: its batches
                counters["replayed"] = counters["updates"] * was.get("batch_size", t.batch_size) * was.get("seq_len",
                                                                                                           t.seq_len)
            if was.get("train_ratio", t.train_ratio) != t.train_ratio:  # the new ratio holds from here
                counters["ratio_from"] = [counters["env_steps"], counters["replayed"]]
            restore_rng(state["rng"], t.seed, counters["vector_steps"])
            interval.load_state_dict(this_ranks(state.get("log_means"), {}))
            t.env_steps = resumed_length(counters["env_steps"], t.env_steps, "train.env_steps", state)
            replay = resumed_replay(run, state, cfg, counters, capacity, spec, replay_device, new_replay)
            if main:  # the stopped run's episodes after its checkpoint are not counted; damaged lines are blanked
                stats = run.path / "stats.jsonl"
                if "stats_bytes" in state:  # a checkpoint from before records were counted
                    rollback_appended(stats, state["stats_bytes"])
                keep_records(stats, state.get("stats_records"), is_episode)
        settings = {"eval_episodes": t.eval_episodes}  # what the evaluations depend on
        checkpointed = None if state is None else {
            "eval_episodes": state.get("config", {}).get("train", {}).get("eval_episodes")}
        state = None  # the checkpoint's tensors are in the models now: not kept for the whole run
        episode_log = JsonlTail(run.path / "stats.jsonl")  # the training episodes, read as the workers append them
        run.stage_config(cfg, resume)  # a resume's: with its first checkpoint
        if main and updates_due(t.env_steps, cfg) == 0 and counters["env_steps"] < t.env_steps:  # one to play
            why = ("train.train_ratio=0" if t.train_ratio == 0 else
                   f"train.env_steps={t.env_steps} is too few (updates start after train.prefill={t.prefill} random "
                   "steps, one per train.batch_size x train.seq_len / train.train_ratio env steps)")
            print(f"note: {why}: this run gives no update, it only collects", file=sys.stderr)
        wm_parallel = distributed.wrap(WorldModelLoss(wm), device) if distributed.active() else None
        ac_parallel = distributed.wrap(ac, device) if distributed.active() else None
        logger = MetricLogger(run, start_step=counters["env_steps"], config=cfg)
        cleanup.callback(logger.close)
        policy = SlotPolicy(wm, ac, device, amp=t.amp)
        wm.eval()  # train_step switches to train mode for its update and back
        rng = np.random.default_rng([rank_seed(t.seed), counters["vector_steps"]])
        collector = Collector(venv, replay, keys=replay.spec)
        episodes_base, restarts_base = counters["episodes"], counters["env_restarts"]
        last_eval, evaluated_at = {}, None  # the last evaluation and its env step

        def global_counts() -> tuple[int, int, int]:
            """A collective: every rank's finished episodes, env workers restarted (after a crash or hang) and
            replayed steps held, summed."""
            mine = (collector.episodes, getattr(venv, "restarts", 0), len(replay))  # SyncVectorEnv never restarts
            gathered = distributed.gather_objects(mine)
            return (episodes_base + sum(g[0] for g in gathered), restarts_base + sum(g[1] for g in gathered),
                    sum(g[2] for g in gathered))

        def checkpoint(evaluated: bool = False) -> None:
            """`evaluated`: the checkpoint an evaluation follows, kept as step_<env step>.pt with
            train.keep_checkpoints (for its weights: the replay it names goes with later checkpoints)."""
            # named by the updates too: a resumed run's catch-up checkpoint at the step it stopped at must not
            # overwrite the state file the previous latest.pt names before the new one replaces it
            name = f"replay/{counters['env_steps']:012d}-{counters['updates']:09d}-rank{distributed.rank()}.npz"
            (run.path / "replay").mkdir(exist_ok=True)
            # the replays first, so the checkpoint never names a missing file; only the steps new since the last
            # checkpoint are written (chunk files), the rest of the ring is in earlier chunks
            needed = replay.save(run.path / name, chunks=f"rank{distributed.rank()}")
            gathered = distributed.gather_objects((name, needed))  # also waits until every rank's replay is written
            names, kept = [g[0] for g in gathered], {f for g in gathered for f in g[1]}
            counters["episodes"], counters["env_restarts"], _ = global_counts()
            stats = run.path / "stats.jsonl"  # every rank's episodes up to this step are in it (gathered above)
            run.save_checkpoint({"wm": wm.state_dict(), "ac": ac.state_dict(), "wm_opt": wm_opt.state_dict(),
                                 "ac_opt": ac.optimizer_state(), "counters": dict(counters), "rng": rng_states(),
                                 "replays": names, "config": asdict(cfg), "num_actions": num_actions,
                                 "status_vars": wm.status_vars, "stats_records": count_records(stats, is_episode),
                                 "log_means": distributed.gather_objects(interval.state_dict())},
                                keep_step=counters["env_steps"] if evaluated and t.keep_checkpoints else None)
            logger.flush()
            if main:
                for old in (run.path / "replay").glob("*.npz"):
                    if old.name not in kept:
                        old.unlink()

        def evaluate(at: int) -> dict:
            """Evaluation episodes (their records appended to eval_stats.jsonl), logged with pictures."""
            with shown(bar, f"evaluating, {t.eval_episodes} episode{'s' * (t.eval_episodes != 1)}", f"env step {at}"):
                summary = evaluate_agent(wm, ac, cfg, device, t.eval_episodes, run.path / "eval_stats.jsonl",
                                         tag={"env_step": at})  # which evaluation each record is of
            result = log_keys(summary, cfg.env.name, "")
            logger.evaluation(at, result, settings)
            log_pictures(logger, at, wm, replay, device, t.seq_len, t.amp)
            said = [k for k in ("crafter_score", "score", "depth", "return", "length") if k in result]
            bar.write(f"env step {at}: evaluation, {summary['episodes']} episode{'s' * (summary['episodes'] != 1)}: "
                      + ", ".join(f"{k}={result[k]:.4g}" for k in said))
            return result

        bar = tqdm(total=t.env_steps, initial=counters["env_steps"], desc=f"train {cfg.env.name}",
                   disable=not progress or not main, dynamic_ncols=True, unit="step")
        cleanup.callback(bar.close)  # closed before the final evaluation too
        next_log = (counters["env_steps"] // t.log_every + 1) * t.log_every
        next_ckpt = (counters["env_steps"] // t.ckpt_every + 1) * t.ckpt_every
        segments = False  # some episode in every rank's replay holds two steps (a prediction target)
        bursts = {"prefill done": f"train.train_ratio={t.train_ratio} of the prefill's steps",
                  "resumed": "owed at the checkpoint it resumes from"}

        def update_as_owed(stops: StepStops, burst: str = "") -> int:
            """Run the updates the env steps so far are owed (train.train_ratio); how many ran. `burst` (a key of
            `bursts`): why many are owed at once, minutes of updates shown on the bar (and said in a log file)."""
            nonlocal segments
            owed = 0
            if burst:
                owed = updates_owed(counters["env_steps"], counters["replayed"], cfg, counters["ratio_from"])
            if owed and main and not progress:  # minutes of updates before the next line: say why
                print(f"env step {counters['env_steps']}: {burst}, training its {owed} owed updates now "
                      f"({bursts[burst]})", flush=True)
            phase = shown(bar, f"{burst}: its {owed} owed updates") if owed else contextlib.nullcontext()
            before = counters["updates"]
            with phase:
                while updates_owed(counters["env_steps"], counters["replayed"], cfg, counters["ratio_from"]):
                    # A segment holds a prediction target once some episode has two stored steps; until every rank's
                    # replay does, the owed updates follow later. Checked until it holds (it stays), so no collective
                    # per update after.
                    segments = segments or distributed.all_true(replay.longest_episode() >= 2, device)
                    if not segments:
                        break
                    stats = train_step(wm, ac, wm_opt, replay, cfg, device, counters["updates"], wm_parallel,
                                       ac_parallel)
                    counters["updates"] += 1
                    counters["replayed"] += t.batch_size * t.seq_len
                    interval.add(stats)
                    # A non-finite loss or gradient skipped that update (it never reaches weights or checkpoints).
                    wm_skipped, ac_skipped = int(stats["wm/skipped"]), int(stats.get("ac/skipped", 0))
                    counters["skipped_wm"] += wm_skipped
                    counters["skipped_ac"] += ac_skipped
                    wm_streak("loss or gradient" if wm_skipped else None, counters["updates"])
                    # imagined in a world model whose update was skipped, the actor-critic's is not its own fault
                    ac_streak("loss or gradient" if ac_skipped and not wm_skipped else None, counters["updates"])
                    if owed:
                        bar.set_postfix_str(f"{burst}: owed update {counters['updates'] - before}/{owed}", refresh=True)
                    stops.poll(checkpoint)  # a stop in the middle of them: the resumed run does the rest first
            return counters["updates"] - before

        # Ctrl-C / SIGTERM: stop after a step, with a checkpoint (under torchrun: the step the processes agree on)
        wm_streak = SkipStreak("the world model", f"train.wm_lr (now {t.wm_lr:g})")
        ac_streak = SkipStreak("the actor-critic", f"actor_critic.actor_lr and critic_lr (now "
                               f"{cfg.actor_critic.actor_lr:g} and {cfg.actor_critic.critic_lr:g}; train.wm_lr, now "
                               f"{t.wm_lr:g}, if the world model it imagines in diverged)")
        with StepStops() as stops:
            # A run stopped during a step's updates does the rest of them, then the rest of that step: its log row,
            # a checkpoint, the evaluation due there.
            mid_step = update_as_owed(stops, "resumed") > 0
            at = counters["env_steps"]
            if mid_step:
                next_log = ((at - cfg.env.num_envs) // t.log_every + 1) * t.log_every
            elif main and stopped_evaluation(logger, at, t.eval_every, t.env_steps, stride=cfg.env.num_envs):
                with stops.at_once():  # a run stopped during an evaluation makes it first
                    last_eval, evaluated_at = evaluate(at), at
            # after the catch-up: its updates sample the replay the stopped run's would have, without new first frames
            collector.reset(rank_seed(t.seed) + counters["vector_steps"])
            t_last, steps_last = time.perf_counter(), counters["env_steps"]
            while counters["env_steps"] < t.env_steps or mid_step:
                if not mid_step:
                    if counters["env_steps"] < t.prefill:
                        actions = rng.integers(num_actions, size=num_envs)
                    else:
                        actions = policy.act(collector.obs, collector.first)
                    collector.step(actions)
                    counters["vector_steps"] += 1
                    counters["env_steps"] += cfg.env.num_envs
                    bar.update(cfg.env.num_envs)
                    prefill_ends = counters["env_steps"] - cfg.env.num_envs < t.prefill <= counters["env_steps"]
                    update_as_owed(stops, "prefill done" if prefill_ends else "")
                if counters["env_steps"] >= next_log:
                    next_log += t.log_every
                    now = time.perf_counter()
                    episodes, restarts, replay_steps = global_counts()
                    stepped = counters["env_steps"] - steps_last  # 0: a resumed run finishing its stopped step
                    loop = dict({"env_steps_per_s": stepped / (now - t_last)} if stepped else {},
                                skipped_wm=counters["skipped_wm"], skipped_ac=counters["skipped_ac"],
                                replay_steps=replay_steps, updates=counters["updates"],
                                episodes=episodes, env_restarts=restarts,
                                replay_ratio=(counters["replayed"] - counters["ratio_from"][1])
                                / max(counters["env_steps"] - counters["ratio_from"][0], 1))
                    row = {**distributed.mean_scalars(interval.pop(), device),
                           **{f"loop/{k}": v for k, v in loop.items()}}
                    t_last, steps_last = now, counters["env_steps"]
                    if main:
                        row.update(stats_scores(episode_log.records(), cfg.env.name, "train/"))
                    logger.scalars(counters["env_steps"], row)
                    score = {name: f"{row[key]:.2f}" for key, name in BAR_SCORES.items() if key in row}
                    bar.set_postfix(episodes=episodes, updates=counters["updates"], **score)
                    if main and not progress:  # a log file still shows the run moving
                        updates = counters["updates"]
                        print(f"env step {counters['env_steps']}/{t.env_steps}: "
                              f"{updates} update{'s' * (updates != 1)}, "
                              f"{episodes} episode{'s' * (episodes != 1)}"
                              + (f", {loop['env_steps_per_s']:.1f} env steps/s" if stepped else "")
                              + "".join(f", {k}={v}" for k, v in score.items()), flush=True)
                evaluating = evaluation_due(counters["env_steps"], t.eval_every, t.env_steps, stride=cfg.env.num_envs)
                # evaluating: also at the last step; mid_step: the updates a resumed run just caught up on
                due = counters["env_steps"] >= next_ckpt or evaluating or mid_step
                mid_step = False
                if due:
                    if counters["env_steps"] >= next_ckpt:
                        next_ckpt += t.ckpt_every
                    checkpoint(evaluated=evaluating)  # also before each evaluation: Ctrl-C or a crash there loses
                                                      # no training
                stops.poll(checkpoint, saved=due)
                if evaluating and main:
                    with stops.at_once():
                        last_eval, evaluated_at = evaluate(counters["env_steps"]), counters["env_steps"]
        bar.close()
        if main:
            if evaluated_at != counters["env_steps"]:  # every run ends with an evaluation at its last step
                # a finished run resumed: its final evaluation is read back from the log, not played (and its
                # episodes appended) again; a run stopped during it evaluates now
                last_eval = logger.final_evaluation(counters["env_steps"], settings, checkpointed) or \
                    evaluate(counters["env_steps"])
            last_eval.update(stats_scores(episode_log.records(), cfg.env.name, "train_"))
        run.write_config()  # a finished run resumed writes no checkpoint: its evaluation's settings
        return last_eval


def load_replay_shards(run_path: Path, state: dict, capacity: int, seed: int,
                       device: Optional[torch.device] = None) -> ReplayBuffer:
    """This rank's replay on resume (stored on `device`, None = host). Same world size: its own shard, exactly.
    Fewer ranks than saved shards: rank r merges the shards j with j % world == r. More: rank r takes every
    world-th episode of them all, from the r-th on, so no episode is held twice."""
    names = state.get("replays") or [state["replay"]]  # older checkpoints name one buffer
    w, r = distributed.world_size(), distributed.rank()
    if len(names) == w:
        return ReplayBuffer.load(run_path / names[r], device)
    loaded = (ReplayBuffer.load(run_path / n) for n in (names[r::w] if len(names) > w else names))  # one at a time
    return ReplayBuffer.merged(loaded, capacity, seed, device, share=None if len(names) > w else (r, w))


PICTURE_STEPS = 8  # frames of the replayed segment the logged pictures show


@torch.no_grad()
def log_pictures(logger: MetricLogger, step: int, wm: WorldModel, replay: ReplayBuffer, device: torch.device,
                 seq_len: int, amp: bool = False) -> None:
    """Tensorboard pictures of a replayed segment of at most `seq_len` steps, the time positions training teaches
    the dynamics (drawn from a fixed seed, not the replay's own stream):
    `slots/decomposition` (input | reconstruction | segmentation | each slot, a row per frame of the first 4, slots
    carried over) and `wm/real_decoded_imagined` (`prediction_grid`: a row per frame, real | its codes decoded | the
    dynamics' open-loop prediction from the first frame under the real actions, decoded), computed under the
    autocast training runs under (`amp`: the codes it learned). Eager even under
    `train.compile`: these calls' shapes would otherwise add graphs to the compiled parts, which dynamo caps at 8
    each."""
    from world_model.decompose import decompose
    from world_model.visualize import decomposition_picture, prediction_grid

    length = min(PICTURE_STEPS, seq_len, replay.longest_episode())
    if length < 2:
        return
    batch = to_batch(replay.sample(1, length, np.random.default_rng(step)), wm.resolution, device)
    images = batch["images"][0]  # t 3 r r
    with fixed_rng(step, device), torch.compiler.set_stance("force_eager"), autocast(device, amp):
        parts = decompose(wm.autoencoder, images, carry=True)
        enc = wm.encode(batch["images"], batch.get("status"))
        imag = wm.open_loop(enc, batch["action"], 1, length - 1)
        decoded = wm.decode_codes(enc.slot_codes[0])  # t 3 r r
        imagined = torch.cat([torch.ones_like(decoded[:1]), wm.decode_codes(imag["slot_codes"][0])])  # after the first
    picture = decomposition_picture(images, parts["masks"], parts["recon"], parts["rgb"])  # the first 4 frames
    logger.image(step, "slots/decomposition", picture)
    logger.image(step, "wm/real_decoded_imagined", prediction_grid(images, decoded, imagined, range(length)))
