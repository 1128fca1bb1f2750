"""Typed configuration: dataclass schemas, YAML presets and dotted command-line overrides.

OmegaConf does the merging and type checking (a preset or override naming an unknown key
or a wrong type fails); this module turns its errors into one-line messages that name the fix.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from envs.atomic import FOLDER_KINDS, folder_kind
from envs.clevr_layout import MAX_OBJECTS as MAX_SCENE_OBJECTS
from envs.errors import UsageError

from . import distributed
from .dynamics import DynamicsConfig
from .frame_tokenizer import FrameTokenizerConfig
from .slots.vq import temperature


class ConfigError(UsageError):
    """A bad preset or override; the message is one line and says what to change."""


@dataclass
class VQConfig:
    """VQ-SA: each slot becomes `num_vars` categorical latents over `num_codes` learned codes."""

    enabled: bool = False
    num_vars: int = 4
    num_codes: int = 16
    code_dim: int = 32
    beta: float = 0.01  # weight of KL(q(z|x) || uniform)
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed exponentially ...
    tau_end: float = 0.1  # ... to this value ...
    anneal_steps: int = 100_000  # ... over this many steps
    hard: bool = False  # straight-through one-hot samples during training


@dataclass
class ModelConfig:
    """CNN backbone + slot module (+ VQ) + decoder / set-prediction head."""

    slots: str = "gmm"  # gmm | slot_attention
    num_slots: int = 10
    slot_dim: int = 64  # GMM slots are concat(mu, logsigma): 2 * slot_dim wide
    iters: int = 3
    mlp_hidden: int = 128
    implicit_grad: bool = False  # last iteration on detached slots (fixed-point gradient)
    gmm_temperature: float = 0.0  # GMM E-step temperature; 0 = sqrt(slot_dim), 1 = exact posterior
    gmm_log_det: bool = True  # GMM E-step: -sum log sigma in the log-likelihood (false: the seed's pseudocode)
    gmm_update_pi: bool = True  # GMM: re-estimate pi every iteration (false: pi stays 1/K)
    cnn_channels: list[int] = field(default_factory=lambda: [64, 64, 64, 64])
    cnn_strides: list[int] = field(default_factory=lambda: [1, 2, 2, 1])
    cnn_kernel: int = 5
    feature_dim: int = 64
    decoder_channels: int = 64
    decoder_init: int = 8  # spatial-broadcast grid side; upsampled x2 until the image size
    head_hidden: int = 64
    vq: VQConfig = field(default_factory=VQConfig)


@dataclass
class DataConfig:
    """Where images come from: procedurally generated scenes, a CLEVR v1.0 directory, or the frames of an episode
    dataset (`run.py collect`)."""

    source: str = "generated"  # generated | clevr | frames (episodes from `run.py collect`)
    root: Optional[str] = None  # CLEVR root (source=clevr) or episode dataset (source=frames)
    split: str = "train"
    eval_split: str = "val"
    resolution: int = 128
    crop: bool = False  # Slot Attention's object-discovery crop
    min_objects: int = 3  # objects per scene: generated scenes have min..max of them, and a CLEVR split on disk
    max_objects: int = 10  # keeps the scenes within that range (the paper's CLEVR6: max_objects=6)
    supersample: int = 1
    pool: int = 0  # >0: train on a fixed set of this many scenes (a finite dataset), rendered as training reaches them
    eval_images: int = 2000  # held-out images an evaluation reads (at most)
    eval_fraction: float = 0.1  # source=frames: the last episodes holding this fraction of frames are held out
    num_workers: int = 0


@dataclass
class TrainConfig:
    steps: int = 150_000
    batch_size: int = 512
    lr: float = 4e-4
    warmup_steps: int = 10_000
    decay_rate: float = 0.5
    decay_steps: int = 100_000
    grad_clip: float = 1.0
    log_every: int = 100
    image_every: int = 1000
    eval_every: int = 10_000  # 0 = only at the end
    ckpt_every: int = 1000
    keep_checkpoints: bool = False  # also keep each evaluation's checkpoint (checkpoints/step_<N>.pt, a hard link)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model (CUDA; on CPU it needs a C++ compiler and minutes)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune; see `run.py bench pretrain`
    threads: int = 0  # torch CPU threads, 0 = torch's default


@dataclass
class PretrainConfig:
    """`run.py pretrain`: object discovery (reconstruction) or set-property prediction."""

    task: str = "setpred"  # setpred | discovery
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class WMEncoderConfig:
    """The slot encoder under the world model: a pretrained VQ run (frozen, or fine-tuned jointly with its
    reconstruction loss), or a fresh VQ encoder trained jointly from scratch."""

    checkpoint: Optional[str] = None  # run dir of `run.py pretrain --data ...` with model.vq.enabled=true
    mode: str = "frozen"  # frozen | joint (a fresh encoder is always joint)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(num_slots=8, vq=VQConfig(enabled=True)))
    resolution: int = 64  # model input side (fresh encoder; a checkpoint brings its own)
    # Gradients through the slots carried from frame to frame (full backpropagation through the sequence); false
    # truncates it to one frame, and the slot module then trains on all frames of an update in one batch.
    carry_grad: bool = True


@dataclass
class WMDataConfig:
    root: Optional[str] = None  # episode dataset from `run.py collect`
    seq_len: int = 32  # training segment length (time steps)
    capacity: int = 1_000_000  # training steps held in memory: the newest, when the dataset has more
    eval_fraction: float = 0.1  # the last episodes holding this fraction of steps are held out (at least one)


@dataclass
class WMTrainConfig:
    steps: int = 50_000
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 2000  # 0 = only at the end
    ckpt_every: int = 500
    keep_checkpoints: bool = False  # also keep each evaluation's checkpoint (checkpoints/step_<N>.pt, a hard link)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int = 0


@dataclass
class WMEvalConfig:
    context: int = 8  # real frames before open-loop prediction
    horizons: list[int] = field(default_factory=lambda: [1, 5, 15])
    segments: int = 128  # held-out segments per evaluation


@dataclass
class WorldModelConfig:
    """`run.py train-wm`: the slot-token dynamics model trained on collected episodes. dynamics.num_slots,
    num_vars, num_codes, frame_vars, frame_codes and num_actions are set from the encoder, frame tokenizer
    and dataset."""

    encoder: WMEncoderConfig = field(default_factory=WMEncoderConfig)
    frame: FrameTokenizerConfig = field(default_factory=FrameTokenizerConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    data: WMDataConfig = field(default_factory=WMDataConfig)
    train: WMTrainConfig = field(default_factory=WMTrainConfig)
    eval: WMEvalConfig = field(default_factory=WMEvalConfig)


CHOICES = {
    "task": ("setpred", "discovery"),
    "model.slots": ("gmm", "slot_attention"),
    "encoder.model.slots": ("gmm", "slot_attention"),
    "data.source": ("generated", "clevr", "frames"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "encoder.mode": ("frozen", "joint"),
    "env.name": ("crafter", "nethack"),
    "env.task": ("score", "challenge"),
}
CHOICE_HINTS = {f"{where}slots": f"; VQ slot codes (VQ-SA) are a switch on either: {where}vq.enabled=true"
                for where in ("model.", "encoder.model.")}
# world_model/presets/ in an installed wheel (first: a `configs` folder beside it in site-packages is another's);
# configs/ beside the packages in the source tree and an editable install
PRESET_DIR = next((d for d in (Path(__file__).resolve().parent / "presets",
                               Path(__file__).resolve().parent.parent / "configs") if d.is_dir()),
                  Path(__file__).resolve().parent.parent / "configs")
# keys that must be positive (whichever schema has them), and those that may also be 0
POSITIVE = ("train.steps", "train.env_steps", "train.batch_size", "train.seq_len", "train.log_every",
            "train.image_every", "train.ckpt_every", "train.imag_starts", "data.resolution", "encoder.resolution",
            "env.num_envs", "env.envs_per_worker", "env.size", "env.crop", "actor_critic.horizon", "data.eval_images",
            "replay.capacity", "train.decay_steps", "data.supersample", "data.capacity", "eval.segments",
            "frame.channels", "frame.target", "dynamics.max_steps",
            *(f"{net}.{key}" for net in ("dynamics", "actor_critic")  # the transformers' sizes
              for key in ("embed_dim", "layers", "heads", "mlp_ratio")),
            *(f"{where}{key}" for where in ("model.", "encoder.model.")  # the slot encoder's sizes, either schema
              for key in ("num_slots", "iters", "slot_dim", "mlp_hidden", "cnn_kernel", "feature_dim",
                          "decoder_channels", "decoder_init", "head_hidden", "vq.num_vars", "vq.num_codes",
                          "vq.code_dim", "cnn_channels", "cnn_strides")))
DERIVED = {  # world-model keys a run sets from elsewhere (build_world_model), so setting them would do nothing
    "dynamics.num_slots": "encoder.model.num_slots", "dynamics.num_vars": "encoder.model.vq.num_vars",
    "dynamics.num_codes": "encoder.model.vq.num_codes", "dynamics.frame_vars": "frame.vars",
    "dynamics.frame_codes": "frame.codes", "dynamics.num_actions": "the env (or the dataset's meta.json)"}
AT_LEAST = {  # keys with a larger minimum, and why
    "train.seq_len": (2, "a training segment predicts each step from the one before"),
    "data.seq_len": (2, "a training segment predicts each step from the one before"),
    "eval.context": (1, "open-loop prediction starts from at least one real frame"),
    "eval.horizons": (1, "each horizon is a number of predicted steps"),
    "train.eval_episodes": (1, "every run evaluates at its end"),
    "frame.codes": (2, "a categorical latent needs two values"),
    "model.vq.num_codes": (2, "a categorical latent needs two values"),
    "encoder.model.vq.num_codes": (2, "a categorical latent needs two values"),
    "dynamics.reward_bins": (2, "a two-hot reward spreads over two neighbouring bins"),
    "actor_critic.reward_bins": (2, "a two-hot return spreads over two neighbouring bins")}
ABOVE_ZERO = ("train.lr", "train.wm_lr", "actor_critic.actor_lr", "actor_critic.critic_lr", "train.decay_rate",
              "train.grad_clip", "train.wm_grad_clip", "actor_critic.grad_clip",  # a clip at 0 zeroes, below 0 flips
              *(f"{where}vq.{key}" for where in ("model.", "encoder.model.") for key in ("tau_start", "tau_end")))
UNLIMITED = ("train.grad_clip", "train.wm_grad_clip", "actor_critic.grad_clip")  # inf: no clipping
NON_NEGATIVE = ("train.seed", "train.eval_every", "train.prefill", "train.train_ratio", "train.warmup_steps", "data.pool",
                "train.threads", "data.num_workers", "frame.vars", "env.max_episode_steps", "actor_critic.entropy",
                "actor_critic.slow_reg", *(f"{where}{key}" for where in ("model.", "encoder.model.")
                                           for key in ("gmm_temperature", "vq.beta", "vq.anneal_steps")))
UNIT_INTERVAL = ("actor_critic.gamma", "actor_critic.lam", "actor_critic.unimix", "actor_critic.ema_decay",
                 "actor_critic.return_norm_decay", "frame.unimix", "data.eval_fraction", "dynamics.dropout")

RANGES = (  # (key, test, what a value must be): every entry of a list value must pass; a key may have several
    *((key, lambda v: v >= 1, "positive") for key in POSITIVE),
    *((key, lambda v: v >= 0, "0 or more") for key in NON_NEGATIVE),
    *((key, lambda v, low=low: v >= low, f"at least {low} ({why})") for key, (low, why) in AT_LEAST.items()),
    *((key, lambda v: v > 0, "above 0") for key in ABOVE_ZERO),
    *((key, lambda v: 0 <= v <= 1, "between 0 and 1") for key in UNIT_INTERVAL))

def _keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        name = f"{prefix}{k}"
        out.append(name)
        if OmegaConf.is_dict(v):
            out += _keys(v, name + ".")
    return out


def _suggest(key: str, schema: Any) -> str:
    """' (did you mean ...?)' for an unknown key: keys beside it whose name holds its name (lr -> actor_lr,
    critic_lr), else the closest spelling."""
    keys = _keys(schema)
    parent, _, leaf = key.rpartition(".")
    near = [k for k in keys if k.rpartition(".")[0] == parent and leaf and leaf in k.rpartition(".")[2] and k != key]
    close = near[:3] or difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _explain(err: OmegaConfBaseException, schema: Any, where: str, command: Optional[str],
             key: str = "") -> ConfigError:
    key = getattr(err, "full_key", None) or key  # an override of a whole section names no key: its own
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        listing = f"python run.py config --for {command}" if command else "python run.py config"
        return ConfigError(f"unknown config key '{key}' in {where}{_suggest(key, schema)}; run `{listing}` to list keys")
    if "is not a ListConfig" in msg:
        msg = f"it takes a list, e.g. {key.rpartition('.')[2]}=[32,32]"
    section = OmegaConf.select(schema, key, default=None) if key else None
    if isinstance(section, DictConfig):  # a value given to a whole section (model.vq=true)
        keys = list(section.keys())
        msg = f"{key} is a section of keys ({', '.join(keys)}): set one of them, e.g. {key}.{keys[0]}=..."
    return ConfigError(f"bad config value for '{key}' in {where}: {msg}")


def _fitting_command(loaded: Any) -> Optional[str]:
    """The command whose schema takes a loaded YAML file as it is, or None."""
    for command, schema_cls in run_schemas().items():
        try:
            OmegaConf.merge(OmegaConf.structured(schema_cls), loaded)
            return command
        except OmegaConfBaseException:
            continue
    return None


def preset_path(path: str | Path) -> Path:
    """A preset given as a path, or by name (`tiny`, `crafter.yaml`: the file in configs/). `configs/X.yaml` that is
    not there relative to the working directory is the project's preset (a command run from another directory)."""
    path = Path(path)
    if path.is_file() or path.parent not in (Path("."), Path("configs")):
        return path
    named = PRESET_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return named if named.is_file() else path


