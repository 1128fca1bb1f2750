"""Run directories: atomic writes, and logs that a resumed run continues without duplicates or holes."""
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from world_model.rundir import (MetricLogger, RunDir, atomic_torch_save, atomic_write, evaluation_due, resumed_length, read_jsonl,
                                set_precision)


def _tensorboard_steps(path, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _next_second() -> None:
    """Wait for the next whole second. Tensorboard reads a folder's event files in name order: the creation second,
    then a writer counter of the process, compared as text (so ...9 sorts after ...10). Two files of one second
    from one process, which only a test making many writers meets, could read in the wrong order."""
    import time

    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def test_resumed_logger_keeps_the_checkpoint_step_and_drops_what_came_after(tmp_path):
    """The checkpoint is at step 4; the first run logged up to step 6 and was killed while writing step 7's row. The
    resumed run logs from step 5: both logs then hold 1..4 once, then its own steps (tensorboard used to lose step 4
    as well)."""
    run = RunDir(tmp_path)
    first = MetricLogger(run, enabled=True)
    for step in range(1, 7):
        first.scalars(step, {"loss": float(step)}, prefix="train/")
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "train/lo')  # the first run was killed while writing a row
    _next_second()
    resumed = MetricLogger(run, start_step=4, enabled=True)
    for step in (5, 6):
        resumed.scalars(step, {"loss": 10.0 + step}, prefix="train/")
    resumed.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 15), (6, 16)]
    assert _tensorboard_steps(tmp_path / "tb", "train/loss") == [1, 2, 3, 4, 5, 6]
    again = MetricLogger(run, start_step=6, enabled=True)  # a resume with nothing left to do loses nothing
    again.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == rows
    assert _tensorboard_steps(tmp_path / "tb", "train/loss") == [1, 2, 3, 4, 5, 6]


def test_counts_are_logged_as_integers_and_read_back(tmp_path):
    """Episode and update counts stay integers in metrics.jsonl; what a step logged under a prefix reads back."""
    import numpy as np

    logger = MetricLogger(RunDir(tmp_path), enabled=True)
    logger.scalars(3, {"episodes": np.int64(2), "updates": 5, "score": 1.5, "done": True, "nan": float("nan")},
                   prefix="eval/")
    logger.close()
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert row["eval/episodes"] == 2 and isinstance(row["eval/episodes"], int) and row["eval/done"] == 1.0
    assert logger.logged(3, "eval/") == {"episodes": 2, "updates": 5, "score": 1.5, "done": 1.0}
    assert logger.logged(4, "eval/") == {}


def test_a_finished_runs_evaluation_is_read_back_from_the_row_its_record_names(tmp_path):
    """evaluated.json names the row (step and time) and the settings of the last evaluation: a resume with those
    settings reads that row back, also when a later evaluation's row follows it without its record (a crash between
    the two writes); other settings, or a damaged record, evaluate again; a run from before the record compares its
    checkpoint's settings and reads the last row."""
    logger = MetricLogger(RunDir(tmp_path), enabled=True)
    assert logger.final_evaluation(4, {"n": 8}, {"n": 8}) == {}  # nothing logged
    logger.scalars(4, {"ap": 0.5}, prefix="eval/")  # a run from before the record
    assert logger.final_evaluation(4, {"n": (8, 1)}, {"n": [8, 1]}) == {"ap": 0.5}  # tuples as JSON lists
    assert logger.final_evaluation(4, {"n": 8}, {"n": 4}) == {} and logger.final_evaluation(4, {"n": 8}, None) == {}
    logger.evaluation(4, {"ap": 0.7}, {"n": 8})
    logger.scalars(4, {"ap": 0.9}, prefix="eval/")  # settings {"n": 2}, stopped before its record was written
    assert logger.final_evaluation(4, {"n": 8}, None) == {"ap": 0.7}
    assert logger.final_evaluation(4, {"n": 2}, {"n": 2}) == {} and logger.final_evaluation(5, {"n": 8}, None) == {}
    logger.evaluated_path.write_text("{damaged")
    assert logger.final_evaluation(4, {"n": 8}, {"n": 8}) == {}
    logger.close()


