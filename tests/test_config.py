"""Presets, overrides and their one-line errors."""
import re
import time
from pathlib import Path

import pytest
import torch

from world_model.config import ConfigError, PretrainConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(str(p) for pattern in ("clevr_*.yaml", "frames_*.yaml") for p in CONFIGS.glob(pattern))


def test_presets_exist():
    names = {Path(p).stem for p in PRESETS}
    assert {"clevr_setpred", "clevr_discovery", "clevr_tiny"} <= names


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_with_the_values_it_writes(preset):
    import yaml
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]

    cfg = OmegaConf.structured(load_config(PretrainConfig, preset))
    written = list(leaves(yaml.safe_load(Path(preset).read_text())))
    assert written and all(OmegaConf.select(cfg, key) == value for key, value in written)


def test_every_checked_key_is_a_key_of_some_command():
    """A renamed or removed key left in a range table would be checked nowhere, silently."""
    from omegaconf import OmegaConf

    from world_model import config

    missing = object()
    schemas = [OmegaConf.structured(schema) for schema in config.run_schemas().values()]
    tables = (config.POSITIVE, config.NON_NEGATIVE, config.ABOVE_ZERO, config.UNIT_INTERVAL, config.AT_LEAST,
              config.CHOICES, config.DERIVED, config.FIXED)
    stale = [key for table in tables for key in table
             if all(OmegaConf.select(cfg, key, default=missing) is missing for cfg in schemas)]
    assert not stale


def test_overrides_are_typed():
    cfg = load_config(PretrainConfig, None, ["model.slots=slot_attention", "train.steps=7", "model.vq.enabled=true",
                                             "model.cnn_channels=[8,8]", "model.cnn_strides=[2,1]"])
    assert cfg.model.slots == "slot_attention" and cfg.train.steps == 7 and cfg.model.vq.enabled
    assert cfg.model.cnn_channels == [8, 8]
    from world_model.config import WorldModelConfig  # Python's None is YAML's null, not the string 'None'
    assert load_config(WorldModelConfig, None, ["encoder.checkpoint=r", "encoder.checkpoint=None"]).encoder.checkpoint \
        is None
    assert load_config(PretrainConfig, None, ["train.grad_clip=inf"]).train.grad_clip == float("inf")  # no clipping


@pytest.mark.parametrize("overrides, message", [
    (["model.slotz=gmm"], "unknown config key 'model.slotz'.*did you mean 'model.slots'"),
    (["train.steps=many"], "bad config value for 'train.steps'"),
    (["model.slots=kmeans"], "model.slots='kmeans' is not one of gmm, slot_attention"),
    (["model.slots=vq"], "not one of gmm, slot_attention; VQ slot codes .* switch on either: model.vq.enabled=true"),
    (["train.steps=${foo}"], r"train.steps: Interpolation key 'foo' not found \(a value in a preset or override\)"),
    (["train.lr=inf"], "train.lr=inf is not a finite number$"),
    (["train.grad_clip=nan"], r"train.grad_clip=nan is not a finite number \(inf: no limit\)"),
    (["model.vq.anneal_steps=-100"], "model.vq.anneal_steps=-100 must be 0 or more"),
    (["train.steps=None"], "override 'train.steps=None'"),  # not Optional: refused, as typed
    (["train.compile_mode=fast"], "train.compile_mode='fast' is not one of default, reduce-overhead"),
    (["train.steps"], "not of the form key=value"),
    (["train.log_every=0"], "train.log_every=0 must be positive"),
    (["train.batch_size=-2"], "train.batch_size=-2 must be positive"),
    (["data.resolution=0"], "data.resolution=0 must be positive"),
    (["train.eval_every=-1"], "train.eval_every=-1 must be 0 or more"),
    (["train.lr=-1"], r"train.lr=-1.0 must be above 0"),
    (["model.slot"], "not of the form key=value"),
    ("train.steps=3", r"overrides are a list of key=value strings .* got a str: 'train.steps=3'"),  # not per letter
])
def test_bad_overrides_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(PretrainConfig, None, overrides)
    assert "\n" not in str(err.value)


