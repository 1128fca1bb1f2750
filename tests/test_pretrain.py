"""End-to-end pretraining: the CLI smoke run, exact resume, eval-ap output, NaN handling, run-dir errors."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import run
from world_model.config import PretrainConfig, load_config
from world_model.pretrain import build_model, compute_loss, load_run, preflight, pretrain
from world_model.rundir import RunDir, RunDirError, read_jsonl

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(str(p) for pattern in ("clevr_*.yaml", "frames_*.yaml") for p in CONFIGS.glob(pattern))
TINY = [
    "model.num_slots=4", "model.slot_dim=8", "model.mlp_hidden=16", "model.cnn_channels=[8,8]",
    "model.cnn_strides=[2,2]", "model.feature_dim=8", "model.head_hidden=16", "model.decoder_channels=8",
    "data.resolution=32", "data.max_objects=4", "data.eval_images=8", "train.batch_size=2", "train.log_every=2",
    "train.image_every=2", "train.eval_every=4", "train.ckpt_every=2", "train.warmup_steps=2", "train.threads=2",
]


def tiny_cfg(*extra):
    return load_config(PretrainConfig, None, TINY + list(extra))


def test_cli_pretrain_and_eval_ap(tmp_path, capsys):
    rd = tmp_path / "run"
    assert run.main(["pretrain", "--config", "configs/clevr_tiny.yaml", "--run-dir", str(rd), "--no-progress",
                     *TINY, "train.steps=4", "train.image_every=100"]) == 0
    assert (rd / "config.yaml").is_file() and (rd / "checkpoints" / "latest.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(rd / "tb"))
    events.Reload()
    images = events.Tags()["images"]  # a run shorter than train.image_every still leaves its last step's pictures
    assert images and all([e.step for e in events.Images(tag)] == [4] for tag in images)
    config = events.Tensors("config/text_summary")  # the run's config, told apart from others' in tensorboard
    assert [e.step for e in config] == [0] and "task: setpred" in config[0].tensor_proto.string_val[0].decode()
    rows = read_jsonl(rd / "metrics.jsonl")
    assert any("train/loss" in r for r in rows) and any("eval/AP_inf" in r for r in rows)
    assert list((rd / "tb").glob("events.*"))
    first = [r["train/first_step_s"] for r in rows if "train/first_step_s" in r]  # logged once, in its first row
    assert len(first) == 1 and "train/first_step_s" in next(r for r in rows if "train/loss" in r)
    out = capsys.readouterr().out  # from the process's start (imports and all), so above this test's own time
    assert out.count(f"first step done {first[0]:.1f} s after the process started") == 1 and first[0] > 1
    assert run.main(["eval-ap", "--checkpoint", str(rd), "--images", "6"]) == 0
    out = capsys.readouterr().out
    assert "AP_inf" in out and "AP_0.0625" in out
    assert "on 6 images (held-out generated scenes, the same seeded stream for every run)" in out
    result = json.loads((rd / "eval_ap.json").read_text())
    assert result["images"] == 6 and set(result) >= {"AP_inf", "AP_1", "AP_0.5", "AP_0.25", "AP_0.125", "AP_0.0625"}
    assert 0 <= result["empty_slots"] <= 4  # near-empty slots per image, out of model.num_slots=4
    from world_model.pretrain import evaluate_run, load_run

    assert evaluate_run(str(rd), images=6) == result  # the same evaluation from Python, as a dict
    assert load_run(str(rd), "auto")[2]["step"] == 4  # a device by name, as the commands take it
    if not torch.cuda.is_available():  # a good checkpoint is not called damaged for want of CUDA
        with pytest.raises(ValueError, match="^device=cuda but CUDA is not available; use device=cpu or auto$"):
            load_run(str(rd), "cuda")
    for images in (0, -1):
        with pytest.raises(ValueError, match=f"images={images}: evaluate at least one image"):
            evaluate_run(str(rd), images=images)


@pytest.mark.parametrize("task,pool,clevr", [("setpred", 0, False), ("discovery", 7, False), ("setpred", 0, True)])
def test_resume_is_exact(tmp_path, monkeypatch, task, pool, clevr):
    """Stopped at step 2 and resumed, a run ends as the straight one: every tensor of the checkpoint (weights,
    optimizer, RNG) and every logged number after the stop. Also with a scene pool that is still filling when the
    run stops (4 steps of 2 scenes, a pool of 7), and on a CLEVR directory (whose loaders draw no global seed)."""
    from compare import assert_same_state, checkpoint, metric_rows
    from envs.clevr import write_dataset
    from world_model.sources import ScenePool

    monkeypatch.setattr(ScenePool, "CHUNK", 1)
    over = ["model.vq.enabled=true", f"data.pool={pool}", f"task={task}", "train.log_every=1"]
    if clevr:
        for split, n in (("train", 6), ("val", 2)):
            write_dataset(tmp_path / "clevr", n, split=split, seed=1, batch_size=n, max_objects=4)
        over += ["data.source=clevr", f"data.root={tmp_path / 'clevr'}", "data.eval_images=2"]
    straight = tmp_path / "straight"
    pretrain(tiny_cfg("train.steps=4", *over), str(straight), progress=False)
    halves = tmp_path / "halves"
    pretrain(tiny_cfg("train.steps=2", *over), str(halves), progress=False)
    pretrain(tiny_cfg("train.steps=4", *over), str(halves), resume=True, progress=False)
    a, b = checkpoint(straight), checkpoint(halves)
    assert a["step"] == b["step"] == 4
    assert_same_state(a, b)
    assert metric_rows(straight, after=2) == metric_rows(halves, after=2) != []


def test_a_run_stopped_between_log_rows_resumes_with_the_same_rows(tmp_path, monkeypatch):
    """Rows every 3 steps, checkpoints every 2, the run stopped by a crash in step 3: the resumed run's row at step 3
    averages steps 1-3 as the straight run's does (the checkpoint keeps the sums since the last row), not step 3
    alone."""
    from compare import metric_rows
    from stopping import raising_at_call
    import world_model.pretrain as pt

    over = ["train.steps=6", "train.log_every=3", "train.ckpt_every=2", "train.eval_every=0"]
    pretrain(tiny_cfg(*over), str(tmp_path / "straight"), progress=False)
    real = pt.guarded_update
    monkeypatch.setattr(pt, "guarded_update", raising_at_call(real, 3, RuntimeError("stopped")))
    with pytest.raises(RuntimeError, match="stopped"):
        pretrain(tiny_cfg(*over), str(tmp_path / "halves"), progress=False)
    monkeypatch.setattr(pt, "guarded_update", real)
    pretrain(tiny_cfg(*over), str(tmp_path / "halves"), resume=True, progress=False)
    rows = metric_rows(tmp_path / "straight")
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6]
    assert metric_rows(tmp_path / "halves") == rows


def test_each_evaluations_checkpoint_is_kept_and_evaluated_by_step(tmp_path, capsys, monkeypatch):
    """train.keep_checkpoints=true keeps the checkpoint of every evaluation (a hard link, no copy); eval-ap and
    visualize --step N read it, eval-ap writing beside the latest's results; a step none was kept at names the
    kept ones, unless it is the step of the latest checkpoint (whose step is read without loading its tensors)."""
    import os

    rd = tmp_path / "run"
    pretrain(tiny_cfg("train.steps=4", "train.eval_every=2", "train.keep_checkpoints=true"), str(rd), progress=False)
    kept = rd / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["latest.pt", "step_2.pt", "step_4.pt"]
    assert os.path.samefile(kept / "latest.pt", kept / "step_4.pt")  # the same file: no copy
    early, late = (torch.load(kept / name, weights_only=False) for name in ("step_2.pt", "latest.pt"))
    assert early["step"] == 2 and any(not torch.equal(w, late["model"][k]) for k, w in early["model"].items())
    capsys.readouterr()
    assert run.main(["eval-ap", "--checkpoint", str(rd), "--images", "4", "--step", "2"]) == 0
    assert "step 2 on 4 images" in capsys.readouterr().out
    assert json.loads((rd / "eval_ap_step2.json").read_text())["step"] == 2 and not (rd / "eval_ap.json").exists()
    assert run.main(["visualize", "--checkpoint", str(rd), "--step", "2", "--frames", "1", "--out",
                     str(tmp_path / "viz")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert run.main(["eval-ap", "--checkpoint", str(rd), "--step", "3"]) == 2
    assert f"{rd} keeps no checkpoint of step 3 (it keeps steps 2, 4)" in capsys.readouterr().err
    pretrain(tiny_cfg("train.steps=2"), str(tmp_path / "plain"), progress=False)  # the default keeps none
    assert sorted(p.name for p in (tmp_path / "plain" / "checkpoints").iterdir()) == ["latest.pt"]
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("mmap", False)) or real_load(*a, **k))
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "plain"), "--step", "1"]) == 2
    assert loads == [True]  # latest.pt's step, through a memory map
    assert "keeps no checkpoint of step 1 (it keeps none: train.keep_checkpoints=true keeps each evaluation's)" in \
        capsys.readouterr().err
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "plain"), "--images", "4", "--step", "2"]) == 0
    assert "step 2 on 4 images" in capsys.readouterr().out  # the step the run is at: its latest checkpoint


def test_ctrl_c_between_checkpoints_stops_after_its_step_with_a_checkpoint(tmp_path, monkeypatch, ctrl_c):
    """Ctrl-C during step 3 of a run that checkpoints every 100 steps: the step finishes, its checkpoint is written,
    and the resumed run logs the rows and ends with the weights of a run never stopped."""
    from compare import assert_same_state, checkpoint, metric_rows
    from stopping import ctrl_c_in_call
    import world_model.pretrain as pt

    over = ["train.steps=5", "train.log_every=2", "train.ckpt_every=100", "train.eval_every=0"]
    pretrain(tiny_cfg(*over), str(tmp_path / "straight"), progress=False)
    real = pt.guarded_update
    monkeypatch.setattr(pt, "guarded_update", ctrl_c_in_call(real, 3))
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg(*over), str(tmp_path / "stopped"), progress=False)
    assert checkpoint(tmp_path / "stopped")["step"] == 3 and pt.guarded_update.calls == 3
    monkeypatch.setattr(pt, "guarded_update", real)
    pretrain(tiny_cfg(*over), str(tmp_path / "stopped"), resume=True, progress=False)
    assert metric_rows(tmp_path / "stopped") == metric_rows(tmp_path / "straight")
    assert_same_state(checkpoint(tmp_path / "stopped")["model"], checkpoint(tmp_path / "straight")["model"])


def test_each_evaluation_pictures_held_out_images_with_what_each_set_prediction_slot_says(tmp_path, monkeypatch):
    """`slots/held_out` at every evaluation; for set prediction each slot's cell says its confidence, colour and
    shape for that image (here slot 0: 0.90 cyan cylinder; slot 1: 0.20 gray cube), and `annotated` writes each text
    on its own cell's bottom band."""
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import world_model.pretrain as pt
    from world_model.visualize import annotated

    rows = torch.zeros(2, 2, 19)
    rows[:, 0, [9, 17, 18]] = torch.tensor([1.0, 1.0, 0.9])  # cylinder, cyan (the last colour), confidence 0.9
    rows[:, 1, [7, 10, 18]] = torch.tensor([1.0, 1.0, 0.2])  # cube, gray
    seen = []
    monkeypatch.setattr(pt, "annotated", lambda picture, texts, side: seen.append(texts) or picture)
    enc = SimpleNamespace(attn_maps=lambda size: torch.full((2, 2, *size), 0.5))
    pt.held_out_picture("setpred", torch.zeros(2, 3, 32, 32), enc, rows)
    assert seen == [[[None, None, "0.90 cyan cylinder", "0.20 gray cube"]] * 2]
    blank = torch.ones(3, 16 + 2 * (4 * 34) + 8, 8 + 4 * 136)  # 2 rows, 4 columns of 32-pixel pictures upscaled 4x
    ink = annotated(blank, [[None, "x"], [None, None]], 32).mean(0) < 0.5
    band = slice(16 + 8 + 128 - 12, 16 + 8 + 128)  # row 0's cells' bottom 12 pixels
    assert ink[band, 8 + 136:8 + 136 + 128].any() and ink.sum() == ink[band, 8 + 136:8 + 136 + 128].sum()
    monkeypatch.undo()
    pretrain(tiny_cfg("train.steps=4", "train.eval_every=2"), str(tmp_path / "r"), progress=False)
    events = EventAccumulator(str(tmp_path / "r" / "tb"))
    events.Reload()
    assert [image.step for image in events.Images("slots/held_out")] == [2, 4]


