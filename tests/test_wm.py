"""The world model end to end: encoding with slot carry-over, losses, train-wm / eval-wm, resume."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import run
from compare import assert_same_state, checkpoint
from envs.errors import DataError, UsageError
from envs.episodes import EpisodeWriter, load_frames
from world_model.config import WorldModelConfig, load_config
from world_model.rundir import read_jsonl
from world_model.train_wm import build_wm_for, evaluate_wm, load_wm_run, split_dataset, to_batch, train_wm

TINY_WM = [
    "encoder.resolution=16", "encoder.model.num_slots=3", "encoder.model.slot_dim=8", "encoder.model.mlp_hidden=16",
    "encoder.model.cnn_channels=[8,8]", "encoder.model.cnn_strides=[2,1]", "encoder.model.feature_dim=8",
    "encoder.model.decoder_channels=8", "encoder.model.vq.num_vars=2", "encoder.model.vq.num_codes=4",
    "frame.vars=2", "frame.codes=4", "frame.channels=4", "frame.target=8", "dynamics.embed_dim=16",
    "dynamics.layers=1", "dynamics.heads=2", "dynamics.max_steps=8", "dynamics.reward_bins=17",
    "data.seq_len=5", "eval.context=2", "eval.horizons=[1,3]", "eval.segments=4", "train.batch_size=2",
    "train.log_every=1", "train.eval_every=2", "train.ckpt_every=1", "train.warmup_steps=1", "train.threads=2",
]


def toy_dataset(root, episodes=6, length=10, size=16, seed=0, moves=3, status=False):
    """Episodes of a moving square: frames depend on actions, reward 1 at the last step of terminated ones. With
    `status`, each frame comes with a status token (as NetHack's bottom line): the square's position."""
    rng = np.random.default_rng(seed)
    w = EpisodeWriter(root, {"env": "toy", "num_actions": 3})
    for e in range(episodes):
        pos = int(rng.integers(size - 4))

        def frame(p):
            f = np.zeros((size, size, 3), np.uint8)
            f[6:10, p:p + 4] = 255
            return {"image": f, "status": np.array([p], np.uint8)} if status else f

        w.begin(0, frame(pos))
        for t in range(length - 1):
            a = int(rng.integers(moves)) if moves > 1 else 1  # action 1 keeps the square still
            pos = int(np.clip(pos + a - 1, 0, size - 4))
            last = t == length - 2
            w.step(0, frame(pos), a, float(last), terminated=last and e % 2 == 0, truncated=last and e % 2 == 1)
    return root


def wm_cfg(root, *extra):
    return load_config(WorldModelConfig, None, TINY_WM + [f"data.root={root}", *extra])


def test_a_fresh_encoder_trains_jointly_and_says_so(tmp_path, capsys):
    """Without encoder.checkpoint the slot encoder trains with the world model (several times slower per step than
    a frozen pretrained one): a note says so at the start, and an explicit encoder.mode=frozen, which has nothing
    to freeze, is refused in one line rather than silently replaced."""
    root = toy_dataset(tmp_path / "d")
    assert run.main(["train-wm", "--data", str(root), "--run-dir", str(tmp_path / "x"), "encoder.mode=frozen"]) == 2
    assert "error: encoder.mode=frozen needs encoder.checkpoint=RUN" in capsys.readouterr().err
    assert run.main(["train", "--run-dir", str(tmp_path / "x"), "encoder.mode='frozen'"]) == 2  # the agent's too
    assert "error: encoder.mode=frozen needs encoder.checkpoint=RUN" in capsys.readouterr().err
    train_wm(wm_cfg(root, "train.steps=1"), str(tmp_path / "a"), progress=False)
    assert "note: no encoder.checkpoint: a fresh slot encoder trains jointly" in capsys.readouterr().err


def test_a_preset_setting_a_size_the_run_derives_is_refused_unless_it_agrees(tmp_path, capsys):
    """dynamics.num_slots in a preset would be replaced by the encoder's slot count without a word: refused, as an
    override is. The default, and the value the run sets (what `run.py config` prints), pass: so does its dump."""
    root = toy_dataset(tmp_path / "d")
    cfg = wm_cfg(root)
    cfg.dynamics.num_slots, cfg.dynamics.num_actions = 5, 7  # as a preset file would set them
    with pytest.raises(UsageError, match=r"the config sets dynamics.num_slots=5 \(the run sets 3, from "
                       r"encoder.model.num_slots\); dynamics.num_actions=7 \(the run sets 3, from the env"):
        build_wm_for(cfg, 3, torch.device("cpu"))
    filled = wm_cfg(root)
    build_wm_for(filled, 3, torch.device("cpu"))  # fills in filled.dynamics for an env of 3 actions
    with pytest.raises(UsageError,
                       match=r"dynamics.num_actions=3 \(the run sets 5.*copy.deepcopy\(cfg\) before filling"):
        build_wm_for(filled, 5, torch.device("cpu"))  # the same config for another env: the way out is named
    cfg = wm_cfg(root)
    cfg.dynamics.num_slots = 3
    assert build_wm_for(cfg, 3, torch.device("cpu")).dynamics.cfg.num_slots == 3
    assert run.main(["config", "--for", "train-wm", *TINY_WM, f"data.root={root}"]) == 0
    dump = tmp_path / "dump.yaml"
    dump.write_text(capsys.readouterr().out)
    cfg = load_config(WorldModelConfig, dump)
    assert cfg.dynamics.num_actions == 3 and cfg.dynamics.num_slots == 3
    build_wm_for(cfg, 3, torch.device("cpu"))


def test_split_holds_out_last_episodes(tmp_path):
    cfg = wm_cfg(toy_dataset(tmp_path / "d"))
    train, held, meta = split_dataset(cfg)
    assert len(train) + len(held) == 60 and len(held) == 10 and meta["num_actions"] == 3
    assert meta["held_out"] == ["000005-10.npz"] and meta["left_out"] == 0
    _, held, meta = split_dataset(wm_cfg(tmp_path / "d", "data.eval_fraction=0"))  # still one to evaluate on
    assert len(held) == 10 and meta["held_out"] == ["000005-10.npz"]
    _, held, meta = split_dataset(wm_cfg(tmp_path / "d", "data.eval_fraction=0.25"))  # 15 steps: two episodes
    assert len(held) == 20 and meta["held_out"] == ["000004-10.npz", "000005-10.npz"]


def test_training_steps_beyond_the_capacity_are_left_out_and_said(tmp_path, capsys):
    """data.capacity=25 of 50 training steps: the newest 25 are kept (episodes 3 and 4 whole, the end of 2; 0 and 1
    are not even read); the run says how many it leaves out."""
    root = toy_dataset(tmp_path / "d")
    train, held, meta = split_dataset(wm_cfg(root, "data.capacity=25"))
    assert len(train) == 25 and train.num_episodes == 3 and train.longest_episode() == 10 and len(held) == 10
    assert meta["left_out"] == 25
    train_wm(wm_cfg(root, "data.capacity=25", "train.steps=1"), str(tmp_path / "a"), progress=False)
    assert (f"note: the oldest 25 of the 50 training steps in {root} are left out, beyond data.capacity=25"
            in capsys.readouterr().err)


def test_loss_and_gradients_fresh_encoder(tmp_path):
    cfg = wm_cfg(toy_dataset(tmp_path / "d"))
    train, _, meta = split_dataset(cfg)
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    batch = to_batch(train.sample(2, 4), 16, torch.device("cpu"))
    loss, stats, _ = wm.loss(batch, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and {"loss_slots", "loss_reward", "loss_cont", "loss_slot_recon"} <= set(stats)
    assert all(p.grad is not None for p in wm.autoencoder.encoder.backbone.parameters())  # joint: it learns
    frames = torch.as_tensor(train.sample(2, 4)["image"])  # uint8 `b t h w 3`, as env frames come
    for bad in (frames, batch["images"][:, 0], batch["images"][..., :8, :8]):
        with pytest.raises(ValueError, match=r"WorldModel.encode expects float images `b t 3 h w` in \[0, 1\] at its "
                                             r"resolution, \(batch, time, 3, 16, 16\), got .*frames_to_input"):
            wm.encode(bad)


def test_padded_steps_are_neither_inputs_to_a_loss_nor_targets(tmp_path):
    """A training segment padded past its episode's end: whatever the padded steps hold (here noise frames, rewards,
    terminals), the loss and its stats are those of the valid steps alone. Padded steps still enter the model
    (static shapes), but frames are encoded causally, the dynamics attends causally, and every loss term (slot and
    frame reconstruction, VQ KL, next-step codes, reward, continuation) averages over valid steps only."""
    cfg = wm_cfg(toy_dataset(tmp_path / "d"))
    train, _, _ = split_dataset(cfg)
    torch.manual_seed(0)  # the same weights whichever tests ran before
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    batch = to_batch(train.sample(2, 8, np.random.default_rng(0)), 16, torch.device("cpu"))
    batch["valid"] = torch.arange(8) < torch.tensor([[8], [5]])  # the second segment: 3 padded steps
    garbled = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["valid"]
    garbled["images"][pad] = torch.rand_like(garbled["images"][pad])
    garbled["reward"][pad], garbled["is_terminal"][pad] = 7.0, True
    garbled["action"][pad] = 2
    results = []
    for b in (batch, garbled):
        torch.manual_seed(0)
        loss, stats, _ = wm.loss(b, 0.01)
        results.append((loss, stats))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    assert results[0][1]["valid_frac"].item() == 13 / 16  # logged: how much of a batch is padding
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], rtol=1e-6, atol=1e-6, msg=k)
    torch.manual_seed(0)
    unmasked, _, _ = wm.loss({k: v for k, v in garbled.items() if k != "valid"}, 0.01)
    assert abs(unmasked.item() - results[0][0].item()) > 1e-3  # the garbled steps count without the mask


def test_frame_codes_are_the_argmax_codes_in_training_too(tmp_path):
    """The dynamics learns to predict the frame codes that acting reads (argmax): in training the tokenizer's
    reconstruction goes through sampled codes, but the codes it returns carry no sampling noise."""
    cfg = wm_cfg(toy_dataset(tmp_path / "d"), "frame.vars=16", "frame.codes=4")
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    tok = wm.frame_tokenizer.train()
    images = torch.rand(64, 3, 16, 16)
    torch.manual_seed(0)
    codes, _ = tok(images)
    assert torch.equal(codes, tok.codes(images))
    sampled = tok.onehots(tok.logits(images)).argmax(-1)
    assert not torch.equal(sampled, codes)  # training's sampled one-hots differ: the check above can fail


def test_status_tokens_join_the_frame_codes(tmp_path, capsys):
    """A dataset whose frames come with status tokens: the world model appends them to the frame codes (the dynamics
    predicts them, its frame vocabulary holding their 16 values), records that in its checkpoint, and eval-wm
    rebuilds it; frame.status=false leaves them out."""
    root = toy_dataset(tmp_path / "d", status=True)
    cfg = wm_cfg(root)
    train, _, meta = split_dataset(cfg)
    assert meta["status_vars"] == 1
    wm = build_wm_for(cfg, 3, torch.device("cpu"), meta["status_vars"])
    assert (wm.dynamics.cfg.frame_vars, wm.dynamics.cfg.frame_codes) == (3, 16)  # 2 learned of 4 values, 1 status
    sample = train.sample(2, 4)
    batch = to_batch(sample, 16, torch.device("cpu"))
    loss, stats, enc = wm.loss(batch, 0.01)
    assert torch.isfinite(loss) and torch.equal(enc.frame_codes[..., 2], torch.as_tensor(sample["status"][..., 0]).long())
    assert {"acc_frame", "acc_status"} <= set(stats)  # the learned codes and the status tokens scored apart
    off = build_wm_for(wm_cfg(root, "frame.status=false"), 3, torch.device("cpu"), meta["status_vars"])
    assert (off.status_vars, off.dynamics.cfg.frame_vars, off.dynamics.cfg.frame_codes) == (0, 2, 4)
    train_wm(wm_cfg(root, "train.steps=2"), str(tmp_path / "a"), progress=False)
    assert torch.load(tmp_path / "a" / "checkpoints" / "latest.pt", weights_only=False)["status_vars"] == 1
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "eval_wm.json").read_text())
    assert 0 <= result["h1/status_acc"] <= 100 and result["h3/status_acc_copy"] < 100  # the square moves
    assert result["h3/status_acc_token0"] == result["h3/status_acc"]  # the one token's, under its index (no names)
    table = capsys.readouterr().out.splitlines()  # the printed table has them too
    header = next(line.split() for line in table if line.startswith("horizon"))
    row = next(line.split() for line in table if line.split()[:1] == ["3"])
    assert header[-2:] == ["status_acc", "status_acc_copy"]
    assert "status_acc: % of the status tokens right" in " ".join(table)  # the legend says what the column is
    assert float(row[-1]) == pytest.approx(result["h3/status_acc_copy"], abs=1e-4)
    tokens = table[table.index("status tokens, accuracy (%):") + 1:]  # then each token's, a row per horizon
    assert tokens[0].split() == ["horizon", "token0"]
    assert float(tokens[2].split()[1]) == pytest.approx(result["h3/status_acc_token0"], abs=0.05)
    plain = toy_dataset(tmp_path / "plain")  # the same game's episodes from before it gave status tokens
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "a"), "--data", str(plain), "--out",
                     str(tmp_path / "e2")]) == 2
    assert "reads 1 status tokens beside each frame; the episodes of" in capsys.readouterr().err
    # an oracle that imagines the real frames' codes scores 100%; one that repeats the last context frame scores
    # the copy baseline
    cfg, trained, _ = load_wm_run(str(tmp_path / "a"), torch.device("cpu"))
    _, held_out, _ = split_dataset(cfg)
    real = trained.open_loop

    def oracle(copying):
        def open_loop(enc, actions, context, horizon):
            out = real(enc, actions, context, horizon)
            frames = enc.frame_codes[:, context - 1:context].expand(-1, horizon, -1) if copying else \
                enc.frame_codes[:, context:context + horizon]
            return {**out, "frame_codes": frames}
        return open_loop

    for copying in (False, True):
        trained.open_loop = oracle(copying)
        result = evaluate_wm(trained, held_out, cfg, torch.device("cpu"), status_names=["hp"])
        for hz in cfg.eval.horizons:
            assert result[f"h{hz}/status_acc"] == (result[f"h{hz}/status_acc_copy"] if copying else 100.0)
            assert result[f"h{hz}/status_acc_hp"] == result[f"h{hz}/status_acc"]



def test_config_data_shows_the_config_a_data_command_would_run(tmp_path, capsys):
    """`run.py config --data DIR` takes the dataset as `pretrain --data` (frames, discovery, its preset) and, with --for
    train-wm, as `train-wm --data` (its 3 actions and 1 status token fill the dynamics' sizes); train has none."""
    root = toy_dataset(tmp_path / "d", status=True)
    assert run.main(["config", "--for", "train-wm", "--data", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# run.py train-wm --data {root}, preset configs/wm_crafter_cpu.yaml\n")
    assert f"  root: {root}\n" in out and "  num_actions: 3  # set by the run from the env" in out
    assert "  frame_vars: 9  # set by the run from frame.vars + the env's 1 status tokens" in out
    assert run.main(["config", "--data", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# run.py pretrain --data {root}, preset configs/frames_discovery_cpu.yaml\n")
    assert "task: discovery\n" in out and "  source: frames\n" in out and f"  root: {root}\n" in out
    assert run.main(["config", "--for", "train", "--data", str(root)]) == 2
    assert "`train` collects its own episodes" in capsys.readouterr().err
    clevr = tmp_path / "clevr"  # a dataset either command would refuse is refused here, nothing printed
    for split in ("images/train", "scenes"):
        (clevr / split).mkdir(parents=True)
    for command in ("pretrain", "train-wm"):
        assert run.main(["config", "--for", command, "--data", str(clevr)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"error: {clevr} is a CLEVR root, not an episode dataset")

@pytest.mark.parametrize("carry_grad", [True, False])
def test_batched_encode_matches_frame_by_frame(tmp_path, monkeypatch, carry_grad):
    """encode runs the backbone, quantizer, decoder and frame tokenizer once over all frames; the codes, losses
    and gradients are those of the autoencoder run frame by frame with slots carried over (as constants, for
    encoder.carry_grad=false, whose slot module also runs once over all frames). The Gumbel noise is taken out
    (relaxed one-hots = softmax(logits / tau)), since batching draws it in another order."""
    import torch.nn.functional as F

    from world_model.slots import vq

    monkeypatch.setattr(vq.F, "gumbel_softmax", lambda logits, tau, hard, dim: (logits / tau).softmax(dim))
    cfg = wm_cfg(toy_dataset(tmp_path / "d"), f"encoder.carry_grad={carry_grad}")
    train, _, _ = split_dataset(cfg)
    images = to_batch(train.sample(2, 4), 16, torch.device("cpu"))["images"]
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    assert wm.carry_grad == carry_grad
    torch.manual_seed(0)  # the first frame's slot initialization
    enc = wm.encode(images)
    (enc.recon_loss + enc.kl).backward()
    batched = [p.grad.clone() for p in wm.autoencoder.parameters()]
    wm.zero_grad()
    torch.manual_seed(0)
    codes, recon, kl, prev = [], [], [], None
    for i in range(images.shape[1]):
        out, dec = wm.autoencoder(images[:, i], prev)
        prev = out.raw_slots if carry_grad else out.raw_slots.detach()
        codes.append(out.codes)
        recon.append(F.mse_loss(dec.recon, images[:, i]))
        kl.append(out.kl)
    recon_loss, kl = torch.stack(recon).mean(), torch.stack(kl).mean()
    (recon_loss + kl).backward()
    assert torch.equal(enc.slot_codes, torch.stack(codes, 1))
    torch.testing.assert_close(enc.recon_loss, recon_loss)
    torch.testing.assert_close(enc.kl, kl)
    for p, g in zip(wm.autoencoder.parameters(), batched):
        torch.testing.assert_close(g, p.grad)


def test_frozen_pretrained_encoder_and_errors(tmp_path, capsys):
    from test_pretrain import TINY

    root = toy_dataset(tmp_path / "d")
    pre = tmp_path / "pre"
    assert run.main(["pretrain", "--data", str(root), "--run-dir", str(pre), "--no-progress", *TINY,
                     "data.resolution=16", "train.steps=1", "model.vq.enabled=true", "model.vq.num_vars=2"]) == 0
    cfg = wm_cfg(root, f"encoder.checkpoint={pre}")
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    assert not any(p.requires_grad for p in wm.autoencoder.parameters())
    assert cfg.dynamics.num_slots == 4 and cfg.dynamics.num_vars == 2  # taken from the pretrained encoder
    assert cfg.encoder.model.num_slots == 4  # the checkpoint's encoder, not the config's 3 slots
    capsys.readouterr()
    build_wm_for(wm_cfg(root, f"encoder.checkpoint={pre}"), 3, torch.device("cpu"), env="nethack")  # another game's
    assert (f"note: encoder.checkpoint={pre} was pretrained on toy frames; this run is on nethack: its slots may not "
            "fit nethack's objects") in capsys.readouterr().err
    build_wm_for(wm_cfg(root, f"encoder.checkpoint={pre}"), 3, torch.device("cpu"), env="toy")
    assert "was pretrained on" not in capsys.readouterr().err
    # `run.py config` shows the encoder the run will use, and the dynamics sizes that follow from it
    assert run.main(["config", "--for", "train-wm", f"data.root={root}", f"encoder.checkpoint={pre}"]) == 0
    shown = capsys.readouterr().out
    assert "# encoder.model and encoder.resolution: those of encoder.checkpoint" in shown
    assert "  num_slots: 4  # set by the run from encoder.model.num_slots" in shown
    assert "  num_actions: 3  # set by the run from the env" in shown  # the dataset's
    train, _, _ = split_dataset(cfg)
    loss, stats, _ = wm.loss(to_batch(train.sample(2, 4), 16, torch.device("cpu")), 0.01)
    assert "loss_slot_recon" not in stats
    novq = tmp_path / "novq"
    assert run.main(["pretrain", "--data", str(root), "--run-dir", str(novq), "--no-progress", *TINY,
                     "data.resolution=16", "train.steps=1", "model.vq.enabled=false"]) == 0
    with pytest.raises(ValueError, match=f"encoder.checkpoint={novq} was pretrained without one: pretrain with "
                       "model.vq.enabled=true"):
        build_wm_for(wm_cfg(root, f"encoder.checkpoint={novq}"), 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a VQ slot encoder: encoder.model.vq.enabled=false would give it none"):
        build_wm_for(wm_cfg(root, "encoder.model.vq.enabled=false"), 3, torch.device("cpu"))
    capsys.readouterr()
    assert run.main(["train-wm", "--data", str(root), "--run-dir", str(tmp_path / "wm_novq"), "--no-progress",
                     f"encoder.checkpoint={novq}"]) == 2
    said = capsys.readouterr()  # refused before the config is printed: the error is the last line, not lost above it
    assert said.out == "" and "was pretrained without one" in said.err
    with pytest.raises(ValueError, match="max_steps"):
        build_wm_for(wm_cfg(root, "dynamics.max_steps=3"), 3, torch.device("cpu"))


def test_a_jointly_fine_tuned_encoders_temperature_anneals_on_from_its_pretraining(tmp_path, capsys):
    """encoder.mode=joint with a pretrained VQ encoder: its Gumbel temperature goes on from where pretraining left it
    (the run's config records the rest of the anneal, and `run.py config` shows it), not hot from tau_start again; a
    frozen encoder keeps its run's settings."""
    from test_pretrain import TINY
    from world_model.config import VQConfig, continued_anneal
    from world_model.slots.vq import temperature

    root = toy_dataset(tmp_path / "d")
    pre = tmp_path / "pre"
    assert run.main(["pretrain", "--data", str(root), "--run-dir", str(pre), "--no-progress", *TINY,
                     "data.resolution=16", "train.steps=2", "model.vq.enabled=true", "model.vq.num_vars=2",
                     "model.vq.anneal_steps=4"]) == 0
    reached = temperature(2, 1.0, 0.1, 4)  # sqrt(0.1)
    capsys.readouterr()
    assert run.main(["train-wm", "--data", str(root), "--run-dir", str(tmp_path / "wm"), "--no-progress",
                     *(o for o in TINY_WM if not o.startswith("encoder.")),
                     f"encoder.checkpoint={pre}", "encoder.mode=joint", "train.steps=1"]) == 0
    shown = capsys.readouterr().out
    assert "; its VQ temperature anneals on from where its step 2 left it (tau_start, anneal_steps)" in shown
    assert run._anneal_note(VQConfig(anneal_steps=4), 4) == \
        "stays at tau_end, which its pretraining reached by its step 4"  # pretrained past the anneal
    capsys.readouterr()
    assert run.main(["train-wm", "--data", str(root), "--run-dir", str(tmp_path / "wm2"), f"encoder.checkpoint={pre}",
                     "encoder.mode=joint", "encoder.model.vq.tau_start=1.0"]) == 2
    assert ("encoder.model.vq.tau_start=1.0 would not apply: encoder.mode=joint continues the VQ temperature anneal "
            f"of encoder.checkpoint={pre} from its step 2, which sets tau_start and anneal_steps; drop it") in \
        capsys.readouterr().err
    vq = load_config(WorldModelConfig, tmp_path / "wm" / "config.yaml").encoder.model.vq
    assert (vq.tau_start, vq.tau_end, vq.anneal_steps) == (pytest.approx(reached), 0.1, 2)
    rows = read_jsonl(tmp_path / "wm" / "metrics.jsonl")
    assert [r["train/vq_tau"] for r in rows if "train/vq_tau" in r] == [pytest.approx(reached)]
    assert run.main(["config", "--for", "train-wm", f"data.root={root}", f"encoder.checkpoint={pre}",
                     "encoder.mode=frozen"]) == 0
    shown = capsys.readouterr().out
    assert "anneals on" not in shown and "tau_start: 1.0" in shown and "anneal_steps: 4" in shown
    # the continued schedule is the pretraining one shifted by its steps, before and after the anneal ends
    model = load_config(WorldModelConfig, tmp_path / "wm" / "config.yaml").encoder.model
    for steps in (1, 3, 4, 9):
        v = continued_anneal(model, steps).vq
        for u in (0, 1, 2, 7):
            assert temperature(u, v.tau_start, v.tau_end, v.anneal_steps) == \
                pytest.approx(temperature(steps + u, model.vq.tau_start, 0.1, model.vq.anneal_steps))


def test_a_run_resumes_from_anywhere_after_its_inputs_move(tmp_path, monkeypatch, capsys):
    """A run records its data and encoder paths absolute, so it resumes from another working directory; a resume
    and eval-wm rebuild the encoder from the run's own checkpoint (still frozen), so the pretraining run may move;
    moved data is named in one line and given back with data.root."""
    from test_pretrain import TINY

    monkeypatch.chdir(tmp_path)
    toy_dataset(tmp_path / "d")
    assert run.main(["pretrain", "--data", "d", "--run-dir", "pre", "--no-progress", *TINY, "data.resolution=16",
                     "train.steps=1", "model.vq.enabled=true", "model.vq.num_vars=2"]) == 0
    assert run.main(["train-wm", "--run-dir", "wm", "--no-progress", *TINY_WM, "data.root=d", "encoder.checkpoint=pre",
                     "train.steps=2"]) == 2  # TINY_WM's encoder sizes are not pre's: refused, not dropped
    assert "error: encoder.model.num_slots=3 would not apply: encoder.checkpoint=" in capsys.readouterr().err
    own_encoder = [o for o in TINY_WM if not o.startswith("encoder.")]
    assert run.main(["train-wm", "--run-dir", "wm", "--no-progress", *own_encoder, "data.root=d", "encoder.checkpoint=pre",
                     "train.steps=2"]) == 0
    saved = load_config(WorldModelConfig, tmp_path / "wm" / "config.yaml")
    assert (saved.data.root, saved.encoder.checkpoint) == (str(tmp_path / "d"), str(tmp_path / "pre"))
    capsys.readouterr()  # the start's command line again: its relative encoder path is the one recorded absolute
    assert run.main(["train-wm", "--resume", "wm", "--no-progress", "encoder.checkpoint=pre", "train.steps=2"]) == 0
    assert "already at step 2" in capsys.readouterr().err
    before = torch.load(tmp_path / "wm" / "checkpoints" / "latest.pt", weights_only=False)["model"]
    (tmp_path / "pre").rename(tmp_path / "pre_moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert run.main(["train-wm", "--resume", "../wm", "--no-progress", "train.steps=3"]) == 0
    after = torch.load(tmp_path / "wm" / "checkpoints" / "latest.pt", weights_only=False)
    assert after["step"] == 3 and "  mode: frozen\n" in (tmp_path / "wm" / "config.yaml").read_text()
    encoder = [k for k in before if k.startswith("autoencoder.")]
    assert encoder and all(torch.equal(before[k], after["model"][k]) for k in encoder)  # frozen, as it trained
    assert any(not torch.equal(before[k], after["model"][k]) for k in before if k.startswith("dynamics."))
    capsys.readouterr()
    assert run.main(["eval-wm", "--checkpoint", "../wm", "--out", "e", "--segments", "2"]) == 0
    said = capsys.readouterr().out  # no status tokens in this game: the legend names no status column
    assert "frame_mse: the imagined codes decoded" in said and "status" not in said
    # resumed from Python with a config of its own (the preset's encoder.model): the run's recorded encoder is built
    again = train_wm(wm_cfg(tmp_path / "d", f"encoder.checkpoint={tmp_path / 'pre'}", "train.steps=3"),
                     str(tmp_path / "wm"), resume=True, progress=False)
    assert "h1/code_acc" in again
    (tmp_path / "d").rename(tmp_path / "d2")
    capsys.readouterr()
    assert run.main(["train-wm", "--resume", "../wm", "--no-progress", "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.root={tmp_path / 'd'}, the data ../wm trained on, does not exist" in err
    assert run.main(["train-wm", "--resume", "../wm", "--no-progress", "train.steps=4", "data.root=../d2"]) == 0
    (tmp_path / "d2").rename(tmp_path / "d3")
    capsys.readouterr()
    assert run.main(["eval-wm", "--checkpoint", "../wm", "--out", "e2", "--segments", "2"]) == 2
    assert "does not exist; if it moved, pass --data DIR" in capsys.readouterr().err
    assert run.main(["eval-wm", "--checkpoint", "../wm", "--out", "e2", "--segments", "2", "--data", "../d3"]) == 0
    assert run.main(["eval-wm", "--checkpoint", "../wm", "--segments", "2", "--data", "../d3"]) == 0
    assert f"written to {Path('../wm/eval_wm_data_d3/eval_wm.json')}" in capsys.readouterr().out  # not over eval_wm
    assert load_config(WorldModelConfig, tmp_path / "wm" / "config.yaml").data.root == str(tmp_path / "d2")


def test_train_resume_exact_and_eval_cli(tmp_path, capsys):
    root = toy_dataset(tmp_path / "d")
    a = train_wm(wm_cfg(root, "train.steps=4", "encoder.mode=frozen"), str(tmp_path / "a"), progress=False)
    assert "  mode: joint\n" in (tmp_path / "a" / "config.yaml").read_text()  # no encoder.checkpoint: trained jointly
    train_wm(wm_cfg(root, "train.steps=2"), str(tmp_path / "b"), progress=False)
    b = train_wm(wm_cfg(root, "train.steps=4"), str(tmp_path / "b"), resume=True, progress=False)
    assert a == b  # same evaluation after resuming from step 2, and the same weights, optimizer and RNG state
    assert_same_state(checkpoint(tmp_path / "a"), checkpoint(tmp_path / "b"))
    assert "held-out split" not in capsys.readouterr().err
    # the finished run resumed: its final evaluation read back from the log, not run and logged a second time
    assert train_wm(wm_cfg(root, "train.steps=2"), str(tmp_path / "b"), resume=True, progress=False) == b
    assert load_config(WorldModelConfig, tmp_path / "b" / "config.yaml").train.steps == 4  # not the shorter override
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/h1/code_acc" in r] == [2, 4]  # each once
    # resumed with other evaluation settings, the finished run evaluates again: its logged evaluation no longer holds
    again = train_wm(wm_cfg(root, "train.steps=4", "eval.horizons=[1,2]"), str(tmp_path / "b"), resume=True,
                     progress=False)
    assert "h2/code_acc" in again and "h3/code_acc" not in again
    assert train_wm(wm_cfg(root, "train.steps=4", "eval.horizons=[1,2]"), str(tmp_path / "b"), resume=True,
                    progress=False) == again  # and then holds: read back, not run again
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/h1/code_acc" in r] == [2, 4, 4]
    other = tmp_path / "o"  # another game's episodes (5 actions): refused before its weights misfit
    w = EpisodeWriter(other, {"env": "other", "num_actions": 5})
    for _ in range(3):
        w.begin(0, np.zeros((16, 16, 3), np.uint8))
        for t in range(9):
            w.step(0, np.zeros((16, 16, 3), np.uint8), 4, 0.0, terminated=False, truncated=t == 8)
    with pytest.raises(DataError, match="this run trained on toy episodes; data.root=.* holds other ones"):
        train_wm(wm_cfg(other, "train.steps=5"), str(tmp_path / "b"), resume=True, progress=False)
    grown = toy_dataset(tmp_path / "g")
    train_wm(wm_cfg(grown, "train.steps=2"), str(tmp_path / "c"), progress=False)
    toy_dataset(grown, episodes=2, seed=1)  # more episodes collected into the run's dataset
    train_wm(wm_cfg(grown, "train.steps=3"), str(tmp_path / "c"), resume=True, progress=False)
    assert "changed since this run's last checkpoint, so its held-out split moved" in \
        capsys.readouterr().err
    for key in ("h1/code_acc", "h3/frame_mse", "h3/code_acc_copy", "h1/reward_mae"):
        assert np.isfinite(a[key])
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "eval_wm.json").read_text())
    assert result["step"] == 4 and len(list((tmp_path / "e").glob("real_vs_imagined.*"))) == 1
    assert result["picture"] == str(tmp_path / "e" / "real_decoded_imagined.png") and Path(result["picture"]).is_file()
    out = capsys.readouterr().out
    assert "frame_mse_copy_decoded" in out and "real_vs_imagined" in out
    assert "no lower than frame_mse_decoder_floor" in out  # the columns explained under the table
    held = result["held_out_episodes"], result["held_out_steps"]  # what the segments are drawn from, said
    assert held[0] >= 1 and f"segments held out: the last {held[0]} episodes ({held[1]} steps)" in out
    # its slot encoder and decoder pictured on game frames, with a note that it learned on other frames
    assert run.main(["visualize", "--checkpoint", str(tmp_path / "a"), "--env", "crafter", "--frames", "1",
                     "--out", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "summary.json").read_text())["step"] == 4
    assert "was trained on toy frames, shown crafter frames" in capsys.readouterr().err
    # another game's dataset (other env, other action count) is refused in one line, not an embedding IndexError
    other = tmp_path / "o"
    w = EpisodeWriter(other, {"env": "other", "num_actions": 5})
    for _ in range(2):
        w.begin(0, np.zeros((16, 16, 3), np.uint8))
        for t in range(9):
            w.step(0, np.zeros((16, 16, 3), np.uint8), 4, 0.0, terminated=False, truncated=t == 8)
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "a"), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds other episodes with 5 actions; this world model was trained on toy with 3" in err


def test_ctrl_c_between_checkpoints_stops_after_its_step_with_a_checkpoint(tmp_path, monkeypatch, ctrl_c):
    """Ctrl-C during step 2 of a run that checkpoints every 100: its checkpoint is of step 2, and the resumed run
    ends as a run never stopped does."""
    from stopping import ctrl_c_in_call
    import world_model.train_wm as tw

    root = toy_dataset(tmp_path / "d")
    over = ["train.steps=4", "train.ckpt_every=100", "train.eval_every=0"]
    train_wm(wm_cfg(root, *over), str(tmp_path / "straight"), progress=False)
    real = tw.guarded_update
    monkeypatch.setattr(tw, "guarded_update", ctrl_c_in_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        train_wm(wm_cfg(root, *over), str(tmp_path / "stopped"), progress=False)
    assert checkpoint(tmp_path / "stopped")["step"] == 2 and tw.guarded_update.calls == 2
    monkeypatch.setattr(tw, "guarded_update", real)
    train_wm(wm_cfg(root, *over), str(tmp_path / "stopped"), resume=True, progress=False)
    assert_same_state(checkpoint(tmp_path / "stopped")["model"], checkpoint(tmp_path / "straight")["model"])


def test_eval_wm_scores_a_kept_evaluation_checkpoint_beside_the_latest(tmp_path, capsys):
    """train.keep_checkpoints=true: `eval-wm --step N` scores the world model of step N into eval_wm_step<N>/."""
    root = toy_dataset(tmp_path / "d")
    rd = tmp_path / "run"
    train_wm(wm_cfg(root, "train.steps=4", "train.eval_every=2", "train.keep_checkpoints=true"), str(rd),
             progress=False)
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["latest.pt", "step_2.pt", "step_4.pt"]
    capsys.readouterr()
    assert run.main(["eval-wm", "--checkpoint", str(rd), "--segments", "2", "--step", "2"]) == 0
    assert "open-loop prediction, step 2," in capsys.readouterr().out
    assert json.loads((rd / "eval_wm_step2" / "eval_wm.json").read_text())["step"] == 2
    assert not (rd / "eval_wm").exists()


def test_compare_notes_world_model_runs_evaluated_under_other_settings(tmp_path, capsys):
    """Open-loop scores from another context length or another dataset's held-out episodes do not measure the same
    thing: compare says which settings differ (for slot encoders on game frames, the held-out fraction, not the
    CLEVR crop they do not use)."""
    preset = (Path(run.__file__).parent / "configs" / "wm_crafter_cpu.yaml").read_text()
    for name, context, root in (("a", 8, "/data/crafter"), ("b", 4, "/data/crafter2")):
        (tmp_path / name).mkdir()
        text = preset.replace("data:\n", f"data:\n  root: {root}\n").replace("  context: 8", f"  context: {context}")
        (tmp_path / name / "config.yaml").write_text(text)
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/h1/code_acc": 50.0,
                                                                   "eval/segments": 4}) + "\n")
    assert run.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("note: evaluated under other settings: data.root "
                                                       "(/data/crafter, /data/crafter2); eval.context (8, 4)")
    (tmp_path / "c").mkdir()  # a run that differs in a setting no column names: a row says which
    (tmp_path / "c" / "config.yaml").write_text((tmp_path / "a" / "config.yaml").read_text().replace(
        "  layers: 2", "  layers: 1").replace("  steps: ", "  seed: 7\n  steps: "))
    (tmp_path / "c" / "metrics.jsonl").write_text((tmp_path / "a" / "metrics.jsonl").read_text())
    assert run.main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["dynamics.layers"] == ["2", "1"] and rows["train.seed"] == ["0", "7"]
    names = list(rows)
    assert names.index("dynamics.layers") < names.index("train.seed") < names.index("step")  # config order, then step
    assert not [name for name in rows if name.startswith("note")]
    frames = (Path(run.__file__).parent / "configs" / "frames_discovery_cpu.yaml").read_text()
    for name, fraction, crop, root in (("f1", 0.1, "false", "/data/crafter"),
                                       ("f2", 0.2, "true", "/data/../data/crafter/")):
        (tmp_path / name).mkdir()  # slot encoders on game frames; one folder, written two ways
        (tmp_path / name / "config.yaml").write_text(frames.replace(
            "  source: frames\n", f"  source: frames\n  root: {root}\n  eval_fraction: {fraction}\n"
                                  f"  crop: {crop}\n"))
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/mse": 0.01}) + "\n")
    assert run.main(["compare", str(tmp_path / "f1"), str(tmp_path / "f2")]) == 0  # crop: not used on frames
    assert capsys.readouterr().out.splitlines()[-1] == "note: evaluated under other settings: data.eval_fraction (0.1, 0.2)"


def test_an_evaluation_that_fails_loses_no_checkpoint(tmp_path, monkeypatch):
    """The checkpoint at a step is written before that step's evaluation: a crash (or Ctrl-C) there keeps it. The
    evaluation runs under the autocast training ran under (train.amp)."""
    import world_model.train_wm as tw

    asked = []

    def broken(*args, **kwargs):
        asked.append(kwargs["amp"])
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(tw, "evaluate_wm", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_wm(wm_cfg(toy_dataset(tmp_path / "d"), "train.steps=2", "train.amp=false"), str(tmp_path / "a"),
                 progress=False)
    assert torch.load(tmp_path / "a" / "checkpoints" / "latest.pt", weights_only=False)["step"] == 2
    assert asked == [False]


def test_datasets_too_small_to_train_and_evaluate_are_refused_before_training(tmp_path):
    """One episode leaves nothing to hold out; held-out episodes shorter than the evaluation's context + horizon
    leave nothing to evaluate: each is a one-line DataError before any training step. Training episodes shorter
    than a training segment are fine (padded)."""

    with pytest.raises(DataError, match="holds 1 episode.*at least 2"):
        split_dataset(wm_cfg(toy_dataset(tmp_path / "one", episodes=1)))
    split_dataset(wm_cfg(toy_dataset(tmp_path / "d"), "data.seq_len=12"))  # training segments are padded
    with pytest.raises(DataError, match=r"held-out \(the last 1\) episodes are at most 10 steps long, shorter than "
                       r"the 11 steps of eval.context \+ max\(eval.horizons\)"):
        split_dataset(wm_cfg(tmp_path / "d", "eval.horizons=[1,9]"))
    # eval-wm evaluates as the run trained, and an agent's episodes are all held out: neither is told otherwise
    with pytest.raises(DataError, match=r": the episodes are at most 10 steps long, .*; collect longer episodes \(this "
                       r"run evaluates with the context and horizons it has\)$"):
        split_dataset(wm_cfg(tmp_path / "d", "eval.horizons=[1,9]"), all_held_out=True, training=False)
    # a file that `run.py collect` did not name, and an episode of another frame size: each named in one line
    stray = tmp_path / "d" / "episodes" / "notes.npz"
    stray.write_bytes(b"")
    with pytest.raises(DataError, match=r"notes.npz: not an episode file name of `run.py collect`"):
        split_dataset(wm_cfg(tmp_path / "d"))
    stray.unlink()
    mixed = toy_dataset(tmp_path / "mixed")
    last = sorted((mixed / "episodes").glob("*.npz"))[-1]
    with np.load(last) as f:
        episode = dict(f)
    episode["image"] = np.zeros((len(episode["image"]), 8, 8, 3), np.uint8)
    np.savez(last, **episode)
    with pytest.raises(DataError, match=rf"{last.name} holds frames of shape \(8, 8, 3\)"):
        split_dataset(wm_cfg(mixed))
    with pytest.raises(DataError, match=rf"{last.name} holds 8x8 frames, the episodes before it 16x16"):
        load_frames(mixed)


@pytest.mark.parametrize("preset", ["configs/wm_crafter.yaml", "configs/wm_crafter_cpu.yaml"])
def test_every_wm_preset_trains_one_step(preset, tmp_path):
    """Each world-model preset's architecture (fresh encoder), one update at batch 2 on 4-step segments."""
    root = toy_dataset(tmp_path / "d", size=64, length=24)  # held-out episodes as long as the eval segments
    cfg = load_config(WorldModelConfig, preset, [f"data.root={root}", "data.seq_len=4"])
    torch.manual_seed(0)
    train, _, _ = split_dataset(cfg)
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    loss, _, _ = wm.loss(to_batch(train.sample(2, 4), cfg.encoder.resolution, torch.device("cpu")), 0.01)
    loss.backward()
    assert torch.isfinite(loss)


def test_copy_baselines_on_still_frames(tmp_path):
    """Frames that never change: copying the last frame is exact, and the reward baseline is mean |reward|."""
    from world_model.train_wm import evaluate_wm

    cfg = wm_cfg(toy_dataset(tmp_path / "d", moves=1), "eval.segments=8")
    _, held, _ = split_dataset(cfg)
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    result = evaluate_wm(wm, held, cfg, torch.device("cpu"))
    assert result["h1/frame_mse_copy"] == 0.0 and result["h3/frame_mse_copy"] == 0.0
    held.rng = np.random.default_rng(2025)  # evaluate_wm's segment draw, repeated
    rewards = held.sample(8, 5)["reward"][:, 2:]
    assert result["h3/reward_mae_zero"] == pytest.approx(float(np.abs(rewards[:, 2]).mean()))


def test_open_loop_evaluation_runs_under_the_autocast_training_runs_under(tmp_path, monkeypatch):
    """With train.amp (CUDA) the held-out segments are encoded and imagined under bf16 autocast, as training encodes
    them, so the dynamics is scored on the codes it learned (here the CPU's bf16 autocast stands in)."""
    import world_model.train_wm as tw

    entered = []

    def cpu_autocast(device, enabled):
        entered.append(enabled)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    monkeypatch.setattr(tw, "autocast", cpu_autocast)
    cfg = wm_cfg(toy_dataset(tmp_path / "d"), "eval.segments=4")
    _, held, _ = split_dataset(cfg)
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    mixed, plain = (evaluate_wm(wm, held, cfg, torch.device("cpu"), amp=amp) for amp in (True, False))
    assert entered == [True, False]
    assert all(math.isfinite(v) for v in (*mixed.values(), *plain.values()))
    assert mixed["h1/frame_mse"] != plain["h1/frame_mse"]  # bf16 decoding: the autocast was in force


def test_train_wm_logs_the_mean_of_the_updates_since_the_last_row(tmp_path, monkeypatch):
    """As the agent loop does: a row's losses average every update since the previous row, not the last batch's."""
    from world_model.wm import WorldModel

    losses, loss = [], WorldModel.loss

    def recorded(self, batch, beta, counts=None):
        out = loss(self, batch, beta, counts)
        losses.append(float(out[0].detach()))
        return out

    monkeypatch.setattr(WorldModel, "loss", recorded)
    train_wm(wm_cfg(toy_dataset(tmp_path / "d"), "train.steps=4", "train.log_every=2", "train.eval_every=0"),
             str(tmp_path / "r"), progress=False)
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4] and len(losses) == 4 and len(set(losses)) == 4
    assert [r["train/loss"] for r in rows] == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:]) / 2], rel=1e-5)


def test_a_world_model_evaluation_stopped_midway_is_run_on_resume(tmp_path, monkeypatch):
    import world_model.train_wm as wm_training
    from stopping import interrupted_once

    monkeypatch.setattr(wm_training, "evaluate_wm", interrupted_once(wm_training.evaluate_wm))
    cfg = wm_cfg(toy_dataset(tmp_path / "d"), "train.steps=4", "train.eval_every=2", "train.ckpt_every=3")
    given = copy.deepcopy(cfg)
    with pytest.raises(KeyboardInterrupt):
        train_wm(cfg, str(tmp_path / "r"), progress=False)
    train_wm(cfg, str(tmp_path / "r"), resume=True, progress=False)
    assert cfg == given  # the derived sizes go to config.yaml, not into the caller's config
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "eval/h1/code_acc" in r] == [2, 4]