def test_a_damaged_metrics_log_does_not_block_a_resume(tmp_path, capsys):
    """Lines of metrics.jsonl that are not JSON rows with a step (a disk that filled, an edit by hand) are dropped with
    a warning when a run resumes; the good rows up to the checkpoint stay."""
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"st\x00\n[1, 2]\n{"a": 3}\n{"step": 2, "a": 2}\n'
                                            '{"step": 5, "a": 5}\n')
    MetricLogger(run, start_step=2, enabled=True).close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]
    assert "dropped 3 damaged line(s)" in capsys.readouterr().err


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1}, path)

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    atomic_write(tmp_path / "a.json", lambda f: f.write(json.dumps({"x": 1}).encode()))
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


@pytest.mark.nethack
def test_jsonl_files_skip_a_torn_last_line_only(tmp_path):
    """What a writer killed mid-row leaves (the episode statistics of both games, metrics) reads without that row;
    damage before the last line is an error that names the line."""
    from envs.errors import DataError
    from envs.jsonl import read_records
    from envs.nethack import nethack_summary

    path = tmp_path / "stats.jsonl"
    path.write_text('{"score": 1, "depth": 1, "max_depth": 1, "length": 5}\n\n'
                    '{"score": 3, "depth": 2, "max_depth": 2, "length": 7}\n{"score": 9, "de')
    assert [r["score"] for r in read_records(path)] == [1, 3]
    assert nethack_summary(path)["episodes"] == 2
    path.write_text('{"score": 1}\n{"sco\n{"score": 3}\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_records(path)


def test_a_run_stopped_before_it_logged_anything_leaves_its_directory_reusable(tmp_path):
    """A run stopped in its first seconds (before a first value was logged) leaves its config.yaml and no
    tensorboard file; starting the run again in that directory works. Once a value is logged, the logs block a new
    run there as before (they are a stopped run's)."""
    from world_model.rundir import RunDirError

    run = RunDir.open(tmp_path / "r", resume=False)
    (run.path / "config.yaml").write_text("{}")
    MetricLogger(run, enabled=True).close()
    run.release()
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml"]
    again = RunDir.open(tmp_path / "r", resume=False)
    logger = MetricLogger(again, enabled=True)
    logger.scalars(1, {"loss": 1.0})
    logger.close()
    again.release()
    assert list((again.path / "tb").glob("events.*"))
    with pytest.raises(RunDirError, match="of a run that stopped before its first checkpoint"):
        RunDir.open(tmp_path / "r", resume=False)


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    """A --run-dir or --out that is a file (or lies inside one) is a one-line error before any work: before a
    collection plays, an evaluation runs or a run starts. A folder of other files is not taken as a new run's
    directory (a dataset's root, say), while an empty one is."""
    import run
    from world_model.rundir import RunDirError, check_out_dir

    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, where in ((afile, "is a file"), (afile / "sub", "is inside .*afile, which is a file")):
        with pytest.raises(RunDirError, match=f"--run-dir .* {where}: choose a folder path"):
            RunDir.open(path, resume=False)
        with pytest.raises(RunDirError, match=f"--out .* {where}"):
            check_out_dir(path)
    assert afile.read_text() == "x"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path in (tmp_path / "dangling", tmp_path / "dangling" / "sub", tmp_path / "loop"):
        with pytest.raises(RunDirError, match="a symbolic link to .*, which does not exist"):
            RunDir.open(path, resume=False)
    assert run.main(["train", "--run-dir", str(tmp_path / "dangling"), "--no-progress"]) == 2
    assert run.main(["collect", "--env", "crafter", "--frames", "10000", "--out", str(afile)]) == 2
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "none"), "--out", str(afile / "ap.json")]) == 2
    err = capsys.readouterr().err
    assert "--out " + str(afile) + " is a file" in err and "--out " + str(tmp_path) + " is a folder" in err
    assert "--out's folder " + str(afile) + " is a file" in err and "Traceback" not in err
    data = tmp_path / "clevr"
    (data / "CLEVR_v1.0").mkdir(parents=True)
    with pytest.raises(RunDirError, match="clevr holds CLEVR_v1.0: data or a repository, not a run directory"):
        RunDir.open(data, resume=False)
    (tmp_path / "empty").mkdir()
    RunDir.open(tmp_path / "empty", resume=False).release()
    logged = tmp_path / "logged"  # `run.py train --run-dir D > D/train.log`: the shell makes the log first
    logged.mkdir()
    (logged / "train.log").write_text("")
    (logged / ".DS_Store").write_text("")
    capsys.readouterr()
    RunDir.open(logged, resume=False).release()
    assert "already holds train.log; the run's files go beside them" in capsys.readouterr().err


