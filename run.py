#!/usr/bin/env python
"""slotworld command line: one entry point, one subcommand per job. `python run.py SUBCOMMAND --help`."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import functools
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

EPILOG = """examples:
  python run.py pretrain --config configs/clevr_tiny.yaml --run-dir runs/tiny
  python run.py pretrain --config clevr_setpred_cpu model.slots=slot_attention train.steps=1000   # 10-15 min on a CPU
  python run.py pretrain --config clevr_setpred --run-dir runs/setpred     # the paper's setup: a GPU run
  python run.py pretrain --run-dir runs/tiny --resume train.steps=400
  python run.py eval-ap --checkpoint runs/tiny --images 2000
  python run.py generate --out data/clevr_like --images 100                # 480x320 scenes: ~0.1-0.2 s each on a CPU
  python run.py pretrain --config clevr_setpred data.source=clevr data.root=CLEVR_v1.0   # CLEVR on disk
  python run.py convert-clevr-masks --tfrecords clevr_with_masks_train.tfrecords --out data/clevr6   # FG-ARI
  python run.py collect --env crafter --frames 20000 --out data/crafter --workers 2
  python run.py pretrain --data data/crafter --run-dir runs/slots
  python run.py visualize --checkpoint runs/slots --env crafter --frames 16 --out viz/crafter
  python run.py visualize --checkpoint runs/vq_setpred --codes --out viz/codes
  python run.py train-wm --data data/crafter --run-dir runs/wm encoder.checkpoint=runs/slots
  python run.py eval-wm --checkpoint runs/wm
  python run.py train --config crafter_cpu_frozen --run-dir runs/agent encoder.checkpoint=runs/slots
  python run.py train --resume runs/agent
  python run.py eval --checkpoint runs/agent --episodes 20                 # --policy random: the baseline
  python run.py compare runs/gmm runs/slot_attention                       # last evaluations side by side
  python run.py config --for train --config crafter_cpu                    # the resolved config, every key
  python run.py bench pretrain
  python run.py bench envs
Overrides are dotted `key=value` pairs, before or after the options; `python run.py config` lists every key."""


DEFAULT_PRESETS = {"pretrain": "configs/clevr_tiny.yaml", "train-wm": "configs/wm_crafter_cpu.yaml",
                   "train": "configs/tiny.yaml"}  # what each training command runs without --config
FRAMES_PRESET = "configs/frames_discovery_cpu.yaml"  # `pretrain --data DIR` without --config


class _Once(argparse.Action):
    """An option given at most once: presets do not combine, and a second --config would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): presets do not "
                         "combine; pass one and change it with key=value overrides")
        setattr(namespace, self.dest, values)


def _add_step_option(s: argparse.ArgumentParser, written: str = "the files written get _step<N> in their names"
                     ) -> None:
    """--step, alike for the commands that read a run's checkpoint; `written`: what it does to their output."""
    s.add_argument("--step", type=int, help="read the checkpoint kept at this evaluation step (a run with "
                   "train.keep_checkpoints=true keeps one per evaluation, checkpoints/step_<N>.pt) instead of the "
                   f"latest; {written}")


def _add_run_options(s: argparse.ArgumentParser, command: str, presets: str, run_dir_default: str) -> None:
    """--config, --run-dir and --resume, alike for the commands that make a run directory."""
    s.add_argument("--config", action=_Once, help=f"YAML preset, a path or a name in configs/ ({presets}); default "
                   f"{DEFAULT_PRESETS[command]}")
    s.add_argument("--run-dir", help=f"run directory (default {run_dir_default})")
    s.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue a run from its checkpoint: `--resume RUN`, or `--resume` with --run-dir RUN")


def _overrides_help(example: str, command: str) -> str:
    return f"dotted config overrides, e.g. {example} (`run.py config --for {command}` lists the keys)"


def cmd_config(args) -> None:
    from envs.errors import UsageError
    from world_model.config import load_config, run_schemas, schema_command

    command = args.command_schema or (args.config and schema_command(args.config)) or "pretrain"
    preset, overrides = args.config or DEFAULT_PRESETS[command], list(args.overrides)
    if args.data and command == "train":
        raise UsageError("--data names the episode dataset of `pretrain` or `train-wm` (--for); `train` collects its "
                         "own episodes")
    if args.data and command == "pretrain":
        overrides, preset = _frames_overrides(args.data, overrides), args.config or FRAMES_PRESET
    elif args.data:
        overrides = [f"data.root={args.data}"] + overrides
    cfg = load_config(run_schemas()[command], preset, overrides)
    if args.data:  # refused here as the command would refuse it
        from world_model.sources import check_source
        from world_model.train_wm import dataset_meta

        if command == "pretrain":
            check_source(cfg)
        else:
            dataset_meta(cfg)
    text = _config_text(cfg, command)  # an error: nothing printed
    print(f"# run.py {command}{f' --data {args.data}' if args.data else ''}, preset {preset}")
    print(text, end="")


def _config_text(cfg, command: str, resumed: bool = False) -> str:
    """`cfg` as YAML, with the keys a world-model or agent run sets itself shown at the values it will give them
    (`resumed`: a run's recorded config, which holds them as the run set them at its start)."""
    import copy

    from envs import STATUS_LEVELS
    from world_model.config import DERIVED, ConfigError, to_yaml
    from world_model.frame_tokenizer import frame_token_size

    cfg, derived, notes = copy.deepcopy(cfg), {}, ""
    if command in ("train-wm", "train") and resumed:  # not the env's now: a run keeps what it started with
        derived = {key: ("its start, as recorded", functools.reduce(getattr, key.split("."), cfg)) for key in DERIVED}
    elif command in ("train-wm", "train"):
        derived = {key: (source, None) for key, source in DERIVED.items()}
        actions, status = _env_facts(cfg, command)
        derived["dynamics.num_actions"] = (DERIVED["dynamics.num_actions"], actions)
        read, frame_vars, frame_codes = frame_token_size(cfg.frame, status or 0)
        if read:  # the env's status tokens follow the learned frame codes
            derived["dynamics.frame_vars"] = (f"frame.vars + the env's {read} status tokens", frame_vars)
            derived["dynamics.frame_codes"] = (f"frame.codes, at least the status tokens' {STATUS_LEVELS} values",
                                               frame_codes)
        if cfg.encoder.checkpoint:  # the encoder's architecture comes from that run, whatever this config says
            try:
                pre, cfg.encoder.model, continued = _pretrained_encoder(cfg.encoder)
            except ConfigError as e:  # not pretrained yet (a recipe's preset names the run its first steps make)
                notes = (f"# {e}\n# encoder.model and encoder.resolution will be those of that run; shown: this "
                         "config's\n")
            else:
                cfg.encoder.resolution = pre.data.resolution
                notes = (f"# encoder.model and encoder.resolution: those of encoder.checkpoint={cfg.encoder.checkpoint}"
                         + (f"; its VQ temperature {_anneal_note(pre.model.vq, continued)}" if continued else "")
                         + "\n")
        else:
            derived["encoder.mode"] = ("encoder.checkpoint unset (a fresh encoder trains jointly)", "joint")
    text = to_yaml(cfg)
    return notes + (_mark_derived(text, cfg, derived) if derived else text)


