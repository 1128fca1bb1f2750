"""Collection into episode datasets, a killed crafter worker, and the visualize command end to end."""
import json
import os
import signal
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import run
from envs.errors import DataError, UsageError
from envs.collect import Collector, collect, env_fn
from envs.crafter import CrafterEnv
from envs.episodes import EpisodeWriter, iter_episodes, read_meta
from envs.vector import ResilientVectorEnv
from world_model.config import load_run_config


def test_collect_stores_at_least_the_frames_asked_for(tmp_path):
    """Episodes of 11 frames: the 100th frame would be a new episode's lone first frame, which is not stored (nothing
    follows it), so collection goes on a step: 101 frames, 9 episodes and a cut 2-frame one, not 99."""
    out = collect("crafter", 100, str(tmp_path / "d"), seed=5, progress=False, env_kwargs={"max_episode_steps": 10},
                  asynchronous=False)
    lengths = [len(e["image"]) for e in iter_episodes(tmp_path / "d")]
    assert out["frames"] == sum(lengths) == 101 and lengths == [11] * 9 + [2]


def test_collect_crafter_with_workers(tmp_path):
    out = collect("crafter", 40, str(tmp_path / "d"), num_envs=2, envs_per_worker=2, seed=5, progress=False,
                  env_kwargs={"max_episode_steps": 12})
    assert out["frames"] == 40 and out["restarts"] == 0
    meta = read_meta(tmp_path / "d")
    assert meta["env"] == "crafter" and meta["num_actions"] == 17 and meta["image_shape"] == [64, 64, 3]
    eps = list(iter_episodes(tmp_path / "d"))
    assert sum(len(e["image"]) for e in eps) == 40
    for e in eps:
        assert e["is_first"][0] and e["is_first"].sum() == 1 and e["is_last"][-1] and e["is_last"].sum() == 1
    # Length-12 episodes end truncated (13 observations) and each appends a crafter stats line.
    full = [e for e in eps if len(e["image"]) == 13]
    assert full and all(not e["is_terminal"].any() for e in full)
    assert len((tmp_path / "d" / "stats.jsonl").read_text().splitlines()) >= len(full)
    # Env i was reset with seed + i: its first frame is that of a fresh crafter world with that seed.
    firsts = {e["image"][0].tobytes() for e in eps if e["is_first"][0]}
    assert CrafterEnv().reset(seed=5)[0].tobytes() in firsts and CrafterEnv().reset(seed=6)[0].tobytes() in firsts
    assert out["episodes"] == out["dataset_episodes"] == len(eps)
    # a second call reports its own episodes, and the total; `--size 64` is the default size, not another layout
    more = collect("crafter", 20, str(tmp_path / "d"), num_envs=2, envs_per_worker=2, seed=7, progress=False,
                   env_kwargs={"max_episode_steps": 12, "size": 64})
    assert more["dataset_episodes"] == len(list(iter_episodes(tmp_path / "d"))) == len(eps) + more["episodes"]
    with pytest.raises(DataError, match=r"holds episodes with image_shape=\[64, 64, 3\], not \[32, 32, 3\]"):
        collect("crafter", 4, str(tmp_path / "d"), seed=8, progress=False, asynchronous=False,
                env_kwargs={"max_episode_steps": 12, "size": 32})


def test_killed_crafter_worker_truncates_episode(tmp_path):
    venv = ResilientVectorEnv([env_fn("crafter", stats_path=None)] * 2, envs_per_worker=1)
    try:
        venv.reset(seed=0)
        for _ in range(3):
            venv.step(np.zeros(2, np.int64))
        os.kill(venv.worker_pids[1], signal.SIGKILL)
        with pytest.warns(Warning):
            _, _, terms, truncs, _ = venv.step(np.zeros(2, np.int64))
        assert list(truncs) == [False, True] and not terms.any() and venv.restarts == 1
        for _ in range(3):
            obs, _, _, truncs, _ = venv.step(np.zeros(2, np.int64))
        assert obs.shape == (2, 64, 64, 3) and not truncs.any()
    finally:
        venv.close()


