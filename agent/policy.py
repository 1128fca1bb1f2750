"""Acting in real environments: each env's frames are encoded with its slots carried over from its previous
frame (reset to the learned initialization at the start of an episode), then the actor picks an action."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from world_model.updates import autocast
from world_model.wm import WorldModel, frames_to_input

from .actor_critic import ActorCritic


class SlotPolicy:
    """Batched policy over `num_envs` real envs; call `act` once per vector step. `amp`: encode and act under the
    bf16 autocast (on CUDA) the world model trains under, so acting reads the codes imagination learned from (a VQ
    code near a tie can differ between float32 and bf16)."""

    def __init__(self, wm: WorldModel, ac: ActorCritic, device: torch.device, amp: bool = False):
        self.wm, self.ac, self.device, self.amp = wm, ac, device, amp
        self.prev: Optional[torch.Tensor] = None  # b k d raw slots of each env's previous frame

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray] | np.ndarray, is_first: np.ndarray | bool,
            generator: Optional[torch.Generator] = None) -> np.ndarray:
        """obs: "image" `b h w 3` uint8 (and "status" `b m`, read when the world model reads them), or the images
        alone (a vector env of a game without status tokens); is_first `b` bool, or one bool for every env (a new
        episode starts at this frame) -> actions `b`."""
        if not isinstance(obs, dict):
            obs = {"image": obs}
        if self.wm.status_vars and "status" not in obs:
            raise ValueError(f"this world model reads {self.wm.status_vars} status tokens beside each frame: pass the "
                             "env's observation dict, with its 'status'")
        if np.ndim(obs["image"]) != 4:
            raise ValueError(f"SlotPolicy.act takes a batch of frames `b h w 3`, got shape {np.shape(obs['image'])}; "
                             "add a leading axis for one env")
        is_first = np.broadcast_to(np.asarray(is_first, bool), (len(obs["image"]),)).copy()
        if is_first.all():  # every env starts an episode (any batch size): nothing carries over
            self.prev = None
        with autocast(self.device, self.amp):
            return self._act(obs, is_first, generator)

    def _act(self, obs: dict[str, np.ndarray], is_first: np.ndarray, generator: Optional[torch.Generator]
             ) -> np.ndarray:
        x = frames_to_input(torch.as_tensor(obs["image"], device=self.device)[:, None], self.wm.resolution)[:, 0]
        encoder = self.wm.autoencoder.encoder
        self.wm.step_begin()
        prev = self.prev
        if prev is not None and is_first.any():  # new episodes start from the learned initialization
            init = encoder.slot_module.initial_slots(x.shape[0], x.device)
            prev = torch.where(torch.as_tensor(is_first, device=x.device)[:, None, None], init, prev)
        out = encoder(x, prev)  # prev None: every env from the learned initialization
        self.prev = self.wm.kept(out.raw_slots)  # read at the next step, after the encoder's next call
        frame_codes = None
        if self.wm.frame_tokenizer is not None:
            status = torch.as_tensor(obs["status"], device=self.device) if self.wm.status_vars else None
            frame_codes = self.wm.frame_tokenizer.codes(x, status)
        return self.ac.act(out.codes, frame_codes, generator=generator).cpu().numpy()