def test_eval_every_zero_evaluates_at_the_end_only(tmp_path):
    result = pretrain(tiny_cfg("train.steps=3", "train.eval_every=0"), str(tmp_path / "e"), progress=False)
    assert "AP_inf" in result
    assert [r["step"] for r in read_jsonl(tmp_path / "e" / "metrics.jsonl") if "eval/AP_inf" in r] == [3]
    # resumed when finished: the final evaluation is read back from the log, not run and logged again
    assert pretrain(tiny_cfg("train.steps=3", "train.eval_every=0"), str(tmp_path / "e"), resume=True,
                    progress=False) == result
    assert [r["step"] for r in read_jsonl(tmp_path / "e" / "metrics.jsonl") if "eval/AP_inf" in r] == [3]
    # with another evaluation size the logged evaluation no longer holds: it runs again
    again = pretrain(tiny_cfg("train.steps=3", "train.eval_every=0", "data.eval_images=4"), str(tmp_path / "e"),
                     resume=True, progress=False)
    assert again["images"] == 4
    # and resumed again as it is now, that evaluation holds: read back, not run a third time
    assert pretrain(load_config(PretrainConfig, tmp_path / "e" / "config.yaml"), str(tmp_path / "e"), resume=True,
                    progress=False) == again
    assert [r["step"] for r in read_jsonl(tmp_path / "e" / "metrics.jsonl") if "eval/AP_inf" in r] == [3, 3]
    assert json.loads((tmp_path / "e" / "evaluated.json").read_text())["settings"]["eval_images"] == 4


def test_discovery_task_reports_fg_ari(tmp_path, capsys, monkeypatch):
    """FG-ARI where the data has instance masks; on a CLEVR directory without them (real CLEVR ships none) eval-ap
    says why it is missing, and so does a run training on it."""
    from envs.clevr import ClevrDataset, write_dataset

    result = pretrain(tiny_cfg("task=discovery", "model.slots=slot_attention", "train.steps=4"), str(tmp_path / "d"),
                      progress=False)
    assert -100.0 <= result["fg_ari"] <= 100.0  # ARI can be slightly negative for an untrained model
    assert result["mse"] > 0
    cfg, model, state = load_run(str(tmp_path / "d"), torch.device("cpu"))
    assert cfg.task == "discovery" and state["step"] == 4
    write_dataset(tmp_path / "clevr", 2, split="val", seed=0, batch_size=2, max_objects=4, write_masks=False)
    capsys.readouterr()
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "d"), "--clevr-root", str(tmp_path / "clevr")]) == 0
    out, err = capsys.readouterr()
    assert "note: no FG-ARI: CLEVR" in err and "hold no instance masks" in err and "fg_ari" not in out
    clevr = tmp_path / "clevr"  # training on it says so before the first evaluation leaves FG-ARI out
    read, real_read = [], ClevrDataset.__init__  # each split's scenes are read once, not at each evaluation
    monkeypatch.setattr(ClevrDataset, "__init__", lambda self, *a, **k: read.append(k["split"]) or
                        real_read(self, *a, **k))
    result = pretrain(tiny_cfg("task=discovery", "data.source=clevr", f"data.root={clevr}", "data.split=val",
                               "train.steps=2", "train.eval_every=1", "data.eval_images=2"), str(tmp_path / "c"),
                      progress=False)
    assert read == ["val", "val"]  # training's and the evaluations'
    assert (f"note: {clevr} holds no instance masks for split val (real CLEVR ships none; `run.py generate` writes "
            "them): the evaluations score the reconstruction (mse), not FG-ARI") in capsys.readouterr().err
    assert "mse" in result and "fg_ari" not in result


def test_nan_loss_skips_update(tmp_path, monkeypatch):
    import world_model.pretrain as pt

    real = pt.compute_loss
    calls = {"n": 0}

    def flaky(model, task, batch, beta):
        loss, stats, out = real(model, task, batch, beta)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), stats, out

    monkeypatch.setattr(pt, "compute_loss", flaky)
    pretrain(tiny_cfg("train.steps=3"), str(tmp_path / "n"), progress=False)
    state = RunDir(tmp_path / "n").load_checkpoint()
    assert state["skipped"] == 1 and state["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/skipped_updates" in r] == [2]  # the second update, as rows count
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_run_that_diverges_stops_in_one_line(tmp_path, capsys):
    """train.lr=1e9: every update after the first is skipped (non-finite loss). SKIPPED_IN_A_ROW of them stop the run
    with one line naming the learning rate, as do non-finite predictions met first at an evaluation; a good update
    between skipped ones starts the count again."""
    from world_model.updates import SKIPPED_IN_A_ROW, Diverged, SkipStreak

    base = ["pretrain", "--no-progress", *TINY, "train.lr=1e9", "train.steps=40"]
    assert run.main([*base, "--run-dir", str(tmp_path / "a"), "train.eval_every=0"]) == 2
    err = capsys.readouterr().err
    assert f"error: pretraining diverged: its last {SKIPPED_IN_A_ROW} updates (to update " in err
    assert "gave a non-finite loss and were skipped; lower train.lr (now 1e+09), and train again" in err
    assert "Traceback" not in err
    assert run.main([*base, "--run-dir", str(tmp_path / "b"), "train.eval_every=10"]) == 2
    err = capsys.readouterr().err
    assert "error: the model's set predictions are not finite: its weights diverged; lower train.lr (now 1e+09)" in err
    streak = SkipStreak("it", "x")
    for step in range(1, 3 * SKIPPED_IN_A_ROW):
        streak("loss" if step % SKIPPED_IN_A_ROW else None, step)  # one good update in every SKIPPED_IN_A_ROW
    with pytest.raises(Diverged, match=f"it diverged: its last {SKIPPED_IN_A_ROW} updates"):
        for step in range(SKIPPED_IN_A_ROW):
            streak("gradient", step)