def test_run_directory_guards(tmp_path, capsys):
    """A new run refuses a directory with an earlier run's logs but no checkpoint, and one that a live process is
    training in; a damaged checkpoint is a one-line error that names it."""
    import subprocess
    import sys

    from world_model.rundir import RunDirError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 2}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl of a run that stopped before its first checkpoint"):
        RunDir.open(tmp_path / "a", resume=False)
    # an episode dataset is no run directory (its stats.jsonl is no leftover), nor a place for pictures and reports
    from envs.episodes import EpisodeWriter
    from world_model.rundir import check_out_dir

    writer = EpisodeWriter(tmp_path / "data", {"env": "toy"})
    writer.begin(0, np.zeros((4, 4, 3), np.uint8))
    writer.step(0, np.zeros((4, 4, 3), np.uint8), 0, 0.0, True, False)
    (tmp_path / "data" / "stats.jsonl").write_text("")
    for resume in (False, True):
        with pytest.raises(RunDirError, match=r"data is an episode dataset \(meta.json, episodes/\); choose another"):
            RunDir.open(tmp_path / "data", resume=resume)
    with pytest.raises(RunDirError, match="--out .*data is an episode dataset"):
        check_out_dir(tmp_path / "data")
    with pytest.raises(RunDirError, match=r"--out .*a is a run directory; write to a directory of its own"):
        (tmp_path / "a" / "config.yaml").write_text("")
        check_out_dir(tmp_path / "a")
    assert check_out_dir(tmp_path / "a" / "viz") == tmp_path / "a" / "viz"
    for sub in ("images", "scenes"):  # a CLEVR root: neither pictures nor a run go into it
        (tmp_path / "clevr" / sub).mkdir(parents=True)
    with pytest.raises(RunDirError, match=r"--out .*clevr is a CLEVR root \(images/, scenes/\); write to a directory "
                                          "of its own$"):
        check_out_dir(tmp_path / "clevr")
    with pytest.raises(RunDirError, match=r"clevr holds images, scenes: data or a repository, not a run directory"):
        RunDir.open(tmp_path / "clevr", resume=False)
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "train.pid").write_text(f"{host} {live.pid}")
        with pytest.raises(RunDirError, match=f"process {live.pid} is training in"):
            RunDir.open(tmp_path / "b", resume=False)
        (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 2}\n')  # a live run's logs: not leftovers to remove
        for resume in (False, True):
            with pytest.raises(RunDirError, match=f"process {live.pid} is training in"):
                RunDir.open(tmp_path / "b", resume=resume)
        import run as run_py

        capsys.readouterr()
        argv = ["pretrain", "--config", "clevr_tiny", "--run-dir", str(tmp_path / "b"), "--no-progress"]
        assert run_py.main(argv) == 2
        said = capsys.readouterr()  # before the config is printed: the error is all it says
        assert said.out == "" and f"process {live.pid} is training in" in said.err
        (tmp_path / "b" / "metrics.jsonl").unlink()
        (tmp_path / "b" / "train.pid").write_text(f"another-{host} {live.pid}")  # a pid on another host: not ours
        RunDir.open(tmp_path / "b", resume=False)
        (tmp_path / "b" / "train.pid").write_text(f"{host} {live.pid}")
    finally:
        live.kill()
        live.wait()
    run = RunDir.open(tmp_path / "b", resume=False)  # that process is gone: this one takes over
    assert (tmp_path / "b" / "train.pid").read_text() == f"{host} {os.getpid()}"
    assert RunDir.open(tmp_path / "b", resume=False).path == run.path  # the same process may open it again
    run.release()  # a finished run leaves no claim
    assert not (tmp_path / "b" / "train.pid").exists()
    run.ckpt_path.parent.mkdir()
    for damage in (b"", b"\x80garbage", None):
        if damage is None:  # a checkpoint cut short
            atomic_torch_save({"step": 1, "w": torch.zeros(1000)}, run.ckpt_path)
            os.truncate(run.ckpt_path, 2000)
        else:
            run.ckpt_path.write_bytes(damage)
        with pytest.raises(RunDirError, match="latest.pt is damaged and cannot be read"):
            run.load_checkpoint()
        with pytest.raises(RunDirError, match="latest.pt is damaged and cannot be read"):  # not "keeps no step 1"
            RunDir(run.path, step=1).load_checkpoint()
    with pytest.raises(RunDirError, match=r"latest.pt is damaged and cannot be read \(RuntimeError: "
                       r"PytorchStreamReader failed reading zip archive: failed finding central directory\): the "
                       r"run cannot go on from it; train again in a new --run-dir$"):
        run.load_checkpoint()
    atomic_torch_save({"step": 2}, run.kept_path(2))  # a kept checkpoint is the way on
    with pytest.raises(RunDirError, match=r"\): copy checkpoints/step_2.pt over it to resume from that step, or read a "
                       r"kept checkpoint with --step N \(kept: 2\)$"):
        run.load_checkpoint()
    os.link(run.ckpt_path, run.kept_path(3))  # kept at the last evaluation: a hard link, the same damaged file
    with pytest.raises(RunDirError, match=r"copy checkpoints/step_2.pt over it .*\(kept: 2\)$"):
        run.load_checkpoint()
    with pytest.raises(RunDirError, match=r"step_3.pt is damaged .*\): read another kept one \(kept: 2\)$"):
        RunDir(run.path, step=3).load_checkpoint()
    (run.path / "replay").mkdir()  # an agent run's: the replay its kept checkpoint names is gone
    with pytest.raises(RunDirError, match=r"over it to resume from that step \(with --new-replay\), or read a kept"):
        run.load_checkpoint()
    for step in (2, 3):
        run.kept_path(step).unlink()
    (run.path / "replay").rmdir()
    atomic_torch_save({"wm": {}, "counters": {}}, run.ckpt_path)  # an agent's checkpoint where a pretraining one was
    assert run.load_checkpoint(keys=("wm",))["counters"] == {}
    with pytest.raises(RunDirError, match="latest.pt lacks model, step: it is not a checkpoint of the command"):
        run.load_checkpoint(keys=("model", "step", "wm"))
    # a log the run appends to that is a folder: one line before any work (env workers would crash on every episode)
    (tmp_path / "b" / "stats.jsonl").mkdir()
    with pytest.raises(RunDirError, match="stats.jsonl is a folder, not the log the run appends to: move it away"):
        RunDir.open(tmp_path / "b", resume=True)
    (tmp_path / "b" / "stats.jsonl").rmdir()
    # a new run in a directory that holds a checkpoint: the advice names the command whose run it is
    with pytest.raises(RunDirError, match=r"already holds a checkpoint; --resume continues it, or choose another"):
        RunDir.open(tmp_path / "b", resume=False)
    shutil.copy(Path(__file__).resolve().parent.parent / "configs" / "clevr_tiny.yaml", run.config_path)
    with pytest.raises(RunDirError, match=f"already holds a checkpoint of a `run.py pretrain` run; `run.py pretrain "
                                          f"--resume {run.path}` continues it, or choose another --run-dir"):
        RunDir.open(tmp_path / "b", resume=False)