def slot_module(model: ModelConfig) -> str:
    """The slot module as run names, bars and `compare` say it: gmm, slot_attention, gmm+vq, slot_attention+vq."""
    return model.slots + ("+vq" if model.vq.enabled else "")


def load_config(schema_cls: type, path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Any:
    """Schema defaults <- YAML preset <- `a.b=value` overrides (a list of strings); returns the typed dataclass."""
    if isinstance(overrides, (str, bytes, dict)):
        raise ConfigError(f"overrides are a list of key=value strings (e.g. ['train.steps=100']), got a "
                          f"{type(overrides).__name__}: {overrides!r}")
    schema = OmegaConf.structured(schema_cls)
    command = {s: c for c, s in run_schemas().items()}.get(schema_cls)
    cfg = schema
    if path is not None:
        path = preset_path(path)
        loaded = _read_preset(path)
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            owner = _fitting_command(loaded)
            if owner and command and owner != command:
                raise ConfigError(f"{path} is a preset of `run.py {owner}`, not of `run.py {command}`") from None
            raise _explain(e, schema, str(path), command) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
        key, value = item.split("=", 1)
        given = item
        if value.strip() in ("None", "none"):  # Python's word for it; YAML's is null (or nothing)
            item = f"{key}=null"
        if key in DERIVED and command in ("train-wm", "train"):
            raise ConfigError(f"{key} is set by the run from {DERIVED[key]}; change that instead")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override '{given}'", command, key) from None
        except TypeError:  # omegaconf's answer to `list_key.0=5`: a dotted index makes a mapping
            raise ConfigError(f"override '{item}': a list is set whole, e.g. "
                              f"{key.rsplit('.', 1)[0]}=[...]") from None
    try:
        _check_values(cfg)
        _check_pairs(cfg)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # an interpolation, ${...}, that does not resolve
        raise ConfigError(f"{e.full_key}: {e.msg.splitlines()[0]} (a value in a preset or override)") from None


def _read_preset(path: Path) -> DictConfig:
    """A preset file's mapping; a missing file (with the nearest preset name), an unreadable one, bad YAML (the
    problem and where) or a YAML list is one ConfigError."""
    if not path.is_file():
        stems = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        near = difflib.get_close_matches(Path(path).name.split(".")[0], stems, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"config file not found: {path}{hint}; the presets in configs/ are {', '.join(stems)}")
    try:
        loaded = OmegaConf.load(path)
    except OSError as e:  # e.g. no permission to read it
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # yaml errors are verbose and multi-line: the problem and where it is
        def at(mark) -> str:
            return f"line {mark.line + 1}, column {mark.column + 1}"

        problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        what = f"{problem} at {at(mark)}" if problem and mark else str(e).splitlines()[0]
        if context and start:
            what += f" ({context} from {at(start)})"
        raise ConfigError(f"cannot parse {path}: {what}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must map config keys to values (a YAML mapping), not hold a list")
    return loaded


def _check_values(cfg) -> None:
    """Each key of CHOICES among its choices, each of RANGES in its range (every entry of a listed one)."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{CHOICE_HINTS.get(key, '')}")
    for key in _keys(cfg):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, float) and not math.isfinite(value) and not (value > 0 and key in UNLIMITED):
            hint = " (inf: no limit)" if key in UNLIMITED else ""
            raise ConfigError(f"{key}={value} is not a finite number{hint}")
    for key, test, what in RANGES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        listed = isinstance(value, ListConfig)  # every layer's channels or stride, every horizon
        values = list(value) if listed else [value]
        if listed and not values and key in AT_LEAST:
            raise ConfigError(f"{key}=[] must list at least one value ({AT_LEAST[key][1]})")
        if not all(test(v) for v in values):
            raise ConfigError(f"{key}={values!r}: every entry must be {what}" if listed else
                              f"{key}={value!r} must be {what}")


def _check_pairs(cfg) -> None:
    """Keys that must agree with each other, named in full: one stride per backbone layer, a data root only where the
    source reads one, an object-count range, attention heads, decoder sizes (not those `encoder.checkpoint` replaces)
    and the frame tokenizer's target size."""
    replaced = OmegaConf.select(cfg, "encoder.checkpoint", default=None)  # its run's encoder.model is used instead
    for where in ("model.",) + (() if replaced else ("encoder.model.",)):
        channels, strides = (OmegaConf.select(cfg, where + k, default=None) for k in ("cnn_channels", "cnn_strides"))
        if channels is not None and strides is not None and len(channels) != len(strides):
            raise ConfigError(f"{where}cnn_channels={list(channels)} has {len(channels)} layers and "
                              f"{where}cnn_strides={list(strides)} {len(strides)}: give one stride per layer")
    source, root = (OmegaConf.select(cfg, k, default=None) for k in ("data.source", "data.root"))
    if source == "generated" and root:
        raise ConfigError(f"data.root={root} is set but data.source=generated renders its own scenes: add "
                          "data.source=clevr for a CLEVR v1.0 root, or pass --data DIR for an episode dataset")
    low, high = (OmegaConf.select(cfg, k, default=None) for k in ("data.min_objects", "data.max_objects"))
    if low is not None and high is not None and not 1 <= low <= high <= MAX_SCENE_OBJECTS:
        raise ConfigError(f"data.min_objects={low} and data.max_objects={high}: need 1 <= min_objects <= "
                          f"max_objects <= {MAX_SCENE_OBJECTS}")
    for net in ("dynamics", "actor_critic"):  # the attention splits its width over the heads
        dim, heads = (OmegaConf.select(cfg, f"{net}.{k}", default=None) for k in ("embed_dim", "heads"))
        if dim is not None and heads and dim % heads:
            raise ConfigError(f"{net}.embed_dim={dim} must be divisible by {net}.heads={heads}")
    decoded = (("model.", "data.resolution"),) if OmegaConf.select(cfg, "task", default=None) == "discovery" else ()
    decoded += () if replaced else (("encoder.model.", "encoder.resolution"),)
    for where, res in decoded:
        init, size = (OmegaConf.select(cfg, k, default=None) for k in (where + "decoder_init", res))
        if init and size and not (size % init == 0 and (size // init) & (size // init - 1) == 0):
            raise ConfigError(f"{res}={size} is not {where}decoder_init={init} times a power of 2, which the "
                              "spatial-broadcast decoder doubles its way up from")
    target = OmegaConf.select(cfg, "frame.target", default=None)
    if target is not None and target % 4 and OmegaConf.select(cfg, "frame.vars", default=0):  # vars=0: no tokenizer
        raise ConfigError(f"frame.target={target} must be a multiple of 4: the frame decoder doubles its way up twice "
                          "from a target/4 grid")


def run_schemas() -> dict[str, type]:
    """The config schema of each command that makes a run directory."""
    from agent.config import AgentConfig

    return {"pretrain": PretrainConfig, "train-wm": WorldModelConfig, "train": AgentConfig}


RESUMABLE = ("train.", "eval.", "data.root", "data.eval_images", "data.num_workers",  # length, schedule, speed
             "env.asynchronous", "env.envs_per_worker", "replay.on_device")  # ("x." stands for every key under x)
FIXED = ("train.seed",)  # under a resumable section, but it picks the data (the scene pool, the envs' seeds)


PATHS = ("data.root", "encoder.checkpoint")  # paths a run records absolute, so that it resumes from any directory


def record_paths(cfg: Any, saved: Any = None) -> None:
    """Make `cfg`'s paths absolute (from the working directory), in place; with `saved` (a resumed run's config),
    those an override changed, and relative ones (runs from before paths were recorded absolute) that exist from
    here: the others stay as recorded."""
    for key in PATHS:
        head, _, name = key.rpartition(".")
        node = getattr(cfg, head, None)
        value = getattr(node, name, None)
        if value and (saved is None or value != getattr(getattr(saved, head), name)
                      or (not os.path.isabs(value) and os.path.exists(value))):
            setattr(node, name, os.path.abspath(os.path.expanduser(value)))


def check_against_checkpoint(cfg: Any, state: dict, run_dir: str | Path, evaluating: bool = False) -> None:
    """A config that names another model, env or data than its run's checkpoint was trained with (config.yaml edited
    by hand since, or another config passed from Python) is refused, as the same change given as a resume override
    is. `evaluating`: the run is read to be evaluated or shown, not resumed, which the error's way out says."""
    recorded = state.get("config")
    if not recorded:  # a checkpoint from before they held their config
        return
    try:
        old, new = OmegaConf.merge(OmegaConf.structured(type(cfg)), recorded), OmegaConf.structured(cfg)
        # a pretrained encoder's architecture comes from its run; without one, the encoder trains jointly
        pretrained = OmegaConf.select(new, "encoder.checkpoint", default=None)
        taken = ("encoder.model", "encoder.resolution") if pretrained else ("encoder.mode",)
        for key in (*DERIVED, *taken):  # set by the run from other keys (compared there), the env or another run
            if OmegaConf.select(old, key, default=None) is not None:
                OmegaConf.update(old, key, OmegaConf.select(new, key), merge=False)
        saved = OmegaConf.to_object(old)
    except OmegaConfBaseException:  # a checkpoint of an older schema: config.yaml is all there is
        return
    try:
        check_resume_overrides(saved, cfg, run_dir, fix="restore config.yaml to what the run trained with"
                               if evaluating else None)
    except ConfigError as e:
        raise ConfigError(f"the config does not match the checkpoint in {run_dir} (was its config.yaml edited?): "
                          f"{e}") from None


def check_resume_overrides(saved: Any, cfg: Any, run_dir: str | Path, fix: Optional[str] = None) -> None:
    """A resumed run continues what its checkpoint was trained as: overrides may change how long and how it trains
    (`train.*` but the seed, `eval.*`, env workers, where replay lives) and where its data lives, never the model,
    the env or the data it learns from. `fix`: the way out the error gives instead of a new run's."""
    old, new = OmegaConf.structured(saved), OmegaConf.structured(cfg)
    keys = _keys(old)
    for key in keys:
        before, after = OmegaConf.select(old, key), OmegaConf.select(new, key)
        if OmegaConf.is_dict(before) or (key.startswith(RESUMABLE) and key not in FIXED) or before == after:
            continue
        if fix:
            raise ConfigError(f"{key}={after!r} differs from what {run_dir} trained with ({before!r}); {fix}")
        if key in FIXED:
            raise ConfigError(f"{key}={after!r} differs from what {run_dir} trained with ({before!r}); the seed picks "
                              "the data a run learns from, so a resume keeps it: start a new run (--run-dir NEW) to "
                              "change it")
        raise ConfigError(f"{key}={after!r} differs from what {run_dir} trained with ({before!r}); a resume may change "
                          f"how it runs ({_resumable(keys)}), not what it learns: start a new run (--run-dir NEW) to "
                          "change it")


def _resumable(keys: list[str]) -> str:
    """RESUMABLE as a resume error lists it: the entries among `keys` (a command's own), a section with the keys
    under it that stay fixed."""
    out = []
    for k in RESUMABLE:
        if not any(have == k or have.startswith(k) for have in keys):
            continue
        fixed = [f for f in FIXED if f.startswith(k)]
        out.append(f"{k}*" + (f" but {', '.join(fixed)}" if fixed else "") if k.endswith(".") else k)
    return ", ".join(out)


def schema_command(path: str | Path) -> Optional[str]:
    """The command whose schema takes the config file at `path` (a preset, by path or name, or a run's), or None
    (also when there is no such file or it does not parse)."""
    try:
        loaded = OmegaConf.load(preset_path(path))
        return _fitting_command(loaded) or _closest_command(loaded) if isinstance(loaded, DictConfig) else None
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError):
        return None


def _closest_command(loaded: Any) -> Optional[str]:
    """For a file no schema takes as it is (a typo in a key): the one command whose schema has the most of its
    top-level sections, so the error names the bad key rather than a good key of another command."""
    sections = set(loaded.keys())
    shares = {c: len(sections & set(OmegaConf.structured(s).keys())) for c, s in run_schemas().items()}
    best = max(shares.values())
    winners = [c for c, n in shares.items() if n == best]
    return winners[0] if best and len(winners) == 1 else None


def continued_anneal(model: Any, steps: Optional[int]) -> Any:
    """A pretraining run's model config (`model`, after its `steps` steps) for fine-tuning with a world model: the VQ
    Gumbel temperature anneals on from where pretraining left it (tau_start: the temperature reached, anneal_steps:
    the rest), rather than restarting hot and feeding the decoder soft code mixtures it had long stopped seeing."""
    vq = model.vq
    if not vq.enabled or not steps:
        return model
    reached = temperature(steps, vq.tau_start, vq.tau_end, vq.anneal_steps)
    return replace(model, vq=replace(vq, tau_start=reached, anneal_steps=max(vq.anneal_steps - steps, 0)))


def encoder_run_config(checkpoint: str) -> Any:
    """The pretraining config of a world model's `encoder.checkpoint`; an error names the key, which may come from a
    preset."""
    try:
        return load_run_config("pretrain", checkpoint)
    except ConfigError as e:
        raise ConfigError(f"encoder.checkpoint={checkpoint}: {e}") from None


def load_run_config(command: str, run_dir: str | Path, overrides: Sequence[str] = (), made_by: str = "") -> Any:
    """The config of a run directory made by `run.py <command>` (plus overrides), with an error that says so when the
    directory holds no run or another command's run (`made_by`: what the error names as the expected maker)."""
    path = Path(run_dir) / "config.yaml"
    if Path(run_dir).is_file():  # a checkpoint file, say
        run = Path(run_dir).parent.parent if Path(run_dir).parent.name == "checkpoints" else None
        raise ConfigError(f"{run_dir} is a file: pass the run directory (the folder holding config.yaml and "
                          "checkpoints/)" + (f", {run}" if run else ""))
    if not path.is_file():
        what = FOLDER_KINDS["dataset"] if folder_kind(Path(run_dir)) == "dataset" else f"{path} not found"
        raise ConfigError(f"no run at {run_dir} ({what}): expected a run directory made by "
                          + (made_by or f"`run.py {command} --run-dir DIR`"))
    try:
        return load_config(run_schemas()[command], path, overrides)
    except ConfigError:
        made_by = schema_command(path)
        if made_by is None or made_by == command:
            raise
        raise ConfigError(f"{run_dir} is a run of `run.py {made_by}`; this needs a run of `run.py {command}`") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config, atomically (under torchrun, rank 0 only)."""
    from .rundir import atomic_write

    if distributed.is_main():
        atomic_write(Path(path), lambda f: f.write(to_yaml(cfg).encode()))
