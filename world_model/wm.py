"""The world model: slot encoder (VQ codes) + frame tokenizer + slot-token dynamics, and what it does
with a sequence of frames: encode it with slots carried over time, compute its losses, and predict
open-loop from a context of real frames (decoding imagined codes back to pictures).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from envs import STATUS_LEVELS
from envs.errors import UsageError

from . import distributed
from .dynamics import DynamicsConfig, SlotDynamics, dynamics_loss, masked_mean
from .frame_tokenizer import FrameTokenizer, FrameTokenizerConfig
from .imagined_env import ImaginedEnv
from .perception import SlotAutoencoder
from .slots.vq import temperature

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes whose kernels replay as CUDA graphs


@dataclass
class Encoded:
    slot_codes: torch.Tensor  # b t k v
    frame_codes: Optional[torch.Tensor]  # b t g (learned, then the env's status tokens)
    recon_loss: Optional[torch.Tensor]  # slot autoencoder MSE (joint training only)
    kl: Optional[torch.Tensor]  # VQ KL (joint training only)
    frame_loss: torch.Tensor  # frame tokenizer reconstruction loss


def frames_to_input(frames: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 `b t h w 3` (a torch tensor or numpy array) -> float `b t 3 r r` in [0, 1] (area resize when sizes
    differ)."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames_to_input takes env frames as uint8 `b t h w 3`, got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    b, t = frames.shape[:2]
    x = frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
    return x.unflatten(0, (b, t))


class WorldModel(nn.Module):
    """The VQ slot autoencoder, the frame tokenizer and the slot-token dynamics together: `encode` frames to codes,
    `loss` for a training batch, `open_loop` / `decode_codes` for prediction. Build it with
    world_model.train_wm.build_world_model; it reads images `b t 3 h w` in [0, 1] (`frames_to_input`)."""

    def __init__(self, autoencoder: SlotAutoencoder, resolution: int, frame_cfg: FrameTokenizerConfig,
                 dyn_cfg: DynamicsConfig, joint: bool, carry_grad: bool = True, status_vars: int = 0):
        super().__init__()
        self.carry_grad = carry_grad  # gradients through the slots carried from frame to frame (see carried_slots)
        vq = autoencoder.encoder.vq
        if vq is None:
            raise UsageError("the world model needs a VQ slot encoder (model.vq.enabled=true): it predicts slot codes")
        self.autoencoder, self.resolution, self.joint = autoencoder, resolution, joint
        self.encoder_cfg = None  # the completed encoder config (WMEncoderConfig), which `build_world_model` sets
        # the env's status tokens beside each frame, appended to the frame codes (0: none, or not read; the builder,
        # build_world_model, decides, as it sizes the dynamics' frame tokens by them)
        self.status_vars = status_vars
        self.frame_tokenizer = FrameTokenizer(frame_cfg, resolution, self.status_vars) if frame_cfg.vars else None
        self.dynamics = SlotDynamics(dyn_cfg)
        if self.frame_tokenizer is not None:
            self.dynamics.limit_frame_codes([frame_cfg.codes] * frame_cfg.vars + [STATUS_LEVELS] * status_vars)
        self.cudagraphs = False  # compiled parts replay CUDA graphs (compile_frame_parts)
        if not joint:
            self.autoencoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.joint:
            self.autoencoder.eval()  # a frozen encoder quantizes with argmax, not Gumbel samples
        return self

    def encode(self, images: torch.Tensor, status: Optional[torch.Tensor] = None,
               valid: Optional[torch.Tensor] = None, valid_count: Optional[torch.Tensor] = None) -> Encoded:
        """images `b t 3 h w` (status tokens `b t m` when the model reads them) -> codes, encoding frame t's slots
        from frame t-1's (slot k follows one object). `valid` `b t` (bool): the losses average over these frames
        only (a replayed segment padded past its episode's end), dividing by `valid_count` when given (`masked_mean`).

        Only the slot module runs frame by frame: the backbone, the quantizer, the slot decoder and the frame
        tokenizer each take all b*t frames in one batch (on a GPU, 64 small launches of a part cost far more than
        one big one)."""
        r = self.resolution
        if images.ndim != 5 or tuple(images.shape[2:]) != (3, r, r) or not images.is_floating_point():
            raise ValueError(f"WorldModel.encode expects float images `b t 3 h w` in [0, 1] at its resolution, (batch, "
                             f"time, 3, {r}, {r}), got {images.dtype} {tuple(images.shape)}; convert env frames (uint8 "
                             f"`b t h w 3`) with frames_to_input(frames, {r})")
        b, t = images.shape[:2]
        encoder, frames = self.autoencoder.encoder, images.flatten(0, 1)
        with torch.set_grad_enabled(self.joint and torch.is_grad_enabled()):
            feats, _ = encoder.features(frames)
            raws = self.carried_slots(self.kept(feats).unflatten(0, (b, t)))  # b t k d
            q = encoder.vq(raws.flatten(0, 1))  # (b t) k d: the same codes as frame by frame
            codes, recon_loss = self.kept(q.codes).unflatten(0, (b, t)), None
            kl = masked_mean(self.kept(q.kl_slots).mean(-1).unflatten(0, (b, t)), valid, valid_count)
            if self.joint:  # the mean of each frame's MSE, the frames being equal in size
                recon = self.autoencoder.decoder(q.slots).recon
                recon_loss = masked_mean(F.mse_loss(recon, frames, reduction="none").flatten(1).mean(1)
                                         .unflatten(0, (b, t)), valid, valid_count)
        frame_codes, frame_loss = None, images.new_zeros(())
        if self.frame_tokenizer is not None:
            status = status.flatten(0, 1) if self.status_vars and status is not None else None
            frame_codes, frame_loss = self.frame_tokenizer(frames, status, reduce=False)
            frame_codes = self.kept(frame_codes).unflatten(0, (b, t))
            frame_loss = masked_mean(frame_loss.unflatten(0, (b, t)), valid, valid_count)
        return Encoded(codes, frame_codes, recon_loss, kl if self.joint else None, frame_loss)

    def carried_slots(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone features `b t n d` -> raw slots `b t k d`, frame t's slots initialized from frame t-1's.

        With `carry_grad` (the default) gradients flow back through the carried slots over the whole sequence, so the
        slot module runs frame by frame with autograd. Without it the carried slots are constants (backpropagation
        truncated to one frame): the chain runs frame by frame without autograd, then the slot module runs once
        over all b*t frames from those initial slots, with the same values and, on a GPU, about a third of the
        kernel launches of an update (`python .ci/count-ops.py encoder.carry_grad=false`)."""
        slot_module = self.autoencoder.encoder.slot_module
        b, t = feats.shape[:2]
        if self.carry_grad or not torch.is_grad_enabled():
            raws, prev = [], None
            for i in range(t):
                prev = self.kept(slot_module(feats[:, i], prev)[0])  # b k d, carried to frame i+1
                raws.append(prev)
            return torch.stack(raws, 1)
        # b k d, sampled once, with its gradient; at least fp32, as the slot module samples it from its normalized
        # inputs (a bf16 backbone output under autocast would round it)
        first = slot_module.initial_slots(b, feats.device, torch.promote_types(feats.dtype, torch.float32))
        inits = [first]
        with torch.no_grad():
            prev = first.detach()
            for i in range(t - 1):
                prev = self.kept(slot_module(feats[:, i], prev)[0])
                inits.append(prev)
        raws = slot_module(feats.flatten(0, 1), torch.stack(inits, 1).flatten(0, 1))[0]  # (b t) k d
        return self.kept(raws).unflatten(0, (b, t))

    def loss(self, batch: dict, vq_beta: float, counts: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, dict, Encoded]:
        """batch: images `b t 3 h w` float, action/reward/is_terminal `b t` in the episode step layout
        (action t led to frame t), status `b t m` when the model reads them, and `valid` `b t` for segments padded
        past an episode's end (padded steps are neither inputs to a loss nor targets). The dynamics input at step t
        is frame t with the action taken after it. Also returns the batch's codes (imagination starts from them).
        `counts` (valid frames, valid targets) replace the batch's own counts as the masked losses' divisors."""
        valid = batch.get("valid")
        frames_n, targets_n = (None, None) if counts is None else counts
        enc = self.encode(batch["images"], batch.get("status"), valid, frames_n)
        actions = torch.cat([batch["action"][:, 1:], torch.zeros_like(batch["action"][:, :1])], 1)
        pred = self.dynamics(enc.slot_codes, enc.frame_codes, actions)
        continues = 1.0 - batch["is_terminal"].float()
        loss, stats = dynamics_loss(pred, enc.slot_codes, enc.frame_codes, batch["reward"].float(), continues, valid,
                                     targets_n, self.status_vars)
        if valid is not None:  # the share of replayed steps that are real, not padding past an episode's end
            stats["valid_frac"] = valid.float().mean()
        if self.frame_tokenizer is not None:
            loss = loss + enc.frame_loss
            stats["loss_frame_recon"] = enc.frame_loss.detach()
        if enc.recon_loss is not None:
            loss = loss + enc.recon_loss + vq_beta * enc.kl
            stats.update(loss_slot_recon=enc.recon_loss.detach(), kl=enc.kl.detach())
        stats["loss"] = loss.detach()
        return loss, stats, enc

    def compile_frame_parts(self, mode: str = "default", backend: str = "inductor") -> None:
        """torch.compile, in place (state-dict keys unchanged), the parts that see every frame: the slot encoder's
        backbone and quantizer (all frames of an update in one batch; the acting envs' frames each step), its slot
        module (seq_len times per update, slots carried from frame to frame, and once per acting step), the slot
        decoder and the frame tokenizer. Shapes are static: a kernel set per batch size (training, acting, eval),
        grad mode and first-frame-or-carried slot module call, about 6 compilations per part, within dynamo's
        recompile limit of 8.
        The dynamics stays eager: imagination calls it with a KV cache that grows every step, a new shape each time.
        `backend="aot_eager"` traces without generating kernels (to tell a tracing problem from a code-generation
        one)."""
        kwargs = {"mode": mode} if backend == "inductor" else {}  # modes are inductor's
        kwargs["dynamic"] = False
        encoder = self.autoencoder.encoder
        for part in (encoder.backbone, encoder.slot_module, encoder.vq, self.autoencoder.decoder if self.joint else None,
                     self.frame_tokenizer):
            if part is not None:
                part.compile(backend=backend, **kwargs)
        self.cudagraphs = backend == "inductor" and mode in CUDAGRAPH_MODES

    def step_begin(self) -> None:
        """Call before each update and each acting step: under CUDA graphs, the outputs of earlier replays are not
        read again, so their memory may be reused."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def kept(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A compiled part's output that is read after the part's next call: a copy under CUDA graphs (the backbone's
        features of every frame, the slots carried to the next frame and gathered over the sequence, the codes and
        the KL term). Needed where a step mark falls between the two calls (acting); inside one update it guards
        callers that never mark a step, for whom every call without a pending backward starts a new graph
        generation that may overwrite earlier outputs."""
        return x.clone() if self.cudagraphs and x is not None else x

    def set_vq_temperature(self, step: int, tau_start: float, tau_end: float, anneal_steps: int) -> Optional[float]:
        """A jointly trained encoder's Gumbel temperature at `step` of its anneal (returned); None when frozen."""
        if not self.joint:
            return None
        tau = temperature(step, tau_start, tau_end, anneal_steps)
        self.autoencoder.encoder.vq.set_temperature(tau)
        return tau

    @torch.no_grad()
    def decode_codes(self, slot_codes: torch.Tensor) -> torch.Tensor:
        """`n k v` codes -> decoded frames `n 3 h w`."""
        slots = self.autoencoder.encoder.vq.decode_codes(slot_codes)
        return self.autoencoder.decoder(slots).recon.clamp(0, 1)

    @torch.no_grad()
    def open_loop(self, enc: Encoded, actions: torch.Tensor, context: int, horizon: int) -> dict:
        """Predict steps context..context+horizon-1 from the first `context` encoded steps and the real actions
        (an `ImaginedEnv` stepped with them, taking the most likely codes).

        enc: codes of `b T` real frames (T >= context + horizon); actions `b T` in the episode layout.
        Returns imagined slot codes `b h k v`, frame codes `b h g`, rewards `b h` and continuation probs `b h`."""
        steps = min(enc.slot_codes.shape[1], actions.shape[1])
        if context < 1 or horizon < 1 or steps < context + horizon:
            raise ValueError(f"open_loop needs context >= 1, horizon >= 1 and at least context + horizon = "
                             f"{context + horizon} encoded steps and actions, got {context}, {horizon} and "
                             f"{enc.slot_codes.shape[1]}, {actions.shape[1]}")
        act_after = torch.cat([actions[:, 1:], torch.zeros_like(actions[:, :1])], 1)  # action taken after frame t
        frames = enc.frame_codes
        env = ImaginedEnv(self.dynamics, 0.0)
        env.reset(enc.slot_codes[:, :context], frames[:, :context] if frames is not None else None,
                  act_after[:, :context], horizon)
        slots, frames_out, rewards, conts = zip(*(env.step(act_after[:, t])
                                                  for t in range(context - 1, context - 1 + horizon)))
        return {"slot_codes": torch.stack(slots, 1),
                "frame_codes": torch.stack(frames_out, 1) if frames is not None else None,
                "reward": torch.stack(rewards, 1), "cont": torch.stack(conts, 1)}


class WorldModelLoss(nn.Module):
    """`WorldModel.loss` as a module forward, so DistributedDataParallel can wrap the world model's update.

    Under torchrun the masked losses divide by the ranks' mean counts of valid frames and targets (a collective:
    every rank calls this in step), so DDP's gradient average weighs every valid step of every rank equally."""

    def __init__(self, wm: WorldModel):
        super().__init__()
        self.wm = wm

    def forward(self, batch: dict, vq_beta: float) -> tuple[torch.Tensor, dict, Encoded]:
        valid, counts = batch.get("valid"), None
        if valid is not None and distributed.active():
            counts = distributed.mean_(torch.stack([valid.sum(), valid[:, 1:].sum()]).float())
            counts = counts.clamp_min(1.0 / distributed.world_size())  # one step over all ranks, as one process clamps
        return self.wm.loss(batch, vq_beta, counts)
