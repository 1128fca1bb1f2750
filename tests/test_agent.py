"""The agent loop: the tiny preset end to end, the replay-ratio invariant, resume after SIGKILL, eval."""
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import run
from agent.config import AgentConfig
from agent.evaluate import log_keys
from compare import assert_same_state, checkpoint, metric_rows
from agent.replay import ReplayBuffer
from agent.train import imagination_starts, preflight, train, updates_due
from envs.crafter import crafter_score
from envs.errors import UsageError
from world_model.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
FAST = ["env.asynchronous=false", "train.env_steps=240", "train.prefill=120", "train.log_every=40",
        "train.ckpt_every=120", "train.eval_episodes=1", "env.max_episode_steps=60", "train.train_ratio=2"]


def tiny(*extra):
    return load_config(AgentConfig, ROOT / "configs/tiny.yaml", [*FAST, *extra])


@pytest.mark.nethack
def test_nethack_agent_trains_and_evaluates(tmp_path, capsys):
    """The tiny agent on NetHack, end to end: its summaries carry the keys Crafter's share (episodes, mean_return,
    mean_length) beside NetHack's score and depth, in the logs and in eval's JSON."""
    cfg = tiny("env.name=nethack", "train.env_steps=120", "train.prefill=60", "train.ckpt_every=120")
    result = train(cfg, str(tmp_path / "run"), progress=False)
    assert {"score", "depth", "return", "length", "episodes", "train_score"} <= set(result)
    # the bottom line's 7 status tokens follow the learned frame codes: in the replay, the checkpoint, the dynamics
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)
    assert state["status_vars"] == 7 and state["config"]["dynamics"]["frame_vars"] == cfg.frame.vars + 7
    with np.load(tmp_path / "run" / state["replays"][0]) as f:
        chunks = [c[2] for c in json.loads(str(f["meta"]))["chunks"]]
    with np.load(tmp_path / "run" / "replay" / chunks[0]) as f:
        assert f["data/status"].shape[1:] == (7,) and f["data/status"].dtype == np.uint8
        assert "data/stats" not in f.files  # the raw blstats, which no model reads, stay out of the replay
    assert run.main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "1", "--no-progress"]) == 0
    assert "mean score" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "eval_agent.json").read_text())
    assert {"episodes", "mean_return", "mean_length", "mean_score", "mean_depth", "max_depth"} <= set(summary)
    assert summary["env"] == "nethack" and summary["episodes"] == 1
    # its world model scored on episodes of another window: refused, naming the collect that fits
    assert run.main(["collect", "--env", "nethack", "--frames", "12", "--crop", "5", "--no-progress", "--out",
                     str(tmp_path / "crop5")]) == 0
    capsys.readouterr()
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "crop5")]) == 2
    assert (f"{tmp_path / 'crop5'} holds NetHack episodes of crop 5; this agent played with env.crop=9: collect its "
            "episodes with --crop 9") in capsys.readouterr().err


@pytest.mark.nethack
def test_a_nethack_run_from_before_status_tokens_resumes_without_them(tmp_path, monkeypatch):
    """A NetHack run made before the env gave status tokens (no `status` in its replay, no `status_vars` in its
    checkpoint) resumes on today's env: its model and replay go on without the tokens."""
    from envs.nethack import NetHackEnv

    init, observe = NetHackEnv.__init__, NetHackEnv._observe

    def old_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self.observation_space.spaces["status"]

    monkeypatch.setattr(NetHackEnv, "__init__", old_init)
    monkeypatch.setattr(NetHackEnv, "_observe", lambda self, obs: {k: v for k, v in observe(self, obs).items()
                                                                   if k != "status"})
    run_dir = tmp_path / "run"
    cfg = tiny("env.name=nethack", "train.env_steps=60", "train.prefill=40", "train.eval_every=0")
    train(cfg, str(run_dir), progress=False)
    ckpt = run_dir / "checkpoints" / "latest.pt"
    state = torch.load(ckpt, weights_only=False)
    del state["status_vars"]
    torch.save(state, ckpt)
    monkeypatch.undo()
    train(tiny("env.name=nethack", "train.env_steps=80", "train.prefill=40", "train.eval_every=0"), str(run_dir),
          resume=True, progress=False)
    after = torch.load(ckpt, weights_only=False)
    assert after["counters"]["env_steps"] == 80 and after["status_vars"] == 0


def test_concurrent_evaluations_keep_their_own_episodes(tmp_path, monkeypatch):
    """Two evaluations writing to one stats file at once (`run.py eval` beside a training run's evaluation):
    each summarizes its own episodes and the file gets both."""
    import envs.collect
    from agent.evaluate import evaluate_agent

    cfg = tiny("env.max_episode_steps=5")
    stats, make_env, inner = tmp_path / "eval_stats.jsonl", envs.collect.make_env, []

    def make_env_then_another_evaluation(name, **kwargs):
        env = make_env(name, **kwargs)
        if not inner:  # the first evaluation has its env; a second one runs to the end meanwhile
            inner.append(None)
            inner[0] = evaluate_agent(None, None, cfg, torch.device("cpu"), 2, stats, seed=7)
        return env

    monkeypatch.setattr(envs.collect, "make_env", make_env_then_another_evaluation)
    outer = evaluate_agent(None, None, cfg, torch.device("cpu"), 1, stats, seed=3)
    assert (outer["episodes"], inner[0]["episodes"]) == (1, 2)
    assert len(stats.read_text().splitlines()) == 3 and [p.name for p in tmp_path.iterdir()] == [stats.name]


def test_imagination_starts_only_from_valid_steps():
    """Imagination starts are valid steps of the replayed batch: distinct while there are enough, else every valid
    step once before any repeats, and never a padded step."""
    torch.manual_seed(0)
    valid = torch.arange(16) < torch.tensor([[16], [3], [9], [1]])  # b t: 29 valid steps
    starts = imagination_starts(valid, 28)
    assert len(set(starts.tolist())) == 28 and valid.flatten()[starts].all()
    many = imagination_starts(valid, 64)
    assert valid.flatten()[many].all() and len(set(many.tolist())) == 29
    assert max(torch.bincount(many).tolist()) <= 3  # 64 over 29 steps: two or three times each
    draws = torch.stack([imagination_starts(valid, 10) for _ in range(200)])
    assert set(draws.flatten().tolist()) == set(torch.nonzero(valid.flatten()).flatten().tolist())  # all reachable