def test_a_resume_that_fails_before_its_first_checkpoint_leaves_config_yaml_as_the_checkpoint_ran(tmp_path,
                                                                                                      monkeypatch):
    """A resume with new settings (here more steps) whose data fails at its first batch (a damaged image, say) writes
    no config.yaml: it still describes the checkpoint; the resume that gets on writes it with its first checkpoint."""
    import world_model.pretrain
    from envs.errors import DataError

    rd = tmp_path / "r"
    pretrain(tiny_cfg("train.steps=2"), str(rd), progress=False)
    before = {name: (rd / name).read_bytes() for name in ("config.yaml", "checkpoints/latest.pt")}

    def damaged(*args, **kwargs):
        raise DataError("image 3 is damaged")
        yield

    with monkeypatch.context() as patch:
        patch.setattr(world_model.pretrain, "train_batches", damaged)
        with pytest.raises(DataError, match="image 3 is damaged"):
            pretrain(tiny_cfg("train.steps=4"), str(rd), resume=True, progress=False)
    assert {name: (rd / name).read_bytes() for name in before} == before
    pretrain(tiny_cfg("train.steps=4"), str(rd), resume=True, progress=False)
    assert "  steps: 4\n" in (rd / "config.yaml").read_text()


def test_run_dir_rules(tmp_path, capsys):
    with pytest.raises(RunDirError, match="cannot resume.*start a new run without --resume"):
        pretrain(tiny_cfg("train.steps=1"), str(tmp_path / "r"), resume=True, progress=False)
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text("")  # a run stopped before its first checkpoint
    with pytest.raises(RunDirError, match="cannot resume.*holds metrics.jsonl of a run that stopped before its first "
                                          "checkpoint: remove .*early and start a new run"):
        pretrain(tiny_cfg("train.steps=1"), str(tmp_path / "early"), resume=True, progress=False)
    pretrain(tiny_cfg("train.steps=2"), str(tmp_path / "r"), progress=False)
    with pytest.raises(RunDirError, match="--resume"):
        pretrain(tiny_cfg("train.steps=2"), str(tmp_path / "r"), progress=False)
    capsys.readouterr()
    assert run.main(["pretrain", "--run-dir", str(tmp_path / "r"), *TINY]) == 2  # refused before the config dump
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: run directory {tmp_path / 'r'} already holds a checkpoint of a `run.py "
                                 f"pretrain` run; `run.py pretrain --resume {tmp_path / 'r'}` continues it, or choose "
                                 "another --run-dir\n")
    pretrain(tiny_cfg("train.steps=1"), str(tmp_path / "r"), resume=True, progress=False)  # nothing left to train
    assert ("already at step 2 of train.steps=1: it only makes its final evaluation, if that did not finish or ran "
            "with other settings; pass train.steps=N with N > 2") in capsys.readouterr().err
    assert "  steps: 2\n" in (tmp_path / "r" / "config.yaml").read_text()  # the run's length, not the override's
    with pytest.raises(ValueError, match="does not match the checkpoint in .*: model.slot_dim=16 differs from what"):
        pretrain(tiny_cfg("train.steps=3", "model.slot_dim=16"), str(tmp_path / "r"), resume=True, progress=False)
    text = (tmp_path / "r" / "config.yaml").read_text()  # edited to fewer slots than objects: that, not the slot advice
    (tmp_path / "r" / "config.yaml").write_text(text.replace("  num_slots: 4\n", "  num_slots: 2\n", 1))
    assert run.main(["pretrain", "--resume", str(tmp_path / "r"), "train.steps=3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: the config does not match the checkpoint in {tmp_path / 'r'} (was "
                                        "its config.yaml edited?): model.num_slots=2 differs from what")
    (tmp_path / "r" / "config.yaml").write_text(text)
    assert run.main(["pretrain", "--config", "configs/clevr_tiny.yaml", "model.slotz=gmm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'model.slots'" in err
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_one_step(preset):
    """Each preset's architecture, at batch 2 and 32x32 so it fits the CI budget."""
    cfg = load_config(PretrainConfig, preset, ["data.resolution=32", "train.batch_size=2", "data.pool=0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    from world_model.sources import GeneratedScenes

    batch = GeneratedScenes(cfg, torch.device("cpu")).batch(2, seed=0)
    loss, stats, _ = compute_loss(model, cfg.task, batch, cfg.model.vq.beta)
    loss.backward()
    assert torch.isfinite(loss)


def test_scene_pool_is_a_fixed_deterministic_dataset():
    from world_model.sources import GeneratedScenes

    cfg = tiny_cfg("data.pool=6")
    source = GeneratedScenes(cfg, torch.device("cpu"))
    a, b = source.batch(4, seed=1), source.batch(4, seed=1)
    torch.testing.assert_close(a["images"], b["images"])
    pool = source.pool.data["images"].float() / 255
    for img in a["images"]:
        assert (pool - img).abs().flatten(1).amax(1).min() == 0  # every image is one of the pool's
    again = GeneratedScenes(cfg, torch.device("cpu"))
    again.pool.fill(6)
    torch.testing.assert_close(again.pool.data["targets"], source.pool.data["targets"])


def test_scene_pool_fills_as_training_reaches_it(monkeypatch):
    """The first step waits for one chunk, not the whole pool; while the pool fills, step i trains on its scenes
    i*b .. (i+1)*b - 1 in order, then on uniform draws from the full pool; the pool holds the same scenes as one
    rendered whole (a chunk of 3 against batches of 2 and a pool of 8, so neither divides the other), and a source
    started at step s (a resumed run) gives step s's batch."""
    from world_model.sources import GeneratedScenes, ScenePool

    monkeypatch.setattr(ScenePool, "CHUNK", 3)
    cfg = tiny_cfg("data.pool=8", "train.batch_size=2")
    whole = GeneratedScenes(cfg, torch.device("cpu"))
    whole.pool.fill(8)
    grown = GeneratedScenes(cfg, torch.device("cpu"))
    assert grown.pool.filled == 0
    batches, filled = [], []
    for step in range(6):
        batches.append(grown.batch(2, seed=7 + step, step=step))
        filled.append(grown.pool.filled)
    assert filled == [3, 6, 6, 8, 8, 8]
    for k in ("images", "targets", "masks"):
        torch.testing.assert_close(grown.pool.data[k], whole.pool.data[k], rtol=0, atol=0)
    seen = torch.cat([b["images"] for b in batches[:4]])
    torch.testing.assert_close(seen, whole.pool.data["images"].float() / 255, rtol=0, atol=0)  # each once, in order
    for step in (4, 5):  # the pool is full: uniform draws from `seed`
        torch.testing.assert_close(batches[step]["images"], whole.batch(2, seed=7 + step)["images"], rtol=0, atol=0)
    for first_step, holds in ((2, 6), (4, 8)):
        resumed = GeneratedScenes(cfg, torch.device("cpu"), first_step=first_step)
        assert resumed.pool.filled == holds
        again = resumed.batch(2, seed=7 + first_step, step=first_step)
        for k in ("images", "targets", "masks"):
            torch.testing.assert_close(again[k], batches[first_step][k], rtol=0, atol=0)


def test_eval_ap_on_missing_clevr_root_is_one_line(tmp_path, capsys):
    rd = tmp_path / "r"
    pretrain(tiny_cfg("train.steps=1"), str(rd), progress=False)
    capsys.readouterr()
    assert run.main(["eval-ap", "--checkpoint", str(rd), "--clevr-root", str(tmp_path / "no_clevr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CLEVR" in err


@pytest.mark.parametrize("argv", [
    ["bench", "pretrain", "--batch-size", "2", "--resolution", "32", "--steps", "1", "--profile-row", "eager-fp32"],
    ["bench", "pretrain", "--batch-size", "2", "--resolution", "32", "--steps", "1", "--slots", "gmm+vq", "--rows",
     "channels_last", "--matmul-precision", "highest"],
    ["bench", "estep", "--batch-size", "2", "--steps", "1"],
    ["bench", "generator", "--batch-size", "2", "--resolution", "32", "--steps", "1"],
    ["bench", "metrics", "--steps", "1"],
    ["bench", "imagination", "--wm-config", "configs/wm_crafter_cpu.yaml", "--batch-size", "2", "--horizon", "3"],
    pytest.param(["bench", "envs", "--envs", "nethack", "--workers", "1", "--env-steps", "5", "--envs-per-worker",
                  "1,2"], marks=pytest.mark.nethack),
    ["bench", "agent", "train.batch_size=2", "--agent-config", "configs/tiny.yaml", "--env-steps", "16", "--prefill",
     "16", "--profile", "--profile-row", "fp32-math-attn"],
])
def test_bench_smoke(argv, capsys):
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    # a measurement was printed (a one-row --rows table has no ratio line: its row is checked below)
    assert "--rows" in argv or any(word in out for word in ("ratio", "scenes/s", "seconds", "efficiency", "env steps/s"))
    if "--profile" in argv or "--profile-row" in argv:
        assert "Self CPU" in out  # the profiler table
    if "agent" in argv:
        assert "train.batch_size=2" in out and "(batch 2 x 8)" in out  # the override reached the preset
        # the profile of the first row comes right after it, before the next row
        assert out.index("# where the time goes (fp32-math-attn") < out.index("+fused-attn ")
    if "envs" in argv:
        assert "1 workers x 1 envs" in out and "1 workers x 2 envs" in out and "1 processes x 2 envs, no IPC" in out
    if "--slots" in argv:
        assert "slot_attention" not in out
        assert "eager-fp32 " not in out and "gmm+vq             channels_last" in out  # --rows: that row only
        assert "(fp32 matmuls at torch's 'highest' precision, as in training)" in out
    if "pretrain" in argv and "--profile-row" in argv:  # the profile of gmm's first row comes before its next row
        assert out.index("Self CPU") < out.index("channels_last")


def test_bench_pretrain_rejects_unknown_slots_and_rows(capsys):
    assert run.main(["bench", "pretrain", "--slots", "gmm,sa"]) == 2
    assert "--slots takes gmm, slot_attention, gmm+vq, slot_attention+vq (comma-separated), got 'gmm,sa'" in \
        capsys.readouterr().err
    assert run.main(["bench", "pretrain", "--profile", "--profile-row", "+cudagraphs"]) == 2  # a CUDA-only row
    assert "--profile-row '+cudagraphs' is not one of the rows measured here: eager-fp32" in capsys.readouterr().err
    assert run.main(["bench", "pretrain", "--rows", "channels_last,+bf16"]) == 2
    assert "--rows +bf16: not rows on cpu: eager-fp32, channels_last" in capsys.readouterr().err
    assert run.main(["bench", "pretrain", "--rows", "channels_last", "--profile-row", "eager-fp32"]) == 2
    assert "--profile-row 'eager-fp32' is not one of the rows measured here: channels_last" in capsys.readouterr().err


def test_bench_pretrain_times_one_batch_not_the_presets_pool():
    from world_model.bench import bench_config

    for task in ("setpred", "discovery"):
        assert load_config(PretrainConfig, CONFIGS / f"clevr_{task}.yaml", []).data.pool > 0
        assert bench_config(task, "gmm", 32).data.pool == 0
    assert bench_config("setpred", "slot_attention+vq", 32).model.vq.enabled  # VQ-SA codes on Slot Attention
    assert not bench_config("setpred", "slot_attention", 32).model.vq.enabled


def test_pretrain_and_eval_on_a_clevr_directory(tmp_path, capsys):
    from envs.clevr import write_dataset

    write_dataset(tmp_path / "clevr", 4, split="val", seed=3, batch_size=4)
    rd = tmp_path / "r"
    cfg = tiny_cfg("data.source=clevr", f"data.root={tmp_path / 'clevr'}", "data.split=val", "train.steps=2",
                   "data.max_objects=10", "model.num_slots=10")
    result = pretrain(cfg, str(rd), progress=False)
    assert result["images"] == 4  # eval_split=val holds 4 images
    assert "data.split and data.eval_split are both 'val': the run evaluates on the images it trains on" in \
        capsys.readouterr().err
    assert run.main(["eval-ap", "--checkpoint", str(rd), "--clevr-root", str(tmp_path / "clevr"), "--images",
                     "10"]) == 0
    out, err = capsys.readouterr()
    assert f"on 4 images (CLEVR {tmp_path / 'clevr'} split val, scenes of 3-10 objects)" in out
    assert "hold 4 images, fewer than the 10 asked for (--images)" in err  # said, not silently fewer
    assert run.main(["eval-ap", "--checkpoint", str(rd), "--clevr-root", str(tmp_path / "clevr")]) == 0
    assert "hold 4 images, fewer than the 8 asked for (data.eval_images)" in capsys.readouterr().err
    assert json.loads((rd / "eval_ap_clevr_clevr_val.json").read_text())["images"] == 4  # beside eval_ap.json


def test_held_out_scenes_come_in_fixed_chunks():
    """The first N held-out scenes are the same for every N, in chunks of EVAL_CHUNK (so an evaluation's noise is)."""
    from world_model.sources import EVAL_CHUNK, eval_batches

    cfg = tiny_cfg()
    a = [b["targets"] for b in eval_batches(cfg, torch.device("cpu"), 70)]
    b = torch.cat([b["targets"] for b in eval_batches(cfg, torch.device("cpu"), 66)])
    assert [len(x) for x in a] == [EVAL_CHUNK, 70 - EVAL_CHUNK] and b.shape[0] == 66
    torch.testing.assert_close(torch.cat(a)[:66], b)


@pytest.mark.parametrize("workers", [0, 1])
def test_clevr_training_stream_equals_indexed_batches(tmp_path, workers):
    """One persistent DataLoader for the whole run yields exactly batch(size, seed_i) for each step i."""
    from envs.clevr import write_dataset
    from world_model.sources import ClevrScenes

    write_dataset(tmp_path / "clevr", 6, split="train", seed=1, batch_size=6)
    cfg = tiny_cfg("data.source=clevr", f"data.root={tmp_path / 'clevr'}", f"data.num_workers={workers}",
                   "data.max_objects=10")
    source = ClevrScenes(cfg, "train", torch.device("cpu"))
    stream = source.batches(3, iter([11, 12, 13]))
    for seed in (11, 12, 13):
        got, want = next(stream), source.batch(3, seed)
        torch.testing.assert_close(got["images"], want["images"])
        torch.testing.assert_close(got["targets"], want["targets"])


def test_an_evaluation_on_clevr_reads_through_one_data_loader(tmp_path, monkeypatch):
    """The evaluation split in fixed chunks through ONE DataLoader (with workers: one set of worker processes for the
    whole evaluation, not one per chunk), each chunk the split's images in order."""
    import torch.utils.data

    from envs.clevr import write_dataset
    from world_model.sources import ClevrScenes

    write_dataset(tmp_path / "clevr", 5, split="val", seed=1, batch_size=5)
    cfg = tiny_cfg("data.source=clevr", f"data.root={tmp_path / 'clevr'}", "data.num_workers=1", "data.max_objects=10")
    source = ClevrScenes(cfg, "val", torch.device("cpu"))
    made = []
    loader = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: made.append(1) or loader(*a, **k))
    chunks = list(source.sequential(2))
    assert len(made) == 1 and [len(c["images"]) for c in chunks] == [2, 2, 1]
    images = torch.stack([source.dataset[i]["image"] for i in range(5)])
    torch.testing.assert_close(torch.cat([c["images"] for c in chunks]), images, rtol=0, atol=0)


def test_a_frames_run_resumes_on_the_same_game_and_notes_a_moved_split(tmp_path, capsys, monkeypatch):
    """Resuming a run on env frames with another game's dataset is refused in one line; a dataset that grew moves the
    held-out frames, which a note says."""
    import numpy as np

    import world_model.sources as sources
    from envs.errors import DataError
    from envs.episodes import EpisodeWriter

    def dataset(root, env, episodes, seed):
        rng = np.random.default_rng(seed)
        w = EpisodeWriter(root, {"env": env, "num_actions": 3, "seed": seed})
        for _ in range(episodes):
            w.begin(0, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            for t in range(19):
                w.step(0, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), 0, 0.0, False, t == 18)

    frames = ["task=discovery", "data.source=frames", "data.eval_images=4", "train.eval_every=0"]
    dataset(tmp_path / "a", "crafter", 3, 0)
    dataset(tmp_path / "b", "nethack", 3, 0)
    pretrain(tiny_cfg("train.steps=2", *frames, f"data.root={tmp_path / 'a'}"), str(tmp_path / "r"), progress=False)
    with pytest.raises(DataError, match=r"this run trained on crafter frames; data.root=.*b holds nethack"):
        pretrain(tiny_cfg("train.steps=3", *frames, f"data.root={tmp_path / 'b'}"), str(tmp_path / "r"), resume=True,
                 progress=False)
    capsys.readouterr()
    dataset(tmp_path / "a", "crafter", 2, 1)  # more episodes collected into the run's dataset
    sources._dataset_frames.cache_clear()  # (read once per process)
    pretrain(tiny_cfg("train.steps=3", *frames, f"data.root={tmp_path / 'a'}"), str(tmp_path / "r"), resume=True,
             progress=False)
    assert "now holds 100 frames, the last 20 held out (at this run's last checkpoint 60, the last 20)" in \
        capsys.readouterr().err
    ckpt = tmp_path / "r" / "checkpoints" / "latest.pt"  # a run from before whole episodes were held out
    state = torch.load(ckpt, weights_only=False)
    state["frames"]["split"] = [100, 8]
    del state["frames"]["held_out_by"]
    torch.save(state, ckpt)
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "r")]) == 0
    assert (f"note: the last 20 frames of {tmp_path / 'a'} are held out, whole episodes holding data.eval_fraction of "
            "them (this run, from before that rule, held out its last 8 frames): evaluated on the new split"
            in capsys.readouterr().err)
    # eval-ap on another copy of its data (--data), in place of data.root; a generated-scene run has no such data
    (tmp_path / "a").rename(tmp_path / "a2")
    capsys.readouterr()
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "r")]) == 2
    assert f"data.root={tmp_path / 'a'}, the data {tmp_path / 'r'} trained on, does not exist; if it moved, " \
        "pass --data DIR" in capsys.readouterr().err
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "r"), "--data", str(tmp_path / "b")]) == 2
    assert f"{tmp_path / 'b'} holds nethack episodes; {tmp_path / 'r'} was trained on crafter frames" in \
        capsys.readouterr().err
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "r"), "--data", str(tmp_path / "a2"), "--clevr-root",
                     str(tmp_path)]) == 2
    assert "--data and --clevr-root name two datasets" in capsys.readouterr().err
    own = (tmp_path / "r" / "eval_ap.json").read_text()  # another dataset's evaluation goes beside it, not over it
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "r"), "--data", str(tmp_path / "a2")]) == 0
    assert json.loads((tmp_path / "r" / "eval_ap_data_a2.json").read_text())["data"] == \
        f"held-out frames of {tmp_path / 'a2'}"
    assert (tmp_path / "r" / "eval_ap.json").read_text() == own
    # a CLEVR set-prediction preset on game frames: trained as discovery, and said so below the config (where a
    # terminal shows it); its missing VQ codes too
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", sys.stdout)  # one stream, as a terminal shows them
        assert run.main(["pretrain", "--data", str(tmp_path / "a2"), "--config", "clevr_tiny", "--run-dir",
                         str(tmp_path / "c"), "--no-progress", *TINY, "data.eval_images=4", "train.steps=1"]) == 0
    out = capsys.readouterr().out
    assert "note: clevr_tiny sets task=setpred; game frames have no property targets, so --data trains object " \
        "discovery" in out and "note: clevr_tiny trains slots without VQ codes; `train-wm` and `train` need" in out
    assert out.index("\ntrain:\n") < out.index("note: clevr_tiny sets task") < out.index("step 1: ")
    assert load_config(PretrainConfig, tmp_path / "c" / "config.yaml").task == "discovery"
    # visualize shows it frames of the game it trained on, without --env
    assert run.main(["visualize", "--checkpoint", str(tmp_path / "r"), "--frames", "1", "--out", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "summary.json").read_text())["env"] == "crafter"
    pretrain(tiny_cfg("train.steps=1"), str(tmp_path / "g"), progress=False)
    capsys.readouterr()
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "g"), "--data", str(tmp_path / "a2")]) == 2
    assert ("--data is for a run pretrained on game frames (`run.py pretrain --data DIR`); "
            f"{tmp_path / 'g'} trained on data.source=generated: for CLEVR scenes on disk pass --clevr-root DIR") in \
        capsys.readouterr().err