@pytest.mark.parametrize("damage, message", [
    (lambda ep: {**ep, "image": ep["image"].astype(np.float32)}, "expected uint8 values, got float32"),
    (lambda ep: {**ep, "action": ep["action"][:-2]}, "steps, but other keys have"),
    (lambda ep: {**ep, "action": ep["action"] + 5}, "actions outside the env's 3"),
    (lambda ep: {**ep, "reward": ep["reward"] * np.nan}, "non-finite rewards"),
    (lambda ep: {**ep, "stats": np.zeros((len(ep["action"]), 2))}, "holds stats, unlike"),
])
def test_a_damaged_or_foreign_episode_is_a_one_line_error_that_names_it(tmp_path, damage, message):
    """Each of these was a traceback, a crash at the final evaluation, or a run that skipped every update."""
    root = toy_dataset(tmp_path / "d", episodes=4)
    path = sorted((root / "episodes").glob("*.npz"))[2]
    with np.load(path) as f:
        ep = dict(f)
    np.savez_compressed(path, **damage(ep))
    with pytest.raises(DataError, match=f"{path.name}.*{message}"):
        split_dataset(wm_cfg(root))


def test_eval_wm_says_when_the_held_out_split_moved_since_training(tmp_path, capsys):
    root = toy_dataset(tmp_path / "d", episodes=12)
    train_wm(wm_cfg(root, "train.steps=2", "train.eval_every=0"), str(tmp_path / "r"), progress=False)
    capsys.readouterr()
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "r")]) == 0
    assert "held-out split moved" not in capsys.readouterr().err
    sorted((root / "episodes").glob("*.npz"))[-1].unlink()  # a training episode is now held out
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "r")]) == 0
    assert "held-out split moved since this run trained" in capsys.readouterr().err


