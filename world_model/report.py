"""`run.py compare`: the last evaluations of several runs side by side (GMM vs Slot Attention, VQ or not), a row
per metric and a column per run, as the seed's tables read."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from envs.errors import UsageError

from .config import load_run_config, schema_command, slot_module
from .rundir import read_jsonl


def last_evaluation(run_dir: str | Path) -> tuple[str, int, dict]:
    """A run's command, the step of its last evaluation and that evaluation's scores (the last `eval/` row of
    metrics.jsonl, the prefix dropped); ({} and step 0 while it has none)."""
    command = schema_command(Path(run_dir) / "config.yaml")
    if command is None:
        load_run_config("pretrain", run_dir, made_by="`run.py pretrain`, `train-wm` or `train`")  # what it is instead
        raise UsageError(f"{run_dir}: config.yaml is not a run's config")
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    if not rows:
        return command, 0, {}
    return command, rows[-1]["step"], {k[5:]: v for k, v in rows[-1].items() if k.startswith("eval/")}


def _describe(command: str, cfg) -> dict:
    """The settings a comparison names each run (of `command`, config `cfg`) by."""
    if command == "pretrain":
        return {"task": cfg.task, "slots": slot_module(cfg.model),
                "num_slots": cfg.model.num_slots, "data": cfg.data.source}
    where = {"data": Path(cfg.data.root).name} if command == "train-wm" else {"env": cfg.env.name}
    return {**where, "slots": cfg.encoder.model.slots, "encoder": cfg.encoder.mode}


# the config keys `_describe` already shows, by command
DESCRIBED = {"pretrain": ("task", "model.slots", "model.vq.enabled", "model.num_slots", "data.source"),
             "train-wm": ("data.root", "encoder.model.slots", "encoder.mode"),
             "train": ("env.name", "encoder.model.slots", "encoder.mode")}
DIFFERING_ROWS = 12  # at most this many rows of other settings that differ; a note counts the rest
# pretraining keys a task never reads (set prediction has no decoder, discovery no set head): no row when every run
# is of such a task
UNUSED_BY_TASK = {"setpred": {"model.decoder_channels", "model.decoder_init"}, "discovery": {"model.head_hidden"}}


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys: {"train.steps": 100, ...}."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differing(command: str, configs: list, skip) -> list[tuple[str, list[str]]]:
    """A row per config key whose value differs between the runs (`skip`: keys shown elsewhere), in config order:
    what else tells the runs apart."""
    flat = [_flat(asdict(cfg)) for cfg in configs]
    unused = set.intersection(*(UNUSED_BY_TASK.get(getattr(cfg, "task", None), set()) for cfg in configs))
    shown = set(skip) | unused | set(DESCRIBED[command])
    keys = dict.fromkeys(k for f in flat for k in f if k not in shown)
    rows = [(k, [_setting(f.get(k, "-")) for f in flat]) for k in keys]
    return [(k, cells) for k, cells in rows if len(set(cells)) > 1]


def _evaluated_on(command: str, cfg) -> dict:
    """The settings that decide what a run's evaluations measure (the held-out data and how it is scored), by their
    config keys: runs that differ in one are not measured alike."""
    if command == "pretrain":
        d = cfg.data
        if d.source == "frames":  # the last episodes of a dataset, whole frames
            return {"data.source": d.source, "data.root": d.root, "data.eval_fraction": d.eval_fraction,
                    "data.resolution": d.resolution}
        where = {"data.root": d.root, "data.eval_split": d.eval_split} if d.source == "clevr" else {}
        return {"data.source": d.source, **where, "data.resolution": d.resolution, "data.crop": d.crop,
                "data.min_objects": d.min_objects, "data.max_objects": d.max_objects}
    if command == "train-wm":
        return {"data.root": cfg.data.root, "data.eval_fraction": cfg.data.eval_fraction,
                "eval.context": cfg.eval.context, "eval.horizons": cfg.eval.horizons}
    return {"env.name": cfg.env.name, "env.size": cfg.env.size, "env.max_episode_steps": cfg.env.max_episode_steps}


def _compared(key: str, value) -> str:
    """A setting as runs are compared by it: a data root as the folder it names (`data/x`, `./data/x/` and its
    absolute path alike; config.yaml records absolute ones), not as written."""
    if key == "data.root" and value:
        return str(Path(value).expanduser().resolve())
    return _setting(value)


def _setting(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def comparison_table(runs: list[str]) -> str:
    """The runs' settings, steps and last evaluations: a row per key (those of every run's evaluation: the AP table
    first, then in the order the runs logged them, the image count last), a column per run named by its folder (by
    the path given where two folders share a name), and notes under it where the runs' numbers are means over
    samples of unequal size (images, segments, episodes), come from other evaluation settings (`_evaluated_on`) or
    are not there yet (a run that has not evaluated: a column of '-'; all of them: an error)."""
    if len(runs) < 1:
        raise UsageError("compare needs at least one run directory")
    found = [(run, *last_evaluation(run)) for run in runs]
    commands = sorted({command for _, command, _, _ in found})
    if len(commands) > 1:
        raise UsageError(f"compare takes runs of one command; these are runs of {' and '.join(commands)}")
    missing = [run for run, _, _, scores in found if not scores]
    if len(missing) == len(found):
        raise UsageError(f"{', '.join(missing)}: no evaluation logged yet (metrics.jsonl holds no eval/ row)")
    keys = list(dict.fromkeys(k for _, _, _, scores in found for k in scores))
    keys.sort(key=lambda k: 0 if k.startswith("AP_") else 2 if k == "images" else 1)  # AP table first, counts last
    names = [Path(run).name for run in runs]
    header = [("run", names if len(set(names)) == len(names) else [str(run) for run in runs])]  # a/run, b/run
    configs = [load_run_config(command, run) for run, command, _, _ in found]
    described = [_describe(command, cfg) for (_, command, _, _), cfg in zip(found, configs)]
    header += [(name, [str(d.get(name)) for d in described]) for name in described[0]]
    settings = [_evaluated_on(command, cfg) for (_, command, _, _), cfg in zip(found, configs)]
    differing = _differing(commands[0], configs, settings[0])
    header += differing[:DIFFERING_ROWS] + [("step", [str(step) if scores else "-" for _, _, step, scores in found])]
    body = [(k, [_number(scores.get(k)) for _, _, _, scores in found]) for k in keys]
    width = max(len(name) for name, _ in header + body)
    cols = [max(len(cells[i]) for _, cells in header + body) for i in range(len(runs))]
    def line(name: str, cells: list[str]) -> str:
        return f"{name:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, cols))

    rule = "-" * (width + sum(w + 2 for w in cols))
    sizes = {k: {scores.get(k) for _, _, _, scores in found if scores} for k in SAMPLE_SIZES if k in keys}  # of the
    # runs that evaluated (the others' column is "-", with a note of its own)
    unequal = [f"{k} ({', '.join(cells)})" for k, cells in body if k in sizes and len(sizes[k]) > 1]
    notes = [f"note: evaluated on unequal samples: {'; '.join(unequal)}"] if unequal else []
    if missing:  # a run still on its way to its first evaluation: a column of '-'
        notes.append(f"note: no evaluation logged yet: {', '.join(missing)}")
    if len(differing) > DIFFERING_ROWS:
        notes.append(f"note: {len(differing) - DIFFERING_ROWS} more settings differ: "
                     + ", ".join(k for k, _ in differing[DIFFERING_ROWS:]))
    differ = [f"{k} ({', '.join(_setting(s.get(k)) for s in settings)})" for k in settings[0]
              if len({_compared(k, s.get(k)) for s in settings}) > 1]
    notes += [f"note: evaluated under other settings: {'; '.join(differ)}"] if differ else []
    return "\n".join([*(line(*row) for row in header), rule, *(line(*row) for row in body), *notes])


SAMPLE_SIZES = ("images", "segments", "episodes")  # what an evaluation's numbers are means over


def _number(value) -> str:
    """A score as the table shows it: 4 significant digits, '-' where a run has none."""
    return "-" if value is None else f"{value:.4g}"