def test_sigterm_is_handled_as_ctrl_c(tmp_path):
    """`kill` (or `timeout`, or a scheduler) stops a run as Ctrl-C does: after the step in progress, with a
    checkpoint of it even long before the next one was due; it gives up its claim (train.pid) and says how to
    resume, with exit status 143."""
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "run.py", "pretrain", "--run-dir", str(run_dir), "--no-progress", *TINY,
                             "train.steps=100000", "train.ckpt_every=100000", "train.threads=1"],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = ""  # the config, then a log row: training is under way
    while not line.startswith("step ") and proc.poll() is None:
        line = proc.stdout.readline()
    assert line.startswith("step 2/100000: loss=")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    step = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)["step"]
    lines = [line for line in err.splitlines() if line]
    assert step >= 2 and lines[-2] == ("SIGTERM: stopping after this step, with a checkpoint (a second SIGTERM stops "
                                       "at once, from the last checkpoint)")
    assert lines[-1] == (f"terminated (SIGTERM); `python run.py pretrain --resume {run_dir}` continues from its last "
                         f"checkpoint (step {step})")
    assert not (run_dir / "train.pid").exists()


class SignalsSeen(torch.utils.data.Dataset):
    """A dataset whose items say, as their target, whether the process that loaded them ignores Ctrl-C and SIGTERM."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        import signal

        ignored = [float(signal.getsignal(s) is signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]
        return {"image": self.inner[i]["image"], "target": torch.tensor(ignored)}


def test_data_workers_leave_ctrl_c_and_sigterm_to_the_run(tmp_path):
    """A terminal's Ctrl-C (a scheduler's SIGTERM) reaches every process of the run: DataLoader workers ignore it, so
    none dies under a batch the run's last step still reads; the run stops after that step and they go with it."""
    from envs.clevr import write_dataset
    from world_model.sources import ClevrScenes

    write_dataset(tmp_path / "clevr", 4, split="train", seed=1, batch_size=4, max_objects=4)
    cfg = tiny_cfg("data.source=clevr", f"data.root={tmp_path / 'clevr'}", "data.num_workers=1")
    source = ClevrScenes(cfg, "train", torch.device("cpu"))
    source.dataset = SignalsSeen(source.dataset)
    assert next(source.batches(2, iter([0])))["targets"].tolist() == [[1.0, 1.0]] * 2  # training batches
    assert source.batch(2, 0)["targets"].tolist() == [[1.0, 1.0]] * 2  # evaluation batches