def test_a_replay_smaller_than_a_segment_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"replay.capacity=6 is less than one training segment"):
        train(tiny("replay.capacity=6"), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_a_replay_smaller_than_the_prefill_and_a_prefill_past_the_end_are_noted():
    assert preflight(tiny()) == []
    notes = preflight(tiny("replay.capacity=300", "train.prefill=400", "train.env_steps=1000"))
    assert notes == ["note: replay.capacity=300 holds fewer steps than train.prefill=400: the first 100 random steps "
                     "are overwritten before the first update"]
    assert preflight(tiny("train.prefill=240")) == [
        "note: train.prefill=240 is not below train.env_steps=240: the run plays random actions only and never "
        "updates its models; lower train.prefill or raise train.env_steps"]



def test_more_env_processes_than_the_cores_hold_are_noted(monkeypatch):
    """64 worker processes on 2 cores step slowly and start for minutes: noted, with the key that runs fewer."""
    import envs.vector

    monkeypatch.setattr(envs.vector, "usable_cores", lambda: 2)
    assert preflight(tiny("env.asynchronous=true", "env.num_envs=4")) == []
    assert preflight(tiny("env.asynchronous=true", "env.num_envs=64", "env.envs_per_worker=16")) == []
    assert preflight(tiny("env.asynchronous=true", "env.num_envs=64")) == [
        "note: env.num_envs=64 with env.envs_per_worker=1 starts 64 env worker processes on 2 CPU cores; fewer "
        "processes running more envs each step as fast with less overhead (env.envs_per_worker)"]
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun: 2 nodes of 2 processes, each node's 2 x 2 workers on 2 cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert preflight(tiny("env.asynchronous=true", "env.num_envs=8")) == []
    assert preflight(tiny("env.asynchronous=true", "env.num_envs=12")) == [
        "note: env.num_envs=12 with env.envs_per_worker=1 over 4 processes (2 on this node) starts 6 env worker "
        "processes on 2 CPU cores; fewer processes running more envs each step as fast with less overhead "
        "(env.envs_per_worker)"]


def test_nethacks_task_and_window_reach_its_env_and_are_refused_elsewhere():
    """env.task and env.crop are NetHack's: passed to its env (as `collect --task/--crop`), refused on Crafter; the
    window is an odd number of cells."""
    from agent.config import env_kwargs

    cfg = tiny("env.name=nethack", "env.task=challenge", "env.crop=11")
    assert env_kwargs(cfg, None) == {"size": 64, "stats_path": None, "max_episode_steps": cfg.env.max_episode_steps,
                                     "task": "challenge", "crop": 11}
    assert "task" not in env_kwargs(tiny(), None)
    with pytest.raises(UsageError, match=r"env.task=challenge and env.crop=7: NetHack's \(env.name=nethack\); "
                                         "crafter has none"):
        preflight(tiny("env.task=challenge", "env.crop=7"))
    with pytest.raises(UsageError, match=r"env.crop=8: an odd number of map cells"):
        preflight(tiny("env.name=nethack", "env.crop=8"))
    with pytest.raises(ConfigError, match=r"env.task"):
        tiny("env.task=oracle")


def test_an_evaluation_that_fails_loses_no_checkpoint(tmp_path, monkeypatch):
    """The checkpoint at an env step is written before that step's evaluation: a crash (or Ctrl-C) there keeps it."""
    import agent.train

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(agent.train, "evaluate_agent", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(tiny("train.env_steps=60", "train.prefill=60", "train.eval_every=60", "train.ckpt_every=1000"),
              str(tmp_path / "run"), progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 60


def test_an_evaluation_stopped_midway_is_played_on_resume(tmp_path, monkeypatch):
    """Stopped during the evaluation at step 100 (between checkpoints at 120), the run resumes from the checkpoint
    written just before it and plays that evaluation first: none is lost."""
    import agent.train
    from stopping import interrupted_once

    rd, stopped = tmp_path / "run", interrupted_once(agent.train.evaluate_agent)
    monkeypatch.setattr(agent.train, "evaluate_agent", stopped)
    cfg = tiny("train.env_steps=160", "train.eval_every=100", "train.ckpt_every=120", "train.prefill=1000")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(rd), progress=False)
    train(load_config(AgentConfig, rd / "config.yaml"), str(rd), resume=True, progress=False)
    assert [r["step"] for r in metric_rows(rd) if "eval/return" in r] == [100, 160] and stopped.calls == 3


def test_ctrl_c_during_the_prefills_updates_stops_after_that_update(tmp_path, monkeypatch, ctrl_c, capsys):
    """The updates owed at the end of the prefill can take minutes: Ctrl-C during the second stops after it, with a
    checkpoint counting two updates, and the resumed run does the rest of them (saying so), then the rest of that
    env step: its log row and the evaluation the stopped run had not made yet."""
    import agent.train
    from stopping import ctrl_c_in_call

    plain, sizes = agent.train.train_step, []

    def real(wm, ac, opt, replay, *args):  # the replay each update samples from
        sizes.append(len(replay))
        return plain(wm, ac, opt, replay, *args)

    monkeypatch.setattr(agent.train, "train_step", ctrl_c_in_call(real, 2))
    rd, cfg = tmp_path / "run", tiny("train.env_steps=120", "train.prefill=100", "train.ckpt_every=1000",
                                     "train.log_every=20", "train.eval_every=100")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(rd), progress=False)
    stopped = checkpoint(rd)
    assert stopped["counters"]["updates"] == 2 and stopped["counters"]["env_steps"] == 100
    monkeypatch.setattr(agent.train, "train_step", real)
    capsys.readouterr()
    evaluated, play = [], agent.train.evaluate_agent
    monkeypatch.setattr(agent.train, "evaluate_agent",
                        lambda *a, **k: evaluated.append(checkpoint(rd)) or play(*a, **k))  # which updates it saw
    train(load_config(AgentConfig, rd / "config.yaml"), str(rd), resume=True, progress=False)
    owed = updates_due(100, cfg) - 2
    assert sizes[2:2 + owed] == [sizes[0]] * owed  # the replay the stopped run's would have sampled: no new frames
    assert checkpoint(rd)["counters"]["updates"] == updates_due(120, cfg) > updates_due(100, cfg) > 2
    assert (f"env step 100: resumed, training its {owed} owed updates now (owed at the checkpoint it resumes from)"
            in capsys.readouterr().out)
    assert [c["counters"]["updates"] for c in evaluated] == [updates_due(100, cfg), updates_due(120, cfg)]
    # the catch-up checkpoint at env step 100 wrote its own replay state, not over the one the stopped run's names
    assert evaluated[0]["replays"] != stopped["replays"]
    rows = [r for r in metric_rows(rd) if "loop/updates" in r]
    assert [(r["step"], r["loop/updates"]) for r in rows] == [(s, updates_due(s, cfg)) for s in range(20, 121, 20)]
    rates = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    rates = [r["step"] for r in rates if "loop/env_steps_per_s" in r]
    assert rates == [20, 40, 60, 80, 120]  # the row at 100 finishes the stopped step: no env step since the last row


def test_a_kept_evaluation_checkpoint_plays_its_own_agent(tmp_path, capsys):
    """With train.keep_checkpoints=true each evaluation's checkpoint stays (step_<env step>.pt); `eval --step N`
    plays that agent and writes eval_agent_step<N>.json beside the latest's."""
    rd = tmp_path / "run"
    train(tiny("train.env_steps=100", "train.prefill=60", "train.eval_every=60", "train.ckpt_every=1000",
               "train.keep_checkpoints=true"), str(rd), progress=False)
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["latest.pt", "step_100.pt", "step_60.pt"]
    capsys.readouterr()
    assert run.main(["eval", "--checkpoint", str(rd), "--episodes", "1", "--step", "60", "--no-progress"]) == 0
    assert "crafter agent at env step 60: 1 episode" in capsys.readouterr().out
    assert json.loads((rd / "eval_agent_step60.json").read_text())["env_steps"] == 60
    assert (rd / "eval_agent_step60_stats.jsonl").is_file() and not (rd / "eval_agent.json").exists()
    assert run.main(["eval", "--checkpoint", str(rd), "--episodes", "1", "--step", "60", "--policy", "random"]) == 2
    assert "--policy random plays without one" in capsys.readouterr().err


def test_a_run_ends_with_an_evaluation_at_its_last_step(tmp_path, capsys):
    """Periodic evaluations at eval_every, and one at the last env step when that falls between them; each says its
    scores in a line (a log file of a --no-progress run too)."""
    result = train(tiny("train.env_steps=100", "train.prefill=100", "train.eval_every=60", "train.ckpt_every=1000"),
                   str(tmp_path / "run"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/crafter_score" in r] == [60, 100]
    assert result["crafter_score"] == [r for r in rows if "eval/crafter_score" in r][-1]["eval/crafter_score"]
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if ": evaluation, " in line]
    assert [line.split(":")[0] for line in said] == ["env step 60", "env step 100"]
    assert [line for line in out if ": evaluating, " in line] == ["env step 60: evaluating, 1 episode",
                                                                 "env step 100: evaluating, 1 episode"]
    assert said[-1].endswith(f"1 episode: crafter_score={result['crafter_score']:.4g}, return={result['return']:.4g}, "
                             f"length={result['length']:.4g}")


def test_an_agent_on_a_frozen_pretrained_encoder_resumes_after_it_moves(tmp_path, monkeypatch):
    """The CPU recipe's shape: the agent on a pretrained VQ encoder (encoder.checkpoint, frozen). The encoder's
    weights never change, and the run resumes and evaluates from its own checkpoint after the pretraining run moved."""
    from test_pretrain import TINY
    from test_wm import toy_dataset

    monkeypatch.chdir(tmp_path)
    toy_dataset(tmp_path / "d")
    assert run.main(["pretrain", "--data", "d", "--run-dir", "pre", "--no-progress", *TINY, "data.resolution=16",
                     "train.steps=1", "model.vq.enabled=true", "model.vq.num_vars=2"]) == 0
    pretrained = torch.load(tmp_path / "pre" / "checkpoints" / "latest.pt", weights_only=False)["model"]
    agent = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--run-dir", "agent", "--no-progress", *FAST,
             "encoder.checkpoint=pre", "encoder.mode=frozen"]
    assert run.main([*agent, "train.env_steps=180"]) == 0
    assert load_config(AgentConfig, tmp_path / "agent" / "config.yaml").encoder.checkpoint == str(tmp_path / "pre")
    (tmp_path / "pre").rename(tmp_path / "pre_moved")
    assert run.main(["train", "--resume", "agent", "--no-progress", "train.env_steps=240"]) == 0
    state = torch.load(tmp_path / "agent" / "checkpoints" / "latest.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 240 and state["counters"]["updates"] == 15
    assert all(torch.equal(pretrained[k], state["wm"][f"autoencoder.{k}"]) for k in pretrained)  # frozen throughout
    assert run.main(["eval", "--checkpoint", "agent", "--episodes", "1"]) == 0


def test_log_rows_average_the_updates_since_the_last_row():
    """The agent's update stats (tensors as the updates left them, and numbers) averaged per log row."""
    from world_model.updates import StepMeans

    means = StepMeans()
    means.add({"wm/loss": torch.tensor(1.0), "wm/skipped": 0.0})
    means.add({"wm/loss": torch.tensor(float("nan")), "wm/skipped": 1.0})  # a skipped update: its NaN loss is not
    means.add({"wm/loss": torch.tensor(4.0, dtype=torch.float64), "wm/skipped": 0.0})  # averaged in
    assert means.pop() == pytest.approx({"wm/loss": 2.5, "wm/skipped": 1 / 3})
    assert means.pop() == {}  # no update since: the next row holds no update stats, not the old ones again
    means.add({"ac/entropy": float("inf")})
    assert math.isnan(means.pop()["ac/entropy"])
    # a checkpoint between rows keeps the sums as they are held: the restored row is the same bit for bit
    steps = [{"wm/loss": torch.tensor(v), "wm/acc": torch.tensor(v / 3), "lr": 0.1 * v} for v in (0.1, 0.7, 1.3)]
    straight, saved = StepMeans(), StepMeans()
    for stats in steps:
        straight.add(stats)
    for stats in steps[:2]:
        saved.add(stats)
    resumed = StepMeans()
    resumed.load_state_dict(json.loads(json.dumps(saved.state_dict())))  # plain numbers, as a checkpoint holds them
    resumed.add(steps[2])
    assert resumed.pop() == straight.pop()


def test_a_row_after_no_update_repeats_no_loss(tmp_path):
    """Updates come every 16 env steps here and rows every 8: a row with no update since the last holds no wm/ or ac/
    values (they used to repeat the last update's)."""
    train(tiny("train.env_steps=176", "train.log_every=8", "train.ckpt_every=1000"), str(tmp_path / "run"),
          progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loop/updates" in r and r["step"] > 120]
    fresh = [r["loop/updates"] > before["loop/updates"] for before, r in zip(rows, rows[1:])]
    assert True in fresh and False in fresh
    assert all(("wm/loss" in r and "ac/entropy" in r) == new for r, new in zip(rows[1:], fresh))


def test_replay_ratio_invariant():
    """Replayed steps stay within one update of train_ratio x env steps; the loop's test (`updates_owed`, one update
    at a time) owes exactly the updates `updates_due` counts for an unchanged config, and counts them all at once."""
    from agent.train import updates_owed

    cfg = tiny()
    t = cfg.train
    assert updates_due(t.prefill - 1, cfg) == 0
    for steps in (t.prefill, 1000, 12_345):
        replayed = updates_due(steps, cfg) * t.batch_size * t.seq_len
        assert steps * t.train_ratio - t.batch_size * t.seq_len < replayed <= steps * t.train_ratio
    updates = 0
    for steps in range(0, 3000, 2):
        owed = updates_owed(steps, updates * t.batch_size * t.seq_len, cfg)
        while updates_owed(steps, updates * t.batch_size * t.seq_len, cfg):
            updates += 1
        assert updates == updates_due(steps, cfg) and owed == updates - updates_due(steps - 2, cfg), steps


def test_the_agent_checkpoints_before_each_evaluation(tmp_path, monkeypatch, capsys):
    """Whatever train.ckpt_every is, an evaluation (which Ctrl-C or a crash may stop) starts from a checkpoint."""
    import agent.train as agent_train

    rd, seen, play = tmp_path / "run", [], agent_train.evaluate_agent

    def evaluate_agent(*args, **kwargs):
        seen.append(checkpoint(rd)["counters"]["env_steps"])
        return play(*args, **kwargs)

    monkeypatch.setattr(agent_train, "evaluate_agent", evaluate_agent)
    train(tiny("train.env_steps=160", "train.eval_every=100", "train.ckpt_every=120", "train.prefill=1000"), str(rd),
          progress=False)
    assert seen == [100, 160]
    assert "train.env_steps=160 is too few (updates start after train.prefill=1000" in capsys.readouterr().err


def test_a_resume_with_another_batch_or_ratio_keeps_the_ratio_from_there(tmp_path):
    """Replayed steps are counted as each update ran: a resume at half the batch owes the updates that keep
    replayed / env steps at train_ratio from there (not a burst recounted from step 0), and logs the true ratio;
    a resume with another train_ratio holds the new one from that step."""
    rd = tmp_path / "run"
    train(tiny("train.env_steps=160", "train.eval_every=0"), str(rd), progress=False)
    assert checkpoint(rd)["counters"]["updates"] == updates_due(160, tiny()) == 10  # 10 x 4 x 8 = 160 x 2
    cfg = load_config(AgentConfig, rd / "config.yaml", ["train.env_steps=200", "train.batch_size=2"])
    train(cfg, str(rd), resume=True, progress=False)
    counters = checkpoint(rd)["counters"]
    assert counters["replayed"] == 200 * 2 and counters["updates"] == 10 + 80 // (2 * 8)
    assert [r["loop/replay_ratio"] for r in metric_rows(rd, after=160) if "loop/replay_ratio" in r] == [2.0]
    # a new ratio holds from the resume on: 40 more env steps at ratio 4 owe 160 replayed steps, 10 updates of 2 x 8
    cfg = load_config(AgentConfig, rd / "config.yaml", ["train.env_steps=240", "train.train_ratio=4"])
    train(cfg, str(rd), resume=True, progress=False)
    counters = checkpoint(rd)["counters"]
    assert counters["ratio_from"] == [200, 400] and counters["replayed"] == 400 + 40 * 4 and counters["updates"] == 25
    assert [r["loop/replay_ratio"] for r in metric_rows(rd, after=200) if "loop/replay_ratio" in r] == [4.0]


def test_a_run_whose_replay_was_lost_resumes_with_a_new_one(tmp_path, capsys):
    """A damaged or deleted replay stops a resume with an error that names the way on, `--new-replay`: the models,
    optimizers and counters go on from the checkpoint with an empty replay, and updates wait until the agent has
    played train.prefill steps into it, then keep train_ratio from there."""
    rd = tmp_path / "run"
    train(tiny("train.env_steps=160", "train.eval_every=0"), str(rd), progress=False)
    before = checkpoint(rd)
    (rd / before["replays"][0]).write_bytes(b"damaged")
    argv = ["train", "--resume", str(rd), "--no-progress", "train.env_steps=360", "train.eval_every=0"]
    capsys.readouterr()
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a readable replay buffer" in err and f"run.py train --resume {rd} --new-replay" in err
    assert run.main(["train", "--new-replay", "--no-progress"]) == 2
    assert "--new-replay starts a resumed run's replay afresh; it needs --resume RUN" in capsys.readouterr().err
    assert run.main([*argv, "--new-replay"]) == 0
    after = checkpoint(rd)
    refill = before["counters"]["env_steps"] + tiny().train.prefill  # 160 + 120: no update owed before
    assert f"updates pause until env step {refill} (train.prefill=120 steps" in capsys.readouterr().err
    assert after["counters"]["ratio_from"] == [refill, before["counters"]["replayed"]]
    assert after["counters"]["updates"] == before["counters"]["updates"] + (360 - refill) * 2 // (4 * 8)
    logged = [r["loop/updates"] for r in metric_rows(rd, after=160) if r["step"] <= refill]
    assert logged == [before["counters"]["updates"]] * 3
    saved = ReplayBuffer.load(rd / after["replays"][0])
    assert len(saved) == saved.steps_added == 2 + 200  # the new first frames, then the 200 steps played since
    # stopped before its own first checkpoint, a --new-replay run is resumed with the flag again (the checkpoint it
    # went on from still names the lost replay); once it wrote one, without
    from types import SimpleNamespace

    args = SimpleNamespace(command="train", run_dir=str(rd), resume=str(rd), new_replay=True)
    for started, hint in ((time.time() + 60, f"--resume {rd} --new-replay`"), (0, f"--resume {rd}`")):
        args.started = started
        step = torch.load(rd / "checkpoints" / "latest.pt", weights_only=False)["counters"]["env_steps"]
        assert run._way_back(args).endswith(f"{hint} continues from its last checkpoint (env step {step})")
    with np.load(rd / after["replays"][0]) as f:  # the lost replay's files are gone
        chunks = [c[2] for c in json.loads(str(f["meta"]))["chunks"]]
    assert sorted(p.name for p in (rd / "replay").glob("*")) == sorted([Path(after["replays"][0]).name, *chunks])


def test_a_checkpoint_from_before_replayed_steps_were_counted_resumes_at_its_ratio(tmp_path):
    """An older checkpoint holds no replayed-step count: it is derived from its updates and batches, so the resume
    owes only the updates of its new env steps, not every update since step 0 again."""
    from world_model.rundir import atomic_torch_save

    rd = tmp_path / "run"
    train(tiny("train.env_steps=160", "train.eval_every=0"), str(rd), progress=False)
    state = checkpoint(rd)
    for key in ("replayed", "ratio_from", "skipped_wm", "skipped_ac", "env_restarts"):
        del state["counters"][key]
    atomic_torch_save(state, rd / "checkpoints" / "latest.pt")
    train(load_config(AgentConfig, rd / "config.yaml", ["train.env_steps=200"]), str(rd), resume=True,
          progress=False)
    counters = checkpoint(rd)["counters"]  # 10 updates of 4 x 8 replayed 320 = 160 x 2; 40 more env steps owe 2
    assert counters["updates"] == 12 and counters["replayed"] == 320 + 2 * 32 and counters["ratio_from"] == [0, 0]


def test_tiny_preset_end_to_end(tmp_path, capsys):
    result = train(tiny(), str(tmp_path / "run"), progress=False)
    assert {"crafter_score", "return", "train_crafter_score", "train_episodes"} <= set(result)
    # the updates owed for the prefill's steps run at once when it ends (minutes at preset scale): a log says so
    assert (f"env step 120: prefill done, training its {updates_due(120, tiny())} owed updates now "
            "(train.train_ratio=2.0 of the prefill's steps)") in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # each of Crafter's 22 achievements has its success-rate curve, over the training episodes and the evaluations'
    for prefix in ("train/", "eval/"):
        logged = {k for r in rows for k in r if k.startswith(f"{prefix}achievement_")}
        assert len(logged) == 22 and f"{prefix}achievement_collect_wood" in logged
    last = [r for r in rows if "loop/replay_ratio" in r][-1]
    assert last["step"] == 240 and last["loop/updates"] == updates_due(240, tiny())
    assert abs(last["loop/replay_ratio"] - 2.0) < 32 / 240 + 1e-9  # within one update of the train ratio
    replay_dir = tmp_path / "run" / "replay"  # the last checkpoint's state file and the chunks it names, nothing else
    state = f"{240:012d}-{last['loop/updates']:09d}-rank0.npz"
    with np.load(replay_dir / state) as f:
        chunks = [c[2] for c in json.loads(str(f["meta"]))["chunks"]]
    assert sorted(p.name for p in replay_dir.glob("*")) == sorted([state, *chunks])
    assert (tmp_path / "run" / "stats.jsonl").read_text().strip()  # training episodes, crafter schema
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()  # the final evaluation's pictures: slots of replayed frames, real vs decoded vs imagined
    for tag, wide in (("slots/decomposition", True), ("wm/real_decoded_imagined", False)):
        (picture,) = events.Images(tag)  # a row per frame: slots across, or real | decoded | imagined
        assert picture.step == 240 and (picture.width > picture.height) == wide
    evals = []
    for _ in range(2):  # the agent's sampling and the env are seeded: a repeat plays the same episode
        assert run.main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "1", "--no-progress"]) == 0
        evals.append(json.loads((tmp_path / "run" / "eval_agent.json").read_text()))
    assert evals[0] == evals[1] and evals[0]["seed"] == 10_000
    assert run.main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "1", "--policy", "random",
                     "--no-progress"]) == 0
    assert (tmp_path / "run" / "eval_random_stats.jsonl").is_file()
    # each source of episodes keeps its own records: the run's evaluations, and the last `eval` call's (beside its
    # eval_agent.json, not the same seeded episodes again after those of the first call)
    lines = {name: len((tmp_path / "run" / name).read_text().splitlines()) for name in ("eval_stats.jsonl",
                                                                                         "eval_agent_stats.jsonl")}
    assert lines == {"eval_stats.jsonl": 1, "eval_agent_stats.jsonl": 1}
    # the agent's slot encoder and decoder, shown on game frames like a pretraining run's
    viz = tmp_path / "viz"
    assert run.main(["visualize", "--checkpoint", str(tmp_path / "run"), "--frames", "2", "--out", str(viz)]) == 0
    assert json.loads((viz / "summary.json").read_text())["env"] == "crafter"  # the game the agent played
    summary = json.loads((viz / "summary.json").read_text())
    assert summary["step"] == 240 and summary["pngs"] == 2 and "note" not in summary  # it has a decoder
    from agent.policy import SlotPolicy

    acted, act = [], SlotPolicy.act
    with pytest.MonkeyPatch.context() as patch:  # the frames are the trained agent's own play, seeded
        patch.setattr(SlotPolicy, "act", lambda self, *a, **k: acted.append(1) or act(self, *a, **k))
        assert run.main(["visualize", "--checkpoint", str(tmp_path / "run"), "--frames", "3", "--out",
                         str(tmp_path / "viz_again")]) == 0
        assert json.loads((tmp_path / "viz_again" / "summary.json").read_text())["policy"] == "agent"
        assert len(acted) == 2  # an action before each frame after the first
        assert (tmp_path / "viz_again" / "frame_0001.png").read_bytes() == (viz / "frame_0001.png").read_bytes()
        assert run.main(["visualize", "--checkpoint", str(tmp_path / "run"), "--frames", "2", "--policy", "random",
                         "--out", str(tmp_path / "viz_random")]) == 0
        assert len(acted) == 2 and json.loads((tmp_path / "viz_random" / "summary.json").read_text())["policy"] == \
            "random"
    assert run.main(["visualize", "--checkpoint", str(tmp_path / "run"), "--env", "nethack", "--policy", "agent",
                     "--out", str(viz)]) == 2
    assert "--policy agent plays crafter, the game" in capsys.readouterr().err
    assert run.main(["visualize", "--checkpoint", str(tmp_path / "run"), "--env", "clevr", "--out", str(viz)]) == 2
    assert run.main(["visualize", "--checkpoint", str(tmp_path / "run"), "--clevr-root", str(tmp_path), "--out",
                     str(viz)]) == 2
    assert "--clevr-root shows CLEVR scenes to a pretraining run; " in capsys.readouterr().err
    # the agent's world model, scored open loop on collected episodes (an agent run keeps none: --data is needed),
    # its context and horizons fitted into the time positions its 8-step training segments taught it
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "run")]) == 2
    assert "is an agent run, which keeps no episode dataset: pass --data DIR" in capsys.readouterr().err
    assert run.main(["collect", "--env", "crafter", "--frames", "100", "--max-episode-steps", "20", "--out",
                     str(tmp_path / "episodes")]) == 0
    capsys.readouterr()
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "episodes"),
                     "--segments", "2"]) == 0
    out, err = capsys.readouterr()
    assert "train.seq_len=8 segments (time positions 0..6): context 4, horizons 1, 4" in err
    episodes = tmp_path / "episodes"
    assert f"open-loop prediction, env step 240, 2 segments from all 5 episodes (100 steps) of {episodes}" in out
    scored = json.loads((tmp_path / "run" / "eval_wm_data_episodes" / "eval_wm.json").read_text())
    assert scored["step"] == 240 and 0 <= scored["h4/code_acc"] <= 100 and "h5/code_acc" not in scored
    # resuming the finished run plays no evaluation again: the final one is read back from the log, nothing appended;
    # a shorter train.env_steps does not rewrite config.yaml to misdescribe the run
    logs = {name: (tmp_path / "run" / name).read_text() for name in ("eval_stats.jsonl", "metrics.jsonl")}
    # a damaged line of the training episodes (a hand edit; here the first of the 2) is dropped with a warning on
    # resume, rather than stopping the run where it reads them
    stats = tmp_path / "run" / "stats.jsonl"
    assert len(stats.read_text().splitlines()) == result["train_episodes"] == 2
    stats.write_text("#" + stats.read_text()[1:])
    capsys.readouterr()
    again = train(tiny("train.env_steps=120"), str(tmp_path / "run"), resume=True, progress=False)
    assert f"warning: {stats}: dropped 1 damaged line(s)" in capsys.readouterr().err
    assert again == {**result, **log_keys(crafter_score(stats), "crafter", "train_"),
                     "train_return_recent": crafter_score(stats)["mean_return"],
                     "train_crafter_score_recent": crafter_score(stats)["score"]} and again["train_episodes"] == 1
    assert logs == {name: (tmp_path / "run" / name).read_text() for name in logs}
    assert load_config(AgentConfig, tmp_path / "run" / "config.yaml").train.env_steps == 240
    # with another number of evaluation episodes the final evaluation plays again, and then holds: a later resume as the
    # run now is reads it back, appending no episodes a second time
    again = train(tiny("train.eval_episodes=2"), str(tmp_path / "run"), resume=True, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "eval_stats.jsonl").read_text().splitlines()]
    assert again["episodes"] == 2 and [r["env_step"] for r in records] == [240] * 3  # each names its evaluation
    logs = {name: (tmp_path / "run" / name).read_text() for name in ("eval_stats.jsonl", "metrics.jsonl")}
    assert train(load_config(AgentConfig, tmp_path / "run" / "config.yaml"), str(tmp_path / "run"), resume=True,
                 progress=False) == again
    assert logs == {name: (tmp_path / "run" / name).read_text() for name in logs}



