"""`run.py bench`: throughput of pretraining steps, the GMM E-step, the scene generator, envs, imagination and
the agent loop (`agent/bench.py`).

Every figure is measured in one process, side by side, so ratios (GMM vs Slot Attention, optimized vs
eager, expanded vs materialized E-step) are meaningful on any machine; absolute img/s only mean
something on the GPU. Defaults shrink on the CPU (64x64, batch 64) so a run takes a minute or two.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from envs.errors import UsageError

from .config import PretrainConfig, load_config
from .dynamics import SlotDynamics, sample_step
from .imagined_env import cache_dtype
from .pretrain import build_model, compute_loss
from .sources import GeneratedScenes
from .updates import autocast, guarded_update
from .rundir import resolve_device, set_precision
from .slots.gmm import gaussian_log_likelihood


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer reads the work done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def imagination_speed(model: SlotDynamics, batch: int, steps: int, use_cache: bool, device) -> float:
    """Imagined trajectory-steps per second (steps x batch / s) of a rollout with random actions from
    a 1-step context: one T=1 forward per step with the cache, the whole growing sequence without."""
    c = model.cfg
    model.eval()
    gen = torch.Generator(device).manual_seed(0)
    slots = torch.randint(c.num_codes, (batch, steps, c.num_slots, c.num_vars), device=device, generator=gen)
    frames = (torch.randint(c.frame_codes, (batch, steps, c.frame_vars), device=device, generator=gen)
              if c.frame_vars else None)
    actions = torch.randint(c.num_actions, (batch, steps), device=device, generator=gen)
    dtype = cache_dtype(model, torch.device(device))  # bf16 under autocast, as imagination's cache

    def frames_at(sl):
        return frames[:, sl] if frames is not None else None

    def rollout():
        cache = model.init_cache(batch, steps, device, dtype) if use_cache else None
        for i in range(steps):
            sl = slice(i, i + 1) if use_cache else slice(0, i + 1)
            pred = model(slots[:, sl], frames_at(sl), actions[:, sl], cache)
            next_slots, next_frame, _, _ = sample_step(pred, generator=gen)
            if i + 1 < steps:
                slots[:, i + 1] = next_slots
                if frames is not None:
                    frames[:, i + 1] = next_frame

    rollout()  # warmup (allocator, kernels)
    sync(torch.device(device))
    t0 = time.perf_counter()
    rollout()
    sync(torch.device(device))
    return steps * batch / (time.perf_counter() - t0)


def _timeit(fn, device: torch.device, steps: int, warmup: int = 2) -> tuple[float, float]:
    """Seconds per call after warmup, and seconds the first call took."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps, first


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def gib_column(gib: float, width: int = 10) -> str:
    """A peak-memory cell: `-` where nothing was measured (CPU)."""
    return f"{'-':>{width}}" if gib != gib else f"{gib:>{width}.2f}"


BENCH_PRESETS = {"setpred": "configs/clevr_setpred.yaml", "discovery": "configs/clevr_discovery.yaml"}  # timed


SLOT_MODULES = ("gmm", "slot_attention", "gmm+vq", "slot_attention+vq")  # as `slot_module` names them


def bench_config(task: str, slots: str, resolution: int) -> PretrainConfig:
    """The Slot Attention architecture for the task (preset) with slot module `slots` (one of SLOT_MODULES), at the
    requested resolution; no scene pool (the bench times steps on one rendered batch)."""
    module, vq = slots.removesuffix("+vq"), slots.endswith("+vq")
    return load_config(PretrainConfig, BENCH_PRESETS[task], [f"model.slots={module}", f"model.vq.enabled={vq}",
                                                            f"data.resolution={resolution}", "data.pool=0"])


def pretrain_modes(device: torch.device, compile_on_cpu: bool) -> list[tuple[str, bool, bool, str]]:
    """(name, bf16 autocast, channels_last, torch.compile mode or "") per measured configuration, each adding one
    optimization to the previous, so the table says what each gave."""
    if device.type == "cuda":
        return [("eager-fp32", False, False, ""), ("channels_last", False, True, ""), ("+bf16", True, True, ""),
                ("+compile", True, True, "default"), ("+cudagraphs", True, True, "reduce-overhead")]
    modes = [("eager-fp32", False, False, ""), ("channels_last", False, True, "")]
    return modes + [("+compile", False, True, "default")] if compile_on_cpu else modes