def test_world_model_loss_shifts_actions_inverts_terminals_and_sums_its_terms(tmp_path, monkeypatch):
    """WorldModel.loss in the episode layout (action t led to frame t): the dynamics input at step t is the action
    taken AFTER frame t (actions [[0, 1, 2, 0]] -> [[1, 2, 0, 0]]), continuation targets are 1 - is_terminal, and the
    loss is the dynamics loss + frame-token reconstruction + slot reconstruction + vq_beta x KL."""
    import world_model.wm as wm_module
    from world_model.train_wm import build_wm_for, split_dataset, to_batch

    cfg = wm_cfg(toy_dataset(tmp_path / "d"))
    train, _, _ = split_dataset(cfg)
    torch.manual_seed(0)
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    batch = to_batch(train.sample(1, 4, np.random.default_rng(0)), 16, torch.device("cpu"))
    batch["action"] = torch.tensor([[0, 1, 2, 0]])
    batch["is_terminal"] = torch.tensor([[False, False, False, True]])
    seen, real_forward, real_loss = {}, wm.dynamics.forward, wm_module.dynamics_loss

    def forward(slot_codes, frame_codes, actions, *rest):
        seen["actions"] = actions.clone()
        return real_forward(slot_codes, frame_codes, actions, *rest)

    def dynamics_loss(pred, slots, frames, reward, continues, *rest):
        seen["continues"] = continues.clone()
        seen["dyn_loss"], stats = real_loss(pred, slots, frames, reward, continues, *rest)
        return seen["dyn_loss"], stats

    monkeypatch.setattr(wm.dynamics, "forward", forward)
    monkeypatch.setattr(wm_module, "dynamics_loss", dynamics_loss)
    loss, stats, _ = wm.loss(batch, 0.5)
    assert seen["actions"].tolist() == [[1, 2, 0, 0]]
    assert seen["continues"].tolist() == [[1.0, 1.0, 1.0, 0.0]]
    want = seen["dyn_loss"] + stats["loss_frame_recon"] + stats["loss_slot_recon"] + 0.5 * stats["kl"]
    assert stats["kl"] > 0 and stats["loss_frame_recon"] > 0
    torch.testing.assert_close(loss.detach(), want)