@pytest.mark.nethack
def test_training_scores_have_a_recent_mean_beside_the_all_episode_one(tmp_path):
    """25 NetHack episodes returning 0, 1, ..., 24: the logged return is their mean (12), the recent one the mean of
    the last 20 (5 ... 24: 14.5), as the score (10x the return here); 10 of the 25 died (40%)."""
    from agent.evaluate import stats_scores
    from envs.jsonl import read_records

    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps({"reward": float(i), "score": 10 * i, "depth": 1, "max_depth": 1, "length": 5,
                                        "end_status": "DEATH" if i % 5 < 2 else "ABORTED"}) + "\n" for i in range(25)))
    scores = stats_scores(read_records(path), "nethack", "train/")
    assert scores["train/return"] == 12.0 and scores["train/return_recent"] == 14.5
    assert scores["train/score"] == 120.0 and scores["train/score_recent"] == 145.0
    assert scores["train/died_pct"] == 40.0 and scores["train/episodes"] == 25

def test_a_seeded_run_repeats_bitwise(tmp_path):
    """Two runs of one config (one thread) log the same numbers and end with the same weights: the games, the
    replay samples, the updates and the evaluation are all seeded. Crafter's own despawn order broke this once."""
    rows, weights = [], []
    for name in ("a", "b"):
        train(tiny("train.env_steps=160", "train.eval_every=0"), str(tmp_path / name), progress=False)
        rows.append([{k: v for k, v in json.loads(line).items() if k != "time" and not k.endswith("per_s")}
                     for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
        weights.append(torch.load(tmp_path / name / "checkpoints" / "latest.pt", weights_only=False)["wm"])
    assert rows[0] == rows[1] and any("wm/loss" in r for r in rows[0])
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_episodes_shorter_than_a_segment_are_trained_on(tmp_path):
    """A game that ends fast (here a step limit of 5 against segments of train.seq_len) still trains: its
    segments are padded past each episode's end, and every owed update runs with finite losses."""
    cfg = tiny("env.max_episode_steps=5", "train.env_steps=80", "train.prefill=20", "train.log_every=40")
    assert cfg.train.seq_len > 6 and updates_due(80, cfg) > 0
    given = copy.deepcopy(cfg)
    train(cfg, str(tmp_path / "run"), progress=False)
    assert cfg == given  # the derived sizes go to config.yaml, not into the caller's config
    assert load_config(AgentConfig, tmp_path / "run" / "config.yaml").dynamics.num_actions == 17
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loop/updates" in r][-1]
    assert last["loop/updates"] == updates_due(80, cfg) and last["loop/skipped_wm"] == 0
    assert all(math.isfinite(r[k]) for r in rows for k in ("wm/loss", "ac/loss_critic") if k in r)
    assert any("wm/loss_cont" in r for r in rows)


def test_resume_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "run.py", "train", "--run-dir", str(run_dir), "--no-progress", *FAST,
            "train.env_steps=100000", "train.ckpt_every=60", "train.prefill=100000"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.is_file() and torch.load(ckpt, weights_only=False)["counters"]["env_steps"] >= 120:
            break
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)  # the killed run as it was left, resumed a second time below
    state = torch.load(ckpt, weights_only=False)  # never torn: written to a temp file and renamed
    steps = state["counters"]["env_steps"]
    saved = ReplayBuffer.load(run_dir / state["replays"][0])
    assert steps >= 120 and len(saved) == saved.steps_added == steps + 2  # 2 first frames, then one per env step
    # resumed with the replay kept as tensors on the training device (the saved buffer loads into that storage),
    # prefill ending at the checkpoint, so its owed updates run
    cfg = load_config(AgentConfig, run_dir / "config.yaml", [f"train.env_steps={steps + 20}", "replay.on_device=true",
                                                             f"train.prefill={steps}"])
    train(cfg, str(run_dir), resume=True, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    after = torch.load(ckpt, weights_only=False)
    assert after["counters"]["env_steps"] == steps + 20
    resumed = ReplayBuffer.load(run_dir / after["replays"][0])
    assert len(resumed) == len(saved) + 2 + 20  # the saved replay, the new first frames, the new steps
    assert rows[-1]["step"] == steps + 20
    # what the killed run logged after its checkpoint is gone: steps never go back, every episode is counted once
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    episodes = (run_dir / "stats.jsonl").read_text().splitlines()
    assert len(episodes) == after["counters"]["episodes"] >= state["counters"]["episodes"]
    # a resume is a function of what the checkpoint saved: the same checkpoint resumed again ends the same
    assert after["counters"]["updates"] == updates_due(steps + 20, cfg) > 0
    train(cfg, str(twin), resume=True, progress=False)
    assert_same_state(after, checkpoint(twin))
    assert metric_rows(run_dir) == metric_rows(twin)


def _one_update_setup(cfg: AgentConfig, num_actions: int):
    """A fresh agent, its optimizer and a replay holding one random 8-step episode."""
    from agent.train import build_agent

    torch.manual_seed(0)
    wm, ac = build_agent(cfg, num_actions, torch.device("cpu"))
    opt = torch.optim.Adam([p for p in wm.parameters() if p.requires_grad], lr=1e-4)
    replay = ReplayBuffer(64, {"image": ((cfg.env.size, cfg.env.size, 3), np.uint8)})
    rng = np.random.default_rng(0)
    replay.add_episode({"image": rng.integers(0, 255, (8, cfg.env.size, cfg.env.size, 3), dtype=np.uint8),
                        "action": rng.integers(num_actions, size=8), "reward": np.zeros(8, np.float32),
                        "is_first": np.arange(8) == 0, "is_last": np.arange(8) == 7, "is_terminal": np.zeros(8, bool)})
    return wm, ac, opt, replay


ONE_UPDATE = ["train.batch_size=2", "train.seq_len=4", "train.imag_starts=4", "actor_critic.horizon=3"]


@pytest.mark.parametrize("preset,num_actions", [("tiny", 17), ("crafter_cpu", 17), ("crafter", 17), ("nethack_cpu", 23),
                                                ("nethack", 23)])
def test_every_agent_preset_trains_one_step(preset, num_actions):
    """Each agent preset's architecture: one world-model + actor-critic update at batch 2 on 4-step segments,
    eager (the GPU presets' compiled path is what test_compiled_frame_parts_match_eager checks)."""
    from agent.train import train_step

    cfg = load_config(AgentConfig, ROOT / f"configs/{preset}.yaml", [*ONE_UPDATE, "train.compile=false"])
    wm, ac, opt, replay = _one_update_setup(cfg, num_actions)
    stats = train_step(wm, ac, opt, replay, cfg, torch.device("cpu"), 0)
    assert math.isfinite(stats["wm/loss"]) and stats["wm/skipped"] == 0 and math.isfinite(stats["ac/loss_critic"])


def test_the_frozen_recipe_preset_trains_one_step_on_its_pretrained_encoder(tmp_path, monkeypatch, capsys):
    """crafter_cpu_frozen names the recipe's encoder run (runs/crafter_vq): missing, the error names the key (and
    `config` prints the config with that as a comment); given, the encoder is frozen and the preset trains one
    update."""
    from test_pretrain import TINY
    from test_wm import toy_dataset

    monkeypatch.chdir(tmp_path)
    assert run.main(["train", "--config", "crafter_cpu_frozen", "--run-dir", "agent"]) == 2
    assert f"error: encoder.checkpoint={tmp_path / 'runs/crafter_vq'}: no run at" in capsys.readouterr().err
    assert run.main(["config", "--config", "crafter_cpu_frozen"]) == 0  # the recipe's config, before its first steps
    assert "# encoder.model and encoder.resolution will be those of that run" in capsys.readouterr().out
    root = toy_dataset(tmp_path / "d")
    assert run.main(["pretrain", "--data", str(root), "--run-dir", "runs/crafter_vq", "--no-progress", *TINY,
                     "data.resolution=16", "train.steps=1", "model.vq.enabled=true", "model.vq.num_vars=2"]) == 0
    capsys.readouterr()
    cfg = load_config(AgentConfig, ROOT / "configs/crafter_cpu_frozen.yaml", [*ONE_UPDATE, "train.compile=false"])
    wm, ac, opt, replay = _one_update_setup(cfg, 17)
    assert not wm.joint and not any(p.requires_grad for p in wm.autoencoder.parameters())
    from agent.train import train_step

    stats = train_step(wm, ac, opt, replay, cfg, torch.device("cpu"), 0)
    assert math.isfinite(stats["wm/loss"]) and stats["wm/skipped"] == 0 and math.isfinite(stats["ac/loss_critic"])


def test_imagination_stays_within_the_time_positions_training_teaches(tmp_path):
    """Imagination from one replayed state predicts from time positions 0..horizon-1; train.seq_len=4 segments teach
    the dynamics positions 0..2 (a segment's last step predicts nothing). A horizon of 3 in a dynamics of exactly
    train.seq_len steps trains; a horizon of 4 is refused before a run starts, as is a dynamics shorter than a
    segment."""
    from agent.train import train_step

    cfg = tiny(*ONE_UPDATE, "dynamics.max_steps=4")
    wm, ac, opt, replay = _one_update_setup(cfg, 5)
    assert math.isfinite(train_step(wm, ac, opt, replay, cfg, torch.device("cpu"), 0)["ac/loss_critic"])
    with pytest.raises(ValueError, match=r"imagination of actor_critic.horizon=4 steps predicts from time positions up "
                                         r"to 3; train.seq_len=4 segments train the dynamics at positions 0..2 only"):
        train(tiny(*ONE_UPDATE, "actor_critic.horizon=4"), str(tmp_path / "never"), progress=False)
    with pytest.raises(ValueError, match=r"max_steps=3 is shorter than the longest sequence it must hold \(4 steps: "
                                         r"train.seq_len\)"):
        preflight(tiny(*ONE_UPDATE, "dynamics.max_steps=3"))
    assert not (tmp_path / "never").exists()


def test_the_policy_takes_what_a_vector_env_returns():
    """SlotPolicy.act on the observation dict and an is_first array, or on the images and one bool: the same
    actions; a world model that reads status tokens asks for the dict."""
    from agent.policy import SlotPolicy
    from agent.train import build_agent

    cfg = tiny("encoder.mode=frozen")  # a fresh encoder trains with the world model: the build makes it joint
    assert build_agent(cfg, 5, torch.device("cpu"))[0].dynamics.cfg.num_actions == 5  # the config left as given:
    wm, ac = build_agent(cfg, 17, torch.device("cpu"))  # it builds for another env too
    assert wm.dynamics.cfg.num_actions == 17 and cfg == tiny("encoder.mode=frozen")
    assert wm.encoder_cfg.mode == "joint"
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    acts = []
    for obs, first in (({"image": images}, np.array([True, True])), (images, True)):
        torch.manual_seed(0)  # the slots' initial noise
        policy = SlotPolicy(wm.eval(), ac, torch.device("cpu"))
        acts.append([policy.act(obs, first, generator=torch.Generator().manual_seed(0)) for _ in range(2)])
    assert all(np.array_equal(a, b) for a, b in zip(*acts)) and acts[0][0].shape == (2,)
    wm, ac = build_agent(tiny(), 17, torch.device("cpu"), status_vars=2)
    with pytest.raises(ValueError, match="reads 2 status tokens beside each frame: pass the env's observation dict"):
        SlotPolicy(wm, ac, torch.device("cpu")).act(images, True)


def test_the_logged_pictures_are_drawn_under_the_training_autocast(monkeypatch):
    """With amp the pictures' slots, codes and open-loop prediction come from the autocast training runs under (CUDA
    only in the project; here the CPU's bf16 autocast stands in), and its bf16 outputs still draw fp32 pictures."""
    import agent.train
    from agent.train import log_pictures

    entered, logged = [], {}

    def cpu_autocast(device, enabled):
        entered.append(enabled)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    class Logger:
        def image(self, step, tag, picture):
            logged[tag] = picture

    monkeypatch.setattr(agent.train, "autocast", cpu_autocast)
    wm, _, _, replay = _one_update_setup(tiny(), 17)
    log_pictures(Logger(), 3, wm.eval(), replay, torch.device("cpu"), 8, amp=True)
    assert entered == [True] and sorted(logged) == ["slots/decomposition", "wm/real_decoded_imagined"]
    assert all(p.dtype == torch.float32 and p.ndim == 3 for p in logged.values())


def test_the_policy_acts_under_the_autocast_the_world_model_trains_under(monkeypatch):
    """With amp the policy encodes and acts under bf16 autocast, as train_step encodes (CUDA only in the project;
    here the CPU's bf16 autocast stands in), its carried slots and a new episode's initial ones mixed included."""
    import agent.policy
    from agent.policy import SlotPolicy
    from agent.train import build_agent

    entered = []

    def cpu_autocast(device, enabled):
        entered.append(enabled)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    monkeypatch.setattr(agent.policy, "autocast", cpu_autocast)
    wm, ac = build_agent(tiny(), 17, torch.device("cpu"))
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    policy = SlotPolicy(wm.eval(), ac, torch.device("cpu"), amp=True)
    for first in (np.array([True, True]), np.array([False, True]), np.array([False, False])):
        actions = policy.act(images, first)
        assert actions.shape == (2,) and ((0 <= actions) & (actions < 17)).all()
    assert entered == [True] * 3
    SlotPolicy(wm, ac, torch.device("cpu")).act(images, True)
    assert entered[-1] is False


def test_joint_encoder_temperature_anneals_over_updates():
    """The agent anneals a jointly trained VQ encoder's Gumbel temperature over its updates, as pretraining and
    train-wm do over steps: from tau_start at update 0 to tau_end at anneal_steps."""
    from agent.train import train_step

    cfg = load_config(AgentConfig, ROOT / "configs/tiny.yaml", ONE_UPDATE)
    vq = cfg.encoder.model.vq
    assert cfg.encoder.mode == "joint" and vq.tau_end < vq.tau_start
    wm, ac, opt, replay = _one_update_setup(cfg, 17)
    taus = []
    for update in (0, vq.anneal_steps // 2, vq.anneal_steps, 10 * vq.anneal_steps):
        stats = train_step(wm, ac, opt, replay, cfg, torch.device("cpu"), update)
        taus.append(stats["wm/vq_tau"])
        assert float(wm.autoencoder.encoder.vq.tau) == pytest.approx(stats["wm/vq_tau"])
    assert taus == pytest.approx([vq.tau_start, (vq.tau_start * vq.tau_end) ** 0.5, vq.tau_end, vq.tau_end])


def _compiled_vs_eager(backend: str, cudagraph_steps: bool = False, *overrides: str) -> None:
    """Two updates of the tiny agent, eager and with `compile_frame_parts(backend)`, from the same weights, batch
    and random numbers: the same losses and weights (to float tolerance), the same state-dict keys.
    `cudagraph_steps`: also take the CUDA-graph path's step marks and output copies (no graphs on CPU)."""
    from agent.train import train_step

    results = []
    for compiled in (False, True):
        cfg = load_config(AgentConfig, ROOT / "configs/tiny.yaml", [*ONE_UPDATE, f"train.compile={compiled}", *overrides])
        cfg.train.compile = False  # build eager; compiled below with the backend under test
        wm, ac, opt, replay = _one_update_setup(cfg, 17)
        if compiled:
            wm.compile_frame_parts(backend=backend)
            assert wm.autoencoder.encoder.backbone._compiled_call_impl is not None
            wm.cudagraphs = cudagraph_steps
        torch.manual_seed(1)
        losses = [float(train_step(wm, ac, opt, replay, cfg, torch.device("cpu"), u)["wm/loss"]) for u in range(2)]
        results.append((losses, wm.state_dict()))
    (eager_losses, eager_state), (comp_losses, comp_state) = results
    assert list(eager_state) == list(comp_state)
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4)
    for k, v in eager_state.items():
        torch.testing.assert_close(comp_state[k], v, rtol=1e-3, atol=1e-5, msg=k)


def test_cudagraph_modes_copy_carried_outputs():
    """Compile modes that replay CUDA graphs (reduce-overhead, and max-autotune, which turns them on too) make the
    world model copy outputs read after the next call; the copy keeps the gradient. Compilation itself is lazy
    (first call), so nothing is compiled here."""
    x = torch.ones(2, requires_grad=True)
    for mode, graphs in (("default", False), ("reduce-overhead", True), ("max-autotune", True)):
        cfg = load_config(AgentConfig, ROOT / "configs/tiny.yaml", [*ONE_UPDATE, "train.compile=true",
                                                                    f"train.compile_mode={mode}"])
        wm, *_ = _one_update_setup(cfg, 17)  # build_agent compiles as the config says
        encoder = wm.autoencoder.encoder
        assert encoder.backbone._compiled_call_impl is not None and encoder.slot_module._compiled_call_impl is not None
        assert wm.dynamics._compiled_call_impl is None
        assert wm.cudagraphs == graphs
        kept = wm.kept(x)
        assert (kept is not x) == graphs
        assert kept.grad_fn is not None if graphs else kept is x


@pytest.mark.parametrize("carry_grad", [True, False])
def test_compiled_frame_parts_match_eager(carry_grad):
    """`train.compile`'s tracing (dynamo graphs, AOT autograd, the slot module recompiling for the carried slots
    after the first frame; with encoder.carry_grad=false, for the chain without autograd and the one batched call)
    checked on the aot_eager backend, which builds no C++ kernels: fast enough for CI. The CUDA-graph bookkeeping
    (step marks, copies of carried outputs) runs too and changes no number."""
    torch._dynamo.reset()
    _compiled_vs_eager("aot_eager", True, f"encoder.carry_grad={carry_grad}")


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"),
                    reason="this torch cannot make the recompile limit an error")
@pytest.mark.parametrize("carry_grad", [True, False])
def test_compiled_run_stays_within_the_recompile_limit(tmp_path, monkeypatch, carry_grad):
    """A whole compiled run (acting at 3 envs, updates at batch 4, evaluation at 1 env) under bf16 autocast, as on
    CUDA: every compiled part stays within dynamo's recompile limit (8), past which it would silently run eager.
    The slot module compiles 6 graphs in either gradient mode (first frame or carried slots, at each batch size
    and grad mode); the limit is made an error here. Traced with aot_eager, which builds no kernels."""
    import agent.train as agent_train
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from world_model.backbone import CNNBackbone
    from world_model.slots.gmm import SlotMixture
    from world_model.slots.vq import SlotQuantizer
    from world_model.wm import WorldModel

    compile_parts = WorldModel.compile_frame_parts
    monkeypatch.setattr(WorldModel, "compile_frame_parts",
                        lambda self, mode="default", backend="inductor": compile_parts(self, mode, "aot_eager"))
    monkeypatch.setattr(agent_train, "autocast", lambda device, enabled: torch.autocast("cpu", torch.bfloat16))
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            train(tiny("train.env_steps=40", "train.prefill=20", "env.max_episode_steps=10", "train.ckpt_every=40",
                       "train.log_every=20", "env.num_envs=3", "train.compile=true", f"encoder.carry_grad={carry_grad}"),
                  str(tmp_path / "run"), progress=False)
        graphs = {cls: len(_debug_get_cache_entry_list(cls.forward.__code__))
                  for cls in (SlotMixture, SlotQuantizer, CNNBackbone)}
    finally:
        torch._dynamo.reset()
    # what torch 2.13 compiles (README); another torch may merge graphs, and the limit itself is enforced above
    assert 0 < graphs[SlotMixture] <= 6 and 0 < graphs[SlotQuantizer] <= 3 and 0 < graphs[CNNBackbone] <= 3


@pytest.mark.slow
def test_inductor_compiled_frame_parts_match_eager(monkeypatch):
    """The same with inductor's kernels (~2.5 min of C++ compilation on 2 cores; `run.py bench agent --compile`
    runs this path too). fallback_random makes inductor draw the eager random numbers."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    _compiled_vs_eager("inductor")


def test_nan_loss_is_skipped_and_logged(tmp_path, monkeypatch):
    from world_model.wm import WorldModel

    real_loss = WorldModel.loss

    def nan_loss(self, batch, beta, counts=None):
        loss, stats, enc = real_loss(self, batch, beta, counts)
        return loss * float("nan"), stats, enc

    monkeypatch.setattr(WorldModel, "loss", nan_loss)
    train(tiny("train.env_steps=160", "train.ckpt_every=160"), str(tmp_path / "run"), progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)
    assert state["counters"]["skipped_wm"] == state["counters"]["updates"] > 0
    assert all(torch.isfinite(v).all() for v in state["wm"].values() if v.is_floating_point())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loop/skipped_wm", 0) > 0 for r in rows)


def test_killed_env_worker_during_training(tmp_path, monkeypatch):
    """A worker killed mid-run is restarted; its episode ends at its last real step in the replay and training goes
    on."""
    from envs.vector import ResilientVectorEnv

    real_step, calls = ResilientVectorEnv.step, []

    def step(self, actions):
        calls.append(1)
        if len(calls) == 5:
            os.kill(self.worker_pids[0], signal.SIGKILL)
        return real_step(self, actions)

    monkeypatch.setattr(ResilientVectorEnv, "step", step)
    with pytest.warns(RuntimeWarning, match="died"):
        train(tiny("env.asynchronous=true", "train.env_steps=160", "train.ckpt_every=160"), str(tmp_path / "run"),
              progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 160 and state["counters"]["episodes"] >= 1
    assert state["counters"]["env_restarts"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    restarts = [r["loop/env_restarts"] for r in rows if "loop/env_restarts" in r]
    assert restarts[-1] == 1  # logged beside the losses
    # the loop's episode count holds the one the crash cut short; the games' records (train/episodes) do not
    last = [r for r in rows if "loop/episodes" in r][-1]
    recorded = len((tmp_path / "run" / "stats.jsonl").read_text().splitlines())
    assert last["loop/episodes"] == state["counters"]["episodes"] > recorded == last.get("train/episodes", 0)
    replay = ReplayBuffer.load(tmp_path / "run" / state["replays"][0])
    episodes = list(replay.episodes())
    assert len(episodes) >= 3  # the 2 initial episodes and the one started after the crash
    # the crashed episode ends at its last real step (the failed step is not stored, so no end flag: the next first
    # step closed it); the others without one still run, one per env
    assert len([ep for ep in episodes if not ep["is_last"][-1]]) == tiny().env.num_envs + 1


@pytest.mark.nethack
def test_bench_agent_runs_the_real_loop(capsys):
    """`bench agent` end to end on the CPU: collection, acting and updates of the tiny preset on NetHack (status
    tokens and all), timed and printed as one row."""
    assert run.main(["bench", "agent", "env.name=nethack", "env.asynchronous=false", "--agent-config",
                     str(ROOT / "configs/tiny.yaml"), "--env-steps", "8", "--prefill", "20", "--rows", "preset"]) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("preset ")]
    assert float(row[1]) > 0 and int(row[2]) >= 1  # env steps/s, updates
    for override, message in (("encoder.mode=frozen", "encoder.mode=frozen needs encoder.checkpoint=RUN"),
                              ("actor_critic.horizon=8", "imagination of actor_critic.horizon=8 steps")):
        assert run.main(["bench", "agent", override, "--agent-config", str(ROOT / "configs/tiny.yaml")]) == 2
        out, err = capsys.readouterr()  # refused as `train` refuses it, rather than timing something else
        assert out == "" and err.startswith(f"error: {message}")


def test_bench_agent_rows_add_one_optimization_each_and_a_failed_row_is_reported(monkeypatch, capsys):
    """Each row of `bench agent` changes one setting of the row above; a row whose optimization fails prints its
    error and the others still run (the CUDA rows are first run on a GPU no test has)."""
    import argparse

    from agent import bench

    rows = bench.agent_modes(torch.device("cuda"), compile_on_cpu=False)
    assert [n for n, _ in rows] == ["fp32-math-attn", "+fused-attn", "+bf16", "+replay-on-gpu", "+compile",
                                    "+cudagraphs", "preset"]
    for (_, before), (_, after) in zip(rows[:-1], rows[1:-1]):
        assert sum(before[k] != after[k] for k in before) == 1
    assert bench._with(tiny(), rows[-1][1]) == tiny()  # the preset row runs the config as `run.py train` would
    cfg = bench._with(tiny(), rows[-2][1])
    assert (cfg.train.amp, cfg.replay.on_device, cfg.train.compile, cfg.train.compile_mode) == (
        True, True, True, "reduce-overhead")
    assert [n for n, _ in bench.agent_modes(torch.device("cpu"), compile_on_cpu=True)] == [
        "fp32-math-attn", "+fused-attn", "+compile", "preset"]

    def fake_loop(cfg, device, env_steps, prefill, profiler, fused_attention):
        if cfg.train.compile:
            raise RuntimeError("no C++ compiler\nmore lines")
        return {"seconds": {"policy": 1.0, "env_step": 1.0, "update": 2.0}, "total": 4.0, "env_steps": env_steps,
                "updates": 3, "warmup": 0.5, "peak_gib": float("nan")}

    monkeypatch.setattr(bench, "measure_loop", fake_loop)
    args = argparse.Namespace(agent_config=str(ROOT / "configs/tiny.yaml"), overrides=[], env_steps=40, prefill=8,
                              compile=True, profile=False, profile_rows=5, profile_row=None, rows=None)
    bench.bench_agent(args, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "fp32-math-attn" in out and "+fused-attn" in out and "10.0" in out  # 40 env steps in 4 s
    assert out.splitlines()[2].endswith("peak GiB") and out.splitlines()[3].endswith(" -")  # no GPU memory on CPU
    assert "ratio +fused-attn/fp32-math-attn: 1.00" in out and "ratio preset" not in out
    assert "# row preset: as `run.py train` runs it: amp=True compile=False" in out
    assert re.search(r"^preset +10\.0 ", out, re.M)  # tiny.yaml compiles nothing: the preset row runs
    assert "# note: a row timed fewer than 8 updates" in out  # 3 updates: a rate to take with care
    assert "+compile        failed: RuntimeError: no C++ compiler\n" in out and "ratio +compile" not in out
    bench.bench_agent(argparse.Namespace(**{**vars(args), "profile_row": "+compile"}), torch.device("cpu"))
    assert "# no profile: the +compile row failed" in capsys.readouterr().out  # --profile-row implies --profile
    with pytest.raises(ValueError, match=r"--profile-row '\+bf16' is not one of the rows measured here: fp32-math"):
        bench.bench_agent(argparse.Namespace(**{**vars(args), "profile": True, "profile_row": "+bf16"}),
                          torch.device("cpu"))
    seen = []
    monkeypatch.setattr(bench, "measure_loop",
                        lambda *a, **kw: seen.append(kw["fused_attention"]) or fake_loop(*a, **kw))
    bench.bench_agent(argparse.Namespace(**{**vars(args), "compile": False, "rows": " +fused-attn,"}),
                      torch.device("cpu"))
    out = capsys.readouterr().out
    assert "+fused-attn" in out and "fp32-math-attn" not in out and seen == [True]  # the rows above still apply
    with pytest.raises(ValueError, match=r"--rows \+bf16: not rows on cpu"):
        bench.bench_agent(argparse.Namespace(**{**vars(args), "rows": "+fused-attn,+bf16"}), torch.device("cpu"))
    def failing(cfg, *rest, **kw):  # every row fails
        return fake_loop(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True)), *rest, **kw)

    monkeypatch.setattr(bench, "measure_loop", failing)
    bench.bench_agent(argparse.Namespace(**{**vars(args), "compile": False, "profile": True}), torch.device("cpu"))
    assert capsys.readouterr().out.endswith("# no profile: every row failed\n")  # not a traceback from a rerun
    threads = torch.get_num_threads()
    try:  # the preset's train.threads, as `run.py train` sets them
        bench.bench_agent(argparse.Namespace(**{**vars(args), "compile": False, "overrides": ["train.threads=1"]}),
                          torch.device("cpu"))
        assert torch.get_num_threads() == 1 and ", 1 threads;" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


def test_compile_is_announced_before_the_run(tmp_path, capsys):
    """With train.compile the run says up front that its first steps compile (minutes on CPU), so a quiet
    progress bar is not mistaken for a hang; without it, nothing is said."""
    import argparse

    calls = []
    args = argparse.Namespace(command="train", config=str(ROOT / "configs/tiny.yaml"), run_dir=str(tmp_path / "r"),
                              no_progress=True)
    for compile_ in ("true", "false"):
        run._run_training(args, "configs/tiny.yaml", [f"train.compile={compile_}"], lambda c: "x",
                          lambda cfg, run_dir, resume, progress: calls.append(cfg.train.compile) or {}, False)
        out = capsys.readouterr().out
        assert ("# train.compile: the first steps compile (default)" in out) == (compile_ == "true")
    assert calls == [True, False]


def test_the_policy_resets_only_the_envs_whose_episode_starts():
    """A vector step where one env starts a new episode and the other goes on: the first env's slots start afresh (as
    a policy that sees only it), the second's carry over from its previous frame (as a policy that sees only it)."""
    from agent.policy import SlotPolicy
    from agent.train import build_agent

    wm, ac = build_agent(tiny(), 17, torch.device("cpu"))
    module = wm.autoencoder.encoder.slot_module
    with torch.no_grad():  # no initialization noise, so policies over different env batches start alike
        for name in ("mu_logstd", "logsigma_logstd", "init_logsigma"):
            if hasattr(module, name):
                getattr(module, name).fill_(-40.0)
    rng = np.random.default_rng(0)
    before, now = (rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8) for _ in range(2))

    def slots(frames, firsts):
        policy = SlotPolicy(wm.eval(), ac, torch.device("cpu"))
        for obs, first in zip(frames, firsts):
            policy.act(obs, first)
        return policy.prev

    both = slots([before, now], [np.array([True, True]), np.array([True, False])])
    assert torch.allclose(both[0], slots([now[:1]], [True])[0], atol=1e-5)  # env 0: a new episode
    assert torch.allclose(both[1], slots([before[1:], now[1:]], [True, False])[0], atol=1e-5)  # env 1: carried
    assert not torch.allclose(both[1], slots([now[1:]], [True])[0], atol=1e-3)  # which differs from a fresh start