def _env_facts(cfg, command: str) -> tuple:
    """The action count and status tokens a run of `cfg` will give its dynamics (the env's, or its dataset's); None
    for what cannot be known here (no dataset yet)."""
    if command == "train":
        from agent.config import env_kwargs
        from agent.train import obs_spec
        from envs.collect import make_env
        from world_model.frame_tokenizer import status_vars

        env = make_env(cfg.env.name, **env_kwargs(cfg, None))  # NetHack's task sets the actions
        try:
            return int(env.action_space.n), status_vars(obs_spec(env.observation_space))
        finally:
            env.close()
    from envs.episodes import episode_paths, load_episode, read_meta
    from world_model.frame_tokenizer import status_vars
    from world_model.train_wm import episode_spec

    try:
        first = load_episode(episode_paths(cfg.data.root)[0])
        return read_meta(cfg.data.root)["num_actions"], status_vars(episode_spec(first))
    except (ValueError, KeyError, TypeError):  # no dataset there (yet)
        return None, None


def _mark_derived(text: str, cfg, derived: dict) -> str:
    """The YAML of a world-model or agent config with each key the run sets itself shown at the value it will get
    and a comment saying where from. `derived`: key -> (its source, its value when the source is not a key)."""
    lines, section = [], None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line.rstrip(":")
        key = f"{section}.{line.strip().split(':')[0]}"
        if line.startswith("  ") and not line.startswith("   ") and key in derived:
            source, value = derived[key]
            try:
                value = functools.reduce(getattr, source.split("."), cfg)
            except AttributeError:  # not another key (the env's action count): known here, or not
                pass
            name = line.split(':')[0]
            line = (f"{name}: {value}  # set by the run from {source}" if value is not None else  # read back alike
                    f"{name[:2]}# {name.strip()}: set by the run from {source}, not known here")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _run_training(args, default_preset: str, overrides: list, run_name, train_fn, resume, preflight=None,
                  report=None, notes: Sequence[str] = ()) -> None:
    """What pretrain, train-wm and train share: the config (the run's own when resuming, plus overrides), the run
    directory (named explicitly under torchrun, where a timestamped default could differ between processes), the
    resolved config and the result printed once. `resume`: False, True (the run in --run-dir) or the run's path;
    `preflight(cfg)`: the command's own config checks, run with the others before the config is printed (it may
    return lines to say with `notes`);
    `report(run_dir, result)`: the text that ends the run (default: the result as one JSON line, `_json_line`);
    `notes`: lines said on stderr right below the config, where they are seen."""
    from world_model import distributed
    from envs.episodes import check_recorded_root
    from world_model.config import (check_against_checkpoint, check_resume_overrides, load_config, load_run_config,
                                     record_paths, run_schemas)
    from envs.errors import DataError, UsageError
    from world_model.rundir import RunDir, check_run_folder, peek_checkpoint, release_claims, resolve_device

    if isinstance(resume, str):
        if args.run_dir and Path(args.run_dir).resolve() != Path(resume).resolve():
            raise UsageError(f"--resume {resume} names the run to continue; --run-dir {args.run_dir} contradicts it")
        args.run_dir = resume
    resume = bool(resume)
    if resume:
        if args.run_dir is None:
            raise UsageError("--resume needs the run to continue: --resume RUN, or --run-dir RUN --resume")
        cfg, saved = load_run_config(args.command, args.run_dir, overrides), load_run_config(args.command, args.run_dir)
        record_paths(cfg, saved)  # first: the relative path the run started with names the path it recorded absolute
        check_resume_overrides(saved, cfg, args.run_dir)
        if args.config:
            raise UsageError(f"--resume continues {args.run_dir} with its own config.yaml; --config {args.config} "
                             "would not apply (change keys with key=value overrides, or start a new run)")
        root = getattr(getattr(cfg, "data", None), "root", None)
        if root:
            check_recorded_root(root, args.run_dir, "resume with data.root=ITS_NEW_PATH")
    else:
        cfg = load_config(run_schemas()[args.command], args.config or default_preset, overrides)
        record_paths(cfg)
    if distributed.launched() and not args.run_dir:
        raise UsageError("under torchrun pass --run-dir DIR (every process must use the same run directory)")
    run_dir = args.run_dir = args.run_dir or f"runs/{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    # before the config is printed: an error is then the last line, not lost above it
    check_run_folder(run_dir)
    RunDir(run_dir).refuse_if_live()  # another process training there (claimed for this one when training starts)
    if not resume:
        RunDir(run_dir).refuse_checkpoint()
    resolve_device(cfg.train.device, "train.device")
    peeked = peek_checkpoint(RunDir(run_dir).ckpt_path) if resume else None
    if peeked is not None:  # an edited config.yaml: said before the checks below advise on what it now says
        check_against_checkpoint(cfg, peeked, run_dir)
    del peeked  # its tensors map the file, which the run's first checkpoint replaces: not held for the run
    if preflight is not None:
        try:
            notes = [*notes, *(preflight(cfg) or ())]
        except DataError as e:  # a resumed run's data that changed in place, or moved and left something behind
            root = getattr(getattr(cfg, "data", None), "root", None)
            if resume and root and not any(o.startswith("data.root=") for o in overrides):
                raise DataError(f"{e} (if {run_dir}'s data moved, resume with data.root=ITS_NEW_PATH)") from None
            raise
    main_rank = distributed.is_main()
    if main_rank:
        print(f"# run directory: {run_dir}\n{_config_text(cfg, args.command, resume)}", end="")
        if distributed.launched():
            print(f"# torchrun: {distributed.launched_size()} processes, data-parallel (this one, rank 0, prints and "
                  "writes for all)")
        if getattr(cfg.train, "compile", False):
            print(f"# train.compile: the first steps compile ({cfg.train.compile_mode}); that takes minutes on a CPU "
                  "and is cached on disk for later runs")
        sys.stdout.flush()
        for note in notes:
            print(note, file=sys.stderr)
    try:
        result = train_fn(cfg, run_dir, resume=resume, progress=not args.no_progress)
    finally:  # a run that failed or was stopped gives up its claim (train.pid), and a directory it left empty
        release_claims()
    if main_rank:
        print((report or _json_line)(run_dir, result))


def _json_line(run_dir: str, result: dict) -> str:
    """A training run's result as the one JSON line that ends its output (what a script reads)."""
    return json.dumps({"run_dir": run_dir, **result})


def cmd_pretrain(args) -> None:
    from world_model.config import slot_module
    from world_model.pretrain import preflight, pretrain

    overrides, notes = list(args.overrides), []
    if args.data:
        overrides = _frames_overrides(args.data, overrides)
        if args.config and not args.resume:  # (--config with --resume is refused)
            notes = _frames_preset_notes(args.config, overrides)
    preset = FRAMES_PRESET if args.data else DEFAULT_PRESETS["pretrain"]
    _run_training(args, preset, overrides, lambda c: f"pretrain-{c.task}-{slot_module(c.model)}", pretrain,
                  args.resume, preflight, notes=notes)


def _frames_overrides(data: str, overrides: list) -> list:
    """What `pretrain --data DIR` stands for: object discovery on the frames of the episode dataset DIR."""
    from envs.errors import UsageError

    same = ("data.source=frames", f"data.root={data}")
    clash = [o for o in overrides if re.fullmatch(r"data\.(source|root)=.*", o) and o not in same
             and not (o.startswith("data.root=") and Path(o.split("=", 1)[1]).resolve() == Path(data).resolve())]
    if clash:
        raise UsageError(f"--data {data} trains on that dataset's frames (data.source=frames); {clash[0]} "
                         "contradicts it: give one or the other")
    return ["data.source=frames", f"data.root={data}", "task=discovery"] + overrides