def test_rollback_cuts_appended_lines_back_to_the_checkpoint(tmp_path):
    from world_model.rundir import rollback_appended

    path = tmp_path / "stats.jsonl"
    path.write_text('{"e": 1}\n{"e": 2}\n')
    size = path.stat().st_size
    with path.open("a") as f:
        f.write('{"e": 3}\n{"e": 4}\n')
    rollback_appended(path, size)
    assert path.read_text() == '{"e": 1}\n{"e": 2}\n'
    rollback_appended(path, size - 3)  # a size inside a line keeps whole lines only
    assert path.read_text() == '{"e": 1}\n'
    rollback_appended(tmp_path / "missing.jsonl", 0)


def test_cuda_runs_keep_fp32_matmuls_at_full_precision():
    """CUDA runs take TF32 for convolutions only: the GMM E-step's fp32 matmul cancels large terms (see
    tests/test_slots.py), so "high" (TF32) matmul precision is not set; CPU runs leave the flags alone."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = False
        set_precision(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "high" and not torch.backends.cudnn.allow_tf32
        set_precision(torch.device("cuda"))  # sets flags only; needs no GPU
        assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_inductors_advice_against_the_precision_choice_is_silenced():
    """Compiled CUDA runs print inductor's advice to enable TF32 matmuls, which set_precision deliberately does not;
    after set_precision that warning (and the online-softmax notice) is gone, while other warnings still show."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        set_precision(torch.device("cpu"))
        warnings.warn("TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled. "
                      "Consider setting `torch.set_float32_matmul_precision('high')` for better performance.")
        warnings.warn("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction.")
        warnings.warn("some other warning")
    assert [str(w.message) for w in seen] == ["some other warning"]