def failed_row(label: str, e: Exception) -> str:
    """A table row for an optimization that failed: a result too, so the bench prints it and goes on."""
    return f"{label}failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def select_rows(args, modes: list[tuple], device: torch.device) -> list[tuple]:
    """The rows `--rows` names (all without it), in table order; each keeps the optimizations of the rows above."""
    if not args.rows:
        return modes
    names, wanted = [m[0] for m in modes], {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = sorted(wanted - set(names))
    if unknown:
        raise UsageError(f"--rows {', '.join(unknown)}: not rows on {device}: {', '.join(names)}")
    return [m for m in modes if m[0] in wanted]


def check_profile_row(args, rows: list[str]) -> None:
    """`--profile-row` names one of this device's rows (before anything runs) and implies `--profile`."""
    if args.profile_row and args.profile_row not in rows:
        raise UsageError(f"--profile-row {args.profile_row!r} is not one of the rows measured here: {', '.join(rows)}")
    args.profile = args.profile or bool(args.profile_row)


def bench_pretrain(args, device: torch.device) -> None:
    res = args.resolution or (128 if device.type == "cuda" else 64)
    batch_size = args.batch_size or (512 if device.type == "cuda" else 64)
    modes = select_rows(args, pretrain_modes(device, args.compile), device)
    models = [m.strip() for m in args.slots.split(",") if m.strip()]
    unknown = sorted(set(models) - set(SLOT_MODULES))
    if unknown or not models:
        raise UsageError(f"--slots takes {', '.join(SLOT_MODULES)} (comma-separated), got {args.slots!r}")
    check_profile_row(args, [m[0] for m in modes])
    set_precision(device)  # fp32 rows as training runs them
    precision = "full fp32, as in training"
    if args.matmul_precision:  # what the E-step's full-precision matmuls cost (set_precision says why they are kept)
        torch.set_float32_matmul_precision(args.matmul_precision)
        precision = f"at torch's '{args.matmul_precision}' precision" + (
            ", as in training" if args.matmul_precision == "highest" else ", NOT as in training")
    note = (f" (convolutions in TF32, fp32 matmuls {precision})" if device.type == "cuda"
            else f" (fp32 matmuls {precision})" if args.matmul_precision else "")
    print(f"# pretrain step ({args.task}, the architecture of {BENCH_PRESETS[args.task]}), {res}x{res}, batch "
          f"{batch_size}, device {device}{note}; img/s over {args.steps} timed steps after the warm-up, each as "
          "training steps (finite checks, gradient clipping); first step: the row's first call, compilation "
          "included, with the compile caches this process finds (`run.py pretrain` logs train/first_step_s from "
          "its process's start)")
    print(f"{'model':<19}{'mode':<15}{'img/s':>10}{'first step s':>14}{'peak GiB':>10}")
    data = None
    results = {}
    for slots in models:
        cfg = bench_config(args.task, slots, res)
        if data is None:
            data = GeneratedScenes(cfg, device).batch(batch_size, seed=0)
        for name, amp, channels_last, compile_mode in modes:
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.compiler.reset()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = build_model(cfg).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            step_model = torch.compile(model, mode=compile_mode) if compile_mode else model
            params = list(model.parameters())
            opt = torch.optim.Adam(params, lr=1e-4)
            images = data["images"].contiguous(memory_format=torch.channels_last) if channels_last else data["images"]
            batch = dict(data, images=images)

            def step():  # as `run.py pretrain` steps: the finite check, the lr, the guarded update (VQ at tau_start)
                if not torch.isfinite(batch["images"]).all():
                    raise UsageError("non-finite pixel values in the benchmark batch")
                for group in opt.param_groups:
                    group["lr"] = cfg.train.lr
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss, stats, _ = compute_loss(step_model, cfg.task, batch, cfg.model.vq.beta)
                guarded_update(loss, params, opt, cfg.train.grad_clip, stats)

            try:
                per_step, first = _timeit(step, device, args.steps, warmup=3 if compile_mode else 2)
            except Exception as e:  # noqa: BLE001 - a failing optimization is a result too; the other rows still run
                print(failed_row(f"{slots:<19}{name:<15}", e))
                continue
            results[(slots, name)] = batch_size / per_step
            print(f"{slots:<19}{name:<15}{batch_size / per_step:>10.1f}{first:>14.2f}{gib_column(peak_gib(device))}")
            if args.profile and slots == models[0] and name == (args.profile_row or modes[-1][0]):
                _profile_table(step, device, args.profile_rows)
    pairs = [("gmm", "slot_attention"), ("gmm+vq", "slot_attention+vq"), ("gmm+vq", "gmm"),
             ("slot_attention+vq", "slot_attention")]
    for name, *_ in modes:
        for a, b in pairs:
            if (a, name) in results and (b, name) in results:
                print(f"ratio {a}/{b} ({name}): {results[(a, name)] / results[(b, name)]:.2f}")
    for slots in models:
        for name, *_ in modes[1:]:
            if (slots, name) in results and (slots, "eager-fp32") in results:
                print(f"ratio {name}/eager-fp32 ({slots}): "
                      f"{results[(slots, name)] / results[(slots, 'eager-fp32')]:.2f}")


def _profile_table(step, device: torch.device, rows: int) -> None:
    """Operator table of three steps of `step` (self device time on CUDA, self CPU time otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def materialized_log_likelihood(x: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor) -> torch.Tensor:
    """The direct E-step that builds the `b n k d` difference tensor: the baseline the expansion replaces."""
    diff = x.unsqueeze(2) - mu.unsqueeze(1)
    return (-0.5 * diff.square() * torch.exp(-2.0 * logsigma).unsqueeze(1) - logsigma.unsqueeze(1)).sum(-1)


def bench_estep(args, device: torch.device) -> None:
    """Forward + backward of the E-step log-likelihood at the set-prediction feature size (32x32, 10 slots)."""
    batch_size = args.batch_size or (512 if device.type == "cuda" else 64)
    n, k, d = 32 * 32, 10, 64
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, n, d, generator=g).to(device).requires_grad_()
    mu = torch.randn(batch_size, k, d, generator=g).to(device).requires_grad_()
    logsigma = (0.1 * torch.randn(batch_size, k, d, generator=g)).to(device).requires_grad_()
    print(f"# GMM E-step log-likelihood fwd+bwd, batch {batch_size}, n={n} k={k} d={d}, device {device}")
    rates = {}
    for name, fn in (("materialized b n k d", materialized_log_likelihood), ("expanded matmuls", gaussian_log_likelihood)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            fn(x, mu, logsigma).logsumexp(-1).sum().backward()

        per, _ = _timeit(step, device, args.steps)
        rates[name] = batch_size / per
        peak = f"   peak {peak_gib(device):.2f} GiB" if device.type == "cuda" else ""
        print(f"{name:<24}{rates[name]:>12.1f} img/s{peak}")
    print(f"ratio expanded/materialized: {rates['expanded matmuls'] / rates['materialized b n k d']:.2f}")


def bench_generator(args, device: torch.device) -> None:
    res = args.resolution or (128 if device.type == "cuda" else 64)
    batch_size = args.batch_size or (512 if device.type == "cuda" else 64)
    cfg = replace(PretrainConfig(), data=replace(PretrainConfig().data, resolution=res))
    source = GeneratedScenes(cfg, device)
    counter = iter(range(10**9))
    per, first = _timeit(lambda: source.batch(batch_size, seed=next(counter)), device, args.steps, warmup=1)
    print(f"# CLEVR-like generator, {res}x{res}, batch {batch_size}, device {device}")
    print(f"scenes/s {batch_size / per:.1f}   (first batch {first:.2f} s)")


def bench_metrics(args, device: torch.device) -> None:
    """clevr_ap_table (all six thresholds) on random predictions for 5000 images x 10 slots x 10 targets."""
    import numpy as np

    from .metrics import clevr_ap_table

    rng = np.random.default_rng(0)
    pred, target = rng.random((5000, 10, 19)), rng.random((5000, 10, 19))
    target[..., -1] = target[..., -1] > 0.3
    per, _ = _timeit(lambda: clevr_ap_table(pred, target), device, args.steps, warmup=1)
    print(f"# clevr_ap_table, 5000 images x 10 slots x 10 targets, 6 thresholds\nseconds {per:.3f}")


def bench_envs(args, device: torch.device) -> None:
    """Env steps/s of one in-process env vs vectorized workers (random actions), per game, side by side."""
    from envs.collect import env_fn
    from envs.throughput import measure_independent_steps_per_second, measure_steps_per_second
    from envs.vector import make_vector_env, usable_cores

    workers = args.workers or usable_cores()
    steps = args.env_steps or 500
    games = [g.strip() for g in args.envs.split(",")]
    unknown = [g for g in games if g not in ("crafter", "nethack")]
    if unknown or not games:
        raise UsageError(f"--envs takes crafter and/or nethack (comma-separated), got {args.envs!r}")
    try:
        per_worker_list = [int(v) for v in args.envs_per_worker.split(",")]
    except ValueError:
        per_worker_list = []
    if not per_worker_list or min(per_worker_list) < 1:
        raise UsageError(f"--envs-per-worker takes positive integers (comma-separated), got {args.envs_per_worker!r}")
    # Every env runs the same `steps` steps in every row: a game's cost per step changes along an episode (Crafter's
    # night frames render darkness), so rows that stepped each env fewer times would compare different phases.
    print(f"# env steps/s, random actions, {steps} steps of every env in each row; efficiency = rate / (workers x one core); "
          f"of no-IPC = rate / the no-IPC row above it, the same envs (seeds) stepped by as many processes without a "
          f"vector env (the machine's own scaling left out)")
    print(f"{'env':>8} {'setup':>30} {'steps/s':>9} {'efficiency':>10} {'of no-IPC':>10}")
    for name in games:
        fn = env_fn(name, stats_path=None)
        # One core stepping the no-IPC row's envs (seeds 0..workers-1) in turn: a game's step and reset costs vary
        # with the seed (a Crafter world is regenerated when the player dies), so one env's rate is a noisy baseline.
        venv = make_vector_env(fn, workers, asynchronous=False)
        single = measure_steps_per_second(venv, steps)
        venv.close()
        print(f"{name:>8} {f'one core, {workers} envs in turn':>30} {single:9.0f}")
        for per_worker in per_worker_list:
            alone = measure_independent_steps_per_second(fn, workers, steps, envs_per_process=per_worker)
            print(f"{name:>8} {f'{workers} processes x {per_worker} envs, no IPC':>30} {alone:9.0f} "
                  f"{alone / (workers * single):10.2f}")
            venv = make_vector_env(fn, workers * per_worker, envs_per_worker=per_worker)
            rate = measure_steps_per_second(venv, steps)
            venv.close()
            print(f"{name:>8} {f'{workers} workers x {per_worker} envs':>30} {rate:9.0f} {rate / (workers * single):10.2f}"
                  f" {rate / alone:10.2f}")


def bench_imagination(args, device: torch.device) -> None:
    """Imagined trajectory-steps/s of the dynamics transformer with and without the KV cache, side by side."""
    from .config import WorldModelConfig

    args.wm_config = args.wm_config or ("configs/wm_crafter.yaml" if device.type == "cuda" else
                                        "configs/wm_crafter_cpu.yaml")
    cfg = load_config(WorldModelConfig, args.wm_config)
    dyn = replace(cfg.dynamics, num_slots=cfg.encoder.model.num_slots, num_vars=cfg.encoder.model.vq.num_vars,
                  num_codes=cfg.encoder.model.vq.num_codes, frame_vars=cfg.frame.vars, frame_codes=cfg.frame.codes)
    batch = args.batch_size or (1024 if device.type == "cuda" else 16)
    steps = min(args.horizon, dyn.max_steps)
    if steps < args.horizon:
        print(f"note: --horizon {args.horizon} is past the preset's dynamics.max_steps; imagining {steps} steps")
    torch.manual_seed(0)
    model = SlotDynamics(dyn).to(device)
    print(f"# {args.wm_config}: {dyn.layers} layers x {dyn.embed_dim}, {dyn.num_slots} slots + frame + action tokens, "
          f"batch {batch}, {steps} imagined steps from a 1-step context, {device.type}"
          f"{' under bf16 autocast, as training imagines (train.amp)' if device.type == 'cuda' else ''}")
    with autocast(device, cfg.train.amp):
        cached = imagination_speed(model, batch, steps, True, device)
        full = imagination_speed(model, batch, steps, False, device)
    print(f"imagined steps/s, summed over the batch of {batch} trajectories:\n"
          f"with KV cache {cached:10.0f} steps/s\nwithout       {full:10.0f} steps/s\nratio {cached / full:.1f}x")


# the options each bench reads (--device: all of them); another bench's option given is refused, not ignored
USES = {"pretrain": {"batch_size", "resolution", "steps", "task", "slots", "profile", "profile_rows", "profile_row",
                     "matmul_precision", "rows", "compile"},
        "estep": {"batch_size", "steps"}, "generator": {"batch_size", "resolution", "steps"}, "metrics": {"steps"},
        "envs": {"envs", "workers", "envs_per_worker", "env_steps"},
        "imagination": {"batch_size", "horizon", "wm_config"},
        "agent": {"agent_config", "env_steps", "prefill", "profile", "profile_rows", "profile_row", "rows", "compile"}}


def main(args) -> None:
    if args.overrides and args.what != "agent":  # the others take their sizes from their flags
        raise UsageError(f"bench {args.what} takes no key=value overrides ({' '.join(args.overrides)}): they apply to "
                         "`bench agent`'s preset; see `run.py bench --help` for its flags")
    parser = getattr(args, "parser", None)
    if parser is not None:
        unused = [name for name in sorted(set().union(*USES.values()) - USES[args.what])
                  if getattr(args, name) != parser.get_default(name)]
        if unused:
            flags = ", ".join("--" + name.replace("_", "-") for name in unused)
            raise UsageError(f"bench {args.what} does not use {flags} (it reads "
                             f"{', '.join('--' + n.replace('_', '-') for n in sorted(USES[args.what]))}, --device)")
    device = resolve_device(args.device)
    from agent.bench import bench_agent

    benches = {"pretrain": bench_pretrain, "estep": bench_estep, "generator": bench_generator, "metrics": bench_metrics,
               "envs": bench_envs, "imagination": bench_imagination, "agent": bench_agent}
    benches[args.what](args, device)