def test_the_agent_and_world_model_encoder_choices_are_checked_on_load():
    from agent.config import AgentConfig
    from world_model.config import WorldModelConfig

    for schema in (AgentConfig, WorldModelConfig):
        with pytest.raises(ConfigError, match="encoder.model.slots='slotattention' is not one of gmm, slot_attention"):
            load_config(schema, None, ["encoder.model.slots=slotattention"])


def test_a_pretrained_encoders_unused_settings_are_not_checked():
    """With encoder.checkpoint, the checkpoint's run sets the encoder: this config's encoder.model is reported as
    unused at build time, so its key pairs do not refuse the config."""
    from agent.config import AgentConfig

    cfg = load_config(AgentConfig, None, ["encoder.checkpoint=runs/enc", "encoder.model.cnn_channels=[8]"])
    assert cfg.encoder.model.cnn_channels == [8]



def test_encoder_settings_typed_beside_a_checkpoint_are_refused_and_a_fine_tuned_one_noted(tmp_path, capsys):
    """With encoder.checkpoint its run sets the encoder: encoder.resolution or encoder.model.* typed beside it at
    another value would be dropped, so they are refused (at its own value, they pass); the preset's
    encoder.mode=joint (fine-tuning, several times slower) is noted, a typed one is not; a resume leaves them to its
    own checks."""
    import run
    from agent.config import AgentConfig
    from envs.errors import UsageError
    from world_model.config import save_config

    pre = load_config(PretrainConfig, None, ["data.resolution=48", "model.num_slots=5"])
    (tmp_path / "enc").mkdir()
    save_config(pre, tmp_path / "enc" / "config.yaml")
    given = f"encoder.checkpoint={tmp_path / 'enc'}"
    for typed in ("encoder.resolution=32", "encoder.model.num_slots=3"):
        cfg = load_config(AgentConfig, None, [given, typed])
        with pytest.raises(UsageError, match=f"{typed} would not apply: encoder.checkpoint=.*enc sets the encoder"):
            run._check_encoder(cfg, [given, typed], False)
    same = ["encoder.resolution=48", "encoder.model.num_slots=5"]
    run._check_encoder(load_config(AgentConfig, None, [given, *same]), [given, *same], False)
    assert "note: encoder.mode=joint (not typed: the preset's or the default) fine-tunes the pretrained encoder" in \
        capsys.readouterr().err
    cfg = load_config(AgentConfig, None, [given])
    run._check_encoder(cfg, [given, "encoder.mode=joint"], False)
    run._check_encoder(cfg, ["encoder.resolution=32"], True)
    assert capsys.readouterr().err == ""

def test_a_negative_seed_is_refused_naming_the_flag(capsys):
    import run

    for command in (["collect", "--env", "crafter", "--out", "x"], ["eval", "--checkpoint", "x"]):
        with pytest.raises(SystemExit) as exit_:
            run.main([*command, "--seed", "-1"])
        assert exit_.value.code == 2
        assert "argument --seed: takes a whole number, 0 or more; got -1" in capsys.readouterr().err


def test_bad_preset_files(tmp_path, capsys):
    import run

    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    for typo in ("clevr_tinyy", "configs/clevr_tiny.yml"):  # a near miss names the preset meant
        with pytest.raises(ConfigError, match=r"config file not found: .*clevr_tiny.* \(did you mean clevr_tiny\?\); the "
                                              "presets in configs/ are"):
            load_config(PretrainConfig, typo)
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("model:\n  num_slotss: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_slotss' in .*bad.yaml.*model.num_slots"):
        load_config(PretrainConfig, bad_key)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cannot parse .*broken.yaml: did not find expected ',' or '\]' at line 2, "
                                          r"column 1 \(while parsing a flow sequence from line 1, column 8\)"):
        load_config(PretrainConfig, broken)
    with pytest.raises(ConfigError, match="bad config value for 'model' in override 'model=3'"):
        load_config(PretrainConfig, None, ["model=3"])
    listed = tmp_path / "listed.yaml"
    listed.write_text("- [1, 2]\n")
    with pytest.raises(ConfigError, match="must map config keys to values"):
        load_config(PretrainConfig, listed)
    assert run.main(["config", "--config", str(broken)]) == 2  # one line, whichever command reads it
    capsys.readouterr()
    assert run.main(["config", "--for", "pretrain", "--config", "tiny"]) == 2  # an agent preset, refused
    assert capsys.readouterr().out == ""  # no header on stdout before the error: a script reads stdout
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("env: [1,2\n")
    for argv in (["eval", "--checkpoint", str(run_dir)], ["train", "--resume", str(run_dir)],
                 ["eval-ap", "--checkpoint", str(run_dir)]):
        assert run.main(argv) == 2, argv