def test_open_loop_feeds_the_real_action_after_each_imagined_frame(tmp_path, monkeypatch):
    """open_loop(context=2, horizon=3): the context pass reads the actions taken after frames 0 and 1 (episode-layout
    actions 1 and 2), then imagined frame 2 goes in with action 3 and imagined frame 3 with action 4."""
    from world_model.train_wm import build_wm_for, split_dataset, to_batch

    cfg = wm_cfg(toy_dataset(tmp_path / "d"))
    train, _, _ = split_dataset(cfg)
    torch.manual_seed(0)
    wm = build_wm_for(cfg, 6, torch.device("cpu")).eval()
    batch = to_batch(train.sample(1, 6, np.random.default_rng(0)), 16, torch.device("cpu"))
    enc = wm.encode(batch["images"])
    calls, real = [], wm.dynamics.forward

    def forward(slot_codes, frame_codes, actions, *rest):
        calls.append(actions[0].tolist())
        return real(slot_codes, frame_codes, actions, *rest)

    monkeypatch.setattr(wm.dynamics, "forward", forward)
    wm.open_loop(enc, torch.tensor([[0, 1, 2, 3, 4, 5]]), context=2, horizon=3)
    assert sum(calls, []) == [1, 2, 3, 4]


def test_frames_to_input_scales_uint8_to_0_1():
    """Env frames `b t h w 3` uint8 (torch or numpy) -> `b t 3 h w` float with 255 -> 1.0 and 51 -> 0.2."""
    from world_model.wm import frames_to_input

    frames = torch.zeros(1, 2, 2, 2, 3, dtype=torch.uint8)
    frames[0, 0, ..., 0], frames[0, 1, ..., 2] = 255, 51
    x = frames_to_input(frames, 2)
    assert x.shape == (1, 2, 3, 2, 2)
    torch.testing.assert_close(x[0, 0, 0], torch.ones(2, 2))
    torch.testing.assert_close(x[0, 1, 2], torch.full((2, 2), 0.2))
    torch.testing.assert_close(frames_to_input(frames.numpy(), 2), x)  # env frames as numpy arrays, as envs give them