def _frames_preset_notes(preset: str, overrides: list) -> list[str]:
    """`pretrain --data DIR --config PRESET`: what of a preset made for CLEVR changes or is missing on game frames
    (its set-prediction task becomes discovery; without VQ codes the encoder cannot serve a world model)."""
    from world_model.config import PretrainConfig, load_config

    own = load_config(PretrainConfig, preset, [])
    final = load_config(PretrainConfig, preset, overrides)
    notes = []
    if own.task != "discovery":
        notes.append(f"note: {preset} sets task={own.task}; game frames have no property targets, so --data trains "
                     "object discovery")
    if not final.model.vq.enabled:
        notes.append(f"note: {preset} trains slots without VQ codes; `train-wm` and `train` need a VQ encoder "
                     "(model.vq.enabled=true; the default preset for --data, frames_discovery_cpu, has them)")
    return notes


def cmd_eval_ap(args) -> None:
    from envs.atomic import check_folder
    from envs.errors import UsageError
    from world_model.pretrain import evaluate_run
    from world_model.rundir import step_suffix

    if args.out:  # before the evaluation: a path it could not write to
        if Path(args.out).is_dir():
            raise UsageError(f"--out {args.out} is a folder: name the JSON file to write, e.g. "
                             f"{Path(args.out) / 'ap.json'}")
        check_folder(Path(args.out).parent, "--out's folder")
    result = evaluate_run(args.checkpoint, data=args.data, clevr_root=args.clevr_root, split=args.split,
                          images=args.images, device=args.device, progress=not args.no_progress, step=args.step)
    # the run's own evaluation, one on each real-CLEVR root and split and one on another episode dataset are kept
    # side by side
    root = f"{Path(os.path.abspath(args.clevr_root)).name}_" if args.clevr_root else ""
    name = (f"eval_ap_clevr_{root}{result['split']}" if result["source"] == "clevr" else
            f"eval_ap_data_{Path(os.path.abspath(args.data)).name}" if args.data else "eval_ap")
    default = f"{name}{step_suffix(args.step)}.json"  # a kept checkpoint's: beside the latest's
    out = Path(args.out) if args.out else Path(args.checkpoint) / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{result['task']} {result['slots']}{'+vq' if result['vq'] else ''} step {result['step']} "
          f"on {result['images']} images ({result['data']}); {_units(result)}:")
    rows = [[k for k in result if k.startswith("AP_")], [k for k in result if k.startswith("acc_")] +
            [k for k in ("coord_err", "objectness", "fg_ari", "mse", "empty_slots") if k in result]]
    for keys in filter(None, rows):
        widths = [max(10, len(k)) for k in keys]
        print("  ".join(f"{k:>{w}}" for k, w in zip(keys, widths)))
        print("  ".join(f"{result[k]:{w}.{5 if k == 'mse' else 2}f}" for k, w in zip(keys, widths)))
    print(f"written to {out}")


def _units(result: dict) -> str:
    """What eval-ap's numbers are in, for the ones it has."""
    percent = [name for key, name in (("AP_inf", "AP"), ("acc_size", "accuracies"), ("objectness", "objectness"),
                                      ("fg_ari", "FG-ARI")) if key in result]
    others = [text for key, text in (("coord_err", "coord_err in scene units"), ("mse", "mse of pixel values in [0, 1]"),
                                     ("empty_slots", "empty_slots per image")) if key in result]
    if percent:  # "A, B and C in %"
        others.insert(0, " and ".join(filter(None, [", ".join(percent[:-1]), percent[-1]])) + " in %")
    return "; ".join(others)


def cmd_generate(args) -> None:
    from envs.clevr import write_dataset

    from world_model.rundir import resolve_device

    write_dataset(args.out, args.images, split=args.split, seed=args.seed, batch_size=args.batch_size,
                  device=resolve_device(args.device), progress=not args.no_progress)
    print(f"wrote {args.images} scenes to {args.out} (CLEVR v1.0 layout, split {args.split})")


def cmd_convert_clevr_masks(args) -> None:
    from envs.clevr_masks import convert

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    written = convert(args.tfrecords, args.out, train_scenes=args.train_scenes, val_scenes=args.val_scenes,
                      splits=splits, progress=not args.no_progress)
    held = [split for split in ("train", "val") if (Path(args.out) / "scenes" / f"CLEVR_{split}_scenes.json").is_file()]
    command = ("python run.py pretrain --config clevr_discovery data.source=clevr "
               f"data.root={args.out} data.split=train data.eval_split=val")
    print(f"wrote {' and '.join(f'{n} {split}' for split, n in written.items())} scenes to {args.out} (CLEVR v1.0 "
          "layout with instance masks); object discovery on CLEVR6 with FG-ARI: " + (
              command if held == ["train", "val"] else
              f"convert split {({'train', 'val'} - set(held)).pop()} too (--splits), then {command}"))


def cmd_collect(args) -> None:
    from envs.collect import collect
    from envs.errors import UsageError
    from envs.vector import crowding_note

    given = (("size", args.size), ("max_episode_steps", args.max_episode_steps), ("task", args.task),
             ("crop", args.crop))
    kwargs = {key: value for key, value in given if value}
    if args.env != "nethack" and (args.task or args.crop):
        named = " and ".join(o for o, v in (("--task", args.task), ("--crop", args.crop)) if v)
        raise UsageError(f"{named} {'are' if args.task and args.crop else 'is'} NetHack's (--env nethack); {args.env} "
                         "has none")
    note = crowding_note(args.workers, f"--workers {args.workers}")
    if note:
        print(note, file=sys.stderr)
    result = collect(args.env, args.frames, args.out, num_envs=args.workers * args.envs_per_worker,
                     envs_per_worker=args.envs_per_worker, seed=args.seed, env_kwargs=kwargs,
                     asynchronous=args.workers > 1 or args.envs_per_worker > 1, progress=not args.no_progress)
    print(json.dumps(result))


def cmd_visualize(args) -> None:
    from envs.errors import UsageError

    decomposition = {"--env": args.env, "--frames": args.frames, "--policy": args.policy, "--edit": args.edit,
                     "--seed": args.seed}
    if args.codes and any(v is not None for v in decomposition.values()):
        named = ", ".join(k for k, v in decomposition.items() if v is not None)
        raise UsageError(f"--codes draws the code figure from --images held-out scenes; {named} "
                         "choose the frames of a decomposition: leave them out, or --codes")
    if not args.codes and args.images is not None:
        raise UsageError("--images counts the scenes of --codes; a decomposition shows --frames")
    if args.codes:
        from world_model.disentangle import disentanglement

        given = {"n_images": args.images} if args.images is not None else {}  # else the function's default
        summary = disentanglement(args.checkpoint, args.out, device=args.device, clevr_root=args.clevr_root,
                                  step=args.step, **given)
    else:
        from world_model.decompose import visualize

        given = {k: v for k, v in (("frames", args.frames), ("seed", args.seed)) if v is not None}  # else defaults
        summary = visualize(args.checkpoint, args.env, args.out, device=args.device, clevr_root=args.clevr_root,
                            edit=tuple(args.edit) if args.edit else None, step=args.step, policy=args.policy, **given)
    print(json.dumps(summary, indent=2))


def cmd_train_wm(args) -> None:
    from world_model.train_wm import preflight, train_wm

    overrides = ([f"data.root={args.data}"] if args.data else []) + list(args.overrides)

    def checked(cfg) -> None:
        preflight(cfg)
        _check_encoder(cfg, overrides, args.resume)

    _run_training(args, DEFAULT_PRESETS["train-wm"], overrides, lambda c: "wm", train_wm, args.resume, checked)