def test_an_image_a_data_worker_cannot_read_is_the_same_one_line_error(tmp_path, capsys, monkeypatch):
    """data.num_workers > 0: a wrong-size image found in a worker is the error it is without workers (torch raises
    it again with the worker's traceback in its message), in training and evaluation batches alike."""
    import multiprocessing

    from PIL import Image

    import envs.clevr
    from envs.clevr import write_dataset
    from envs.errors import DataError
    from world_model.sources import ClevrScenes

    write_dataset(tmp_path / "clevr", 2, split="train", seed=1, batch_size=2, max_objects=4)
    monkeypatch.setattr(envs.clevr, "FRAME_SAMPLE", 0)  # an image the check on opening does not sample
    image = next((tmp_path / "clevr" / "images" / "train").iterdir())
    Image.new("RGB", (320, 240)).save(image)
    messages = []
    for workers in (0, 1):
        cfg = tiny_cfg("data.source=clevr", f"data.root={tmp_path / 'clevr'}", f"data.num_workers={workers}")
        source = ClevrScenes(cfg, "train", torch.device("cpu"))
        for read in (lambda: next(source.batches(2, iter([0]))), lambda: source.batch(2, 0)):
            with pytest.raises(DataError) as e:
                read()
            messages.append(str(e.value))
            # its workers gone with it: kept alive by the error, they would hold the interpreter's exit forever
            assert not multiprocessing.active_children()
    assert len(set(messages)) == 1 and image.name in messages[0] and "320x240" in messages[0]
    assert "\n" not in messages[0] and "Traceback" not in messages[0]
    # met by a run with its progress bar: the error comes on a line of its own, and no bar is drawn after it
    assert run.main(["pretrain", "--run-dir", str(tmp_path / "r"), *TINY, "data.source=clevr",
                     f"data.root={tmp_path / 'clevr'}", "data.split=train", "data.eval_split=train"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"\nerror: {messages[0]}\n") and err.count("error:") == 1


def test_data_workers_go_with_any_error(tmp_path, monkeypatch):
    """Not only a DataError: a worker's other error (a bug), and the run's own error while its training loader's
    workers are alive, take the workers with them. Kept alive by the error's traceback, workers that ignore SIGTERM
    would hold the interpreter's exit forever."""
    import multiprocessing

    import envs.clevr
    import world_model.pretrain
    from envs.clevr import write_dataset
    from world_model.sources import ClevrScenes

    write_dataset(tmp_path / "clevr", 4, split="train", seed=1, batch_size=4, max_objects=4)
    cfg = tiny_cfg("data.source=clevr", f"data.root={tmp_path / 'clevr'}", "data.num_workers=1", "data.split=train",
                   "data.eval_split=train", "data.eval_images=4", "train.steps=4")
    read_image = envs.clevr.ClevrDataset.__getitem__

    def buggy(self, i):
        raise ValueError("a bug in a worker")

    with monkeypatch.context() as patch:
        patch.setattr(envs.clevr.ClevrDataset, "__getitem__", buggy)
        source = ClevrScenes(cfg, "train", torch.device("cpu"))
        for read in (lambda: next(source.batches(2, iter([0]))), lambda: source.batch(2, 0)):
            with pytest.raises(ValueError, match="a bug in a worker"):
                read()
            assert not multiprocessing.active_children()
    assert envs.clevr.ClevrDataset.__getitem__ is read_image
    losses, calls = world_model.pretrain.compute_loss, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in the run")
        return losses(*args, **kwargs)

    monkeypatch.setattr(world_model.pretrain, "compute_loss", failing)
    with pytest.raises(RuntimeError, match="a bug in the run"):
        pretrain(cfg, str(tmp_path / "r"), progress=False)
    assert not multiprocessing.active_children()


def test_a_split_written_at_another_size_is_refused_before_the_first_step(tmp_path, capsys):
    """The check on opening samples each split's frames (the first and last file among them), so a held-out split
    resized whole is refused at start, not at the run's first evaluation."""
    from PIL import Image

    from envs.clevr import ClevrDataset, write_dataset
    from envs.errors import DataError

    root = tmp_path / "clevr"
    for split in ("train", "val"):
        write_dataset(root, 8, split=split, seed=1, batch_size=8, max_objects=4)  # data.eval_images=8 of TINY
    last = sorted((root / "masks" / "val").iterdir())[-1]
    Image.open(last).resize((320, 240), Image.Resampling.NEAREST).save(last)
    with pytest.raises(DataError, match=f"{last.name} is 320x240, not CLEVR v1.0's 3:2 frame"):
        ClevrDataset(root, split="val")
    assert run.main(["pretrain", "--run-dir", str(tmp_path / "r"), *TINY, "data.source=clevr", f"data.root={root}",
                     "data.split=train", "data.eval_split=val"]) == 2
    err = capsys.readouterr().err
    assert "error: the evaluation split (data.eval_split=val): " in err and last.name in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_run_that_fails_in_python_gives_up_its_claim_and_writes_its_logs(tmp_path, monkeypatch):
    """pretrain() called from Python (no run.py to clean up after it) that fails mid-run: train.pid is gone, so
    another process may resume there, and the tensorboard scalars logged before the failure are on disk."""
    from stopping import raising_at_call
    import world_model.pretrain as pt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(pt, "compute_loss", raising_at_call(pt.compute_loss, 5, RuntimeError("a failure mid-run")))
    with pytest.raises(RuntimeError, match="a failure mid-run"):
        pretrain(tiny_cfg("train.steps=10", "train.log_every=2"), str(tmp_path / "r"), progress=True)
    assert not (tmp_path / "r" / "train.pid").exists()
    events = EventAccumulator(str(tmp_path / "r" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]


def test_ctrl_c_is_one_line_with_the_way_back(tmp_path, monkeypatch, capsys):
    import world_model.pretrain as pt

    from world_model.rundir import start_run

    real = pt.pretrain

    def interrupted(cfg, run_dir, resume, progress):  # stopped after claiming the run directory
        start_run(run_dir, resume, "cpu", 0, 0)
        assert (Path(run_dir) / "train.pid").is_file()
        raise KeyboardInterrupt

    monkeypatch.chdir(CONFIGS.parent)
    assert run.main(["pretrain", "--run-dir", str(tmp_path / "r"), "--no-progress", *TINY, "train.steps=1"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(pt, "pretrain", interrupted)
    assert run.main(["pretrain", "--run-dir", str(tmp_path / "r"), "--no-progress", "--resume", "train.steps=2"]) == 130
    err = capsys.readouterr().err.strip()  # stopped before a checkpoint of its own: its override goes along
    assert err == f"interrupted; `python run.py pretrain --resume {tmp_path / 'r'} train.steps=2` continues from its " \
                  "last checkpoint (step 1)"
    from tqdm import tqdm

    bars = []  # the bar a stopped run leaves open (its frame held by the traceback) is closed before the message, not
               # redrawn below it when the traceback goes

    def interrupted_under_a_bar(cfg, run_dir, resume, progress):
        bars.append(tqdm(total=2, desc="training"))
        bars[0].update(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "pretrain", interrupted_under_a_bar)
    assert run.main(["pretrain", "--run-dir", str(tmp_path / "r"), "--no-progress", "--resume", "train.steps=2"]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert bars[0].disable and any("training:  50%" in line for line in lines)  # closed (tqdm's close disables it)
    assert lines[-1].startswith("interrupted; `python run.py pretrain --resume")
    monkeypatch.setattr(pt, "pretrain", interrupted)
    monkeypatch.chdir(tmp_path)  # run.py as it is reached from there
    assert run.main(["pretrain", "--run-dir", "r", "--no-progress", "--resume", "train.steps=2"]) == 130
    assert capsys.readouterr().err.strip() == (f"interrupted; `python {CONFIGS.parent / 'run.py'} pretrain --resume r "
                                               "train.steps=2` continues from its last checkpoint (step 1)")
    assert run.main(["pretrain", "--run-dir", str(tmp_path / "new"), "--no-progress", *TINY]) == 130
    err = capsys.readouterr().err.strip()  # stopped before writing anything: its directory is gone again
    assert err == f"interrupted; it stopped before writing anything to {tmp_path / 'new'}, so there is nothing to " \
                  "resume or remove"
    # the claim goes with the process: the resumed run keeps its directory, the new one left nothing behind
    assert not (tmp_path / "r" / "train.pid").exists() and (tmp_path / "r" / "checkpoints").is_dir()
    assert not (tmp_path / "new").exists()

    def interrupted_after_logs(cfg, run_dir, resume, progress):  # stopped before its first checkpoint
        start_run(run_dir, resume, "cpu", 0, 0)
        (Path(run_dir) / "metrics.jsonl").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "pretrain", interrupted_after_logs)
    assert run.main(["pretrain", "--run-dir", str(tmp_path / "logs"), "--no-progress", *TINY]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted; {tmp_path / 'logs'} has no checkpoint yet (train.ckpt_every), so there is nothing to resume: "
        "remove it to start again")

    def interrupted_after_its_config(cfg, run_dir, resume, progress):  # config.yaml written, no log yet
        start_run(run_dir, resume, "cpu", 0, 0)
        (Path(run_dir) / "config.yaml").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "pretrain", interrupted_after_its_config)
    argv = ["pretrain", "--run-dir", str(tmp_path / "cfg"), "--no-progress", *TINY, "train.steps=1"]
    assert run.main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(f"so there is nothing to resume: the same command with --run-dir "
                                                    f"{tmp_path / 'cfg'} starts it again")
    monkeypatch.setattr(pt, "pretrain", real)
    assert run.main(argv) == 0  # as said


def test_a_stopped_evaluation_loses_no_training_step(tmp_path, monkeypatch, capsys):
    """The checkpoint of a step is written before that step's evaluation: Ctrl-C during the final evaluation keeps
    every step, and resuming the finished run evaluates it."""
    import world_model.pretrain as pt
    from world_model.rundir import RunDir

    evaluate = pt.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "evaluate", interrupted)
    rd = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(tiny_cfg("train.steps=3", "train.ckpt_every=2", "train.eval_every=0"), str(rd), progress=False)
    assert RunDir(rd).load_checkpoint()["step"] == 3
    monkeypatch.setattr(pt, "evaluate", evaluate)
    capsys.readouterr()
    result = pt.pretrain(tiny_cfg("train.steps=3", "train.ckpt_every=2", "train.eval_every=0"), str(rd), resume=True,
                         progress=False)
    out = capsys.readouterr().out  # said, as a run's own is, before it runs and after
    assert result["images"] == 8
    assert out.index("step 3: evaluating on held-out images\n") < out.index("step 3: images=8, ")


def test_a_resume_continues_what_the_run_trained_as(tmp_path, capsys):
    """Resume overrides may lengthen or re-schedule a run (train.*), not change its model or data: refused in one
    line before anything is written, so config.yaml keeps describing the checkpoint."""
    rd = tmp_path / "r"
    assert run.main(["pretrain", "--run-dir", str(rd), "--no-progress", *TINY, "train.steps=1"]) == 0
    saved = (rd / "config.yaml").read_text()
    capsys.readouterr()
    for change in ("model.num_slots=5", "model.cnn_channels=[4,4]", "data.resolution=8"):
        assert run.main(["pretrain", "--run-dir", str(rd), "--resume", "--no-progress", change, "train.steps=2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{change.split('=')[0]}=" in err and "start a new run" in err, err
        assert (rd / "config.yaml").read_text() == saved
    assert run.main(["pretrain", "--run-dir", str(rd), "--resume", "--no-progress", "train.steps=2",
                     "train.eval_every=0"]) == 0
    assert run.main(["pretrain", "--resume", str(rd), "--config", "clevr_tiny", "train.steps=2"]) == 2
    assert "--config clevr_tiny would not apply" in capsys.readouterr().err
    # the same run named by --resume itself, as `train --resume RUN` does; an override right after the flag
    assert run.main(["pretrain", "--resume", str(rd), "--no-progress", "train.steps=3"]) == 0
    assert run.main(["pretrain", "--run-dir", str(rd), "--no-progress", "--resume", "train.steps=4"]) == 0
    assert RunDir(rd).load_checkpoint()["step"] == 4


def test_data_flag_and_a_contradicting_source_are_refused(tmp_path, capsys):
    assert run.main(["pretrain", "--data", str(tmp_path), "data.source=generated"]) == 2
    assert "data.source=generated contradicts it" in capsys.readouterr().err
    assert run.main(["pretrain", "--data", str(tmp_path), f"data.root={tmp_path / 'other'}"]) == 2
    assert f"data.root={tmp_path / 'other'} contradicts it" in capsys.readouterr().err


def test_a_clevr_run_checks_its_eval_split_before_training(tmp_path, capsys):
    """A missing or broken eval split fails before the first step, not after training; a split smaller than a batch
    is said, and its batches hold all of it."""
    from envs.clevr import ClevrDataset, write_dataset
    from envs.errors import DataError

    root = tmp_path / "clevr"
    write_dataset(root, 1, split="train", seed=3, batch_size=1)
    cfg = tiny_cfg("data.source=clevr", f"data.root={root}", "train.steps=2", "data.max_objects=10",
                   "model.num_slots=10", "data.eval_images=1")
    with pytest.raises(DataError, match=r"data.eval_split=val: CLEVR images dir .*images/val not found: .*holds the "
                       r"split train, not val"):
        pretrain(cfg, str(tmp_path / "r"), progress=False)
    assert run.main(["pretrain", "--data", str(root), "--run-dir", str(tmp_path / "r3"), "--no-progress"]) == 2
    assert f"{root} is a CLEVR root, not an episode dataset: pretrain on it with data.source=clevr" in \
        capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()
    write_dataset(root, 1, split="val", seed=4, batch_size=1)
    assert pretrain(cfg, str(tmp_path / "r2"), progress=False)["images"] == 1
    assert "the training data holds 1 images, fewer than train.batch_size=2" in capsys.readouterr().err
    rows = [r for r in read_jsonl(tmp_path / "r2" / "metrics.jsonl") if "train/images_per_s" in r]
    assert rows and all(r["train/images_per_s"] > 0 for r in rows)
    calls = []  # a training image found damaged mid-run: the error keeps the run and says how it goes on
    real_getitem = ClevrDataset.__getitem__

    def damaged_at_fifth(self, i):
        calls.append(i)
        if len(calls) == 5:
            raise DataError(f"CLEVR image {self.filenames[i]} is damaged")
        return real_getitem(self, i)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClevrDataset, "__getitem__", damaged_at_fifth)
        assert run.main(["pretrain", "--config", "clevr_tiny", "--run-dir", str(tmp_path / "r4"), "--no-progress",
                         "data.source=clevr", f"data.root={root}", "data.split=val", "train.steps=4",
                         "train.ckpt_every=1", "train.batch_size=1", "data.eval_images=1", "train.eval_every=0",
                         "data.max_objects=10", "model.num_slots=10"]) == 2
    step = torch.load(tmp_path / "r4" / "checkpoints" / "latest.pt", weights_only=False)["step"]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: CLEVR image CLEVR_val_000000.png is damaged (the run is kept: fix the data, then `python run.py "
        f"pretrain --resume {tmp_path / 'r4'}` continues from its last checkpoint (step {step}))")
    moved = tmp_path / "moved"  # the data moved: eval-ap names it and the way on, in one line
    (root / "images" / "val").rename(tmp_path / "val_images")  # moved out of the root first: the resume says both
    assert run.main(["pretrain", "--resume", str(tmp_path / "r2"), "train.steps=9"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"(if {tmp_path / 'r2'}'s data moved, resume with data.root=ITS_NEW_PATH)")
    (tmp_path / "val_images").rename(root / "images" / "val")
    root.rename(moved)
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "r2")]) == 2
    assert (f"data.root={root}, the data {tmp_path / 'r2'} trained on, does not exist; if it moved, pass --clevr-root "
            "DIR (its split val, the run's data.eval_split, is read there)" in capsys.readouterr().err)
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "r2"), "--clevr-root", str(moved)]) == 0
    out = capsys.readouterr().out
    assert (f"on 1 images (CLEVR {moved} split val, scenes of 3-10 objects); AP, accuracies and objectness in %; "
            "coord_err in scene units; empty_slots per image:") in out
    assert (tmp_path / "r2" / "eval_ap_clevr_moved_val.json").is_file()  # beside those on other roots
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "r2"), "--split", "train"]) == 2
    assert "if it moved, pass --clevr-root DIR (its split train is read there)" in capsys.readouterr().err
    viz = ["visualize", "--checkpoint", str(tmp_path / "r2"), "--frames", "1", "--out", str(tmp_path / "v")]
    assert run.main(viz) == 2 and "if it moved, pass --clevr-root DIR" in capsys.readouterr().err
    assert run.main(viz + ["--clevr-root", str(moved)]) == 0 and len(list((tmp_path / "v").glob("frame_*.png"))) == 1
    assert run.main(viz[:-4] + ["--frames", "3", "--out", str(tmp_path / "v"), "--clevr-root", str(moved)]) == 0
    assert f"note: {moved} split val holds 1 scenes, fewer than the 3 asked for: shown those" in capsys.readouterr().err
    assert run._units({"fg_ari": 1.0, "mse": 0.1, "empty_slots": 2}) == ("FG-ARI in %; mse of pixel values in [0, 1]; "
                                                                        "empty_slots per image")  # a discovery run
    pretrain(tiny_cfg("train.steps=1", "data.pool=1", "train.eval_every=0"), str(tmp_path / "p"), progress=False)
    assert "the training data holds 1 images, fewer than train.batch_size=2" in capsys.readouterr().err  # a pool too