@pytest.mark.parametrize("saved, world, expected", [
    (2, 2, [[0, 1], [2, 3]]),  # the same world size: each rank its own shard
    (3, 2, [[0, 1, 4, 5], [2, 3]]),  # fewer ranks: rank r merges the shards j with j % world == r
    (1, 2, [[0], [1]]),  # more ranks than shards: every world-th episode of them all, none held twice
    (2, 3, [[0, 3], [1], [2]]),
])
def test_a_resume_at_another_world_size_shares_out_every_saved_episode_once(tmp_path, monkeypatch, saved, world,
                                                                             expected):
    from agent.train import load_replay_shards
    from world_model import distributed

    names = []
    for j in range(saved):  # shard j holds episodes 2 j and 2 j + 1, their frames reading 10 e, 10 e + 1, 10 e + 2
        buf = ReplayBuffer(20, {"image": ((1,), np.uint8)}, seed=j)
        for e in (2 * j, 2 * j + 1):
            for i in range(3):
                buf.add({"image": np.full(1, 10 * e + i, np.uint8), "action": i, "reward": 0.0, "is_first": i == 0,
                         "is_last": i == 2, "is_terminal": i == 2})
        names.append(f"replay{j}.npz")
        buf.save(tmp_path / names[-1])
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        replay = load_replay_shards(tmp_path, {"replays": names}, capacity=20, seed=0)
        held = [ep["image"][0, 0] // 10 for ep in replay.episodes()]
        assert held == expected[rank], rank


def test_library_calls_that_would_go_wrong_quietly_are_refused():
    """Float frames (divided by 255 a second time: black), an open-loop window longer than the data, stepping an
    imagined env before its reset, one unbatched frame: each refused in words. A policy starts afresh at any batch
    size when every env starts an episode."""
    from world_model.imagined_env import ImaginedEnv
    from agent.policy import SlotPolicy
    from agent.train import build_agent
    from world_model.wm import frames_to_input

    with pytest.raises(ValueError, match="takes env frames as uint8 `b t h w 3`, got torch.float32"):
        frames_to_input(torch.rand(1, 1, 64, 64, 3), 32)
    with pytest.raises(ValueError, match="got torch.uint8 \\(1, 1, 3, 64, 64\\)"):
        frames_to_input(torch.zeros(1, 1, 3, 64, 64, dtype=torch.uint8), 32)
    wm, ac = build_agent(tiny(), 17, torch.device("cpu"))
    frames = torch.randint(0, 255, (1, 4, 64, 64, 3), dtype=torch.uint8)
    enc = wm.encode(frames_to_input(frames, wm.resolution))
    with pytest.raises(ValueError, match="at least context \\+ horizon = 6 encoded steps"):
        wm.open_loop(enc, torch.zeros(1, 4, dtype=torch.long), 2, 4)
    assert wm.open_loop(enc, torch.zeros(1, 4, dtype=torch.long), 2, 2)["slot_codes"].shape[1] == 2
    env = ImaginedEnv(wm.dynamics)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(torch.zeros(1, dtype=torch.long))
    env.reset(enc.slot_codes[:, :1], enc.frame_codes[:, :1] if enc.frame_codes is not None else None, None, 2)
    with pytest.raises(ValueError, match="one per imagined env, shape \\(1,\\), got \\(2,\\)"):
        env.step(torch.zeros(2, dtype=torch.long))
    policy = SlotPolicy(wm.eval(), ac, torch.device("cpu"))
    images = frames[0].numpy()
    with pytest.raises(ValueError, match="a batch of frames `b h w 3`, got shape \\(64, 64, 3\\)"):
        policy.act(images[0], True)
    assert policy.act(images[:2], True).shape == (2,) and policy.act(images[:1], True).shape == (1,)


@pytest.mark.nethack
@pytest.mark.parametrize("rates, what", [
    (["train.wm_lr=1e9"], "the world model"),
    (["actor_critic.actor_lr=1e9", "actor_critic.critic_lr=1e9"], "the actor-critic")])
def test_an_agent_that_diverges_stops_in_one_line(tmp_path, capsys, rates, what):
    """A learning rate of 1e9 makes the world model's (or the actor-critic's) outputs NaN after an update or two: its
    sampling draws on (where it raised before), its updates are skipped, and 20 in a row stop the run in one line.
    The world model's skips are not blamed on the actor-critic that imagines in it."""
    argv = ["train", "--config", "tiny", "--run-dir", str(tmp_path / "r"), "--no-progress", *FAST,
            "train.env_steps=400", "train.train_ratio=8", *rates]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {what} diverged: its last 20 updates (to update " in err and "Traceback" not in err


def test_a_config_edited_by_hand_since_the_checkpoint_is_refused(tmp_path, capsys):
    """config.yaml edited to another slot count or game: a resume, and an eval, refuse it rather than train on with
    a checkpoint of another model or play another game with this one."""
    rd = tmp_path / "run"
    train(tiny("train.env_steps=40", "train.prefill=40", "train.eval_every=0"), str(rd), progress=False)
    capsys.readouterr()
    text = (rd / "config.yaml").read_text()
    for edit, key in (("num_slots: 4", "num_slots: 6"), ("name: crafter", "name: nethack")):
        assert edit in text
        (rd / "config.yaml").write_text(text.replace(edit, key, 1))
        for argv in (["train", "--resume", str(rd), "train.env_steps=80"], ["eval", "--checkpoint", str(rd)]):
            assert run.main(argv) == 2, (edit, argv)
            out, err = capsys.readouterr()
            assert out == "" and err.startswith("error: the config does not match the checkpoint in")  # first
            # the way out: a resume may start a new run; an evaluation reads the run as it trained
            assert err.strip().endswith("restore config.yaml to what the run trained with") == (argv[0] == "eval")
    (rd / "config.yaml").write_text(text)
    assert run.main(["eval", "--checkpoint", str(rd), "--episodes", "1"]) == 0


def test_bench_agent_figures_from_fixed_timings(monkeypatch, capsys):
    """40 env steps: the math-attention row takes 8 s of wall time (4 s of it in the timed parts: 1 policy, 1 env,
    2 updates) and 20 updates, the fused rows 4 s and 3 updates. Rates are env steps / wall time: 5.0 and 10.0, so
    +fused-attn/fp32-math-attn 2.00; parts are ms per env step (25, 25, 50); hours per 1M steps 55.6 and 27.8; one
    row under 8 updates is enough for the note. Profiled part times are seconds (CPU time in us / 1e6)."""
    import argparse
    import types

    from torch.autograd import DeviceType

    from agent import bench

    def fake_loop(cfg, device, env_steps, prefill, profiler, fused_attention):
        return {"seconds": {"policy": 1.0, "env_step": 1.0, "update": 2.0}, "total": 4.0 if fused_attention else 8.0,
                "env_steps": env_steps, "updates": 3 if fused_attention else 20, "warmup": 0.5, "peak_gib": float("nan")}

    monkeypatch.setattr(bench, "measure_loop", fake_loop)
    args = argparse.Namespace(agent_config=str(ROOT / "configs/tiny.yaml"), overrides=[], env_steps=40, prefill=8,
                              compile=False, profile=False, profile_rows=5, profile_row=None, rows=None)
    bench.bench_agent(args, torch.device("cpu"))
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in ("fp32-math-attn", "+fused-attn", "preset")}
    assert rows["fp32-math-attn"] == ["5.0", "20", "25.00", "25.00", "50.00", "55.6", "0.5", "-"]
    assert rows["+fused-attn"] == rows["preset"] == ["10.0", "3", "25.00", "25.00", "50.00", "27.8", "0.5", "-"]
    assert "ratio +fused-attn/fp32-math-attn: 2.00" in out.splitlines()
    assert "# note: a row timed fewer than 8 updates" in out
    events = [types.SimpleNamespace(key="policy", device_type=DeviceType.CPU, cpu_time_total=2_500_000,
                                    device_time_total=500_000),
              types.SimpleNamespace(key="policy", device_type=DeviceType.CUDA, cpu_time_total=9e9, device_time_total=9e9),
              types.SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, cpu_time_total=9e9, device_time_total=9e9)]
    assert bench._part_times(events, torch.device("cpu")) == {"policy": 2.5}
    assert bench._part_times(events, torch.device("cuda")) == {"policy": 0.5}