def test_a_shorter_length_on_resume_stops_the_run_where_it_is(capsys):
    """The length a resumed run goes on with (and records), given the checkpoint's step, the override and the
    length the checkpoint was trained with; a line says where it goes on from (a log without a progress bar shows
    nothing else until its next row)."""
    def length(step, override, saved):
        return resumed_length(step, override, "train.steps", {"config": {"train": {"steps": saved}}})

    assert length(2, 8, 6) == 8  # longer: trains on
    assert capsys.readouterr().err == "resuming at step 2 of train.steps=8\n"
    assert length(2, 1, 2) == 2  # finished: keeps its own length
    assert length(2, 1, 6) == 2  # stopped part-way: stops where it is, not at its old 6
    assert length(1202, 300, 1200) == 1200  # an agent past its length by a vector step: its own length


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A read-only file system or a folder without permission (the kernel's answer, here simulated) is one line,
    before the config is printed or a collection plays."""
    import tempfile

    import run

    def refused(dir=None, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    assert run.main(["train", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert run.main(["collect", "--env", "crafter", "--frames", "10", "--out", str(tmp_path / "data")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("not writable (Permission denied): choose another path") == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("override, message", [
    ("train.device=gpu", "train.device=gpu is not a device this project runs on"),
    ("env.num_envs=3", "env.num_envs=3 must be a multiple of env.envs_per_worker=2"),
    ("train.seq_len=20", "dynamics.max_steps=16 is shorter than the longest sequence it must hold (20 steps"),
])
def test_a_config_a_run_would_refuse_later_is_refused_before_it_is_printed(override, message, tmp_path, capsys):
    import run

    argv = ["train", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--no-progress", "env.envs_per_worker=2",
            override]
    assert run.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message}") and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["train-wm", "--data", "NOPE"], "NOPE is not an episode dataset (no meta.json)"),
    (["train-wm"], "train-wm needs data.root=DIR (or --data DIR)"),
    (["pretrain", "--data", "NOPE"], "NOPE is not an episode dataset (no meta.json)"),
    (["pretrain", "data.source=clevr", "data.root=NOPE"], "CLEVR root NOPE not found"),
])
def test_a_missing_dataset_is_refused_before_the_config_is_printed(argv, message, tmp_path, capsys):
    import run

    argv = [a.replace("NOPE", str(tmp_path / "nope")) for a in argv]
    assert run.main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message.replace('NOPE', str(tmp_path / 'nope'))}")
    assert not (tmp_path / "run").exists()


def test_the_printed_config_shows_what_the_run_sets_itself(tmp_path, capsys):
    import run

    assert run.main(["train", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--no-progress",
                     "train.env_steps=2", "train.eval_episodes=1", "env.max_episode_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "  num_slots: 4  # set by the run from encoder.model.num_slots" in out
    assert "  num_actions: 17  # set by the run from the env" in out
    # resumed: the values the run recorded at its start (an older run may read fewer env tokens than the env has now)
    assert run.main(["train", "--resume", str(tmp_path / "run"), "--no-progress", "train.env_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "  num_actions: 17  # set by the run from its start, as recorded" in out
    assert "  frame_vars: 4  # set by the run from its start, as recorded" in out


def test_evaluation_due_when_a_multiple_is_passed_and_at_the_end():
    assert [at for at in range(1, 26) if evaluation_due(at, 10, 25)] == [10, 20, 25]
    assert [at for at in range(1, 26) if evaluation_due(at, 0, 25)] == [25]  # eval_every=0: the last step only
    # a vector env of 4 envs reaches 4, 8, 12, ...: 12 passes 10, 20 meets it, 24 passes nothing new
    assert [at for at in range(4, 29, 4) if evaluation_due(at, 10, 28, stride=4)] == [12, 20, 28]
    assert evaluation_due(30, 10, 28, stride=4)  # past the end


def test_a_resume_removes_the_temporary_files_of_writes_a_kill_stopped(tmp_path):
    run = RunDir.open(tmp_path / "r", resume=False)
    run.save_checkpoint({"step": 1})
    run.release()
    torn = [run.path / "checkpoints" / "latest.ptuky8yfpe.tmp", run.path / "replay" / "000080-rank0.npzab12.tmp",
            run.path / "eval_stats.d23gtye9.jsonl.tmp"]
    (run.path / "replay").mkdir()
    kept = run.path / "replay" / "000080-rank0.npz"
    for path in [*torn, kept]:
        path.write_bytes(b"x")
    RunDir.open(tmp_path / "r", resume=True).release()
    assert not any(p.exists() for p in torn) and kept.exists() and run.ckpt_path.exists()


def test_a_long_phase_is_shown_beside_the_progress_bar_then_cleared():
    """An evaluation or a burst of owed updates shows in the bar while it runs (the bar would look stuck or done),
    then the bar shows what it showed before; a disabled bar (--no-progress) is left alone."""
    import io

    from tqdm import tqdm

    from world_model.rundir import shown

    out = io.StringIO()
    bar = tqdm(total=10, file=out)
    bar.set_postfix(updates=3)
    with shown(bar, "evaluating"):
        assert bar.postfix == "evaluating, updates=3" and out.getvalue().endswith("evaluating, updates=3]")
    assert bar.postfix == "updates=3"
    bar.close()
    quiet = tqdm(total=10, disable=True)
    with shown(quiet, "evaluating"):
        pass


def test_a_resume_keeps_the_episodes_its_checkpoint_counted_and_blanks_damaged_lines(tmp_path, capsys):
    """On resume, stats.jsonl is cut back to the episode records its checkpoint counted (what the stopped run appended
    after it goes), and lines among them that are no episode record (a hand edit such as an inserted line or `{}`,
    binary junk) are blanked in place with a warning: every counted episode stays, once, and readers skip the
    blanks. Appends then read as lines of their own."""
    from envs.jsonl import count_records, is_episode, keep_records, read_records

    path = tmp_path / "stats.jsonl"
    episodes = ['{"length": %d}' % n for n in (1, 2, 3)]
    path.write_text(f"{episodes[0]}\nGARBAGE not json\n{{}}\n\x00\x01junk\n{episodes[1]}\n{episodes[2]}\n")
    assert count_records(path, is_episode) == 3
    keep_records(path, 2, is_episode)  # the checkpoint counted 2: the third came after it
    assert [r["length"] for r in read_records(path)] == [1, 2]
    assert count_records(path, is_episode) == 2 and "dropped 3 damaged line(s)" in capsys.readouterr().err
    with open(path, "a") as f:
        f.write(episodes[2] + "\n")
    assert count_records(path, is_episode) == 3
    path.write_text(f"{episodes[0]}\n{episodes[1]}")  # a last record without its newline: ended, not joined
    keep_records(path, None, is_episode)
    with open(path, "a") as f:
        f.write(episodes[2] + "\n")
    assert [r["length"] for r in read_records(path)] == [1, 2, 3] and capsys.readouterr().err == ""
    keep_records(path, 0, is_episode)  # a checkpoint before any episode
    assert path.read_text() == ""


def test_a_growing_log_is_read_by_its_new_lines_only(tmp_path):
    """JsonlTail: appended lines are read as they complete (a torn last line waits), a file that shrank is read from
    its start, and a damaged line before the end is an error naming the file and the line (blank lines counted),
    after which a call reads the same lines again, not records twice."""
    from envs.errors import DataError
    from envs.jsonl import JsonlTail

    path = tmp_path / "stats.jsonl"
    tail = JsonlTail(path)
    assert tail.records() == []  # no file yet
    path.write_text('{"length": 1}\n{"length": 2}\n{"len')
    assert [r["length"] for r in tail.records()] == [1, 2]
    with open(path, "a") as f:
        f.write('gth": 3}\n')
    assert [r["length"] for r in tail.records()] == [1, 2, 3]
    path.write_text('{"length": 5}\n')
    assert [r["length"] for r in tail.records()] == [5]
    with open(path, "a") as f:
        f.write('\n{"length": 6}\nnot json\n')
    for _ in range(2):
        with pytest.raises(DataError, match=r"stats.jsonl: line 4 is not JSON"):
            tail.records()
    path.write_text('{"length": 5}\n\n{"length": 6}\n{"length": 7}\n')  # mended in place, grown
    assert [r["length"] for r in tail.records()] == [5, 6, 7]


def test_a_torn_last_line_is_not_counted_as_damaged(tmp_path, capsys):
    """read_records(valid=...) drops every line that is not a row with a step, but counts in its warning only the lines before
    the last (a torn last line is what a killed writer leaves, not damage): one bad middle line -> "dropped 1"."""
    from envs.jsonl import read_records

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n{"step": 3, "lo')
    assert read_records(path, valid=lambda row: isinstance(row.get("step"), int)) == [{"step": 1}, {"step": 2}]
    assert "dropped 1 damaged line(s)" in capsys.readouterr().err


def test_atomic_write_syncs_the_whole_new_file_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """fsync sees every byte of the new file (flushed first) while the target still holds the old one: a power cut
    after the rename cannot leave a renamed-but-empty checkpoint."""
    path = tmp_path / "latest.pt"
    path.write_bytes(b"old")
    real_fsync, seen = os.fsync, []

    def spy(fd):
        seen.append((os.fstat(fd).st_size, path.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(path, lambda f: f.write(b"x" * 100))
    assert seen == [(100, b"old")]
    assert path.read_bytes() == b"x" * 100


def test_an_atomic_write_in_progress_is_a_tmp_file_beside_its_target(tmp_path):
    """The temporary file lives in the target's folder (a rename across file systems is no rename) and is named
    `<target>*.tmp`, what a resume's cleanup (RunDir._remove_torn_writes) removes after a kill."""
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "latest.pt"
    during = []
    atomic_write(path, lambda f: during.extend(p.name for p in path.parent.iterdir()))
    assert len(during) == 1 and during[0].startswith("latest.pt") and during[0].endswith(".tmp")
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]


