"""The slot encoder (backbone + slot module + optional VQ) and the two pretraining models built on it.

`SlotEncoder` is what every later stage reuses: images (and optionally the previous frame's slots, so
slot k stays the same object over a video) -> slots, assignment weights and, with VQ, integer codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import CNNBackbone
from .config import ModelConfig
from .decoders import Decoded, SetPredictionHead, SpatialBroadcastDecoder
from .slots import make_slot_module
from .slots.vq import SlotQuantizer


@dataclass
class SlotOutput:
    """What `SlotEncoder` returns for a batch of images."""
    slots: torch.Tensor  # b k d: what decoders consume (quantized when VQ is on)
    raw_slots: torch.Tensor  # b k d: the slot module's output, to carry over to the next frame
    attn: torch.Tensor  # b k n: assignment weights over feature positions
    grid: tuple[int, int]  # feature map (h', w'), n = h' * w'
    codes: Optional[torch.Tensor] = None  # b k v int64 (VQ only)
    kl: Optional[torch.Tensor] = None  # scalar (VQ only)

    def attn_maps(self, size: tuple[int, int]) -> torch.Tensor:
        """Assignment weights as images `b k h w`, bilinearly resized to `size`."""
        b, k, _ = self.attn.shape
        maps = self.attn.reshape(b, k, *self.grid).float()
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class SlotEncoder(nn.Module):
    """CNN features -> slots by the configured slot module (GMM: the Slot Mixture Module, slots 2 x slot_dim wide,
    concat(mu, logsigma); Slot Attention: slot_dim wide) -> optional VQ-SA codes. Images `b 3 h w` float in [0, 1].
    Slots start from a learned distribution, sampled: two calls on the same images differ, in eval mode too, unless
    torch's RNG is seeded alike before each (or the previous frame's slots are passed in)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = CNNBackbone(cfg.cnn_channels, cfg.cnn_strides, cfg.cnn_kernel, cfg.feature_dim)
        self.slot_module = make_slot_module(cfg.slots, cfg.feature_dim, cfg.num_slots, cfg.slot_dim, cfg.iters,
                                            cfg.mlp_hidden, cfg.implicit_grad, cfg.gmm_temperature, cfg.gmm_log_det,
                                            cfg.gmm_update_pi)
        self.slot_width = self.slot_module.out_dim  # GMM: 2 x cfg.slot_dim (mu, logsigma)
        self.vq = None
        if cfg.vq.enabled:
            self.vq = SlotQuantizer(self.slot_width, cfg.vq.num_vars, cfg.vq.num_codes, cfg.vq.code_dim, cfg.vq.hard)

    def forward(self, images: torch.Tensor, prev_slots: Optional[torch.Tensor] = None) -> SlotOutput:
        """images `b 3 h w` in [0, 1]; prev_slots `b k d` = a previous SlotOutput.raw_slots."""
        want = (images.shape[0], self.cfg.num_slots, self.slot_width)
        if prev_slots is not None and tuple(prev_slots.shape) != want:
            raise ValueError(f"prev_slots must be a previous SlotOutput.raw_slots of shape (batch, num_slots, slot "
                             f"width) = {want}, got {tuple(prev_slots.shape)}")
        feats, grid = self.features(images)
        raw, attn = self.slot_module(feats, prev_slots)
        out = SlotOutput(slots=raw, raw_slots=raw, attn=attn, grid=grid)
        if self.vq is not None:
            q = self.vq(raw)
            out.slots, out.codes, out.kl = q.slots, q.codes, q.kl
        return out

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images `b 3 h w` -> backbone features `b n d` and their grid; frames of a video can go through in one
        batch, since only the slot module carries state from frame to frame."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SlotEncoder expects images of shape (batch, 3, h, w), got {tuple(images.shape)}")
        if not images.is_floating_point():  # env frames are uint8 `h w 3`: 0..255 would pass the shape check
            raise ValueError(f"SlotEncoder expects float images in [0, 1], got {images.dtype}; convert env frames "
                             "with world_model.wm.frames_to_input")
        weights = next(self.backbone.parameters()).dtype
        if images.dtype != weights and not torch.is_autocast_enabled(images.device.type):
            raise ValueError(f"images are {images.dtype} but the encoder's weights {weights}: cast the images (or the "
                             "model), or run under torch.autocast")
        return self.backbone(images)


class SlotAutoencoder(nn.Module):
    """Object discovery: reconstruct the image as a mask-weighted mixture of per-slot decodings."""

    def __init__(self, cfg: ModelConfig, resolution: int):
        super().__init__()
        self.encoder = SlotEncoder(cfg)
        self.decoder = SpatialBroadcastDecoder(self.encoder.slot_width, resolution, cfg.decoder_channels, cfg.decoder_init)
        self.resolution = resolution

    def forward(self, images: torch.Tensor, prev_slots: Optional[torch.Tensor] = None) -> tuple[SlotOutput, Decoded]:
        if images.shape[-2:] != (self.resolution, self.resolution):  # the decoder draws at the built resolution
            raise ValueError(f"this autoencoder was built for {self.resolution}x{self.resolution} images, got "
                             f"{tuple(images.shape[-2:])}")
        enc = self.encoder(images, prev_slots)
        return enc, self.decoder(enc.slots)


class SetPredictor(nn.Module):
    """Set-property prediction: one 19-entry CLEVR property row per slot. With VQ codes the properties come from the
    quantized slot and the 3 coordinates from the continuous one, as the VQ-SA reference reads them: from codes
    alone the positions would lie on a grid of at most num_codes^num_vars points, which caps AP at tight distance
    thresholds. A checkpoint from before (no `coords_from_slots` in its state) reads everything from the quantized
    slot, as it trained."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = SlotEncoder(cfg)
        self.head = SetPredictionHead(self.encoder.slot_width, cfg.head_hidden)
        self.register_buffer("coords_from_slots", torch.tensor(1, dtype=torch.uint8))  # saved with the weights
        self._coords_from_slots = True  # its value, kept on the host: forward never waits on the device for it

    def forward(self, images: torch.Tensor) -> tuple[SlotOutput, torch.Tensor]:
        enc = self.encoder(images)
        if enc.codes is None or not self._coords_from_slots:
            return enc, self.head(enc.slots)  # b k 19: xyz, then the attributes and objectness
        quantized, raw = self.head(torch.stack([enc.slots, enc.raw_slots])).unbind(0)  # one pass for both
        return enc, torch.cat([raw[..., :3], quantized[..., 3:]], dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "coords_from_slots"
        state_dict.setdefault(key, torch.tensor(0, dtype=torch.uint8))  # a checkpoint from before
        self._coords_from_slots = bool(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