@pytest.mark.parametrize("override", ["model.mlp_hidden=-1", "model.cnn_strides=[0,2,2]", "model.slot_dim=-4",
                                      "model.feature_dim=0", "data.eval_images=0", "model.vq.num_codes=0"])
def test_sizes_must_be_positive(override):
    with pytest.raises(ConfigError, match=f"^{re.escape(override.split('=')[0])}=.*must be positive"):
        load_config(PretrainConfig, None, [override])


@pytest.mark.parametrize("command, override, message", [
    ("pretrain", "train.grad_clip=0", "above 0"),  # would zero every gradient
    ("pretrain", "train.grad_clip=-1", "above 0"),  # would flip them: training climbs the loss
    ("pretrain", "model.gmm_temperature=-1", "0 or more"),  # would flip the E-step's softmax
    ("pretrain", "model.vq.tau_end=0", "above 0"),
    ("pretrain", "model.vq.beta=-0.1", "0 or more"),
    ("pretrain", "train.decay_steps=0", "positive"),
    ("pretrain", "train.decay_rate=-1", "above 0"),
    ("pretrain", "data.num_workers=-1", "0 or more"),
    ("train-wm", "data.eval_fraction=1.5", "between 0 and 1"),
    ("train", "train.wm_grad_clip=0", "above 0"),
    ("train", "dynamics.layers=0", "positive"),
    ("train", "actor_critic.heads=0", "positive"),
    ("train", "dynamics.reward_bins=1", "at least 2"),
    ("train", "actor_critic.gamma=1.5", "between 0 and 1"),
    ("train", "encoder.model.vq.tau_start=0", "above 0"),
])
def test_values_that_would_train_wrongly_or_crash_late_are_refused(command, override, message):
    from world_model.config import run_schemas

    with pytest.raises(ConfigError, match=f"^{re.escape(override.split('=')[0])}=.*{message}"):
        load_config(run_schemas()[command], None, [override])


@pytest.mark.parametrize("command", ["pretrain", "eval-ap", "generate", "collect", "visualize", "train-wm", "eval-wm",
                                     "train", "eval", "bench", "compare", "config"])
def test_every_command_explains_itself(command, capsys):
    """`run.py COMMAND --help` exits cleanly with a usage line; bench names what each of its benchmarks prints."""
    import run

    with pytest.raises(SystemExit) as exit_info:
        run.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: run.py {command}")
    if command == "bench":
        for what in ("pretrain", "estep", "generator", "metrics", "envs", "imagination", "agent"):
            assert f"\n  {what} " in out, what


@pytest.mark.parametrize("command", ["pretrain", "train-wm", "train"])
def test_a_training_commands_help_names_each_of_its_presets(command, capsys):
    """--config's help lists the presets in configs/ that the command reads (by its schema), none left out."""
    import run
    from world_model.config import schema_command

    with pytest.raises(SystemExit):
        run.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    named = re.search(r"--config CONFIG YAML preset, a path or a name in configs/ \(([^)]*)\)", text).group(1)
    configs = Path(run.__file__).parent / "configs"
    presets = sorted(p.stem for p in configs.glob("*.yaml") if schema_command(p) == command)
    assert presets and sorted(named.split(", ")) == presets