def _anneal_note(vq, step: int) -> str:
    """How a jointly fine-tuned encoder's VQ temperature goes on from pretraining step `step` (`continued_anneal`)."""
    if step >= vq.anneal_steps:
        return f"stays at tau_end, which its pretraining reached by its step {step}"
    return f"anneals on from where its step {step} left it (tau_start, anneal_steps)"


def _pretrained_encoder(enc) -> tuple:
    """The pretraining config of `enc.checkpoint`, the encoder model a run with `enc` builds from it, and the step a
    joint run's VQ temperature anneal continues from (`continued_anneal`; 0: none)."""
    from world_model.config import continued_anneal, encoder_run_config
    from world_model.rundir import RunDir, checkpoint_step

    pre = encoder_run_config(enc.checkpoint)
    step = (checkpoint_step(RunDir(enc.checkpoint).ckpt_path) or 0) if enc.mode == "joint" and pre.model.vq.enabled \
        else 0
    return pre, continued_anneal(pre.model, step), step


def _check_encoder(cfg, overrides: list, resume) -> None:
    """The encoder settings typed on the command line must apply: encoder.mode=frozen with nothing to freeze
    (`check_typed_mode`) and encoder.model.* / encoder.resolution beside a checkpoint whose run sets them otherwise
    are refused. A preset's encoder.mode=joint with a checkpoint gets a note: fine-tuning the encoder costs several
    times more per update."""
    from envs.errors import UsageError
    from world_model import distributed
    from world_model.train_wm import check_typed_mode

    check_typed_mode(cfg.encoder, overrides)
    typed = [o for o in overrides if o.split("=", 1)[0] == "encoder.mode"]
    if not cfg.encoder.checkpoint or resume:
        return
    pre, model, continued = _pretrained_encoder(cfg.encoder)
    theirs = {"encoder.resolution": pre.data.resolution, "encoder.model": model}
    for typed_key in (o.split("=", 1)[0] for o in overrides if re.match(r"encoder\.(model\.|resolution=)", o)):
        path = typed_key.split(".")
        mine = functools.reduce(getattr, path[1:], cfg.encoder)
        if mine == functools.reduce(getattr, path[2:], theirs[".".join(path[:2])]):
            continue
        if continued and typed_key in ("encoder.model.vq.tau_start", "encoder.model.vq.anneal_steps"):
            raise UsageError(f"{typed_key}={mine} would not apply: encoder.mode=joint continues the VQ temperature "
                             f"anneal of encoder.checkpoint={cfg.encoder.checkpoint} from its step {continued}, which "
                             "sets tau_start and anneal_steps; drop it")
        raise UsageError(f"{typed_key}={mine} would not apply: encoder.checkpoint={cfg.encoder.checkpoint} sets "
                         "the encoder (its model and resolution) otherwise; drop it, or pretrain an encoder with it")
    if not typed and cfg.encoder.mode == "joint" and distributed.is_main():  # under torchrun, one process says it
        print("note: encoder.mode=joint (not typed: the preset's or the default) fine-tunes the pretrained encoder with "
              "the world model, several times slower per update than encoder.mode=frozen", file=sys.stderr)


def cmd_compare(args) -> None:
    from world_model.report import comparison_table

    print(comparison_table(args.runs))


def cmd_eval_wm(args) -> None:
    from world_model.train_wm import eval_wm, open_loop_legend, open_loop_table

    result = eval_wm(args.checkpoint, out=args.out, segments=args.segments, device=args.device, data=args.data,
                     progress=not args.no_progress, step=args.step)
    agent = result["agent"]  # an agent run's steps are env steps; it trained on none of the episodes
    drawn = (f"from all {result['held_out_episodes']} episodes ({result['held_out_steps']} steps) of {args.data}"
             if agent else f"held out: the last {result['held_out_episodes']} episodes ({result['held_out_steps']} "
             "steps)")
    print(f"open-loop prediction, {'env ' * agent}step {result['step']}, {result['segments']} segments {drawn}")
    print(open_loop_table(result))
    print(open_loop_legend(any(k.endswith("/status_acc") for k in result)))
    print(f"video: {result['video']}, picture: {result['picture']}")
    print(f"written to {Path(result['video']).parent / 'eval_wm.json'}")


def cmd_train(args) -> None:
    from agent.train import preflight, train

    from envs.errors import UsageError

    if args.new_replay and not args.resume:
        raise UsageError("--new-replay starts a resumed run's replay afresh; it needs --resume RUN")
    def checked(cfg) -> list[str]:
        notes = preflight(cfg)
        _check_encoder(cfg, args.overrides, args.resume)
        return [] if args.resume else notes  # (a resumed run's prefill is long done)

    _run_training(args, DEFAULT_PRESETS["train"], args.overrides, lambda c: f"agent-{c.env.name}",
                  functools.partial(train, new_replay=args.new_replay), args.resume, checked,
                  lambda run_dir, result: _json_line(run_dir, {k: v for k, v in result.items()
                                                               if "achievement_" not in k}))  # they are in the logs