def test_an_atomic_write_stopped_by_ctrl_c_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "latest.pt"
    path.write_bytes(b"old")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """Not mkstemp's 0600: under umask 022 a checkpoint or log is 0644, like a file open() makes (others on a shared
    machine can read the run)."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda f: f.write(b"{}"))
        (tmp_path / "plain.json").write_bytes(b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644 == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_check_folder_takes_links_to_folders_and_asks_only_the_nearest_existing_folder(tmp_path, monkeypatch):
    """A run directory behind a symbolic link to a real folder (runs/ on a bigger disk) is fine; only the nearest
    existing folder must be writable (a writable folder inside a read-only one, here simulated), and a path that
    is a special file (a FIFO) is no folder."""
    import tempfile

    from envs.atomic import check_folder
    from envs.errors import UsageError

    (tmp_path / "disk" / "runs").mkdir(parents=True)
    (tmp_path / "runs").symlink_to(tmp_path / "disk" / "runs")
    assert check_folder(tmp_path / "runs", "--run-dir") == tmp_path / "runs"
    assert check_folder(tmp_path / "runs" / "r1", "--run-dir") == tmp_path / "runs" / "r1"
    RunDir.open(tmp_path / "runs" / "r1", resume=False).release()
    real = tempfile.TemporaryFile

    def read_only_above(dir=None, **kw):
        if Path(dir) != tmp_path / "disk" / "runs" and Path(dir) != tmp_path / "runs":
            raise PermissionError(13, "Permission denied")
        return real(dir=dir, **kw)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_above)
    assert check_folder(tmp_path / "disk" / "runs" / "new" / "deeper", "--run-dir")
    monkeypatch.undo()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="fifo is a file: choose a folder path"):
        check_folder(tmp_path / "fifo", "--run-dir")


def test_blank_lines_are_not_damage_and_undecodable_bytes_do_not_stop_a_read(tmp_path, capsys):
    """A line an earlier resume blanked (spaces) is no damaged line the next resume warns about again; bytes that
    are not UTF-8 (a disk that filled) are a damaged line like any other, not a UnicodeDecodeError; a JSON object
    without "length" is no episode record."""
    from envs.errors import DataError
    from envs.jsonl import count_records, is_episode, keep_records, read_records

    path = tmp_path / "stats.jsonl"
    path.write_text('{"length": 1}\n          \n{"length": 2}\n')
    keep_records(path, 2, is_episode)
    assert capsys.readouterr().err == "" and path.read_text() == '{"length": 1}\n          \n{"length": 2}\n'
    path.write_text('{"length": 1}\n{"note": "x"}\n{"length": 2}\n')
    assert count_records(path, is_episode) == 2 and not is_episode({"note": "x"})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1}\n\xff\xfe\x80 junk\n{"step": 2}\n')
    assert read_records(metrics, valid=lambda r: isinstance(r.get("step"), int)) == [{"step": 1}, {"step": 2}]
    assert "dropped 1 damaged line(s)" in capsys.readouterr().err
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_records(metrics)


def test_only_rank_0_writes_checkpoints_and_metrics(tmp_path, monkeypatch):
    """Under torchrun the other ranks hold the same state: they write no checkpoint and log nothing (no
    metrics.jsonl rows, no tensorboard file) unless told to."""
    from world_model import distributed

    run = RunDir(tmp_path)
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    run.save_checkpoint({"step": 1})
    logger = MetricLogger(run)
    logger.scalars(1, {"loss": 1.0})
    logger.close()
    assert not run.ckpt_path.exists() and not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tb").exists()
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    run.save_checkpoint({"step": 1})
    logger = MetricLogger(run)
    logger.scalars(1, {"loss": 1.0})
    logger.close()
    assert torch.load(run.ckpt_path)["step"] == 1 and [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_per_rank_seeds_and_the_rng_a_resume_restores(monkeypatch):
    """rank_seed: the seed itself in one process without salt, else mixed_seed(seed, rank, salt). restore_rng: at the
    world size of the checkpoint each rank takes its own state; at another world size every rank seeds afresh from
    (seed, rank, step); an older checkpoint's single state is taken as is."""
    import random

    from world_model import distributed
    from world_model.rundir import mixed_seed, rank_seed, restore_rng, rng_state, seed_everything, set_rng_state

    saved = rng_state()

    def draws():
        return torch.rand(3).tolist(), np.random.rand(), random.random()

    def after(state):
        set_rng_state(state)
        return draws()

    try:
        assert rank_seed(7) == 7 and rank_seed(7, 3) == mixed_seed(7, 0, 3) != 7
        seed_everything(1)
        s0 = rng_state()
        seed_everything(2)
        s1 = rng_state()
        want0, want1 = after(s0), after(s1)
        seed_everything(mixed_seed(7, 0, 3))
        fresh = draws()
        assert len({str(want0), str(want1), str(fresh)}) == 3
        restore_rng([s0, s1], 7, 3)  # one process resuming a 2-process run: a fresh seed, not rank 0's stream
        assert draws() == fresh
        restore_rng(s1, 7, 3)  # an older checkpoint's single state
        assert draws() == want1
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda: 1)
        assert rank_seed(7) == mixed_seed(7, 1, 0) != mixed_seed(7, 0, 0)
        restore_rng([s0, s1], 7, 3)  # rank 1 of the same world size: its own state
        assert draws() == want1
    finally:
        set_rng_state(saved)