def test_set_prediction_with_fewer_slots_than_objects_is_refused_before_the_run_starts(tmp_path, capsys):
    """A scene of data.max_objects objects needs as many slots: refused before anything is written or printed, not
    at the first batch holding such a scene (hours in, with checkpoints of a run no resume could fix)."""
    assert run.main(["pretrain", "--config", "clevr_tiny", "--run-dir", str(tmp_path / "r"), "model.num_slots=9"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == ("error: model.num_slots=9 is fewer than data.max_objects=10: set prediction gives each "
                           "object a slot of its own; set model.num_slots >= data.max_objects, or lower "
                           "data.max_objects")
    assert out == "" and not (tmp_path / "r").exists()
    assert preflight(load_config(PretrainConfig, "clevr_tiny", ["model.num_slots=6", "data.max_objects=6"])) == []
    assert preflight(load_config(PretrainConfig, "clevr_discovery_cpu", ["model.num_slots=7"])) == []  # CLEVR6
    assert preflight(load_config(PretrainConfig, "clevr_discovery_cpu", ["model.num_slots=4"])) == [  # may share
        "note: model.num_slots=4 holds at most 3 objects beside the background, and scenes have up to "
        "data.max_objects=6: objects will share slots, which lowers FG-ARI (the paper's CLEVR6: 7 slots, 6 objects)"]


def test_compare_puts_the_runs_last_evaluations_side_by_side(tmp_path, capsys):
    """Two tiny set-prediction runs, GMM and Slot Attention: a column per run under the settings that tell them
    apart, a row per logged evaluation key (the AP table first) with the numbers of metrics.jsonl; a run without an
    evaluation yet is a column of '-'; runs of two commands, runs none of which evaluated and a folder that is no run
    are one-line errors; settings their task does not read (a set-prediction run's decoder) are no row."""
    import shutil

    for slots in ("gmm", "slot_attention"):
        pretrain(tiny_cfg("train.steps=2", f"model.slots={slots}"), str(tmp_path / slots), progress=False)
    capsys.readouterr()
    assert run.main(["compare", str(tmp_path / "gmm"), str(tmp_path / "slot_attention")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if not line.startswith("-")}
    assert list(rows)[:7] == ["run", "task", "slots", "num_slots", "data", "step", "AP_inf"]
    assert rows["run"] == rows["slots"] == ["gmm", "slot_attention"] and rows["step"] == ["2", "2"]
    for i, slots in enumerate(("gmm", "slot_attention")):
        logged = [r for r in read_jsonl(tmp_path / slots / "metrics.jsonl") if "eval/AP_inf" in r][-1]
        assert rows["AP_0.5"][i] == f"{logged['eval/AP_0.5']:.4g}" and rows["objectness"][i] == \
            f"{logged['eval/objectness']:.4g}"
    wm = tmp_path / "wm"  # a world-model run's files, as far as compare reads them
    wm.mkdir()
    shutil.copy(CONFIGS / "wm_crafter_cpu.yaml", wm / "config.yaml")
    assert run.main(["compare", str(tmp_path / "gmm"), str(wm)]) == 2
    assert "compare takes runs of one command; these are runs of pretrain and train-wm" in capsys.readouterr().err
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(tmp_path / "gmm" / "config.yaml", early / "config.yaml")
    assert run.main(["compare", str(tmp_path / "gmm"), str(early)]) == 0  # a run on its way: a column of '-'
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if not line.startswith(("-", "note"))}
    assert rows["step"] == ["2", "-"] and rows["AP_inf"][1] == "-" and rows["AP_inf"][0] != "-"
    assert lines[-1] == f"note: no evaluation logged yet: {early}"
    assert not any("unequal samples" in line for line in lines)  # a run yet to evaluate has no sample size
    assert run.main(["compare", str(early)]) == 2  # none has evaluated: nothing to compare
    assert f"{early}: no evaluation logged yet" in capsys.readouterr().err
    assert run.main(["compare", str(tmp_path)]) == 2
    assert f"no run at {tmp_path} " in (err := capsys.readouterr().err)
    assert "expected a run directory made by `run.py pretrain`, `train-wm` or `train`" in err
    (tmp_path / "again").mkdir()  # two runs of one folder name: named by their paths
    shutil.copytree(tmp_path / "gmm", tmp_path / "again" / "gmm")
    assert run.main(["compare", str(tmp_path / "gmm"), str(tmp_path / "again" / "gmm")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", str(tmp_path / "gmm"), str(tmp_path / "again" / "gmm")]
    assert not lines[-1].startswith("note")  # both evaluated on 8 images
    metrics = tmp_path / "again" / "gmm" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"eval/images": 8', '"eval/images": 4'))
    assert run.main(["compare", str(tmp_path / "gmm"), str(tmp_path / "again" / "gmm")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "note: evaluated on unequal samples: images (8, 4)"
    config = tmp_path / "again" / "gmm" / "config.yaml"  # evaluated on CLEVR6-like scenes: other held-out images
    config.write_text(config.read_text().replace("max_objects: 4", "max_objects: 6").replace("crop: false", "crop: true"))
    assert run.main(["compare", str(tmp_path / "gmm"), str(tmp_path / "again" / "gmm")]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "note: evaluated on unequal samples: images (8, 4)",
        "note: evaluated under other settings: data.crop (false, true); data.max_objects (4, 6)"]
    config.write_text(config.read_text().replace("decoder_channels: 8", "decoder_channels: 16")
                      .replace("head_hidden: 16", "head_hidden: 32"))
    assert run.main(["compare", str(tmp_path / "gmm"), str(tmp_path / "again" / "gmm")]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["model.head_hidden"] == ["16", "32"] and "model.decoder_channels" not in rows  # setpred: no decoder


def test_a_data_root_that_the_source_would_not_read_is_refused():
    from world_model.config import ConfigError

    with pytest.raises(ConfigError, match="data.root=somewhere is set but data.source=generated renders its own"):
        tiny_cfg("data.root=somewhere")


def test_an_evaluation_stopped_midway_is_run_on_resume(tmp_path, monkeypatch):
    """The checkpoint is written before each evaluation (here at step 2, between checkpoints every 3 steps); a run
    stopped during that evaluation runs it first when it resumes, so no evaluation is lost."""
    import world_model.pretrain as pretraining
    from stopping import interrupted_once

    monkeypatch.setattr(pretraining, "evaluate", interrupted_once(pretraining.evaluate))
    cfg = tiny_cfg("train.steps=4", "train.eval_every=2", "train.ckpt_every=3")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, str(tmp_path / "r"), progress=False)
    assert RunDir(tmp_path / "r").load_checkpoint()["step"] == 2
    pretrain(cfg, str(tmp_path / "r"), resume=True, progress=False)
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "eval/AP_inf" in r] == [2, 4]


def test_a_log_row_holds_the_mean_of_the_updates_since_the_last_row(tmp_path, monkeypatch):
    """`train/loss` averages every update since the previous row (a skipped one left out), not one noisy batch."""
    import world_model.pretrain as pt

    real, losses = pt.compute_loss, []

    def recorded(model, task, batch, beta):
        loss, stats, out = real(model, task, batch, beta)
        losses.append(float(loss.detach()))
        return (loss * float("nan") if len(losses) == 4 else loss), stats, out

    monkeypatch.setattr(pt, "compute_loss", recorded)
    pretrain(tiny_cfg("train.steps=4", "train.log_every=2", "train.eval_every=0"), str(tmp_path / "r"),
             progress=False)
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4] and len(set(losses)) == 4
    assert [r["train/loss"] for r in rows] == pytest.approx([(losses[0] + losses[1]) / 2, losses[2]], rel=1e-5)


def test_lr_factor_warms_up_linearly_then_decays_exponentially():
    from world_model.updates import lr_factor

    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # the world model's: warmup only
    assert lr_factor(0, 0) == 1.0 and lr_factor(200, 0, 0.5, 100) == pytest.approx(0.25)
    assert lr_factor(1, 4, 0.5, 2) == pytest.approx(0.5 * 0.5 ** 0.5)  # both at once


def test_bench_refuses_overrides_and_options_it_would_ignore(capsys):
    """Overrides (bench agent's preset) and another bench's options are refused before anything is measured; the
    table of what each bench reads covers every bench option of the parser."""
    from world_model.bench import USES

    assert run.main(["bench", "metrics", "--steps", "1", "train.batch_size=8"]) == 2
    assert "bench metrics takes no key=value overrides (train.batch_size=8)" in capsys.readouterr().err
    assert run.main(["bench", "estep", "--steps", "1", "--profile", "--task", "discovery"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "bench estep does not use --profile, --task (it reads --batch-size, --steps, --device)" in err
    parser = run.build_parser()._subparsers._group_actions[0].choices["bench"]
    options = {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "device")}
    assert set().union(*USES.values()) == options


def test_an_update_with_a_non_finite_gradient_is_skipped():
    """A finite loss whose gradient is not (sqrt at 0): guarded_update reports "gradient", leaves the weight as it was
    and no gradient behind, and logs no grad_norm."""
    from world_model.updates import guarded_update

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    stats = {}
    assert guarded_update(torch.sqrt(p).sum(), [p], opt, 1.0, stats) == "gradient"
    assert p.item() == 0.0 and p.grad is None and "grad_norm" not in stats
    q = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([q], lr=0.5)
    assert guarded_update((3 * q).sum(), [q], opt, 10.0, stats) is None  # grad 3, within the clip: q = 1 - 1.5
    assert q.item() == pytest.approx(-0.5) and float(stats["grad_norm"]) == pytest.approx(3.0)


def test_discovery_evaluation_mse_is_per_pixel_over_every_image(capsys):
    """evaluate's discovery MSE divides the summed squared error by every pixel entry of every image: two black
    3x4x4 images reconstructed as mid-gray score 0.25 (per image of the batch it would be 0.5)."""
    from types import SimpleNamespace

    from world_model.config import PretrainConfig, load_config
    from world_model.pretrain import evaluate

    class Gray(nn.Module):
        def forward(self, images):
            b = images.shape[0]
            enc = SimpleNamespace(attn=torch.full((b, 2, 16), 0.5))
            return enc, SimpleNamespace(recon=torch.full_like(images, 0.5), masks=torch.ones(b, 2, 1, 4, 4) / 2)

    cfg = load_config(PretrainConfig, None, ["task=discovery", "train.amp=false"])
    result = evaluate(Gray(), cfg, torch.device("cpu"), 2, batches=iter([{"images": torch.zeros(2, 3, 4, 4)}]))
    assert result["images"] == 2 and result["mse"] == pytest.approx(0.25) and result["empty_slots"] == 0
    assert capsys.readouterr().err == ""  # no bar unless asked
    again = evaluate(Gray(), cfg, torch.device("cpu"), 2, batches=iter([{"images": torch.zeros(2, 3, 4, 4)}]),
                     progress=True)
    assert again == result and re.search(r"evaluating: .*/2 \[", capsys.readouterr().err)  # a bar over 2 images


def test_bench_timer_is_seconds_per_timed_call_after_warmup(monkeypatch):
    """_timeit with a clock that each call moves by 2 s: the first call 2 s, then warmup - 1 untimed calls, then
    `steps` timed ones, 2 s each."""
    import types

    from world_model import bench

    clock, calls = [0.0], []

    def fn():
        clock[0] += 2.0
        calls.append(1)

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert bench._timeit(fn, torch.device("cpu"), steps=3, warmup=2) == (2.0, 2.0)
    assert len(calls) == 1 + 1 + 3


def test_bench_pretrain_and_estep_ratios_from_fixed_timings(monkeypatch, capsys):
    """Batch 2 at 0.5, 0.25, 1.0 and 0.4 s per step (gmm eager, gmm channels_last, slot attention eager, slot
    attention channels_last): 4, 8, 2 and 5 img/s, so gmm/slot_attention 2.00 and 1.60, channels_last/eager 2.00
    (gmm) and 2.50 (slot attention). E-step at 0.5 s (materialized) and 0.125 s (expanded): 4 and 16 img/s, 4.00."""
    import argparse
    import types

    from world_model import bench

    pers = iter([0.5, 0.25, 1.0, 0.4, 0.5, 0.125])
    monkeypatch.setattr(bench, "_timeit", lambda fn, device, steps, warmup=2: (next(pers), 0.1))
    monkeypatch.setattr(bench, "build_model", lambda cfg: nn.Linear(1, 1))
    monkeypatch.setattr(bench, "GeneratedScenes", lambda cfg, device: types.SimpleNamespace(
        batch=lambda n, seed: {"images": torch.zeros(n, 3, 32, 32)}))
    args = argparse.Namespace(resolution=32, batch_size=2, rows=None, slots="gmm,slot_attention", compile=False,
                              matmul_precision=None, steps=1, task="setpred", profile=False, profile_row=None,
                              profile_rows=5)
    bench.bench_pretrain(args, torch.device("cpu"))
    out = capsys.readouterr().out
    assert [line.split()[2] for line in out.splitlines()[2:6]] == ["4.0", "8.0", "2.0", "5.0"]
    for line in ("ratio gmm/slot_attention (eager-fp32): 2.00", "ratio gmm/slot_attention (channels_last): 1.60",
                 "ratio channels_last/eager-fp32 (gmm): 2.00", "ratio channels_last/eager-fp32 (slot_attention): 2.50"):
        assert line in out.splitlines()
    bench.bench_estep(argparse.Namespace(batch_size=2, steps=1), torch.device("cpu"))
    out = capsys.readouterr().out
    assert "ratio expanded/materialized: 4.00" in out.splitlines()
    assert [line.split()[-2] for line in out.splitlines()[1:3]] == ["4.0", "16.0"]


def test_bench_envs_efficiencies_from_fixed_rates(monkeypatch, capsys):
    """2 workers: one core 100 steps/s; 2 processes without IPC 300 with 1 env each, 500 with 2 (efficiency 1.50 and
    2.50 of 2 x 100); vector envs of 1 and 2 envs per worker 150 and 300 (0.75 and 1.50 of two cores; 0.50 and 0.60
    of the no-IPC rate of the same envs). Unknown games are refused before anything runs."""
    import argparse
    import types

    import envs.collect
    import envs.throughput
    import envs.vector
    from world_model import bench

    monkeypatch.setattr(envs.collect, "env_fn", lambda name, stats_path=None: name)
    monkeypatch.setattr(envs.vector, "make_vector_env", lambda fn, n, envs_per_worker=1, asynchronous=True:
                        types.SimpleNamespace(per=envs_per_worker, sync=not asynchronous, close=lambda: None))
    monkeypatch.setattr(envs.throughput, "measure_steps_per_second",
                        lambda venv, steps: 100.0 if venv.sync else 150.0 * venv.per)
    monkeypatch.setattr(envs.throughput, "measure_independent_steps_per_second",
                        lambda fn, workers, steps, envs_per_process: 100.0 + 200.0 * envs_per_process)
    bench.bench_envs(argparse.Namespace(workers=2, env_steps=5, envs_per_worker="1,2", envs="crafter"),
                     torch.device("cpu"))
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows[0][-1] == "100" and rows[1][-2:] == ["300", "1.50"] and rows[2][-3:] == ["150", "0.75", "0.50"]
    assert rows[3][-2:] == ["500", "2.50"] and rows[4][-3:] == ["300", "1.50", "0.60"]
    for games in ("crafter,", "toy"):
        with pytest.raises(ValueError, match="--envs takes crafter and/or nethack"):
            bench.bench_envs(argparse.Namespace(workers=2, env_steps=5, envs_per_worker="1", envs=games),
                             torch.device("cpu"))


def test_bench_imagination_rates_from_a_fixed_clock(monkeypatch, capsys):
    """3 imagined steps of 2 trajectories: 0.5 s with the KV cache (12 steps/s), 2 s without (3 steps/s): 4.0x."""
    import argparse
    import types

    from world_model import bench

    ticks = iter([0.0, 0.5, 1.0, 3.0])
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    bench.bench_imagination(argparse.Namespace(wm_config=str(CONFIGS / "wm_crafter_cpu.yaml"), batch_size=2, horizon=3),
                            torch.device("cpu"))
    out = capsys.readouterr().out.splitlines()
    assert out[-3].split() == ["with", "KV", "cache", "12", "steps/s"] and out[-2].split() == ["without", "3", "steps/s"]
    assert out[-1] == "ratio 4.0x"