def test_split_holds_out_the_fewest_last_episodes_reaching_the_fraction(tmp_path):
    """4 episodes of 10 steps, eval_fraction 0.25: the last episode's 10 steps reach 0.25 x 40 = 10 exactly, so one
    episode is held out, not two."""
    from world_model.train_wm import split_dataset

    cfg = wm_cfg(toy_dataset(tmp_path / "d", episodes=4), "data.eval_fraction=0.25")
    train, held, meta = split_dataset(cfg)
    assert (len(train), len(held)) == (30, 10) and meta["held_out"] == ["000003-10.npz"]


def test_a_frozen_encoder_stays_in_eval_mode_when_the_world_model_trains(tmp_path):
    """A world model on a frozen (pretrained) encoder: train() puts the dynamics and the frame tokenizer in training
    mode but keeps the slot autoencoder in eval mode (its quantizer takes the argmax code, not a Gumbel sample), so
    the codes the dynamics learns from do not change from one update to the next; eval() puts everything in eval."""
    from world_model.train_wm import build_wm_for
    from world_model.wm import WorldModel

    cfg = wm_cfg(toy_dataset(tmp_path / "d", episodes=2))
    joint = build_wm_for(cfg, 3, torch.device("cpu"))
    frozen = WorldModel(joint.autoencoder, 16, cfg.frame, joint.dynamics.cfg, joint=False).train()
    assert not frozen.autoencoder.training and not frozen.autoencoder.encoder.vq.training
    assert frozen.dynamics.training and frozen.frame_tokenizer.training
    assert not any(p.requires_grad for p in frozen.autoencoder.parameters())
    joint.train()
    assert joint.autoencoder.training  # a jointly trained encoder samples its codes in training
    frozen.eval()
    assert not frozen.dynamics.training


