"""Imagination as a rollout: the dynamics stepped like a batched environment from real context, with actions
from the actor, collecting the trajectory the actor-critic learns from. Independent of any training loop.

Transition t of a trajectory: state s_t --a_t--> s_{t+1}, with the predicted reward r_t and probability c_t
that s_{t+1} continues the episode (the dynamics reads both from step t's action token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from world_model.dynamics import SlotDynamics, sample_step


@dataclass
class Trajectory:
    """h imagined transitions from a real start state s_0; log-probs are recomputed by the update."""

    slot_codes: torch.Tensor  # b h+1 k v (s_0 .. s_h)
    frame_codes: Optional[torch.Tensor]  # b h+1 g, None without a frame token
    actions: torch.Tensor  # b h (a_t taken in s_t)
    rewards: torch.Tensor  # b h (r_t for s_t -> s_{t+1})
    continues: torch.Tensor  # b h (probability that s_{t+1} is not terminal)
    start_continues: Optional[torch.Tensor] = None  # b: 0 where the real s_0 is terminal (None: none is)


def _cache_dtype(dynamics: SlotDynamics, device: torch.device) -> torch.dtype:
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
        b, c = slot_codes.shape[:2]
        device = slot_codes.device
        self.cache = self.dynamics.init_cache(b, c - 1 + horizon, device, _cache_dtype(self.dynamics, device))
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


@torch.no_grad()
def imagine(dynamics: SlotDynamics, actor, context, context_actions: Optional[torch.Tensor], horizon: int,
            temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> Trajectory:
    """Roll the actor (an `agent.actor_critic.Actor`: `.sample(slot_codes, frame_codes, generator)`) out for
    `horizon` steps in the dynamics from the last state of a real context.

    context: has slot_codes `b c k v` and frame_codes `b c g` or None (e.g. an `Encoded`); context_actions
    `b c`: the action taken after each context frame (the last is replaced by the actor's; None when c = 1).
    The cache holds c-1+horizon steps, so that must not exceed the dynamics' max_steps. Put the dynamics
    in eval mode first if it has dropout."""
    if horizon < 1:
        raise ValueError(f"horizon must be at least 1, got {horizon}")
    env = ImaginedEnv(dynamics, temperature, generator)
    s, f = env.reset(context.slot_codes, context.frame_codes, context_actions, horizon)
    slots, frames, actions, rewards, conts = [s], [f], [], [], []
    for _ in range(horizon):
        a = actor.sample(s, f, generator)  # b
        s, f, r, c = env.step(a)
        slots.append(s)
        frames.append(f)
        actions.append(a)
        rewards.append(r)
        conts.append(c)
    return Trajectory(torch.stack(slots, 1), torch.stack(frames, 1) if f is not None else None,
                      torch.stack(actions, 1), torch.stack(rewards, 1), torch.stack(conts, 1))
