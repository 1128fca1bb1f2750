"""Imagination as a rollout: the dynamics stepped like a batched environment from real context, with actions
from the actor, collecting the trajectory the actor-critic learns from. Independent of any training loop.

Transition t of a trajectory: state s_t --a_t--> s_{t+1}, with the predicted reward r_t and probability c_t
that s_{t+1} continues the episode (the dynamics reads both from step t's action token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from world_model.dynamics import SlotDynamics
from world_model.imagined_env import ImaginedEnv


@dataclass
class Trajectory:
    """h imagined transitions from a real start state s_0; log-probs are recomputed by the update."""

    slot_codes: torch.Tensor  # b h+1 k v (s_0 .. s_h)
    frame_codes: Optional[torch.Tensor]  # b h+1 g, None without a frame token
    actions: torch.Tensor  # b h (a_t taken in s_t)
    rewards: torch.Tensor  # b h (r_t for s_t -> s_{t+1})
    continues: torch.Tensor  # b h (probability that s_{t+1} is not terminal)
    start_continues: Optional[torch.Tensor] = None  # b: 0 where the real s_0 is terminal (None: none is)


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