def test_preflight_refuses_a_dynamics_shorter_than_a_training_segment(tmp_path):
    """The dynamics must hold a training segment (data.seq_len=10): max_steps=8 is refused, naming 10 steps."""
    from envs.errors import UsageError
    from world_model.train_wm import longest_sequence, preflight

    cfg = wm_cfg(tmp_path, "data.seq_len=10")
    assert longest_sequence(cfg) == (10, "data.seq_len")
    with pytest.raises(UsageError, match=r"dynamics.max_steps=8 is shorter than .* \(10 steps: data.seq_len\)"):
        preflight(cfg)


def test_an_evaluation_past_the_trained_time_positions_is_refused_or_fitted(tmp_path, capsys):
    """A 5-step training segment teaches the dynamics time positions 0..3 (its last step predicts nothing, so no
    gradient reaches its time embedding): context 2 + horizon 3 predicts from positions up to 3 and trains; a
    4-step segment is refused before anything runs. eval-wm fits a run that evaluated past them (from before the
    refusal) into them, with a note."""
    from world_model.dynamics import DynamicsConfig, SlotDynamics, dynamics_loss
    from world_model.train_wm import preflight

    dyn = SlotDynamics(DynamicsConfig(num_slots=2, num_vars=1, num_codes=3, frame_vars=0, num_actions=2,
                                      embed_dim=8, layers=1, heads=2, max_steps=8))
    codes, actions = torch.randint(3, (2, 5, 2, 1)), torch.randint(2, (2, 5))
    loss, _ = dynamics_loss(dyn(codes, None, actions), codes, None, torch.zeros(2, 5), torch.ones(2, 5))
    loss.backward()
    learned = dyn.time_embed.weight.grad.abs().sum(-1) > 0
    assert learned.tolist() == [True] * 4 + [False] * 4  # positions 0..3 of a 5-step segment
    root = toy_dataset(tmp_path / "d")
    preflight(wm_cfg(root))  # 2 + 3 = 5 steps
    for override in ("data.seq_len=4", "eval.horizons=[1,4]"):
        with pytest.raises(UsageError, match=r"eval.context \+ max\(eval.horizons\) = 2 \+ \d predicts from time "
                                             r"positions up to \d; data.seq_len=\d segments train the dynamics at "
                                             r"positions 0..\d only"):
            preflight(wm_cfg(root, override))
        with pytest.raises(UsageError, match="predicts from time positions up to"):
            train_wm(wm_cfg(root, override), str(tmp_path / "never"), progress=False)
    assert not (tmp_path / "never").exists()
    train_wm(wm_cfg(root, "train.steps=1", "train.eval_every=0"), str(tmp_path / "r"), progress=False)
    text = (tmp_path / "r" / "config.yaml").read_text()  # as a run from before the refusal recorded it
    (tmp_path / "r" / "config.yaml").write_text(text.replace("  - 3\n", "  - 5\n", 1))
    capsys.readouterr()
    assert run.main(["eval-wm", "--checkpoint", str(tmp_path / "r"), "--segments", "2"]) == 0
    assert ("note: this world model trained on data.seq_len=5 segments (time positions 0..3); its eval.context 2 and "
            "horizons 1, 5 reach past them: context 2, horizons 1, 3") in capsys.readouterr().err
    scored = json.loads((tmp_path / "r" / "eval_wm" / "eval_wm.json").read_text())
    assert "h3/code_acc" in scored and "h5/code_acc" not in scored
    # resumed, such a run is refused with a way on a resume may take (eval.*), which then resumes
    argv = ["train-wm", "--resume", str(tmp_path / "r"), "--no-progress"]
    assert run.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "evaluate within them (eval.horizons=[1,3]; a resume may change eval.*)" in err
    assert run.main([*argv, "eval.horizons=[1,3]"]) == 0
    assert "  - 3\n" in (tmp_path / "r" / "config.yaml").read_text()


