"""The dynamics as a batched environment over slot and frame codes (IRIS's imagination as an env): reset from real
context, then stepped with actions, one step per forward through a KV cache. The agent's imagination rolls the actor
out in it; the world model's open-loop evaluation steps it with the real actions."""
from __future__ import annotations

from typing import Optional

import torch

from .dynamics import SlotDynamics, sample_step


def cache_dtype(dynamics: SlotDynamics, device: torch.device) -> torch.dtype:
    """The attention's keys/values dtype: the autocast dtype when autocast is on (e.g. bf16), else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(dynamics.parameters()).dtype


class ImaginedEnv:
    """The dynamics as a batched environment over slot/frame codes: reset from real context, then step
    with actions, each step one T=1 forward through a KV cache. Runs without gradients."""

    def __init__(self, dynamics: SlotDynamics, temperature: float = 1.0, generator: Optional[torch.Generator] = None):
        self.dynamics, self.temperature, self.generator = dynamics, temperature, generator
        self.cache = None
        self.slot_codes: Optional[torch.Tensor] = None  # b k v
        self.frame_codes: Optional[torch.Tensor] = None  # b g

    @torch.no_grad()
    def reset(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor], actions: Optional[torch.Tensor],
              horizon: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Feed context steps 0..c-2 with their actions and start from step c-1; allows `horizon` steps.

        slot_codes `b c k v`, frame_codes `b c g` or None, actions `b c`: the action taken after each context
        frame (the last one is unused; may be None when c = 1). Returns the start state's codes."""
        if slot_codes.ndim != 4:
            raise ValueError(f"slot_codes must be the context's codes `b c k v` (batch, context steps, slots, "
                             f"variables), got shape {tuple(slot_codes.shape)}")
        b, c = slot_codes.shape[:2]
        if actions is not None and tuple(actions.shape) != (b, c):
            raise ValueError(f"actions must be the context's actions `b c` = {(b, c)} (one after each context frame, "
                             f"the last unused), got shape {tuple(actions.shape)}")
        device = slot_codes.device
        self.cache = self.dynamics.init_cache(b, c - 1 + horizon, device, cache_dtype(self.dynamics, device))
        if c > 1:
            if actions is None:
                raise ValueError(f"a context of {c} steps needs its actions (b c), got None")
            self.dynamics(slot_codes[:, :-1], frame_codes[:, :-1] if frame_codes is not None else None,
                          actions[:, :-1], self.cache)
        self.slot_codes = slot_codes[:, -1]
        self.frame_codes = frame_codes[:, -1] if frame_codes is not None else None
        return self.slot_codes, self.frame_codes

    @torch.no_grad()
    def step(self, actions: torch.Tensor
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """actions `b` -> next slot codes `b k v`, frame codes `b g` (or None), reward `b`, continue prob `b`."""
        if self.slot_codes is None:
            raise RuntimeError("ImaginedEnv.step before reset: reset it from real context first")
        if actions.shape != self.slot_codes.shape[:1]:
            raise ValueError(f"actions must be one per imagined env, shape {tuple(self.slot_codes.shape[:1])}, got "
                             f"{tuple(actions.shape)}")
        frames = self.frame_codes[:, None] if self.frame_codes is not None else None
        pred = self.dynamics(self.slot_codes[:, None], frames, actions[:, None], self.cache)
        self.slot_codes, self.frame_codes, reward, cont = sample_step(pred, self.temperature, self.generator)
        return self.slot_codes, self.frame_codes, reward, cont
