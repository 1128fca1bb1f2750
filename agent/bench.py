"""`run.py bench agent`: env steps/s of the whole agent loop at a preset's train ratio, and where the time goes.

The same parts `agent.train` runs — vectorized env workers, the slot policy, the replay buffer and `train_step`
(world-model update, imagination, actor-critic update) — driven the way the loop drives them: after a random
prefill, every vector step is followed by the updates it owes at the train ratio. Each part is timed with
`torch.profiler.record_function` labels, so `--profile` also prints the operator table beneath them. Each row
adds one optimization to the one above (the fused attention kernels of scaled_dot_product_attention over its
math form; CUDA: bf16 autocast, the replay kept in GPU memory, torch.compile of the per-frame parts, CUDA
graphs; CPU: torch.compile with `--compile`), so the table says what each gave.
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile, record_function

from envs.collect import Collector, env_fn
from envs.errors import UsageError
from envs.vector import make_vector_env
from world_model.bench import check_profile_row, failed_row, gib_column, peak_gib, select_rows, sync
from world_model.config import load_config
from world_model.frame_tokenizer import status_vars
from world_model.rundir import set_precision
from world_model.train_wm import check_typed_mode

from .config import AgentConfig, env_kwargs
from .policy import SlotPolicy
from .replay import ReplayBuffer
from .train import build_agent, obs_spec, preflight, replay_spec, train_step, updates_due

PARTS = ("policy", "env_step", "replay_sample", "wm_update", "imagination", "ac_update")
FEW_UPDATES = 8  # rows timing fewer updates than this get a note: their rates are noisy
WARMUP_UPDATES = 2


def measure_loop(cfg: AgentConfig, device: torch.device, env_steps: int, prefill: int, profiler=None,
                 fused_attention: bool = True) -> dict:
    """Seconds per part over `env_steps` loop env steps after `prefill` random ones; updates follow the train
    ratio counted from the end of the prefill (no catch-up burst). `profiler` (a torch.profiler.profile) records
    the timed loop only, not the prefill or the warm-up updates (where compilation happens).
    `fused_attention=False` restricts scaled_dot_product_attention to its math form."""
    t = cfg.train
    owed = replace(cfg, train=replace(t, prefill=0))  # the loop's train-ratio rule, counted from the prefill's end
    attention = nullcontext() if fused_attention else sdpa_kernel(SDPBackend.MATH)
    with attention, tempfile.TemporaryDirectory() as tmp:
        venv = make_vector_env(env_fn(cfg.env.name, **env_kwargs(cfg, Path(tmp) / "stats.jsonl")), cfg.env.num_envs,
                               envs_per_worker=cfg.env.envs_per_worker, asynchronous=cfg.env.asynchronous)
        try:
            n = cfg.env.num_envs
            num_actions = int(venv.single_action_space.n)
            torch.manual_seed(t.seed)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            spec = obs_spec(venv.single_observation_space)
            wm, ac = build_agent(cfg, num_actions, device, status_vars(spec))
            spec = replay_spec(spec, wm)
            wm_opt = torch.optim.Adam([p for p in wm.parameters() if p.requires_grad], lr=t.wm_lr)
            replay = ReplayBuffer(max(cfg.replay.capacity, prefill + env_steps + n), spec, seed=t.seed,
                                  device=device if cfg.replay.on_device else None)
            policy = SlotPolicy(wm, ac, device, amp=t.amp)
            wm.eval()
            rng = np.random.default_rng(t.seed)
            collector = Collector(venv, replay, keys=replay.spec)
            collector.reset(t.seed)
            for _ in range(max(prefill // n, (t.seq_len + 1))):
                collector.step(rng.integers(num_actions, size=n))
            sync(device)
            warm = time.perf_counter()
            for i in range(WARMUP_UPDATES):  # allocator growth, cuBLAS/cuDNN set-up, compilation: not the loop's rate
                policy.act(collector.obs, collector.first)
                train_step(wm, ac, wm_opt, replay, cfg, device, i)
            sync(device)
            warm = time.perf_counter() - warm
            seconds = dict.fromkeys(("policy", "env_step", "update"), 0.0)
            done, updates = 0, 0
            with profiler if profiler is not None else nullcontext():  # the profile starts and stops here
                start = time.perf_counter()
                while done < env_steps:
                    t0 = time.perf_counter()
                    with record_function("policy"):
                        actions = policy.act(collector.obs, collector.first)
                    t1 = time.perf_counter()
                    with record_function("env_step"):
                        collector.step(actions)
                    t2 = time.perf_counter()
                    seconds["policy"] += t1 - t0
                    seconds["env_step"] += t2 - t1
                    done += n
                    while updates < updates_due(done, owed):
                        train_step(wm, ac, wm_opt, replay, cfg, device, WARMUP_UPDATES + updates)
                        updates += 1
                    sync(device)
                    seconds["update"] += time.perf_counter() - t2
                total = time.perf_counter() - start
        finally:
            venv.close()
    return {"seconds": seconds, "total": total, "env_steps": done, "updates": updates, "warmup": warm,
            "peak_gib": peak_gib(device)}


def _part_times(averages, device: torch.device) -> dict:
    """Total time under each record_function label, in seconds: on CUDA the summed kernel time launched under it
    (the CPU-side label's device time; the GPU-side annotation row, a first-to-last-kernel span, is skipped),
    on CPU its CPU time."""
    out = {}
    for e in averages:
        if e.key in PARTS and e.device_type == DeviceType.CPU:
            out[e.key] = (e.device_time_total if device.type == "cuda" else e.cpu_time_total) / 1e6
    return out


PRESET_ROW = "preset"  # the preset's own train.amp/compile/compile_mode and replay.on_device: what `run.py train` runs


def agent_modes(device: torch.device, compile_on_cpu: bool) -> list[tuple[str, Optional[dict]]]:
    """(name, train/replay settings) per measured row, each adding one optimization to the row above; last, the
    preset as configured (settings None)."""
    rows = [("fp32-math-attn", {}), ("+fused-attn", {"fused_attention": True})]
    if device.type == "cuda":
        rows += [("+bf16", {"amp": True}), ("+replay-on-gpu", {"on_device": True}), ("+compile", {"compile": True}),
                 ("+cudagraphs", {"compile_mode": "reduce-overhead"})]
    elif compile_on_cpu:
        rows += [("+compile", {"compile": True})]
    modes, settings = [], {"fused_attention": False, "amp": False, "on_device": False, "compile": False,
                           "compile_mode": "default"}
    for name, change in rows:
        settings = {**settings, **change}
        modes.append((name, settings))
    return modes + [(PRESET_ROW, None)]


def _with(base: AgentConfig, settings: Optional[dict]) -> AgentConfig:
    if settings is None:
        return base
    train = replace(base.train, amp=settings["amp"], compile=settings["compile"], compile_mode=settings["compile_mode"])
    return replace(base, train=train, replay=replace(base.replay, on_device=settings["on_device"]))


def _measure_row(base: AgentConfig, settings: Optional[dict], device: torch.device, env_steps: int, prefill: int,
                 profiler=None) -> dict:
    return measure_loop(_with(base, settings), device, env_steps, prefill, profiler=profiler,
                        fused_attention=settings is None or settings["fused_attention"])


def bench_agent(args, device: torch.device) -> None:
    preset = args.agent_config or ("configs/crafter.yaml" if device.type == "cuda" else "configs/crafter_cpu.yaml")
    set_precision(device)
    base = load_config(AgentConfig, preset, [*args.overrides, f"train.device={device}"])
    check_typed_mode(base.encoder, args.overrides)  # refused, as `train` refuses it, not timed as something else
    preflight(base)
    if base.train.threads > 0:  # as `run.py train` sets them (the CPU presets: 1)
        torch.set_num_threads(base.train.threads)
    if base.train.train_ratio <= 0:
        raise UsageError("train.train_ratio=0 makes no updates: bench agent times the loop with its updates (`bench "
                         "envs` times collection alone)")
    env_steps = args.env_steps if args.env_steps else math.ceil(
        16 * base.train.batch_size * base.train.seq_len / base.train.train_ratio)
    modes = select_rows(args, agent_modes(device, args.compile), device)
    print(f"# agent loop, {' '.join([preset, *args.overrides])}: {base.env.num_envs} {base.env.name} envs, train "
          f"ratio {base.train.train_ratio:g} (batch {base.train.batch_size} x {base.train.seq_len}), {env_steps} env "
          f"steps after the prefill, {device}, {torch.get_num_threads()} threads; policy, env and update ms are per "
          "env step (an update's time spread over the env steps that owe it)")
    if any(n == PRESET_ROW for n, _ in modes):
        t = base.train
        print(f"# row {PRESET_ROW}: as `run.py train` runs it: amp={t.amp} compile={t.compile} "
              f"compile_mode={t.compile_mode} replay.on_device={base.replay.on_device}, fused attention")
    print(f"{'mode':<16}{'env steps/s':>12}{'updates':>9}{'policy ms':>11}{'env ms':>9}{'update ms':>11}"
          f"{'h per 1M':>10}{'warm-up s':>11}{'peak GiB':>10}")
    check_profile_row(args, [n for n, _ in modes])
    rates, results = {}, {}
    for name, settings in modes:
        torch.compiler.reset()
        try:
            r = results[name] = _measure_row(base, settings, device, env_steps, args.prefill)
        except Exception as e:  # noqa: BLE001 - a failing optimization is a result too; the other rows still run
            print(failed_row(f"{name:<16}", e))
            if args.profile and name == args.profile_row:
                print(f"# no profile: the {name} row failed")
            continue
        s, steps = r["seconds"], r["env_steps"]
        rates[name] = steps / r["total"]
        per = {k: 1e3 * v / steps for k, v in s.items()}  # ms per env step
        print(f"{name:<16}{rates[name]:>12.1f}{r['updates']:>9}{per['policy']:>11.2f}{per['env_step']:>9.2f}"
              f"{per['update']:>11.2f}{1e6 / rates[name] / 3600:>10.1f}{r['warmup']:>11.1f}{gib_column(r['peak_gib'])}")
        if args.profile and name == args.profile_row:  # now, before slower rows (compilation) can run out of time
            _profile_row(name, settings, base, device, env_steps, args)
    chain = [m for m in modes if m[0] != PRESET_ROW]
    for (prev, _), (name, _) in zip(chain, chain[1:]):
        if prev in rates and name in rates:
            print(f"ratio {name}/{prev}: {rates[name] / rates[prev]:.2f}")
    if rates and min(results[n]["updates"] for n in rates) < FEW_UPDATES:
        print(f"# note: a row timed fewer than {FEW_UPDATES} updates, so one slow update (other work on the machine) "
              "moves its rate a lot; raise --env-steps for ratios to trust")
    if args.profile and not args.profile_row:
        measured = [(n, s) for n, s in modes if n in rates]
        if measured:
            _profile_row(*measured[-1], base, device, env_steps, args)
        else:
            print("# no profile: every row failed")


def _profile_row(name: str, settings: dict, base: AgentConfig, device: torch.device, env_steps: int, args) -> None:
    """A profiled rerun of one row: the time under each part's label and the operator table."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    torch.compiler.reset()
    prof = profile(activities=activities)
    _measure_row(base, settings, device, env_steps, args.prefill, profiler=prof)
    averages = prof.key_averages()  # once: with CUDA events of a few updates it takes minutes
    parts = _part_times(averages, device)
    total = sum(parts.values()) or 1.0
    print(f"# where the time goes ({name}, profiled run; "
          f"{'kernel time (env_step has none: see env ms above)' if device.type == 'cuda' else 'CPU time'} "
          "under each label)")
    for k in PARTS:
        if k in parts:
            print(f"{k:<14}{parts[k]:>9.2f} s {100 * parts[k] / total:>6.1f} %")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(averages.table(sort_by=sort, row_limit=args.profile_rows))