def cmd_eval(args) -> None:
    from agent.evaluate import evaluate_run
    from world_model.rundir import step_suffix

    result = evaluate_run(args.checkpoint, args.episodes, policy=args.policy, device=args.device, seed=args.seed,
                          progress=not args.no_progress, step=args.step)
    out = Path(args.checkpoint) / f"eval_{args.policy}{step_suffix(args.step)}.json"
    out.write_text(json.dumps(result, indent=2))
    n = result["episodes"]
    who = f"agent at env step {result['env_steps']}" if args.policy == "agent" else "random policy"
    print(f"{result['env']} {who}: {n} episode{'s' if n != 1 else ''} (seed {args.seed})")
    if "success_rates" in result:
        print(f"  Crafter score {result['score']:.2f}, mean return {result['mean_return']:.2f}, "
              f"mean length {result['mean_length']:.0f}")
        for name, rate in sorted(result["success_rates"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:<20} {rate:6.1f} %")
    else:
        print(f"  mean score {result['mean_score']:.1f}, mean return {result['mean_return']:.2f}, mean depth "
              f"{result['mean_depth']:.2f}, max depth {result['max_depth']}, mean length {result['mean_length']:.0f}")
        print(f"  ended: {result['died']} died, {result['step_limit']} at the step limit"
              + "".join(f"\n  {count:>4} {cause}" for cause, count in result["deaths"].items()))
    print(f"written to {out}")


def cmd_bench(args) -> None:
    from world_model import bench

    bench.main(args)


def seed_value(text: str) -> int:
    """A --seed: a whole number, 0 or more (env and numpy seeding refuse negatives, in words that name no flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, 0 or more; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"takes a whole number, 0 or more; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description="slotworld: object-centric world models and agents "
                                "(GMM slots, Slot Attention, VQ-SA codes).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    p.commands = sub.choices  # name -> subparser, filled below

    s = sub.add_parser("pretrain", help="train a slot encoder on CLEVR-style scenes or env frames (discovery or set prediction)",
                       description="Train a slot encoder: task=discovery reconstructs images through a mask decoder "
                       "(FG-ARI); task=setpred predicts CLEVR object properties with a Hungarian loss (AP). "
                       "Scenes are generated on the fly (data.source=generated), read from a CLEVR v1.0 root "
                       "(data.source=clevr data.root=DIR; a root of `convert-clevr-masks` has masks for FG-ARI) or "
                       "taken from game frames (--data DIR). "
                       "Writes config, checkpoints, tensorboard and metrics.jsonl to --run-dir.")
    _add_run_options(s, "pretrain", "clevr_tiny, clevr_discovery_tiny, clevr_setpred_cpu, clevr_discovery_cpu, "
                     "clevr_setpred, clevr_discovery, frames_discovery_cpu, frames_discovery",
                     "runs/pretrain-<task>-<slots>-<time>")
    s.add_argument("--data", help="train on env frames: an episode dataset made by `run.py collect` (sets "
                   "data.source=frames, task=discovery; default preset configs/frames_discovery_cpu.yaml)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.add_argument("overrides", nargs="*", help=_overrides_help("model.slots=gmm train.steps=100", "pretrain"))
    s.set_defaults(func=cmd_pretrain, parser=s)

    s = sub.add_parser("eval-ap", help="AP table (and FG-ARI) of a pretrained run on held-out scenes",
                       description="Evaluate a pretraining run: set prediction prints CLEVR AP at distance "
                       "thresholds inf, 1, 0.5, 0.25, 0.125, 0.0625; discovery prints FG-ARI and MSE. By default "
                       "on held-out generated scenes; --clevr-root evaluates on a real CLEVR v1.0 directory.")
    s.add_argument("--checkpoint", required=True, help="run directory made by `run.py pretrain`")
    _add_step_option(s)
    s.add_argument("--clevr-root", help="CLEVR v1.0 root (images/<split>/*.png, scenes/CLEVR_<split>_scenes.json)")
    s.add_argument("--split", help="CLEVR split to evaluate on (default: a run trained on CLEVR on disk, its "
                   "data.eval_split; otherwise val)")
    s.add_argument("--data", help="for a run pretrained on game frames: the episode dataset whose held-out frames it "
                                  "is evaluated on (default: its data.root)")
    s.add_argument("--images", type=int, help="number of evaluation images (default data.eval_images; fed in "
                   "fixed chunks of 64, so a result does not depend on how it is run)")
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N (default auto)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.add_argument("--out", help="JSON file for the results (default RUN/eval_ap.json; on a CLEVR split on disk "
                   "RUN/eval_ap_clevr_<split>.json, with --clevr-root DIR RUN/eval_ap_clevr_<DIR's name>_<split>.json; "
                   "with --data DIR, RUN/eval_ap_data_<DIR's name>.json)")
    s.set_defaults(func=cmd_eval_ap, parser=s)

    s = sub.add_parser("generate", help="write procedurally generated CLEVR-like scenes to disk (CLEVR layout)",
                       description="Render scenes at CLEVR's 480x320 into the CLEVR v1.0 layout (images/<split>, "
                       "scenes/CLEVR_<split>_scenes.json, plus instance masks), readable wherever a CLEVR root is "
                       "(data.source=clevr, eval-ap --clevr-root). About 0.2 s per scene on 2 CPU cores "
                       "(128 scenes in 22 s); --device cuda renders on a GPU.")
    s.add_argument("--out", required=True, help="dataset root to create (or add a split to)")
    s.add_argument("--images", type=int, default=1000, help="scenes to render (default 1000)")
    s.add_argument("--split", default="train", help="split name (default train; eval-ap --clevr-root reads val)")
    s.add_argument("--seed", type=seed_value, default=0, help="batch k of a split comes from (seed, split, k) (default 0)")
    s.add_argument("--batch-size", type=int, default=32, help="scenes rendered together (default 32)")
    s.add_argument("--device", default="cpu", help="where to render: cpu, cuda, auto (default cpu, so that a split "
                   "is the same images on every machine)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.set_defaults(func=cmd_generate, parser=s)

    s = sub.add_parser("convert-clevr-masks", help="convert DeepMind's CLEVR with masks (TFRecords) into a CLEVR "
                       "root with instance masks, for FG-ARI on real CLEVR6",
                       description="Read clevr_with_masks_train.tfrecords of DeepMind's multi-object-datasets (100k "
                       "scenes at 320x240, each object's mask; no TensorFlow needed) once and write a CLEVR v1.0-style "
                       "root: images/<split>/, masks/<split>/ and scenes/CLEVR_<split>_scenes.json. The first "
                       "--train-scenes records become split train, the next --val-scenes split val (the Slot "
                       "Attention protocol: train on the first 70k, evaluate on the following ones). Objects keep "
                       "the release's attribute codes, whose meaning it does not document: the root serves object "
                       "discovery (FG-ARI), not set prediction. The file (10.5 GB) unpacks to ~320 GB, read as a "
                       "stream: ~26 ms per scene on 2 CPU cores (about 45 min for all 100k), at most ~23 GB of PNGs.")
    s.add_argument("--tfrecords", required=True, help="the release's file (GZIP, as downloaded; plain TFRecord too)")
    s.add_argument("--out", required=True, help="dataset root to create (or add a split to)")
    s.add_argument("--train-scenes", type=int, default=70000, help="records 0..N-1 form split train (default 70000)")
    s.add_argument("--val-scenes", type=int, help="records after them for split val (default: all the rest)")
    s.add_argument("--splits", default="train,val", help="which splits to write (default train,val; val alone reads "
                   "past the train records without decoding them)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.set_defaults(func=cmd_convert_clevr_masks, parser=s)

    s = sub.add_parser("collect", help="record random-policy episodes of crafter or nethack to an episode dataset",
                       description="Run a uniform random policy in vectorized env workers (a crashed worker is "
                       "restarted and its episode marked truncated) until --frames observations are stored. "
                       "Writes DIR/meta.json, DIR/episodes/*.npz (frames, actions, rewards, flags) and the "
                       "statistics of every finished episode in DIR/stats.jsonl (none before one finishes); `run.py pretrain --data DIR` trains on the frames.")
    s.add_argument("--env", required=True, choices=["crafter", "nethack"])
    s.add_argument("--frames", type=int, required=True, help="observations to store (at least: every env steps "
                   "until the step that reaches it)")
    s.add_argument("--out", required=True, help="dataset directory; an existing one of the same env and settings "
                   "takes more episodes from env seeds it does not hold yet: pass a --seed past them (env i plays "
                   "--seed + i; a --seed it holds is refused, naming the next free one)")
    s.add_argument("--workers", type=int, default=1, help="worker processes (default 1; with one env per worker, "
                   "in-process, no workers)")
    s.add_argument("--envs-per-worker", type=int, default=1, help="envs stepped in turn by each worker (default 1)")
    s.add_argument("--size", type=int, help="image side in pixels (default 64)")
    s.add_argument("--max-episode-steps", type=int, help="steps after which an episode ends truncated (default 10000, "
                   "as the agent's env.max_episode_steps; random NetHack play lasts ~2000, Crafter's ~200)")
    s.add_argument("--task", choices=["score", "challenge"], help="NetHack's task: NetHackScore (default) or "
                   "NetHackChallenge (the agent's env.task)")
    s.add_argument("--crop", type=int, help="NetHack: map cells a side of the window around the player, odd "
                   "(default 9; the agent's env.crop)")
    s.add_argument("--seed", type=seed_value, default=0, help="env seeds and actions (default 0)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.set_defaults(func=cmd_collect, parser=s)

    s = sub.add_parser("visualize", help="slot decompositions of env frames / scenes; VQ code edits; code figures",
                       description="Decompose frames with a pretrained slot encoder: per frame a PNG grid (input, "
                       "reconstruction, colored segmentation, each slot's masked reconstruction), a video of the "
                       "sequence with its slot masks, and the same images in OUT/tb for tensorboard. --edit decodes "
                       "frames with one slot's VQ code changed; --codes draws the disentanglement figure "
                       "(p(property | code) heatmaps, and the adjusted mutual information of each latent variable "
                       "with each property) on CLEVR-like scenes.")
    s.add_argument("--checkpoint", required=True, help="run directory made by `run.py pretrain`, or by `train-wm` / "
                   "`train` (their slot encoder and decoder; --env crafter or nethack)")
    _add_step_option(s, "summary.json records the step (--out names where the files go)")
    s.add_argument("--env", choices=["crafter", "nethack", "clevr"], help="where the frames come from (default: "
                   "the game the run trained on, or clevr for a run pretrained on generated or CLEVR scenes)")
    s.add_argument("--clevr-root", help="show scenes of this CLEVR v1.0 directory (for a run trained on CLEVR on disk "
                   "whose data moved, or on another copy; its split: the run's data.eval_split, else val)")
    s.add_argument("--frames", type=int, help="scenes, or frames of play (slots carried from frame to "
                   "frame, afresh where an episode ends and the next begins) (default 8)")
    s.add_argument("--policy", choices=["agent", "random"], help="who plays the game frames: agent (an agent run's "
                   "trained policy, in its env settings: the default for an agent run on its game) or random (uniform "
                   "random actions: the default for other runs)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--edit", nargs=3, metavar=("SLOT", "VAR", "VALUE"),
                   help="VQ only: set latent VAR of slot SLOT to code VALUE (or 'all' for every code) and decode; a "
                   "row for each of the first 4 frames: input, reconstruction, slot SLOT, then the decodings")
    s.add_argument("--codes", action="store_true", help="disentanglement figure of a VQ run on CLEVR-like scenes")
    s.add_argument("--images", type=int, help="scenes for --codes (default 1000)")
    s.add_argument("--seed", type=seed_value, help="seed of the play (env, actions) and of the slots' "
                   "initial noise, so a repeat on the same --device draws the same pictures (scenes are the run's "
                   "held-out ones) (default 0)")
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N (default auto)")
    s.set_defaults(func=cmd_visualize, parser=s)

    s = sub.add_parser("train-wm", help="train the slot-token world model on collected episodes",
                       description="Train the world model (VQ slot encoder + frame tokenizer + transformer "
                       "dynamics over slot, frame and action tokens) on an episode dataset from `run.py collect`. "
                       "encoder.checkpoint=RUN uses a pretrained VQ encoder (encoder.mode=frozen|joint); without "
                       "it a fresh encoder is trained jointly. The presets fit any game's dataset (its action count and status "
                       "tokens come from the data). Writes config, checkpoints, tensorboard, metrics.jsonl.")
    s.add_argument("--data", help="episode dataset directory (sets data.root)")
    _add_run_options(s, "train-wm", "wm_crafter_cpu, wm_crafter", "runs/wm-<time>")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.add_argument("overrides", nargs="*", help=_overrides_help("train.steps=100 encoder.mode=joint", "train-wm"))
    s.set_defaults(func=cmd_train_wm, parser=s)

    s = sub.add_parser("eval-wm", help="open-loop prediction table (horizons) and real-vs-imagined video",
                       description="From a context of real frames, predict open loop under the real actions: "
                       "slot-code accuracy, decoded-frame MSE, reward error and (NetHack) status-token accuracy at "
                       "each horizon (eval.horizons), beside copying the last context frame; writes "
                       "RUN/eval_wm/eval_wm.json, a video and a picture.")
    s.add_argument("--checkpoint", required=True, help="run directory made by `run.py train-wm`, or by `run.py train` "
                   "(an agent's world model: give --data)")
    _add_step_option(s)
    s.add_argument("--data", help="episode dataset (default: a train-wm run's data.root, whose held-out episodes are "
                   "used; an agent run needs it, and all its episodes are used)")
    s.add_argument("--segments", type=int, help="segments drawn (default: the run's eval.segments; 128 for an agent "
                   "run)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.add_argument("--out", help="output directory (default RUN/eval_wm; with --data DIR, RUN/eval_wm_data_<DIR's name>)")
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N (default auto)")
    s.set_defaults(func=cmd_eval_wm, parser=s)

    s = sub.add_parser("train", help="train an object-centric world-model agent on crafter or nethack",
                       description="The whole loop: vectorized env workers collect with the current policy into a "
                       "replay buffer; the VQ slot encoder + world model and the actor-critic (in imagination) train "
                       "at train.train_ratio replayed steps per env step; periodic evaluation episodes. Everything "
                       "goes to the run directory (config, checkpoints with the replay, stats.jsonl of every "
                       "training episode, tensorboard, metrics.jsonl). Presets: configs/tiny.yaml (default, ~1.5 "
                       "min on CPU), configs/crafter_cpu.yaml and configs/nethack_cpu.yaml (CPU scale), "
                       "configs/crafter_cpu_frozen.yaml (the CPU recipe that beats random, on a pretrained encoder), "
                       "configs/crafter.yaml and configs/nethack.yaml (GPU-sized, compiled with CUDA graphs).")
    _add_run_options(s, "train", "tiny, crafter_cpu, crafter_cpu_frozen, crafter, nethack_cpu, nethack",
                     "runs/agent-<env>-<time>")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.add_argument("--new-replay", action="store_true",
                   help="with --resume: continue the models, optimizers and counters from the checkpoint with an empty "
                   "replay (for a replay that was lost or damaged); updates pause until the agent has played "
                   "train.prefill steps into it, then go on at train.train_ratio")
    s.add_argument("overrides", nargs="*", help=_overrides_help("train.env_steps=5000 env.num_envs=4", "train"))
    s.set_defaults(func=cmd_train, parser=s)

    s = sub.add_parser("eval", help="evaluation episodes of a trained agent (or a random policy)",
                       description="Run N episodes (each to its end, or to the run's env.max_episode_steps, as in "
                       "training) and report Crafter's success rates and score "
                       "(crafter_score while training, `score` in RUN/eval_<policy>.json) or NetHack's score and depth; "
                       "--policy random gives the baseline in the same format. The episode records replace the last eval's in "
                       "RUN/eval_<policy>_stats.jsonl (the training run's own "
                       "evaluations are in RUN/eval_stats.jsonl). For a video of the agent playing, with its slots: "
                       "`run.py visualize --checkpoint RUN --out DIR`.")
    s.add_argument("--checkpoint", required=True, help="run directory made by `run.py train`")
    _add_step_option(s)
    s.add_argument("--episodes", type=int, default=10, help="episodes to play (default 10)")
    s.add_argument("--policy", choices=["agent", "random"], default="agent",
                   help="the run's agent, or uniform random actions in its env (default agent)")
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N (default auto)")
    s.add_argument("--seed", type=seed_value, default=10_000, help="episode i runs env seed SEED + i and the policy samples "
                   "from SEED, so a repeat gives the same episodes (default 10000, the seeds of a training run's "
                   "evaluations)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.set_defaults(func=cmd_eval, parser=s)

    s = sub.add_parser("bench", help="throughput benchmarks (prints img/s, ratios measured side by side)",
                       description="what each benchmark prints:\n"
                       "  pretrain     slot pretraining img/s per optimization row (eager fp32, channels_last, bf16,\n"
                       "               torch.compile, CUDA graphs), GMM and Slot Attention\n"
                       "  estep        the GMM E-step: expanded matmuls vs the materialized b n k d tensor\n"
                       "  generator    CLEVR-like scenes/s of the renderer\n"
                       "  metrics      seconds of clevr_ap_table on 5000 images\n"
                       "  envs         env steps/s: one core, independent processes without IPC (the machine's\n"
                       "               ceiling), the vector env at each --envs-per-worker\n"
                       "  imagination  imagined steps/s of the dynamics with vs without its KV cache\n"
                       "  agent        env steps/s of the whole training loop per optimization row and the time per\n"
                       "               part (key=value overrides apply to the agent preset)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("what", choices=["pretrain", "estep", "generator", "metrics", "envs", "imagination", "agent"],
                   help="what to measure")
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N (default auto)")
    s.add_argument("--batch-size", type=int, help="default: 64 on CPU, 512 on CUDA (bench imagination: 16 / 1024)")
    s.add_argument("--resolution", type=int, help="default: 64 on CPU, 128 on CUDA")
    s.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    s.add_argument("--task", default="setpred", choices=["setpred", "discovery"], help="bench pretrain: the task "
                   "(default setpred)")
    s.add_argument("--slots", default="gmm,slot_attention", help="bench pretrain: slot modules to time, of gmm, "
                   "slot_attention, gmm+vq, slot_attention+vq (VQ-SA codes on them) (comma-separated; default "
                   "gmm,slot_attention)")
    s.add_argument("--envs", default="crafter,nethack", help="bench envs: games to measure (comma-separated; default "
                   "crafter,nethack)")
    s.add_argument("--workers", type=int, help="bench envs: worker processes (default: all CPU cores)")
    s.add_argument("--envs-per-worker", default="1,4,16", help="bench envs: envs per worker process to measure "
                   "(comma-separated; more envs per worker amortize the per-step round-trip; default 1,4,16)")
    s.add_argument("--env-steps", type=int, help="bench envs: steps of every env in each row (default 500); bench agent: "
                   "env steps timed (default 16 updates' worth)")
    s.add_argument("--wm-config", help="bench imagination: world-model preset (default configs/wm_crafter.yaml on "
                   "CUDA, configs/wm_crafter_cpu.yaml on CPU)")
    s.add_argument("--agent-config", help="bench agent: agent preset (default crafter.yaml on CUDA, crafter_cpu.yaml "
                   "on CPU)")
    s.add_argument("--prefill", type=int, default=256, help="bench agent: random env steps before timing (default 256)")
    s.add_argument("--profile", action="store_true", help="bench pretrain/agent: also print a torch.profiler table")
    s.add_argument("--profile-rows", type=int, default=15, help="rows of the profiler table (default 15)")
    s.add_argument("--profile-row", help="bench pretrain/agent: the row to profile, right after it is measured "
                   "(default: the last row), e.g. +bf16 or +replay-on-gpu, so the profile is taken before slower rows")
    s.add_argument("--matmul-precision", choices=("highest", "high", "medium"),
                   help="bench pretrain, CUDA: fp32 matmul precision instead of training's 'highest' ('high': TF32), "
                   "to measure what the GMM E-step's full-precision matmuls cost")
    s.add_argument("--rows", help="bench pretrain/agent: only these rows (comma-separated, e.g. +bf16,+compile); "
                   "each still has every optimization of the rows above it")
    s.add_argument("overrides", nargs="*", help="bench agent: dotted key=value overrides of the agent preset, right "
                   "after `agent` (run.py bench agent encoder.checkpoint=RUN encoder.mode=frozen --profile)")
    s.add_argument("--compile", action="store_true", help="bench pretrain/agent on CPU: also time torch.compile "
                   "(inductor needs a C++ compiler and minutes on CPU; on CUDA it is always timed)")
    s.add_argument("--horizon", type=int, default=32, help="bench imagination: imagined steps per trajectory "
                   "(default 32)")
    s.set_defaults(func=cmd_bench, parser=s)

    s = sub.add_parser("compare", help="the last evaluations of several runs side by side",
                       description="A table of the runs' last logged evaluations (the eval/ scalars of their "
                       "metrics.jsonl, what training evaluated; the JSON files of eval-ap, eval-wm and eval are their "
                       "own and not read here): a row per metric, a column per run, under the runs' settings "
                       "(pretraining: task, slots with +vq, slot count, data source; world-model and agent runs: "
                       "data or env, slots, encoder mode) and the step; notes under it name unequal sample sizes and "
                       "evaluation settings that differ (held-out data, crop, object counts, context, horizons, env). "
                       "Runs of one command (pretrain, train-wm or train). Example: run.py compare runs/gmm "
                       "runs/slot_attention")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    s.set_defaults(func=cmd_compare, parser=s)

    s = sub.add_parser("config", help="print a resolved config (preset + overrides) and exit",
                       description="Print the config a training command would run with (its default preset, or "
                       "--config, plus key=value overrides) and exit; keys a run sets itself are marked. "
                       "Example: run.py config --for train --config crafter env.num_envs=8")
    s.add_argument("--for", dest="command_schema", choices=["pretrain", "train-wm", "train"],
                   help="which command's config schema (default: the one that reads --config, else pretrain)")
    s.add_argument("--config", action=_Once, help="YAML preset, a path or a name in configs/ (default: the preset "
                   "the command runs without --config: " + ", ".join(f"{c} {p}" for c, p in DEFAULT_PRESETS.items()) + ")")
    s.add_argument("--data", help="an episode dataset, as `pretrain --data DIR` (frames_discovery_cpu preset, its "
                   "frames) or `train-wm --data DIR` (with --for train-wm: its actions and status tokens fill the "
                   "dynamics' sizes) take it")
    s.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=8")
    s.set_defaults(func=cmd_config, parser=s)
    return p


# integer options that count something: 0 or less is a mistake, not "the default"
COUNTS = ("images", "batch_size", "segments", "episodes", "frames", "workers", "envs_per_worker", "size", "steps",
          "env_steps", "horizon", "resolution", "profile_rows", "max_episode_steps", "crop", "prefill")


def _check_counts(args) -> None:
    from envs.errors import UsageError

    for name in COUNTS:
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line, taking `key=value` overrides wherever they stand: argparse gives a subcommand's
    positional overrides only their first run of tokens, so overrides typed after an option come back unparsed."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # what the commands are, rather than "the following arguments are required"
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    commands = parser.commands
    if not argv[0].startswith("-") and argv[0] not in commands:
        near = difflib.get_close_matches(argv[0], list(commands), n=1)
        parser.error(f"unknown command {argv[0]!r}{f' (did you mean {near[0]}?)' if near else ''}; the commands are "
                     f"{', '.join(commands)}")
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if OVERRIDE.match(a)]
    rest = [a for a in extra if not OVERRIDE.match(a)]
    if rest or (overrides and not hasattr(args, "overrides")):
        flags = [a.lstrip("-").split("=")[0] for a in rest if a.lstrip("-").split("=")[0] in ("seed", "device",
                                                                                             "threads")]
        dashed = [a.lstrip("-") for a in rest if a.startswith("-") and OVERRIDE.match(a.lstrip("-"))]
        hint = ""
        if flags and hasattr(args, "overrides"):
            hint = (f" ({', '.join(f'--{f}' for f in flags)}: a training run takes "
                    f"{', '.join(f'train.{f}=...' for f in flags)} as an override)")
        elif dashed and hasattr(args, "overrides"):
            hint = f" (config overrides take no dashes: {' '.join(dashed)})"
        args.parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}{hint}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and OVERRIDE.match(resume):  # `--resume train.steps=400`: the flag, then an override
        args.overrides, args.resume = [resume, *args.overrides], True
    return args


def _way_back(args) -> str:
    """After Ctrl-C: the command that continues a training run, or why there is none."""
    if args.command == "collect":
        from envs.episodes import next_free_seed, read_meta, seed_range

        episodes = len(list((Path(args.out) / "episodes").glob("*.npz")))
        try:
            ranges = read_meta(args.out).get("env_seeds", [])  # [first, count]: env i of a collection plays seed + i
        except ValueError:  # no dataset written
            ranges = []
        held_seeds = ", ".join(seed_range(f, c) for f, c in ranges)
        plural = "s" if sum(c for _, c in ranges) > 1 else ""
        seed = (f"--seed {next_free_seed(ranges)} (it holds env seed{plural} {held_seeds})"
                if any(f == args.seed for f, _ in ranges)
                else f"--seed {args.seed} (no episode of it was written)")
        held = f"{episodes} episode{'' if episodes == 1 else 's'}"
        return f"; {args.out} holds {held} (unfinished ones kept as truncated); collect more with {seed}"
    run_dir = _run_dir(args)
    if not run_dir:
        return ""
    from world_model.rundir import RunDir, checkpoint_step

    if not Path(run_dir).exists():  # the run made it and left nothing in it (RunDir.release removed it)
        return f"; it stopped before writing anything to {run_dir}, so there is nothing to resume or remove"
    if not RunDir(run_dir).ckpt_path.is_file():  # a new run there refuses the logs of this one, not its config.yaml
        again = ("remove it to start again" if RunDir(run_dir).leftovers() else
                 f"the same command with --run-dir {run_dir} starts it again")
        return f"; {run_dir} has no checkpoint yet (train.ckpt_every), so there is nothing to resume: {again}"
    ckpt = RunDir(run_dir).ckpt_path
    # a resume stopped before its own first checkpoint: config.yaml is as before it (written with a checkpoint), so
    # its overrides are typed again; a --new-replay one's checkpoint still names the lost replay
    stale = ckpt.stat().st_mtime < getattr(args, "started", 0)
    typed = (getattr(args, "overrides", None) or []) if stale and getattr(args, "resume", None) else []
    again = (" --new-replay" if getattr(args, "new_replay", False) and stale else "") + "".join(
        f" {shlex.quote(o)}" for o in typed)
    from world_model import distributed

    step = checkpoint_step(ckpt)  # None where unreadable: a message of last resort names the step where it can
    where = "its last checkpoint" + ("" if step is None else f" ({'env ' * (args.command == 'train')}step {step})")
    if distributed.launched():  # the same job again: torchrun with the options it was started with
        return (f"; `torchrun ... {_script()} {args.command} --resume {run_dir}{again}` (with this job's torchrun "
                f"options) continues from {where}")
    return f"; `python {_script()} {args.command} --resume {run_dir}{again}` continues from {where}"


def _run_dir(args) -> str | None:
    """The run directory of a training command (`--run-dir`, or the one `--resume` names); None for the others."""
    if args.command not in ("pretrain", "train", "train-wm"):
        return None
    resume = getattr(args, "resume", None)
    return getattr(args, "run_dir", None) or (resume if isinstance(resume, str) else None)


def _after_data_error(args, error: Exception) -> str:
    """For data found bad mid-run (a file a batch first reached), once this call wrote a checkpoint: how it goes on."""
    from envs.errors import DataError
    from world_model.rundir import RunDir

    run_dir = _run_dir(args) if isinstance(error, DataError) else None
    ckpt = RunDir(run_dir).ckpt_path if run_dir else None
    if ckpt is None or not ckpt.is_file() or ckpt.stat().st_mtime < getattr(args, "started", float("inf")):
        return ""
    return f" (the run is kept: fix the data, then{_way_back(args)[1:]})"


def _script() -> str:
    """This file as the user can run it from the working directory: `run.py` from the project root."""
    here = Path(__file__).resolve()
    rel = os.path.relpath(here)
    return str(here) if rel.startswith("..") else rel


def _close_bars() -> None:
    """Close the progress bars a stopped command left open: their last redraw then comes before the message that
    says how to go on, not over or after it."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # the open bars (tqdm's own registry, a WeakSet)
        bar.close()


def _terminate(signum, frame):
    """SIGTERM outside a training loop's steps (which stop at the end of one: `world_model.stopping`)."""
    from world_model.stopping import Terminated

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once (a rank stuck in a collective)
    raise Terminated


def main(argv=None) -> int:
    args = parse_args(argv)  # first: --help and usage errors answer without importing torch (seconds)
    from envs.errors import UsageError
    from world_model import distributed
    from world_model.stopping import Terminated, ctrl_c, wait_out_ctrl_c

    previous = {}
    if threading.current_thread() is threading.main_thread():  # Ctrl-C: one KeyboardInterrupt per key press
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored (`cmd &` in a script)
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, ctrl_c)
    rank = distributed.rank() if distributed.launched() else 0
    # before the processes join, each node's first one reports what they all hit alike (a config, a path on that node)
    node_first = os.environ.get("LOCAL_RANK", "0") == "0"

    def say(text: str) -> None:  # under torchrun, which process says it
        print(text if rank == 0 else f"[rank {rank}] {text}", file=sys.stderr)

    try:
        _check_counts(args)
        if distributed.launched() and args.command not in ("pretrain", "train"):
            raise UsageError(f"{args.command} runs in one process; under torchrun run `pretrain` or `train` (the agent "
                             "loop, which trains its world model data-parallel)")
        args.started = time.time()  # a checkpoint older than this is not the stopped run's own
        args.func(args)
        distributed.barrier()  # under torchrun: the others wait for rank 0's final evaluation before leaving
    except (UsageError, FileNotFoundError, PermissionError) as e:  # ConfigError, DataError, RunDirError among them
        _close_bars()  # the error on a line of its own, not after a bar and under its redraw
        if node_first or distributed.active():
            say(f"error: {e}{_after_data_error(args, e)}")
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped (`run.py config | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        with contextlib.suppress(OSError):
            way_back = _way_back(args)
            if way_back:  # a training run stopped by it, like Ctrl-C
                print(f"\nstopped: its output pipe closed{way_back}", file=sys.stderr)
        return 141  # 128 + SIGPIPE, as a shell reports a process a closed pipe stopped
    except KeyboardInterrupt as e:
        _close_bars()
        if rank == 0:  # torchrun stops every process alike: one says how the run goes on
            stopped = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            print(f"\n{stopped}{_way_back(args)}", file=sys.stderr)
        wait_out_ctrl_c()  # a wrapper's copy of the press would otherwise meet Python's handler on the way out
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        _close_bars()
        if node_first or distributed.active():  # the files are written atomically: the last checkpoint is whole
            say(f"error: {e.strerror} writing {e.filename or 'the run'}; free space (or pick a writable place), then "
                f"go on{_way_back(args) or ''}")
        return 2
    except Exception as e:
        if distributed.active() and distributed.lost_peer(e):  # the cause is the other process's to report
            _close_bars()
            say(f"stopped: lost another process of this torchrun job, which failed or was stopped (its message is "
                f"above): {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return 1
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        distributed.shutdown()  # leave the torchrun process group, if this process joined one
    return 0


if __name__ == "__main__":
    sys.exit(main())