@pytest.mark.nethack
def test_cli_collect_nethack_in_process(tmp_path, capsys):
    assert run.main(["collect", "--env", "nethack", "--frames", "30", "--out", str(tmp_path / "n"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["frames"] == 30
    (ep,) = list(iter_episodes(tmp_path / "n"))
    assert ep["image"].shape == (30, 64, 64, 3) and ep["image"].dtype == np.uint8 and ep["stats"].shape == (30, 27)
    # --max-episode-steps 4: episodes of 5 observations, ended truncated by the game (so it records them)
    assert run.main(["collect", "--env", "nethack", "--frames", "12", "--out", str(tmp_path / "m"), "--no-progress",
                     "--max-episode-steps", "4"]) == 0
    episodes = list(iter_episodes(tmp_path / "m"))
    assert [len(ep["is_last"]) for ep in episodes] == [5, 5, 2]
    assert [bool(ep["is_last"][-1] and not ep["is_terminal"][-1]) for ep in episodes] == [True, True, True]
    assert len((tmp_path / "m" / "stats.jsonl").read_text().splitlines()) == 2
    # NetHack's task and window, as the agent's env.task and env.crop: recorded with the dataset
    assert run.main(["collect", "--env", "nethack", "--frames", "6", "--out", str(tmp_path / "c"), "--no-progress",
                     "--task", "challenge", "--crop", "3"]) == 0
    assert read_meta(tmp_path / "c")["env_kwargs"] == {"task": "challenge", "crop": 3}
    assert read_meta(tmp_path / "c")["num_actions"] == 121  # NetHackChallenge's full action set
    assert run.main(["collect", "--env", "crafter", "--frames", "6", "--out", str(tmp_path / "x"), "--crop", "3"]) == 2
    assert "error: --crop is NetHack's (--env nethack); crafter has none" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run.main(["collect", "--env", "crafter", "--frames", "0", "--out", str(tmp_path / "x")]) == 2
    assert "frames must be positive" in capsys.readouterr().err
    assert run.main(["collect", "--env", "crafter", "--frames", "2", "--envs-per-worker", "2", "--out",
                     str(tmp_path / "x")]) == 2  # the 2 envs' first frames alone: no step played, nothing written
    assert "--frames=2 is no more than the 2 envs collecting" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    for option in ("--workers", "--envs-per-worker", "--size", "--max-episode-steps", "--crop"):
        assert run.main(["collect", "--env", "crafter", "--frames", "5", "--out", str(tmp_path / "x"), option, "0"]) == 2
        assert f"{option} must be positive, got 0" in capsys.readouterr().err
    for argv in (["eval-ap", "--checkpoint", "R", "--images", "0"], ["eval-wm", "--checkpoint", "R", "--segments", "-1"],
                 ["eval", "--checkpoint", "R", "--episodes", "0"], ["generate", "--out", "D", "--batch-size", "0"]):
        assert run.main(argv) == 2  # refused before the (missing) run or directory is looked at
        assert f"{argv[-2]} must be positive, got {argv[-1]}" in capsys.readouterr().err
    assert run.main(["pretrain", "--data", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "no meta.json" in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.yaml").exists()  # the data is checked before the run gets a config


def test_nethack_without_nle_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """nle is an optional extra ([nethack]): without it, asking for NetHack says how to install it, in the main
    process before any worker starts and before anything is written."""
    import sys

    monkeypatch.setitem(sys.modules, "nle", None)  # `import nle` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "envs.nethack", raising=False)
    with pytest.raises(UsageError, match=r'NetHack needs the nle package \(.*\): pip install -e "\.\[nethack\]"'):
        env_fn("nethack")
    assert run.main(["collect", "--env", "nethack", "--frames", "10", "--out", str(tmp_path / "d")]) == 2
    assert "error: NetHack needs the nle package" in capsys.readouterr().err and not (tmp_path / "d").exists()
    env_fn("crafter")  # the other game needs nothing of it


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    from test_pretrain import TINY

    d = tmp_path_factory.mktemp("vq")
    argv = ["pretrain", "--config", "configs/clevr_tiny.yaml", "--run-dir", str(d / "run"), "--no-progress",
            "task=discovery", "model.vq.enabled=true", "train.steps=2", *TINY]
    assert run.main(argv) == 0
    return d / "run"


def _assert_named_columns(png, run_dir, columns):
    """The picture is `columns` pictures wide (the run's resolution, upscaled and padded as `tile` pads), under a
    16-pixel white strip with a name drawn over each column."""
    from PIL import Image

    from world_model.visualize import PNG_MIN_SIDE

    side = load_run_config("pretrain", run_dir).data.resolution
    factor = -(-PNG_MIN_SIDE // side)
    picture = np.asarray(Image.open(png).convert("L")).astype(float) / 255
    assert picture.shape[1] == factor * (columns * (side + 2) + 2)
    strip = picture[:16]
    for i in range(columns):
        left = factor * (2 + i * (side + 2))
        assert strip[:, left:left + factor * side].min() < 0.5, i


def test_an_edit_changes_the_slot_the_frame_pictures_show(vq_run):
    """Game frames carry slots from frame to frame: the edit decodes the codes `decompose` found (those of the
    frame PNGs and codes.npy), so setting a carried frame's own code back gives that frame's reconstruction; a
    frame encoded afresh would have other slots."""
    from world_model.decompose import decompose, edit_codes, episode_frames, load_slot_model
    from world_model.wm import frames_to_input

    model = load_slot_model(str(vq_run), torch.device("cpu")).model
    played, starts = episode_frames("crafter", 3, 0)
    images = frames_to_input(torch.from_numpy(played)[None], 32)[0]
    torch.manual_seed(0)
    parts = decompose(model, images, carry=True, starts=starts)
    for t in (1, 2):  # carried frames
        own = int(parts["codes"][t, 1, 0])
        grid = edit_codes(model, images[t:t + 1], {k: v[t:t + 1] for k, v in parts.items()}, 1, 0, [own])
        cells = grid[:, 2:, 2:].unfold(1, 32, 34).unfold(2, 32, 34)  # 3 rows cols 32 32: the tiled pictures
        torch.testing.assert_close(cells[:, 0, 3], parts["recon"][t].clamp(0, 1), atol=1e-5, rtol=0)
        torch.testing.assert_close(cells[:, 0, 1], cells[:, 0, 3], atol=1e-5, rtol=0)  # the reconstruction column


def test_visualize_refuses_the_other_modes_options(vq_run, tmp_path, capsys):
    """--codes draws from --images held-out scenes: decomposition options with it are refused, and --images
    without it, before anything is computed or written."""
    for extra, error in ((["--codes", "--env", "crafter", "--frames", "3"], "--env, --frames choose the frames"),
                         (["--codes", "--edit", "0", "0", "1"], "--edit choose the frames"),
                         (["--images", "5"], "--images counts the scenes of --codes")):
        assert run.main(["visualize", "--checkpoint", str(vq_run), "--out", str(tmp_path / "v"), *extra]) == 2
        assert error in capsys.readouterr().err and not (tmp_path / "v").exists()


def test_visualize_crafter_frames_and_edit(vq_run, tmp_path, capsys):
    out = tmp_path / "viz"
    assert run.main(["visualize", "--checkpoint", str(vq_run), "--env", "crafter", "--frames", "3", "--out", str(out),
                     "--edit", "1", "0", "all"]) == 0
    assert f"note: {vq_run} was trained on CLEVR-like scenes, shown crafter frames here" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pngs"] == 3 and sorted(p.name for p in out.glob("frame_*.png")) == [
        "frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert os.path.getsize(summary["video"]) > 0 and list((out / "tb").glob("events.*"))
    codes = load_run_config("pretrain", vq_run).model.vq.num_codes
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()  # tensorboard shows the pictures the PNGs hold: labelled and upscaled alike
    with Image.open(out / "frame_0000.png") as png:
        assert (events.Images("slots/decomposition")[0].width, events.Images("slots/decomposition")[0].height) == \
            png.size
    with Image.open(out / "edit_slot1_var0_all.png") as png:
        assert (events.Images("slots/edit")[0].width, events.Images("slots/edit")[0].height) == png.size
    _assert_named_columns(out / "edit_slot1_var0_all.png", vq_run, 3 + codes)  # input, reconstruction, slot, codes
    assert np.load(out / "codes.npy").shape == (3, 4, 4)  # t k v
    capsys.readouterr()
    # refused before any output: an index out of range, or no index at all ("\u00b2" is a digit, not a decimal)
    for edit in (["9", "0", "1"], ["1", "0", "x"], ["a", "0", "0"], ["1", "-1", "0"], ["\u00b2", "0", "0"]):
        assert run.main(["visualize", "--checkpoint", str(vq_run), "--env", "crafter", "--frames", "1",
                         "--out", str(tmp_path / "refused"), "--edit", *edit]) == 2
        assert "out of range" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert summary["policy"] == "random"  # a pretraining run has no policy: random play
    for policy, error in ((["--env", "crafter", "--policy", "agent"], "--policy agent plays an agent run's policy; "),
                          (["--env", "clevr", "--policy", "random"], "CLEVR scenes are not played")):
        assert run.main(["visualize", "--checkpoint", str(vq_run), "--frames", "1", "--out",
                         str(tmp_path / "refused"), *policy]) == 2
        assert error in capsys.readouterr().err and not (tmp_path / "refused").exists()
    import world_model.decompose as decomposing

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:  # Ctrl-C while the slots are computed: no empty --out left behind
        patch.setattr(decomposing, "decompose", interrupted)
        assert run.main(["visualize", "--checkpoint", str(vq_run), "--env", "crafter", "--frames", "1",
                         "--out", str(tmp_path / "stopped")]) == 130
    assert not (tmp_path / "stopped").exists()
    # again into the same folder, fewer frames and no edit: what the first call wrote goes, not left beside the new
    assert run.main(["visualize", "--checkpoint", str(vq_run), "--env", "crafter", "--frames", "1", "--out",
                     str(out)]) == 0
    assert "note: replaced an earlier visualize's pictures" in capsys.readouterr().err
    assert [p.name for p in out.glob("*.png")] == ["frame_0000.png"] and np.load(out / "codes.npy").shape[0] == 1


def test_the_slot_video_names_its_columns_and_steps():
    """Each video frame: input | reconstruction (if any) | segmentation, 4x, under a strip with the frame's step."""
    from world_model.decompose import video_frames

    torch.manual_seed(0)
    images, masks = torch.rand(2, 3, 16, 16), torch.rand(2, 4, 16, 16).softmax(1)
    for recon, columns in ((torch.rand(2, 3, 16, 16), 3), (None, 2)):
        frames = video_frames(images, {"recon": recon, "masks": masks})
        assert frames.shape == (2, 16 + 4 * (18 + 2), 4 * (columns * 18 + 2), 3) and frames.dtype == np.uint8
        strips = frames[:, :16]
        assert (strips > 200).mean() > 0.8 and (strips[0] != strips[1]).any()  # "frame 0", "frame 1"


def test_slots_are_carried_within_an_episode_only():
    """decompose starts each episode's first frame from fresh slots, as it starts the first frame."""
    from types import SimpleNamespace

    from world_model.decompose import decompose

    fresh = []

    def encoder(x, prev):
        fresh.append(prev is None)
        return SimpleNamespace(raw_slots=torch.zeros(1, 2, 4), codes=None,
                               attn_maps=lambda size: torch.zeros(1, 2, *size))

    model, images = SimpleNamespace(encoder=encoder), torch.zeros(4, 3, 8, 8)
    assert decompose(model, images, True, np.array([True, False, True, False]))["masks"].shape == (4, 2, 8, 8)
    decompose(model, images, True)
    decompose(model, images, False)
    assert fresh == [True, False, True, False] + [True, False, False, False] + [True] * 4


def test_the_shown_game_is_played_in_the_settings_the_run_trained_in(tmp_path):
    """visualize plays the game a run trained on in that run's settings: those its dataset recorded (here `collect
    --size 32`), or an agent run's env; random actions, or a policy's."""
    from world_model.decompose import _recorded_env_kwargs, episode_frames

    assert collect("crafter", 4, str(tmp_path / "d"), progress=False, env_kwargs={"size": 32}, asynchronous=False)
    assert _recorded_env_kwargs(str(tmp_path / "d")) == {"size": 32}
    assert _recorded_env_kwargs(str(tmp_path / "moved")) == {} and _recorded_env_kwargs(None) == {}
    frames, starts = episode_frames("crafter", 3, env_kwargs={"size": 32})
    assert frames.shape == (3, 32, 32, 3) and starts.tolist() == [True, False, False]
    seen = []
    episode_frames("crafter", 3, act=lambda obs, first: seen.append((obs["image"].shape, first)) or 0)
    assert seen == [((64, 64, 3), True), ((64, 64, 3), False)]


def test_visualize_clevr_scenes(vq_run, tmp_path, capsys):
    """A run pretrained on CLEVR-like scenes is shown held-out scenes, by default or with --env clevr alike."""
    for env, out in (([], "default"), (["--env", "clevr"], "c")):
        assert run.main(["visualize", "--checkpoint", str(vq_run), *env, "--frames", "2", "--out",
                         str(tmp_path / out)]) == 0
        assert len(list((tmp_path / out).glob("frame_*.png"))) == 2
    assert (tmp_path / "default" / "frame_0000.png").read_bytes() == (tmp_path / "c" / "frame_0000.png").read_bytes()
    assert run.main(["visualize", "--checkpoint", str(vq_run), "--env", "clevr", "--frames", "1",
                     "--out", str(tmp_path / "c")]) == 0  # again, fewer: none of the first call's frames stay
    assert [p.name for p in (tmp_path / "c").glob("frame_*.png")] == ["frame_0000.png"]
    assert len(list((tmp_path / "c" / "tb").glob("events.*"))) == 1
    assert "note" not in json.loads((tmp_path / "c" / "summary.json").read_text())


@pytest.mark.parametrize("ffmpeg", [True, False])
def test_videos_are_mp4_through_ffmpeg_or_else_gif(ffmpeg, tmp_path, monkeypatch):
    """An MP4 through imageio-ffmpeg; without it a GIF, also where another imageio plugin claims ".mp4" (the GPU
    image's tifffile did, and failed on `fps` with a TypeError that eval-wm and visualize did not survive)."""
    import imageio.v2 as imageio
    from PIL import Image

    from world_model.decompose import write_video

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]], np.uint8)
    frames = np.broadcast_to(colours[:, None, None], (5, 20, 30, 3)).copy()  # t h w c: one colour per frame
    real, plugins = imageio.mimwrite, []

    def mimwrite(*args, **kwargs):  # another plugin than FFMPEG, as imageio picks one for ".mp4" without it
        plugins.append(kwargs.get("format"))
        if kwargs.get("format") != "FFMPEG" or not ffmpeg:
            raise TypeError("TiffWriter.write() got an unexpected keyword argument 'fps'")
        return real(*args, **kwargs)
    monkeypatch.setattr(imageio, "mimwrite", mimwrite)
    if not ffmpeg:
        monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    path = write_video(frames, tmp_path / "v")
    assert plugins == (["FFMPEG"] if ffmpeg else [])  # without imageio-ffmpeg, no plugin is asked
    assert path == tmp_path / ("v.mp4" if ffmpeg else "v.gif") and path.exists()
    if ffmpeg:
        read = np.stack(imageio.mimread(path, format="FFMPEG"))
        assert read.shape == (5, 32, 32, 3)  # padded to the codec's multiple of 16
        assert np.abs(read[:, :20, :30].astype(int) - frames).mean() < 8
    else:
        gif = Image.open(path)
        assert gif.n_frames == 5
        for t in range(5):
            gif.seek(t)
            assert (np.asarray(gif.convert("RGB")) == frames[t]).all()


def test_visualize_says_a_set_prediction_run_has_no_reconstruction(tmp_path):
    from test_pretrain import TINY

    assert run.main(["pretrain", "--config", "configs/clevr_tiny.yaml", "--run-dir", str(tmp_path / "run"),
                     "--no-progress", "train.steps=1", *TINY]) == 0
    assert run.main(["visualize", "--checkpoint", str(tmp_path / "run"), "--env", "crafter", "--frames", "1",
                     "--out", str(tmp_path / "v")]) == 0
    assert "no reconstruction" in json.loads((tmp_path / "v" / "summary.json").read_text())["note"]


@pytest.mark.nethack
def test_make_env_passes_episode_limits_to_the_game():
    """`max_episode_steps` reaches NetHack itself (gym.make would keep it for a TimeLimit wrapper)."""
    from envs.collect import make_env

    env = make_env("nethack", max_episode_steps=7, stats_path=None)
    env.reset(seed=0)
    ends = [env.step(0)[3] for _ in range(7)]
    assert ends == [False] * 6 + [True]
    assert make_env("crafter", max_episode_steps=3, stats_path=None)._kwargs["length"] == 3


def test_decomposition_grid_shows_a_reconstruction_only_when_there_is_one():
    """Discovery runs: input | reconstruction | segmentation | one column per slot; set-prediction runs have no
    decoder, so their rows leave the reconstruction out instead of repeating the input."""
    from world_model.visualize import decomposition_grid

    images = torch.rand(2, 3, 8, 8)
    masks = torch.softmax(torch.randn(2, 3, 8, 8), 1)
    pad, side = 2, 8 + 2
    with_recon = decomposition_grid(images, masks, torch.rand(2, 3, 8, 8), torch.rand(2, 3, 3, 8, 8))
    without = decomposition_grid(images, masks)
    assert with_recon.shape[-1] == pad + (3 + 3) * side and without.shape[-1] == pad + (2 + 3) * side
    torch.testing.assert_close(without[:, pad:pad + 8, pad:pad + 8], images[0])  # first column: the input
    assert not torch.equal(without[:, pad:pad + 8, pad + side:pad + side + 8], images[0])  # then the segmentation


def test_a_stopped_collection_keeps_its_episodes_and_says_so(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) during `collect`: the unfinished episodes are written as truncated pieces, and the message
    says what the dataset holds and which --seed collects more; stopped before any episode, the seed stays free."""
    from envs.episodes import EpisodeWriter

    calls, step = [0], EpisodeWriter.step

    def stop_at(n):
        def stopping(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] > n:
                raise KeyboardInterrupt
            return step(self, *args, **kwargs)
        return stopping

    out = tmp_path / "d"
    argv = ["collect", "--env", "crafter", "--frames", "1000", "--out", str(out), "--no-progress"]
    monkeypatch.setattr(EpisodeWriter, "step", stop_at(0))
    assert run.main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(f"{out} holds 0 episodes (unfinished ones kept as truncated); "
                                                    "collect more with --seed 0 (no episode of it was written)")
    assert not (out / "meta.json").exists()
    calls[0] = 0
    monkeypatch.setattr(EpisodeWriter, "step", stop_at(30))
    assert run.main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(f"{out} holds 1 episode (unfinished ones kept as truncated); "
                                                    "collect more with --seed 1 (it holds env seed 0)")
    (episode,) = iter_episodes(out)
    assert len(episode["action"]) == 31 and episode["is_last"][-1] and not episode["is_terminal"].any()
    assert read_meta(out)["env_seeds"] == [[0, 1]]


def test_a_second_collect_into_the_same_dataset_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two collects at once numbered their episodes alike and wrote meta.json over each other."""
    import fcntl

    import run

    out = tmp_path / "d"
    out.mkdir()
    with open(out / ".collect.lock", "w") as held:  # what a running collect holds
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run.main(["collect", "--env", "crafter", "--frames", "10", "--out", str(out), "--no-progress"]) == 2
        assert f"another `run.py collect` is writing into {out}" in capsys.readouterr().err
    assert run.main(["collect", "--env", "crafter", "--frames", "10", "--out", str(out), "--workers", "1",
                     "--no-progress"]) == 0  # released: the next one goes ahead


def test_the_collector_stores_each_env_in_the_episode_layout_across_autoresets(tmp_path):
    """Two envs that end at different steps (one terminates, one is cut off): every stored episode starts with a
    first step holding no action, reward or end, and the step after an end is the next episode's first (NEXT_STEP
    autoreset), whatever action was sent with it. An episode dataset written through the same collector holds
    those episodes, each file one of them."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    class Countdown(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (1,), np.uint8)
        action_space = gym.spaces.Discrete(100)

        def __init__(self, length, terminates):
            self.length, self.terminates = length, terminates

        def reset(self, seed=None, options=None):
            self.t = 0
            return np.array([0], np.uint8), {}

        def step(self, action):
            self.t += 1
            end = self.t == self.length
            return np.array([self.t], np.uint8), 10.0 * self.t, end and self.terminates, end and not self.terminates, {}

    class Recorder:
        def __init__(self):
            self.rows = []

        def add_steps(self, steps, workers):
            assert list(workers) == [0, 1]
            self.rows.append({k: np.array(v) for k, v in steps.items()})

    venv = SyncVectorEnv([lambda: Countdown(2, True), lambda: Countdown(3, False)],
                         autoreset_mode=AutoresetMode.NEXT_STEP)
    collector = Collector(venv, Recorder())
    collector.reset(seed=0)
    for t in range(1, 8):
        collector.step(np.array([t, 50 + t]))

    def column(env, key):
        return [row[key][env].item() for row in collector.sink.rows]

    # env 0 ends (terminal) at its 2nd step, env 1 (cut off) at its 3rd; the step after each end is a first step
    assert column(0, "image") == [0, 1, 2, 0, 1, 2, 0, 1]
    assert column(0, "is_first") == [True, False, False, True, False, False, True, False]
    assert column(0, "action") == [0, 1, 2, 0, 4, 5, 0, 7]  # the action sent with a reset step is not stored
    assert column(0, "reward") == [0, 10, 20, 0, 10, 20, 0, 10]
    assert column(0, "is_last") == column(0, "is_terminal") == [False, False, True, False, False, True, False, False]
    assert column(1, "image") == [0, 1, 2, 3, 0, 1, 2, 3]
    assert column(1, "action") == [0, 51, 52, 53, 0, 55, 56, 57]
    assert column(1, "is_last") == [False, False, False, True, False, False, False, True]
    assert not any(column(1, "is_terminal"))  # cut off by a time limit: the value bootstraps past it
    assert collector.episodes == 4 and list(collector.first) == [False, False]
    venv.close()

    venv = SyncVectorEnv([lambda: Countdown(2, True), lambda: Countdown(3, False)],
                         autoreset_mode=AutoresetMode.NEXT_STEP)
    writer = EpisodeWriter(tmp_path / "data", {"env": "toy"})
    collector = Collector(venv, writer)
    collector.reset(seed=0)
    for t in range(1, 8):
        collector.step(np.array([t, 50 + t]))
    venv.close()
    episodes = [{k: v.tolist() for k, v in e.items() if k in ("image", "action", "is_last", "is_terminal")}
                for e in iter_episodes(tmp_path / "data")]
    assert episodes == [  # in the order they ended
        {"image": [[0], [1], [2]], "action": [0, 1, 2], "is_last": [False, False, True],
         "is_terminal": [False, False, True]},
        {"image": [[0], [1], [2], [3]], "action": [0, 51, 52, 53], "is_last": [False, False, False, True],
         "is_terminal": [False, False, False, False]},
        {"image": [[0], [1], [2]], "action": [0, 4, 5], "is_last": [False, False, True],
         "is_terminal": [False, False, True]},
        {"image": [[0], [1], [2], [3]], "action": [0, 55, 56, 57], "is_last": [False, False, False, True],
         "is_terminal": [False, False, False, False]}]


class ResetFailsOnce(gym.Env):
    """Episodes of `length` steps whose frame is the step count; the second reset raises once (`flag` file)."""
    observation_space = gym.spaces.Box(0, 255, (1,), np.uint8)
    action_space = gym.spaces.Discrete(9)

    def __init__(self, length, flag=None):
        self.length, self.flag, self.resets = length, flag, 0

    def reset(self, seed=None, options=None):
        self.resets += 1
        if self.flag and self.resets == 2 and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            raise ValueError("boom: injected reset failure")
        self.t = 0
        return np.array([0], np.uint8), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.uint8), float(self.t), self.t == self.length, False, {}


def test_a_restarted_workers_step_is_not_stored_and_no_two_episodes_join(tmp_path):
    """Env 0 ends at step 2 and its worker fails on the reset that follows, while env 1 (same worker) is mid-episode.
    The vector env answers that step with the last frames, truncated, and says the worker restarted: no game step, so
    nothing of it is stored for either env (env 1's episode ends at its last real step, no repeated frame with an
    unplayed action), and the step after is a first step of each (a fresh episode, not a stale frame's sequel)."""
    from functools import partial

    class Recorder:
        def __init__(self):
            self.rows = {0: [], 1: []}

        def add_steps(self, steps, workers):
            for row, env in enumerate(workers):
                self.rows[env].append((int(steps["image"][row, 0]), bool(steps["is_first"][row]),
                                       bool(steps["is_last"][row])))

    venv = ResilientVectorEnv([partial(ResetFailsOnce, 2, str(tmp_path / "failed")), partial(ResetFailsOnce, 3)],
                              envs_per_worker=2)
    collector, firsts = Collector(venv, Recorder()), []
    collector.reset(seed=0)
    with pytest.warns(RuntimeWarning, match="boom: injected reset failure"):
        for _ in range(7):
            collector.step(np.zeros(2, np.int64))
            firsts.append(collector.first.tolist())
    venv.close()
    assert collector.sink.rows[0] == [(0, True, False), (1, False, False), (2, False, True),  # the failed reset: none
                                      (0, True, False), (1, False, False), (2, False, True), (0, True, False)]
    assert collector.sink.rows[1] == [(0, True, False), (1, False, False), (2, False, False),  # the restart: none
                                      (0, True, False), (1, False, False), (2, False, False), (3, False, True)]
    assert [f[0] for f in firsts] == [False, False, True, True, False, False, True]  # what the policy is told
    assert collector.episodes == 2 + 2
    # the same through an episode dataset and a replay buffer: the cut episode ends at its last real step
    from agent.replay import ReplayBuffer

    for kind in ("dataset", "replay"):
        venv = ResilientVectorEnv([partial(ResetFailsOnce, 2, str(tmp_path / f"failed_{kind}")),
                                   partial(ResetFailsOnce, 3)], envs_per_worker=2)
        sink = EpisodeWriter(tmp_path / kind, {"env": "toy"}) if kind == "dataset" else \
            ReplayBuffer(100, {"image": ((1,), np.uint8)})
        collector = Collector(venv, sink)
        collector.reset(seed=0)
        with pytest.warns(RuntimeWarning, match="boom"):
            for _ in range(7):
                collector.step(np.full(2, 5, np.int64))
        venv.close()
        if kind == "dataset":
            sink.flush()
        episodes = iter_episodes(tmp_path / kind) if kind == "dataset" else sink.episodes()
        frames = sorted(e["image"][:, 0].tolist() for e in episodes)  # env 0's two, env 1's: no repeated frame
        assert frames == [[0]] * (kind == "replay") + [[0, 1, 2]] * 3 + [[0, 1, 2, 3]], kind  # + env 0's new one


def test_overlay_blends_the_argmax_segmentation():
    """overlay colors each pixel by the slot with the LARGEST mask there, blended half and half with the image where
    one slot holds it all, less as the masks near uniform (not at all at 1/k each)."""
    from world_model.decompose import overlay
    from world_model.visualize import colorize, decomposition_grid

    slot1 = colorize(torch.ones(1, 2, 2, dtype=torch.long))
    images = torch.ones(1, 3, 2, 2)
    sure = torch.tensor([0.0, 1.0, 0.0])[None, :, None, None].expand(1, 3, 2, 2)
    torch.testing.assert_close(overlay(images, sure), 0.5 + 0.5 * slot1)
    masks = torch.tensor([0.1, 0.7, 0.2])[None, :, None, None].expand(1, 3, 2, 2)  # (0.7 - 1/3) / (1 - 1/3) = 0.55
    torch.testing.assert_close(overlay(images, masks), 1 - 0.275 + 0.275 * slot1)
    uniform = torch.full((1, 3, 2, 2), 1 / 3)
    torch.testing.assert_close(overlay(images, uniform), images)
    # the decomposition's segmentation column: white where the masks are uniform, the slot's color where one is sure
    pad = 2
    for masks, seg in ((uniform, torch.ones(3, 2, 2)), (sure, slot1[0])):
        grid = decomposition_grid(images, masks)
        torch.testing.assert_close(grid[:, pad:pad + 2, 2 * pad + 2:2 * pad + 4], seg)


def test_decomposition_pngs_name_their_columns():
    """A strip above the grid names each column (input, reconstruction, segmentation, slot i), each label inside its
    own column: 32-pixel pictures upscaled 4x are 128-pixel columns with 8-pixel gaps."""
    from world_model.visualize import decomposition_labels, labeled, tile, upscale

    labels = decomposition_labels(recon=True, num_slots=2)
    assert labels == ["input", "reconstruction", "segmentation", "slot 0", "slot 1"]
    assert decomposition_labels(recon=False, num_slots=1) == ["input", "attention", "slot 0"]  # set prediction's maps
    grid = upscale(tile(torch.full((5, 3, 32, 32), 0.5), nrow=5), 32)
    out = labeled(grid, labels, 32)
    assert out.shape == (3, grid.shape[1] + 16, grid.shape[2]) and torch.equal(out[:, 16:], grid)
    ink = (out[:, :16].mean(0) < 0.5).any(0)  # columns of the strip with text in them
    for i in range(5):
        left = 8 + i * (128 + 8)
        assert ink[left:left + 128].any() and not ink[left - 8:left].any()



def test_each_slot_column_is_named_beside_its_segmentation_color():
    """decomposition_picture: before "slot i" a swatch in the color the segmentation paints slot i with; none before
    the other columns."""
    from world_model.visualize import PALETTE, decomposition_picture

    masks = torch.zeros(1, 3, 32, 32)
    masks[:, 1] = 1.0  # slot 1 holds every pixel: the segmentation is slot 1's color
    picture = decomposition_picture(torch.zeros(1, 3, 32, 32), masks, torch.zeros(1, 3, 32, 32),
                                    torch.zeros(1, 3, 3, 32, 32))
    swatch = lambda column: picture[:, 7, 8 + column * 136 + 6]  # noqa: E731  (the middle of a swatch)
    segmentation = picture[:, 16 + 8 + 64, 8 + 2 * 136 + 64]
    torch.testing.assert_close(segmentation, PALETTE[1])
    for slot in range(3):
        torch.testing.assert_close(swatch(3 + slot), PALETTE[slot], atol=1 / 255, rtol=0)
    for column in range(3):  # input, reconstruction, segmentation: text only, no block of one color
        block = picture[:, 3:13, 8 + column * 136 + 2:8 + column * 136 + 12]
        assert not (block == block[:, :1, :1]).all()