def test_held_out_segments_are_scored_chunk_by_chunk_weighted_by_their_size(tmp_path, monkeypatch):
    """5 segments in chunks of 2: each chunk's means weigh by its segments (2, 2, 1); the pictured frames are the
    first chunk's; the reward baseline still matches the whole draw (every chunk is scored on its own segments)."""
    import world_model.train_wm as train_wm

    cfg = wm_cfg(toy_dataset(tmp_path / "d"), "eval.segments=5")
    _, held, _ = split_dataset(cfg)
    wm = build_wm_for(cfg, 3, torch.device("cpu"))
    monkeypatch.setattr(train_wm, "SEGMENT_CHUNK", 2)
    real = train_wm._open_loop_scores
    chunks = []

    def recorded(wm, batch, c, video, status_names):
        chunks.append((len(batch["action"]), video))
        scores, pictures = real(wm, batch, c, video, status_names)
        return {**scores, "h1/code_acc": float(len(chunks))}, pictures  # 1, 2, 3 for the three chunks

    monkeypatch.setattr(train_wm, "_open_loop_scores", recorded)
    result = train_wm.evaluate_wm(wm, held, cfg, torch.device("cpu"), frames=True)
    assert chunks == [(2, True), (2, False), (1, False)] and result["segments"] == 5
    assert result["h1/code_acc"] == pytest.approx((1 * 2 + 2 * 2 + 3 * 1) / 5)
    real, decoded, imagined = result["_frames"]  # the first segment's: 5 steps, decoded from the last context one on
    assert (len(real), len(decoded), len(imagined)) == (5, 4, 3)
    video = train_wm.prediction_video(result["_frames"], 2)  # every step: 16-pixel frames, 4x, under a 16-pixel strip
    assert video.shape == (5, 16 + 4 * (18 + 2), 4 * (3 * 18 + 2), 3)
    strips = video[:, :16]  # the names: the step, and "context" or how far ahead the imagined frame is
    assert (strips > 200).mean() > 0.8 and all((strips[t] != strips[t + 1]).any() for t in range(4))
    # every 4th step from the last context frame: 1 row of 16-pixel frames, 8x upscaled, under the names' strip
    assert train_wm.prediction_picture(result["_frames"], 2).shape == (3, 16 + 8 * (18 + 2), 8 * (3 * 18 + 2))
    rewards = held.sample(5, 5, np.random.default_rng(2025))["reward"][:, 2:]
    assert result["h3/reward_mae_zero"] == pytest.approx(float(np.abs(rewards[:, 2]).mean()))



