"""One directory per run: resolved config, atomic checkpoints, JSONL metrics beside tensorboard.

Layout: `config.yaml`, `checkpoints/latest.pt` (and `checkpoints/step_N.pt` kept at evaluations with
train.keep_checkpoints), `metrics.jsonl`, `tb/` (tensorboard events), `evaluated.json` (the step and settings of the
last evaluation logged), `train.pid` (the process training in it); an
agent run adds `stats.jsonl` and `eval_stats.jsonl` (its episodes) and `replay/` (its replay with each checkpoint).
Checkpoints are written to a temporary file and renamed over the old one, so killing the process at
any moment leaves either the previous or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from envs.atomic import FOLDER_KINDS, atomic_write, check_folder, folder_kind
from envs.errors import UsageError
from envs.jsonl import read_records, write_records

from . import distributed


class RunDirError(UsageError):
    """A run directory that cannot be used as asked (exists without --resume, or missing on resume)."""


_IMPORTED = time.time()


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc, so imports count; elsewhere since this module was
    imported): how long a run took to reach a point, e.g. its first training step."""
    try:  # both on the uptime clock (/proc/stat's btime is whole seconds, and drifts from it)
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def peek_checkpoint(path: Path) -> Optional[dict]:
    """A checkpoint read through a memory map, so its tensors are not loaded; None when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return state if isinstance(state, dict) else None
    except Exception:  # whatever keeps it from being read (also in a message of last resort, as Ctrl-C's): None
        return None


def checkpoint_step(path: Path) -> Optional[int]:
    """The step a checkpoint is at (an agent's: its env step), without loading its tensors; None when it cannot be
    read."""
    state = peek_checkpoint(path)
    return None if state is None else state_step(state)


def state_step(state: dict) -> Optional[int]:
    """The step a loaded checkpoint is at: pretraining's and train-wm's `step`, an agent's env step."""
    return state.get("step", state.get("counters", {}).get("env_steps"))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location=cuda moved it
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def rng_states() -> list[dict]:
    """Every rank's RNG state, in rank order (a collective under torchrun; one entry in a single process)."""
    return distributed.gather_objects(rng_state())


def restore_rng(states, seed: int, step: int) -> None:
    """This rank's RNG state from a checkpoint's per-rank list (or the single state older checkpoints hold).
    When the world size changed, every rank gets a fresh seed from (seed, rank, step) instead."""
    mine = this_ranks([states] if isinstance(states, dict) else states)
    if mine is not None:
        set_rng_state(mine)
    else:
        seed_everything(rank_seed(seed, step))


def this_ranks(states: Optional[list], default=None):
    """This rank's entry of a checkpoint's per-rank list when the world size is the one that wrote it; `default`
    otherwise, or for an older checkpoint without the list."""
    return states[distributed.rank()] if states and len(states) == distributed.world_size() else default


def mixed_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (e.g. run seed, stream, index): nearby inputs, unrelated streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def rank_seed(seed: int, salt: int = 0) -> int:
    """`seed` itself in a single process (so single-process runs do not change), a per-rank seed under torchrun."""
    if distributed.world_size() == 1 and salt == 0:
        return seed
    return mixed_seed(seed, distributed.rank(), salt)


@contextlib.contextmanager
def fixed_rng(seed: int, device: torch.device):
    """Torch's CPU (and `device`'s CUDA) generator seeded with `seed` inside the block, the caller's state restored
    after it: evaluations and pictures draw the same noise every time and leave a training run's stream as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_suffix(step: Optional[int]) -> str:
    """What the files an evaluation of a kept checkpoint writes add to their names: `_step<N>` (none for the latest),
    so they go beside the latest one's."""
    return "" if step is None else f"_step{step}"


class RunDir:
    def __init__(self, path: str | Path, step: Optional[int] = None):
        """`step`: read the checkpoint kept at that evaluation (train.keep_checkpoints) instead of the latest."""
        self.path = Path(path)
        self.step = step
        self.ckpt_path = self.kept_path(step) if step is not None else self.path / "checkpoints" / "latest.pt"
        self.config_path = self.path / "config.yaml"
        self.created = False  # `open` made the directory: `release` removes it again if the run left it empty
        self._config: Any = None  # a resumed run's config, written with its first checkpoint (`stage_config`)

    LOGS = ("metrics.jsonl", "tb", "stats.jsonl", "replay")  # what a run writes before its first checkpoint
    DATA_MARKS = ("CLEVR_v1.0", "images", "scenes", ".git")  # a CLEVR root (or its CLEVR_v1.0), a repository

    @classmethod
    def open(cls, path: str | Path, resume: bool) -> "RunDir":
        """New run: the directory must be new, empty, or hold a run's files, and no checkpoint and no logs of an
        earlier run. Resume: it must hold a checkpoint. Never a file or an episode dataset, and no other live process
        may be training in it (`train.pid`)."""
        run = cls(path)
        check_run_folder(run.path)
        if not resume and distributed.is_main():  # rank 0: the others could see its first files being written
            run._check_foreign()
        if distributed.is_main():  # rank 0 only: under torchrun, the others could see its fresh claim
            run.refuse_if_live()  # first: a live run's fresh logs are not leftovers to remove
        for name in ("metrics.jsonl", "stats.jsonl", "eval_stats.jsonl"):  # the logs a run appends to
            log = run.path / name
            if resume and log.exists() and not log.is_file():
                raise RunDirError(f"{log} is a {'folder' if log.is_dir() else 'special file'}, not the log the run "
                                  "appends to: move it away and resume")
        if resume and not run.ckpt_path.is_file():
            stale = run.leftovers()
            fix = (f"it holds {', '.join(stale)} of a run that stopped before its first checkpoint: remove "
                   f"{run.path} and start a new run" if stale else "start a new run without --resume")
            raise RunDirError(f"cannot resume: no checkpoint at {run.ckpt_path}; {fix}")
        if not resume:
            run.refuse_checkpoint()
        if distributed.is_main() and not resume:  # rank 0 only: under torchrun, the others could see its fresh logs
            stale = run.leftovers()
            if stale:
                raise RunDirError(f"{run.path} holds {', '.join(stale)} of a run that stopped before its first "
                                  "checkpoint; remove them or choose another --run-dir")
        run.created = not run.path.exists()
        run.path.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            run._claim()
            if resume:
                run._remove_torn_writes()
        return run

    def refuse_checkpoint(self) -> None:
        """A new run may not start where an earlier run's checkpoint is: the error names the command resuming it."""
        if not self.ckpt_path.is_file():
            return
        from .config import schema_command  # world_model.config imports half the package

        made_by = schema_command(self.config_path)  # whose run it is: its own command resumes it
        whose, resume_it = ((f" of a `run.py {made_by}` run", f"`run.py {made_by} --resume {self.path}`")
                            if made_by else ("", "--resume"))
        raise RunDirError(f"run directory {self.path} already holds a checkpoint{whose}; {resume_it} continues it, "
                          "or choose another --run-dir")

    def _remove_torn_writes(self) -> None:
        """The temporary files of writes a kill stopped midway (a checkpoint, a replay chunk, an evaluation's
        episodes): never renamed into place, so nothing reads them. Called once the claim is this process's."""
        for tmp in [*self.path.glob("*.tmp"), *self.path.glob("*/*.tmp")]:
            tmp.unlink(missing_ok=True)

    def _check_foreign(self) -> None:
        """A new run in a folder that holds no run: refused where the folder holds data (a CLEVR root) or a
        repository, whose files the run's would mix with; a note where it holds other files (a log the shell
        redirects there, a scheduler's output), which the run's files go beside."""
        if not self.path.is_dir() or self._is_run():
            return
        data = [name for name in self.DATA_MARKS if (self.path / name).exists()]
        if data:
            raise RunDirError(f"{self.path} holds {', '.join(data)}: data or a repository, not a run directory; "
                              "choose a new or empty --run-dir")
        others = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))
        if others:
            print(f"note: {self.path} already holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}; "
                  "the run's files go beside them", file=sys.stderr)

    def _is_run(self) -> bool:
        """Whether the directory holds anything a run writes (config, checkpoint, claim, logs)."""
        return any((self.path / name).exists() for name in ("config.yaml", "checkpoints", "train.pid", *self.LOGS))

    def leftovers(self) -> list[str]:
        """The logs a run writes before its first checkpoint, where there is none."""
        return [name for name in self.LOGS if (self.path / name).exists()]

    def _claim(self) -> None:
        """Record this process (`host pid` in train.pid) as the one training here, unless another live process on
        this host already is. A claim from another host (a shared run directory) is taken over: its liveness cannot
        be checked from here, and a run that finished removed its claim (`release`)."""
        self.refuse_if_live()
        atomic_write(self.path / "train.pid", lambda f: f.write(f"{socket.gethostname()} {os.getpid()}".encode()))
        _CLAIMED.append(self)

    def refuse_if_live(self) -> None:
        """A RunDirError if another live process on this host holds the directory's claim (train.pid)."""
        try:
            host, pid = (self.path / "train.pid").read_text().split()
            other = int(pid)
        except (OSError, ValueError):
            return
        if host == socket.gethostname() and other != os.getpid() and _alive(other):
            raise RunDirError(f"process {other} is training in {self.path} (train.pid); wait for it, stop it, or "
                              "choose another --run-dir")

    def release(self) -> None:
        """At the end of training, or when it failed or was interrupted: remove this process's claim on the
        directory, and the directory itself when this run created it and left nothing in it."""
        pid_path = self.path / "train.pid"
        with contextlib.suppress(OSError, ValueError):
            if pid_path.read_text().split() == [socket.gethostname(), str(os.getpid())]:
                pid_path.unlink()
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty
        if self in _CLAIMED:
            _CLAIMED.remove(self)

    def kept_path(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step_{step}.pt"

    def kept_steps(self) -> list[int]:
        """The steps whose checkpoints are kept (train.keep_checkpoints), in order."""
        names = (p.name[5:-3] for p in (self.path / "checkpoints").glob("step_*.pt"))
        return sorted(int(n) for n in names if n.isdigit())

    def stage_config(self, cfg: Any, resume: bool) -> None:
        """The run's config.yaml: a new run's written now; a resumed run's (its overrides applied) with its first
        checkpoint, or by `write_config` when it ends without one (a finished run re-evaluated), so that a resume
        that fails before (its data damaged, say) leaves config.yaml describing the checkpoint."""
        self._config = cfg
        if not resume:
            self.write_config()

    def write_config(self) -> None:
        """Write the staged config.yaml, if `stage_config` left one to write (under torchrun, rank 0 only)."""
        from .config import save_config

        if self._config is not None:
            save_config(self._config, self.config_path)
            self._config = None

    def save_checkpoint(self, state: dict, keep_step: Optional[int] = None) -> None:
        """Atomic write, after the config it was trained with (`stage_config`); under torchrun only rank 0 writes (the
        others' state is the same after each step). `keep_step`: also keep this checkpoint as
        `checkpoints/step_<keep_step>.pt`, a hard link to the file (no copy: the next checkpoint replaces latest.pt by
        a new file), or a copy where links are not possible."""
        if not distributed.is_main():
            return
        self.write_config()
        atomic_torch_save(state, self.ckpt_path)
        if keep_step is not None:
            kept, tmp = self.kept_path(keep_step), self.kept_path(keep_step).with_suffix(".pt.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(self.ckpt_path, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(self.ckpt_path, tmp)
            os.replace(tmp, kept)

    def load_checkpoint(self, map_location: Any = "cpu", keys: Sequence[str] = ()) -> dict:
        """The checkpoint, with one-line errors when it is missing, damaged, or lacks any of `keys` (what the
        command reads: another command's checkpoint copied in, say)."""
        if not self.ckpt_path.is_file():
            if self.step is not None:
                latest = RunDir(self.path)  # the step the run is at needs no kept copy
                at = checkpoint_step(latest.ckpt_path) if latest.ckpt_path.is_file() else -1
                if at is None:  # not readable through a memory map: loaded whole (or said damaged)
                    state = latest.load_checkpoint(map_location, keys)
                    if state_step(state) == self.step:
                        return state
                elif at == self.step:
                    return latest.load_checkpoint(map_location, keys)
                kept = self.kept_steps()
                raise RunDirError(f"{self.path} keeps no checkpoint of step {self.step} (" + (
                    f"it keeps step{'s' * (len(kept) > 1)} {', '.join(map(str, kept))}" if kept else
                    "it keeps none: train.keep_checkpoints=true keeps each evaluation's") + ")")
            if self.config_path.is_file():  # a run that has not reached its first checkpoint, or stopped before it
                raise RunDirError(f"{self.path} has no checkpoint yet: a run writes its first at train.ckpt_every "
                                  "steps or its first evaluation")
            raise RunDirError(f"no checkpoint at {self.ckpt_path}: is {self.path} a run directory?")
        try:
            state = torch.load(self.ckpt_path, map_location=map_location, weights_only=False)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            why = str(e).splitlines()[0].split(". ")[0] if str(e) else "empty"  # torch's first sentence
            raise RunDirError(f"{self.ckpt_path} is damaged and cannot be read ({type(e).__name__}: {why})"
                              f"{self._past_damage()}") from None
        missing = [k for k in keys if not isinstance(state, dict) or k not in state]
        if missing:
            raise RunDirError(f"{self.ckpt_path} lacks {', '.join(missing)}: it is not a checkpoint of the command "
                              "that made this run")
        return state

    def _past_damage(self) -> str:
        """The way on that a damaged checkpoint's error gives: the other checkpoints the run keeps (a kept one is a hard
        link to what latest.pt was at its step: the same file, and as damaged, while the run has not gone on)."""
        def same(a: Path, b: Path) -> bool:
            with contextlib.suppress(OSError):
                return os.path.samefile(a, b)
            return False

        others = [s for s in self.kept_steps() if not same(self.kept_path(s), self.ckpt_path)]
        listed = f" (kept: {', '.join(map(str, others))})"
        if self.step is not None:
            latest = self.path / "checkpoints" / "latest.pt"
            ways = [] if not latest.is_file() or same(latest, self.ckpt_path) else ["the latest checkpoint (no --step)"]
            ways += [f"another kept one{listed}"] if others else []
            return ": read " + " or ".join(ways) if ways else ": the run keeps no other checkpoint"
        if not others:
            return ": the run cannot go on from it; train again in a new --run-dir"
        agent = (self.path / "replay").is_dir()  # the replay an agent's kept checkpoint names is gone since
        return (f": copy checkpoints/step_{others[-1]}.pt over it to resume from that step"
                + (" (with --new-replay)" if agent else "") + f", or read a kept checkpoint with --step N{listed}")

    def restore(self, module: torch.nn.Module, state: dict, key: str) -> None:
        """`module.load_state_dict(state[key])`, with a one-line error when the checkpoint does not fit the model
        the config builds (an override given on resume that changes the architecture)."""
        try:
            module.load_state_dict(state[key])
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise RunDirError(f"{self.ckpt_path}: its '{key}' weights do not fit the model this config builds "
                              f"({lines[1] if len(lines) > 1 else lines[0]}); did an override change the architecture?"
                              ) from None


    def restore_optimizer(self, load: Callable[[dict], None], state: dict, key: str) -> None:
        """`load(state[key])` (an optimizer's `load_state_dict`, or the actor-critic's `load_optimizer_state`), with a
        one-line error when the checkpoint's optimizer held other parameters than the model trains now (e.g. a run
        with `model.implicit_grad=true` from before its initial-slot parameters were frozen)."""
        try:
            load(state[key])
        except ValueError as e:
            raise RunDirError(f"{self.ckpt_path}: its '{key}' state does not fit the parameters this model trains "
                              f"({str(e).splitlines()[0]}); was the run started by an older version, or did an "
                              "override change which parameters train?") from None


_CLAIMED: list[RunDir] = []  # run directories this process claimed and has not released


def check_run_folder(path: str | Path) -> None:
    """A --run-dir must be a folder (or one that can be made) and not an episode dataset (a new run in a CLEVR root
    or other data is refused by `RunDir._check_foreign`)."""
    check_folder(path, "--run-dir", RunDirError)
    if folder_kind(Path(path)) == "dataset":
        raise RunDirError(f"{path} is {FOLDER_KINDS['dataset']}; choose another --run-dir")


def check_out_dir(out: str | Path) -> Path:
    """An --out directory for pictures and reports: refused when it is a run directory, an episode dataset or a
    CLEVR root, whose files (tensorboard logs, episodes, images) it would mix with its own."""
    out = check_folder(out, "--out", RunDirError)
    kind = folder_kind(out)
    if kind:
        raise RunDirError(f"--out {out} is {FOLDER_KINDS[kind]}; write to a directory of its own"
                          + (f" (e.g. {out / 'viz'})" if kind == "run" else ""))
    return out


def release_claims() -> None:
    """Release every run directory this process still claims (a training command that failed or was stopped)."""
    for run in list(_CLAIMED):
        run.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def has_step(row: dict) -> bool:
    """A row of metrics.jsonl: it has an integer "step"."""
    return isinstance(row.get("step"), int)


def config_text(cfg: Any) -> str:
    """A config as tensorboard text: its YAML as a Markdown code block."""
    from omegaconf import OmegaConf

    return "\n".join("    " + line for line in OmegaConf.to_yaml(OmegaConf.structured(cfg)).splitlines())


class MetricLogger:
    """Scalars to `metrics.jsonl` and tensorboard; images to tensorboard. Only finite scalars are logged.
    Under torchrun only rank 0 logs unless `enabled` says otherwise.

    A run resumed from its checkpoint at `start_step` drops what was logged after that step (by the run that went on
    past its last checkpoint and stopped), in both logs; what was logged at the step itself stays. Damaged lines of
    `metrics.jsonl` are dropped then, with a warning: a log must not block a resume. The tensorboard file is made at
    the first value logged, so a run stopped before it leaves no log that would block its directory's reuse.
    `config`: the run's config, which tensorboard shows as text (tag `config`) at `start_step`, so that runs are told
    apart there by more than their folders' names (a resume's, with its overrides, at the step it resumed from)."""

    def __init__(self, run: RunDir, start_step: int = 0, enabled: Optional[bool] = None, config: Any = None):
        self.enabled = enabled = distributed.is_main() if enabled is None else enabled
        self._config = None if config is None else (config_text(config), start_step)
        self.jsonl_path = run.path / "metrics.jsonl"
        self.evaluated_path = run.path / "evaluated.json"  # the step and settings of the last evaluation logged
        self.writer, self._tb = None, (run.path / "tb", start_step + 1 if start_step > 0 else None)  # dir, purge step
        if enabled and start_step > 0:
            if self.jsonl_path.is_file():
                write_records(self.jsonl_path, [row for row in read_records(self.jsonl_path, valid=has_step)
                                                if row["step"] <= start_step])
            self._tensorboard()  # now: its purge drops what the stopped run logged after the checkpoint

    def _tensorboard(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self._tb[0]), purge_step=self._tb[1])
            if self._config is not None:
                self.writer.add_text("config", *self._config)
        return self.writer

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> Optional[dict]:
        """Log the finite `values` at `step` (keys prefixed); the metrics.jsonl row written (None: not logging)."""
        if not self.enabled:
            return None
        row = {"step": step, "time": time.time()}
        for k, v in values.items():
            v = int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else float(v)  # counts stay
            if math.isfinite(v):
                row[prefix + k] = v
                self._tensorboard().add_scalar(prefix + k, v, step)
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def evaluation(self, step: int, result: dict[str, float], settings: dict) -> None:
        """Log an evaluation's scores under eval/, then record which row holds them (its step and time) and the
        settings it ran with, which a finished run resumed compares (`final_evaluation`)."""
        row = self.scalars(step, result, prefix="eval/")
        if row is not None:
            text = json.dumps({"step": step, "time": row["time"], "settings": settings})
            atomic_write(self.evaluated_path, lambda f: f.write(text.encode()))

    def final_evaluation(self, step: int, settings: dict, checkpointed: Optional[dict]) -> dict:
        """A finished run resumed: its final evaluation, the row logged at `step`, if it ran with `settings`; else {}
        (it runs again). Which row and settings: as recorded beside it, or, for a run from before that record, the
        last row at `step` and its checkpoint's settings (`checkpointed`; None: no checkpoint was read)."""
        now = json.loads(json.dumps(settings))  # tuples as lists, as they read back
        if not self.evaluated_path.exists():
            ran = None if checkpointed is None else json.loads(json.dumps(checkpointed))
            return self.logged(step, "eval/") if ran == now else {}
        try:
            record = json.loads(self.evaluated_path.read_text())
        except (OSError, ValueError):  # damaged: which row ran with what is unknown
            return {}
        if not isinstance(record, dict) or record.get("step") != step or record.get("settings") != now:
            return {}
        return self.logged(step, "eval/", record.get("time"))  # a later row (its record lost) may follow it

    def logged(self, step: int, prefix: str, written: Optional[float] = None) -> dict:
        """What the last row logged at `step` under `prefix` holds (the prefix stripped), or the one `written` then
        (its `time`): a finished run that resumes reads its final evaluation back instead of running (and logging) it
        twice; the last, where it ran again with other settings."""
        if not self.enabled or not self.jsonl_path.is_file():
            return {}
        rows = [row for row in read_records(self.jsonl_path) if row.get("step") == step
                and any(k.startswith(prefix) for k in row) and written in (None, row.get("time"))]
        return {k[len(prefix):]: v for k, v in rows[-1].items() if k.startswith(prefix)} if rows else {}

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """image `3 h w` in [0, 1] (NaN, from weights that diverged, drawn black)."""
        if self.enabled:
            self._tensorboard().add_image(tag, image.float().nan_to_num(0.0).clamp(0, 1).cpu(), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def shown(bar, text: str, at: str = ""):
    """`text` before a progress bar's figures while a long phase runs (an evaluation, a burst of owed updates) that
    would otherwise leave the bar looking stuck or done (first: a terminal too narrow for the figures cuts them, not
    it); then what the bar showed before. Without the bar (--no-progress: a log file), "`at`: `text`" is printed
    instead where `at` says when (`step 20`), so minutes of evaluation do not pass in silence."""
    if bar.disable:
        if at:
            print(f"{at}: {text}", flush=True)
        yield
        return
    before = bar.postfix or ""
    bar.set_postfix_str(f"{text}, {before}" if before else text, refresh=True)
    try:
        yield
    finally:
        bar.set_postfix_str(before, refresh=True)


def evaluation_due(at: int, every: int, last: int, stride: int = 1) -> bool:
    """Whether a run evaluates on reaching `at` steps, having come `stride` steps at a time (a vector env's envs): when
    it passed a multiple of `every` (0: never) and at its `last` step."""
    return at >= last or at > 0 and bool(every) and at // every > (at - stride) // every


def stopped_evaluation(logger: MetricLogger, at: int, every: int, last: int, stride: int = 1) -> bool:
    """On resume from step `at`: whether its checkpoint was written just before an evaluation that did not finish
    (Ctrl-C or a crash during it: nothing logged at its step), so the run plays it first. The last step's is left to
    the end of the training loop, which sees to a finished run's."""
    return 0 < at < last and evaluation_due(at, every, last, stride) and not logger.logged(at, "eval/")


def rollback_appended(path: Path, size: int) -> None:
    """Cut a file that workers append lines to back to its `size` bytes at a checkpoint (whole lines only), so a
    resumed run does not count what the stopped run appended after that checkpoint."""
    if not path.is_file() or path.stat().st_size <= size:
        return
    with open(path, "r+b") as f:
        f.seek(0)
        keep = f.read(size)
        f.truncate(keep.rfind(b"\n") + 1)


def resumed_length(step: int, total: int, key: str, state: dict) -> int:
    """The length a resumed run goes on with and records, said on stderr: where it goes on from, or that it already
    reached its length (it would only evaluate again): an override shorter than the run has gone stops it where it
    is (at its own length, when it had finished), rather than writing a length the run has passed into config.yaml."""
    if step < total:
        if distributed.is_main():
            print(f"resuming at step {step} of {key}={total}", file=sys.stderr)
        return total
    if distributed.is_main():
        print(f"note: this run is already at step {step} of {key}={total}: it only makes its final evaluation, if that "
              f"did not finish or ran with other settings; pass {key}=N with N > {step} to train further",
              file=sys.stderr)
    head, _, name = key.partition(".")
    return max(total, min(step, state.get("config", {}).get(head, {}).get(name, total)))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    return read_records(path) if path.is_file() else []


def start_run(run_dir: str | Path, resume: bool, device: str, threads: int, seed: int) -> tuple["RunDir", torch.device]:
    """What every training command does first: join the process group under torchrun, open the run directory,
    pick the device (each rank's own GPU), set CPU threads, seed (per rank)."""
    dev = resolve_device(device, "train.device")  # before the run directory is made or claimed
    local = distributed.setup(device)
    made = distributed.check_shared_folder(Path(run_dir))  # before any process reads a checkpoint there
    run = RunDir.open(run_dir, resume)
    run.created = run.created or made  # the check made it: a run that leaves it empty still removes it
    if dev.type == "cuda" and local is not None:
        dev = torch.device("cuda", local)
    set_precision(dev)
    if threads > 0:
        torch.set_num_threads(threads)
    seed_everything(rank_seed(seed))
    return run, dev


@contextlib.contextmanager
def claimed_run(run_dir: str | Path, resume: bool, device: str, threads: int, seed: int
                ) -> Iterator[tuple["RunDir", torch.device, contextlib.ExitStack]]:
    """`start_run` for the length of a training loop: yields the run, its device and an ExitStack for what the loop
    opens (logs, bars, envs), which closes them and then releases the run's claim, on an error too."""
    run, dev = start_run(run_dir, resume, device, threads, seed)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(run.release)
        yield run, dev, cleanup


def set_precision(device: torch.device) -> None:
    """On CUDA, as every training command and benchmark runs: convolutions in TF32 (cuDNN), fp32 matmuls in full
    fp32. The GMM E-step's log-likelihood is a matmul whose terms (x mu / s^2, x^2 / 2s^2, mu^2 / 2s^2) cancel, and
    TF32's 10-bit mantissa leaves logit errors of 2 nats at sigma = 0.1 and 31 at 0.03 (.ci/tf32-estep.py); under
    bf16 autocast (the default) the other matmuls run in bf16 anyway. cudnn.benchmark stays off: its autotuning
    made a first step take minutes at the pretraining architecture. Inductor's advice to enable TF32 matmuls, which
    this choice contradicts, and its notice about online softmax (nothing a user can act on) are silenced."""
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication",
                            category=UserWarning)
    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled on the fly", category=UserWarning)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> the device, with one-line errors (naming `option`, the flag or config key
    the user set) for any other name and for CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"{option}={name} is not a device this project runs on: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option}={name} but CUDA is not available; use {option}=cpu or auto")
    return device