@pytest.mark.nethack
def test_run_directories_of_another_command_are_named_as_such(tmp_path, capsys):
    """A command given a run directory made by another command, or no run at all, says which in one line; `config`
    reads a preset with the schema that fits it."""
    import run
    from agent.config import AgentConfig
    from world_model.config import WorldModelConfig, save_config

    for name, schema in (("p", PretrainConfig), ("w", WorldModelConfig), ("a", AgentConfig)):
        (tmp_path / name).mkdir()
        save_config(load_config(schema), tmp_path / name / "config.yaml")
    (tmp_path / "p" / "checkpoints").mkdir()
    (tmp_path / "p" / "checkpoints" / "latest.pt").write_bytes(b"")
    dataset = tmp_path / "d"  # what `run.py collect` makes
    (dataset / "episodes").mkdir(parents=True)
    (dataset / "meta.json").write_text("{}")
    cases = [(["eval", "--checkpoint", str(tmp_path / "p")], "is a run of `run.py pretrain`; this needs a run of `run.py train`"),
             (["eval-ap", "--checkpoint", str(tmp_path / "a")], "is a run of `run.py train`; this needs a run of `run.py pretrain`"),
             (["eval-wm", "--checkpoint", str(tmp_path / "p")], "is a pretraining run (`run.py pretrain`): eval-wm "
              "scores a world model, of a `run.py train-wm` run or an agent run (`run.py train`, with --data DIR)"),
             (["visualize", "--checkpoint", str(tmp_path / "w"), "--env", "crafter", "--out", str(tmp_path / "v")],
              f"{tmp_path / 'w'} has no checkpoint yet: a run writes its first at train.ckpt_every steps or its first "
              "evaluation"),  # a world-model run is visualized from its checkpoint, which this one lacks (yet)
             (["train", "--resume", str(tmp_path / "w")], "is a run of `run.py train-wm`; this needs a run of `run.py train`"),
             (["pretrain", "--resume", "--run-dir", str(tmp_path / "none")], "no run at"),
             (["eval-ap", "--checkpoint", str(dataset)], f"no run at {dataset} (an episode dataset (meta.json, "),
             (["train", "--run-dir", str(dataset)], "is an episode dataset (meta.json, episodes/); choose another"),
             (["eval-ap", "--checkpoint", str(tmp_path / "p" / "checkpoints" / "latest.pt")],
              f"latest.pt is a file: pass the run directory (the folder holding config.yaml and checkpoints/), "
              f"{tmp_path / 'p'}"),
             (["train", "--resume", str(tmp_path / "a"), "--run-dir", str(tmp_path / "p")], "contradicts it")]
    for argv, message in cases:
        assert run.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and message in err and out == "", (argv, err)  # before any config dump
    assert run.main(["train", "--resume", str(tmp_path / "a"), "--run-dir", f"{tmp_path / 'a'}/"]) == 2
    assert "cannot resume: no checkpoint at" in capsys.readouterr().err  # the same folder, spelled otherwise
    assert run.main(["config", "--config", str(CONFIGS / "tiny.yaml")]) == 0
    assert capsys.readouterr().out.startswith(f"# run.py train, preset {CONFIGS / 'tiny.yaml'}\nenv:\n")
    assert run.main(["config", "--for", "train"]) == 0  # without --config: the preset `train` runs by default
    out = capsys.readouterr().out
    assert "  env_steps: 1200\n" in out
    # keys the run sets itself show the value it will set (tiny.yaml: 4 slots, 2 VQ variables) and where it comes from
    assert "  num_slots: 4  # set by the run from encoder.model.num_slots\n" in out
    assert "  num_vars: 2  # set by the run from encoder.model.vq.num_vars\n" in out
    assert "  num_actions: 17  # set by the run from the env" in out
    assert run.main(["config", "--config", str(CONFIGS / "wm_crafter_cpu.yaml"), "train.steps=7"]) == 0
    assert "  steps: 7\n" in capsys.readouterr().out
    assert run.main(["config", "--config", "nethack_cpu"]) == 0  # NetHack's actions, and its 7 status tokens
    out = capsys.readouterr().out
    assert "  num_actions: 23  # set by the run from the env" in out
    assert "  frame_vars: 15  # set by the run from frame.vars + the env's 7 status tokens" in out
    shown = tmp_path / "wm.yaml"  # without a dataset the action count is not known: commented out, so the YAML
    assert run.main(["config", "--for", "train-wm"]) == 0  # reads back as a preset of the same command
    shown.write_text(capsys.readouterr().out)
    assert "  # num_actions: set by the run from the env (or the dataset's meta.json), not known here\n" in shown.read_text()
    assert run.main(["config", "--config", str(shown)]) == 0
    assert capsys.readouterr().out.startswith(f"# run.py train-wm, preset {shown}\n")
    # a preset with a typo in a key: the error names that key, not a good key under another command's schema
    typo = tmp_path / "typo.yaml"
    typo.write_text("env:\n  name: crafter\ntrain:\n  env_steps: 10\n  bogus: 1\n")
    assert run.main(["config", "--config", str(typo)]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err


def test_value_ranges_hold_for_every_command():
    """The same range checks reach the agent's and the world model's keys; eval_every=0 means at the end only."""
    from agent.config import AgentConfig
    from world_model.config import WorldModelConfig

    assert load_config(PretrainConfig, None, ["train.eval_every=0"]).train.eval_every == 0
    for schema, override in ((AgentConfig, "env.num_envs=0"), (AgentConfig, "train.ckpt_every=0"),
                             (WorldModelConfig, "train.steps=0"), (AgentConfig, "train.train_ratio=-1")):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(schema, None, [override])
    # keys with a larger minimum: each refused in one line that says why, before any run starts
    for schema, override, message in (
            (AgentConfig, "train.seq_len=1", r"train.seq_len=1 must be at least 2 \(a training segment predicts"),
            (WorldModelConfig, "data.seq_len=1", "data.seq_len=1 must be at least 2"),
            (WorldModelConfig, "eval.context=0", "eval.context=0 must be at least 1"),
            (WorldModelConfig, "eval.horizons=[]", r"eval.horizons=\[\] must list at least one value"),
            (WorldModelConfig, "eval.horizons=[1,0]", r"eval.horizons=\[1, 0\]: every entry must be at least 1"),
            (AgentConfig, "train.eval_episodes=0", r"train.eval_episodes=0 must be at least 1 \(every run evaluates"),
            (PretrainConfig, "model.vq.num_codes=1", "model.vq.num_codes=1 must be at least 2"),
            (AgentConfig, "frame.codes=1", "frame.codes=1 must be at least 2"),
            (PretrainConfig, "model.cnn_channels=32", r"it takes a list, e.g. cnn_channels=\[32,32\]"),
            (PretrainConfig, "model.cnn_channels.0=5", r"override 'model.cnn_channels.0=5': a list is set whole, "
             r"e.g. model.cnn_channels=\[...\]"),
            (PretrainConfig, "model.vq=true", r"model.vq is a section of keys \(enabled, num_vars, .*\): set one of "
             r"them, e.g. model.vq.enabled=\.\.\."),
            (PretrainConfig, "model.cnn_strides=[1,2,2]", r"model.cnn_channels=\[64, 64, 64, 64\] has 4 layers and "
             r"model.cnn_strides=\[1, 2, 2\] 3: give one stride per layer"),
            (AgentConfig, "encoder.model.cnn_channels=[8]", r"encoder.model.cnn_channels=\[8\] has 1 layers"),
            (PretrainConfig, "data.max_objects=11", r"data.min_objects=3 and data.max_objects=11: need 1 <= "
             r"min_objects <= max_objects <= 10")):
        with pytest.raises(ConfigError, match=message):
            load_config(schema, None, [override])


def test_bad_devices_are_one_line_errors_that_name_the_setting():
    from world_model.rundir import resolve_device

    with pytest.raises(ValueError, match=r"^train.device=gpu is not a device this project runs on: use auto, cpu"):
        resolve_device("gpu", "train.device")
    with pytest.raises(ValueError, match=r"^--device=mps is not a device"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device=cuda but CUDA is not available; use --device=cpu or auto"):
            resolve_device("cuda")


def test_presets_are_found_from_another_working_directory(tmp_path, monkeypatch):
    """`--config configs/tiny.yaml`, as the README writes it, works from any directory (and so do the defaults)."""
    from agent.config import AgentConfig

    monkeypatch.chdir(tmp_path)
    assert load_config(AgentConfig, "configs/tiny.yaml") == load_config(AgentConfig, CONFIGS / "tiny.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("train:\n  env_steps: 7\n")  # a file there is the user's own
    assert load_config(AgentConfig, "configs/tiny.yaml").train.env_steps == 7


def test_presets_by_name_and_for_the_wrong_command():
    """`--config tiny` finds configs/tiny.yaml; a missing preset lists the real ones; a preset of another command
    says whose it is; an unknown key suggests the keys beside it that hold its name."""
    from agent.config import AgentConfig

    assert load_config(AgentConfig, "tiny").train.env_steps == load_config(AgentConfig, CONFIGS / "tiny.yaml").train.env_steps
    assert load_config(PretrainConfig, "clevr_tiny.yaml").task == load_config(PretrainConfig, CONFIGS / "clevr_tiny.yaml").task
    with pytest.raises(ConfigError, match="the presets in configs/ are .*clevr_tiny.*tiny"):
        load_config(PretrainConfig, "clevr_tinyy")
    with pytest.raises(ConfigError, match=r"clevr_tiny.yaml is a preset of `run.py pretrain`, not of `run.py train`"):
        load_config(AgentConfig, CONFIGS / "clevr_tiny.yaml")
    with pytest.raises(ConfigError, match=r"did you mean 'actor_critic.actor_lr' or 'actor_critic.critic_lr'\?\); "
                       r"run `python run.py config --for train`"):
        load_config(AgentConfig, None, ["actor_critic.lr=1e-4"])
    with pytest.raises(ConfigError, match="dynamics.num_actions is set by the run from the env"):
        load_config(AgentConfig, None, ["dynamics.num_actions=5"])  # it would be overwritten silently


def test_overrides_may_follow_options(capsys):
    """`key=value` overrides are taken before and after a subcommand's options, in the order typed; any other
    leftover is refused with that subcommand's usage."""
    import run

    args = run.parse_args(["pretrain", "train.steps=2", "--run-dir", "X", "data.eval_images=8", "--no-progress",
                           "train.steps=3"])
    assert args.run_dir == "X" and args.no_progress
    assert args.overrides == ["train.steps=2", "data.eval_images=8", "train.steps=3"]
    with pytest.raises(SystemExit):
        run.parse_args(["pretrain", "--run-dir", "X", "--bogus"])
    with pytest.raises(SystemExit):
        run.parse_args(["eval", "--checkpoint", "X", "train.steps=2"])  # eval takes no overrides
    with pytest.raises(SystemExit):
        run.parse_args(["train", "--seed", "3"])
    assert "(--seed: a training run takes train.seed=... as an override)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["train", "--device=cpu"])
    assert "(--device: a training run takes train.device=... as an override)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["pretrain", "--train.steps=3"])
    assert "--train.steps=3 (config overrides take no dashes: train.steps=3)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a misspelt command: the nearest one, and the list
        run.parse_args(["trian"])
    assert "unknown command 'trian' (did you mean train?); the commands are pretrain, eval-ap" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no command: the whole help, not only "required: SUBCOMMAND"
        run.parse_args([])
    assert "train-wm" in capsys.readouterr().err
    for command in ("pretrain", "train", "config"):  # presets do not combine: a second one is refused, not used alone
        with pytest.raises(SystemExit):
            run.parse_args([command, "--config", "tiny", "--config", "clevr_tiny"])


def test_resume_overrides_may_change_how_a_run_goes_on_not_what_it_learns():
    from agent.config import AgentConfig
    from world_model.config import check_resume_overrides

    saved = load_config(AgentConfig, CONFIGS / "tiny.yaml")
    for ok in (["train.env_steps=5000", "env.asynchronous=false", "env.envs_per_worker=2", "replay.on_device=true"],):
        check_resume_overrides(saved, load_config(AgentConfig, CONFIGS / "tiny.yaml", ok), "RUN")
    pre = load_config(PretrainConfig, CONFIGS / "clevr_tiny.yaml")
    check_resume_overrides(pre, load_config(PretrainConfig, CONFIGS / "clevr_tiny.yaml", ["data.num_workers=2"]), "RUN")
    changed = load_config(PretrainConfig, CONFIGS / "clevr_tiny.yaml", ["model.num_slots=3"])
    with pytest.raises(ConfigError, match=r"may change how it runs \(train.\* but train.seed, data.root, .*num_workers\)"):
        check_resume_overrides(pre, changed, "RUN")
    for bad in ("env.name=nethack", "encoder.model.num_slots=3", "actor_critic.horizon=5", "dynamics.layers=3",
                "train.seed=1"):
        with pytest.raises(ConfigError, match=f"{bad.split('=')[0]}=.* differs from what RUN trained with"):
            check_resume_overrides(saved, load_config(AgentConfig, CONFIGS / "tiny.yaml", [bad]), "RUN")


def test_output_piped_into_head_ends_quietly():
    """`run.py config` into a pipe its reader has closed (`head -c 0` exits long before the interpreter has started):
    no BrokenPipeError traceback, and the shell's status for a closed pipe (141). (With `head -1` the config, a few
    KiB written at once, fits the pipe's buffer before head exits: no error to meet.)"""
    import shlex
    import subprocess
    import sys

    done = subprocess.run(f"{shlex.quote(sys.executable)} run.py config --for train | head -c 0; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True,
                          cwd=CONFIGS.parent)
    assert done.returncode == 141 and done.stderr == ""


def test_paths_are_recorded_absolute(tmp_path, monkeypatch):
    """A new run's paths become absolute; on resume those an override changed do, and a relative one recorded by an
    older run does when it exists from here (from elsewhere it stays, and the data check names it)."""
    from world_model.config import WorldModelConfig, record_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    fresh = load_config(WorldModelConfig, None, ["data.root=d", "encoder.checkpoint=~/pre"])
    record_paths(fresh)
    assert (fresh.data.root, fresh.encoder.checkpoint) == (str(tmp_path / "d"), str(Path.home() / "pre"))
    old = load_config(WorldModelConfig, None, ["data.root=d", "encoder.checkpoint=pre"])
    resumed = load_config(WorldModelConfig, None, ["data.root=d", "encoder.checkpoint=pre"])
    record_paths(resumed, old)
    assert (resumed.data.root, resumed.encoder.checkpoint) == (str(tmp_path / "d"), "pre")  # pre: not here
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = load_config(WorldModelConfig, None, ["data.root=d"])
    record_paths(resumed, old)
    assert resumed.data.root == "d"
    empty = load_config(WorldModelConfig, None, [])
    record_paths(empty)
    assert empty.data.root is None and empty.encoder.checkpoint is None


def test_a_usage_error_is_one_line_and_any_other_error_keeps_its_traceback(monkeypatch, capsys):
    """`run.py` answers a user's mistake in one line, but a ValueError from inside torch or numpy is a bug: it is not
    dressed up as one (it keeps its traceback)."""
    import run
    from envs.errors import UsageError

    def fails(error):
        def command(args):
            raise error
        return command

    monkeypatch.setattr(run, "cmd_config", fails(UsageError("--thing must be positive, got 0")))
    assert run.main(["config"]) == 2
    assert capsys.readouterr().err == "error: --thing must be positive, got 0\n"
    monkeypatch.setattr(run, "cmd_config", fails(ValueError("Expected input batch_size (3) to match target (2)")))
    with pytest.raises(ValueError, match="Expected input batch_size"):
        run.main(["config"])


def test_a_preset_that_cannot_be_read_says_so(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  steps: 3\n")

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(OmegaConf, "load", refused)
    with pytest.raises(ConfigError, match=f"^cannot read {re.escape(str(preset))}: Permission denied$"):
        load_config(PretrainConfig, preset)


def test_under_torchrun_one_process_speaks_for_all(monkeypatch, capsys):
    """Every process checks the same config alike before they join: each node's first process reports it (rank 0
    for the first node), the others stay quiet. A command that runs in one process is refused. A process whose
    collective failed because another one left says so in a line, and leaves the cause to that one's message."""
    import run
    from world_model import distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    refused = "eval runs in one process; under torchrun run `pretrain` or `train`"
    for rank, local, said in (("0", "0", f"error: {refused}"), ("1", "1", ""), ("2", "0", f"[rank 2] error: {refused}")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local)
        assert run.main(["eval", "--checkpoint", "nowhere"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(said) if said else err == ""
    monkeypatch.setenv("WORLD_SIZE", "1")  # a RANK without torchrun is no rank: the error is reported
    monkeypatch.setenv("RANK", "1")
    assert run.main(["eval", "--checkpoint", str(Path("nowhere")), "--episodes", "0"]) == 2
    assert capsys.readouterr().err == "error: --episodes must be positive, got 0\n"

    def peer_left(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:1")

    monkeypatch.setattr(run, "cmd_pretrain", peer_left)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(distributed, "shutdown", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run.main(["pretrain", "--run-dir", "r"]) == 1
    assert capsys.readouterr().err == ("[rank 1] stopped: lost another process of this torchrun job, which failed or "
                                       "was stopped (its message is above): [../third_party/gloo/gloo/transport/tcp/"
                                       "pair.cc:553] Connection closed by peer [::1]:1\n")
    assert not distributed.lost_peer(RuntimeError("CUDA out of memory"))


def test_the_resume_hint_of_a_torchrun_job_is_a_torchrun_command(tmp_path, monkeypatch):
    """Stopped under torchrun, a run is resumed by torchrun with the job's options, not by a plain `python run.py`."""
    from types import SimpleNamespace

    import run
    from world_model import distributed

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.pt").write_bytes(b"")
    args = SimpleNamespace(command="train", run_dir=str(tmp_path), resume=False)
    assert run._way_back(args).startswith(f"; `python {run._script()} train --resume {tmp_path}` continues")
    # a resume stopped before its own first checkpoint: config.yaml is as before it, so its overrides go along
    resumed = SimpleNamespace(command="train", run_dir=None, resume=str(tmp_path), overrides=["train.env_steps=9000",
                              "env.name=it's"], started=time.time() + 60)
    assert run._way_back(resumed).startswith(f"; `python {run._script()} train --resume {tmp_path} "
                                             "train.env_steps=9000 'env.name=it'\"'\"'s'` continues")
    resumed.started = 0  # it wrote one: config.yaml holds them
    assert run._way_back(resumed).startswith(f"; `python {run._script()} train --resume {tmp_path}` continues")
    monkeypatch.setattr(distributed, "launched", lambda: True)
    assert run._way_back(args) == (f"; `torchrun ... {run._script()} train --resume {tmp_path}` (with this job's "
                                   "torchrun options) continues from its last checkpoint")


def test_a_full_disk_is_one_line(monkeypatch, capsys):
    """Files are written atomically, so a full disk leaves the last checkpoint whole: one line says so, and any other
    OSError keeps its traceback."""
    import errno

    import run

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/r/checkpoints/latest.pt.x1.tmp")

    monkeypatch.setattr(run, "cmd_config", full)
    assert run.main(["config"]) == 2
    assert capsys.readouterr().err == ("error: No space left on device writing runs/r/checkpoints/latest.pt.x1.tmp; "
                                       "free space (or pick a writable place), then go on\n")

    def broken(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(run, "cmd_config", broken)
    with pytest.raises(OSError, match="Input/output error"):
        run.main(["config"])


def test_sizes_that_fail_only_when_the_model_is_built_are_refused_at_load():
    from agent.config import AgentConfig

    with pytest.raises(ConfigError, match="dynamics.embed_dim=32 must be divisible by dynamics.heads=3"):
        load_config(AgentConfig, None, ["dynamics.embed_dim=32", "dynamics.heads=3"])
    with pytest.raises(ConfigError, match="data.resolution=48 is not model.decoder_init=8 times a power of 2"):
        load_config(PretrainConfig, None, ["task=discovery", "data.resolution=48"])
    load_config(PretrainConfig, None, ["task=setpred", "data.resolution=48"])  # no decoder
    with pytest.raises(ConfigError, match="frame.target=10 must be a multiple of 4"):
        load_config(AgentConfig, None, ["frame.target=10"])
    load_config(AgentConfig, None, ["frame.target=10", "frame.vars=0"])  # no frame tokenizer: no decoder to size
    with pytest.raises(ConfigError, match="encoder.resolution=48 is not encoder.model.decoder_init=8 times"):
        load_config(AgentConfig, None, ["encoder.resolution=48"])
    load_config(AgentConfig, None, ["encoder.checkpoint=/x", "encoder.resolution=48"])  # the pretrained run's is used