def test_the_prediction_picture_has_a_row_per_step_and_named_columns():
    """`wm/real_decoded_imagined` (train-wm, eval-wm, the agent): 2 steps of 16-pixel frames, upscaled 8x to 128
    pixels, padded by 2 (16) as `tile` pads, under a 16-pixel strip naming the columns: real (0), decoded (0.5) and
    imagined (1) in that order, each row one step, named on a white band at the foot of its real frame ("given",
    "+4 steps")."""
    from world_model.visualize import PREDICTION_COLUMNS, prediction_grid

    real, decoded, imagined = (torch.full((2, 3, 16, 16), v) for v in (0.0, 0.5, 1.0))
    real[1] = 0.25  # the second step's real frame
    grid = prediction_grid(real, decoded, imagined, [0, 4])
    assert PREDICTION_COLUMNS == ["real", "decoded", "imagined"]
    assert grid.shape == (3, 16 + 8 * (2 * 18 + 2), 8 * (3 * 18 + 2))
    centre = lambda row, col: float(grid[0, 16 + 8 * (2 + 18 * row + 8), 8 * (2 + 18 * col + 8)])  # noqa: E731
    assert [[centre(r, c) for c in range(3)] for r in range(2)] == [[0.0, 0.5, 1.0], [0.25, 0.5, 1.0]]
    assert float(grid[:, :16].min()) < 0.5  # the names, drawn dark on the white strip
    foot = lambda row, col: grid[:, 16 + 8 * (2 + 18 * row + 16) - 12:16 + 8 * (2 + 18 * row + 16),  # noqa: E731
                                 8 * (2 + 18 * col):8 * (2 + 18 * col + 16)]
    for row in range(2):  # the real frame's foot: a white band with dark text; the decoded frame's: untouched
        band = foot(row, 0)
        assert (band > 0.99).float().mean() > 0.5 and float(band.min()) < 0.5
        assert bool((foot(row, 1) == 0.5).all())
    assert not torch.equal(foot(0, 0), foot(1, 0))  # "given", then "+4 steps"


def test_train_wm_prints_its_last_evaluation_once_then_its_json_line(tmp_path, capsys):
    """The table of the last evaluation as it ran, then the one JSON line; a resumed finished run shows the logged
    one (not evaluated again)."""
    root = toy_dataset(tmp_path / "d")
    argv = ["train-wm", "--data", str(root), "--run-dir", str(tmp_path / "r"), "--no-progress", *TINY_WM,
            "train.steps=2", "train.eval_every=0", "eval.segments=2"]
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("open-loop prediction on held-out segments") == 1 and "step 2: open-loop" in out
    # said before it runs too: minutes of evaluation in a log file do not pass in silence
    assert 0 <= out.index("step 2: evaluating on held-out segments\n") < out.index("step 2: open-loop")
    assert json.loads(out.strip().splitlines()[-1])["run_dir"] == str(tmp_path / "r")
    assert run.main(["train-wm", "--resume", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("open-loop prediction on held-out segments (as logged)") == 1
    assert "h1/code_acc" in json.loads(out.strip().splitlines()[-1])


def test_frames_to_input_averages_pixels_when_it_shrinks():
    """A 4x4 frame with every other pixel of every other row white, shrunk to 2x2: each cell is its 2x2 area's mean
    0.25 (nearest-pixel sampling would give 1 or 0)."""
    from world_model.wm import frames_to_input

    f = torch.zeros(1, 1, 4, 4, 3, dtype=torch.uint8)
    f[0, 0, ::2, ::2] = 255
    torch.testing.assert_close(frames_to_input(f, 2), torch.full((1, 1, 3, 2, 2), 0.25))


def test_open_loop_takes_the_most_likely_codes(tmp_path):
    """open_loop's predictions do not depend on the random state: it takes the argmax, not a sample."""
    from world_model.train_wm import build_wm_for, split_dataset, to_batch

    cfg = wm_cfg(toy_dataset(tmp_path / "d"))
    train, _, _ = split_dataset(cfg)
    torch.manual_seed(0)
    wm = build_wm_for(cfg, 6, torch.device("cpu")).eval()
    enc = wm.encode(to_batch(train.sample(1, 6, np.random.default_rng(0)), 16, torch.device("cpu"))["images"])
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(wm.open_loop(enc, torch.tensor([[0, 1, 2, 3, 0, 1]]), context=2, horizon=4))
    for key in ("slot_codes", "frame_codes", "reward", "cont"):
        if runs[0][key] is not None:
            assert torch.equal(runs[0][key], runs[1][key]), key