def test_a_resume_replays_an_evaluation_only_when_its_checkpoint_stopped_before_it(tmp_path):
    from world_model.rundir import stopped_evaluation

    logger = MetricLogger(RunDir(tmp_path), enabled=True)
    logger.scalars(10, {"score": 1.0}, prefix="eval/")
    logger.scalars(20, {"loss": 1.0}, prefix="train/")
    assert not stopped_evaluation(logger, 10, 10, 30)  # evaluated and logged at 10
    assert stopped_evaluation(logger, 20, 10, 30)  # due at 20, nothing under eval/ there
    assert not stopped_evaluation(logger, 15, 10, 30)  # not due
    assert not stopped_evaluation(logger, 30, 10, 30)  # the last step is the loop's own
    assert stopped_evaluation(logger, 12, 10, 40, stride=4)  # 8 -> 12 passed 10
    logger.close()


def test_an_optimizer_state_for_other_parameters_is_a_one_line_error(tmp_path):
    """A checkpoint's optimizer that held more parameters than the model trains now (an older version's run, say)."""
    from world_model.rundir import RunDirError

    older = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2)) for _ in range(3)])
    now = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2)) for _ in range(2)])
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match=r"latest.pt: its 'wm_opt' state does not fit the parameters this model trains "
                                          r"\(.*\); was the run started by an older version"):
        run.restore_optimizer(now.load_state_dict, {"wm_opt": older.state_dict()}, "wm_opt")
    run.restore_optimizer(now.load_state_dict, {"wm_opt": now.state_dict()}, "wm_opt")
    # the actor-critic's two optimizers alike
    from agent.actor_critic import ActorCritic, ActorCriticConfig
    from world_model.dynamics import DynamicsConfig

    dyn = DynamicsConfig(num_slots=2, num_vars=2, num_codes=3, num_actions=3, embed_dim=8, layers=1, heads=2)
    ac_older, ac_now = (ActorCritic(dyn, ActorCriticConfig(embed_dim=8, layers=n, heads=2)) for n in (2, 1))
    with pytest.raises(RunDirError, match=r"its 'ac_opt' state does not fit the parameters this model trains"):
        run.restore_optimizer(ac_now.load_optimizer_state, {"ac_opt": ac_older.optimizer_state()}, "ac_opt")
