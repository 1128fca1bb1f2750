"""DreamerV3-style actor-critic over slot codes, trained on imagined trajectories (`agent.imagination`).

Actor and critic each read a state (slot codes `b k v`, frame codes `b g`) with their own permutation-
invariant slot transformer. The critic predicts symlog two-hot values and learns λ-returns bootstrapped
from itself, regularized toward a slow EMA copy; the actor learns by REINFORCE on advantages divided by
a running 5%-95% return range (at least 1), plus an entropy bonus, with a 1% uniform mix in its policy.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from world_model import distributed, twohot
from world_model.dynamics import Block, CodeEmbedding, DynamicsConfig

from .imagination import Trajectory

SUMMARY, SLOT, FRAME = 0, 1, 2  # token types


@dataclass
class ActorCriticConfig:
    """Defaults follow DreamerV3 (discount 1 - 1/333, λ 0.95, 15-step imagination, entropy 3e-4, learning
    rates 3e-5, slow critic EMA 0.98, return percentiles EMA 0.99, 255 two-hot bins, gradient clip 100)."""

    embed_dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    gamma: float = 0.997
    lam: float = 0.95
    horizon: int = 15  # imagined steps per trajectory
    entropy: float = 3e-4  # actor entropy bonus
    unimix: float = 0.01  # uniform share mixed into the policy
    actor_lr: float = 3e-5
    critic_lr: float = 3e-5
    ema_decay: float = 0.98  # slow critic: slow <- decay * slow + (1 - decay) * critic after each update
    slow_reg: float = 1.0  # weight of the critic's loss toward the slow critic's values
    return_norm_decay: float = 0.99
    reward_bins: int = 255
    grad_clip: float = 100.0


class SlotPolicyNet(nn.Module):
    """One state -> features `b d`: a transformer over [summary, slot tokens, frame token] read out at the
    summary token. Token-type embeddings only (no slot index), so it is invariant to permuting slots."""

    def __init__(self, dyn: DynamicsConfig, cfg: ActorCriticConfig):
        super().__init__()
        d = cfg.embed_dim
        self.frame_vars = dyn.frame_vars
        self.slot_embed = CodeEmbedding(dyn.num_vars, dyn.num_codes, d)
        if dyn.frame_vars:
            self.frame_embed = CodeEmbedding(dyn.frame_vars, dyn.frame_codes, d)
        self.type_embed = nn.Embedding(3, d)  # the summary token is its type embedding alone
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, 0.0) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor]) -> torch.Tensor:
        """slot_codes `b k v`, frame_codes `b g` (None without a frame token) -> `b d`."""
        types = self.type_embed.weight
        tokens = [types[SUMMARY].expand(slot_codes.shape[0], 1, -1),  # b 1 d
                  self.slot_embed(slot_codes) + types[SLOT]]  # b k d
        if self.frame_vars:
            if frame_codes is None:
                raise ValueError(f"frame_codes must have shape (batch, frame_vars={self.frame_vars}), got None")
            tokens.append(self.frame_embed(frame_codes[:, None]) + types[FRAME])  # b 1 d
        x = torch.cat(tokens, 1)  # b 1+k(+1) d
        for block in self.blocks:
            x = block(x, None, None, 0)
        return self.norm(x[:, 0])


class Actor(nn.Module):
    """The policy over a step's slot codes (and frame codes): action logits, mixed with uniform in `dist`."""

    def __init__(self, dyn: DynamicsConfig, cfg: ActorCriticConfig):
        super().__init__()
        self.net = SlotPolicyNet(dyn, cfg)
        self.head = nn.Linear(cfg.embed_dim, dyn.num_actions)
        self.head.weight.data.mul_(0.1)  # start near uniform, to explore
        nn.init.zeros_(self.head.bias)
        self.unimix = cfg.unimix

    def forward(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor]) -> torch.Tensor:
        """Action logits `b a` (before the uniform mix)."""
        return self.head(self.net(slot_codes, frame_codes))

    def dist(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor]) -> torch.distributions.Categorical:
        """The policy: softmax mixed with `unimix` of uniform (DreamerV3), so log-probs stay bounded. Not validated:
        weights that diverged give NaN, whose loss skips the update (`guarded_update`) rather than raising here."""
        probs = torch.softmax(self(slot_codes, frame_codes).float(), -1)
        return torch.distributions.Categorical(probs=(1 - self.unimix) * probs + self.unimix / probs.shape[-1],
                                               validate_args=False)

    def sample(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor],
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sampled actions `b` (uniform where weights that diverged give NaN: the run stops at its updates)."""
        probs = self.dist(slot_codes, frame_codes).probs
        drawn = torch.where(torch.isfinite(probs), probs, 1.0)
        return torch.multinomial(drawn, 1, generator=generator).squeeze(-1)


class Critic(nn.Module):
    """The value of a step's slot codes (and frame codes), as symlog two-hot logits."""

    def __init__(self, dyn: DynamicsConfig, cfg: ActorCriticConfig):
        super().__init__()
        self.net = SlotPolicyNet(dyn, cfg)
        self.head = nn.Linear(cfg.embed_dim, cfg.reward_bins)
        # DreamerV3: a zero output layer starts every value at 0.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor]) -> torch.Tensor:
        """Symlog two-hot value logits `b bins`."""
        return self.head(self.net(slot_codes, frame_codes))

    def value(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor]) -> torch.Tensor:
        """Expected values `b`."""
        return twohot.mean(self(slot_codes, frame_codes))  # b


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, continues: torch.Tensor, gamma: float,
                   lam: float) -> torch.Tensor:
    """TD(λ) returns `b h`, computed backward from R_h = v_h:

    R_t = r_t + gamma * c_t * ((1 - lam) * v_{t+1} + lam * R_{t+1}),  t = h-1 .. 0,
    with rewards r_t and continues c_t `b h` of transition s_t -> s_{t+1} and values v_t `b h+1` of s_0 .. s_h."""
    disc = gamma * continues
    ret = values[:, -1]
    out = []
    for t in reversed(range(rewards.shape[1])):
        ret = rewards[:, t] + disc[:, t] * ((1 - lam) * values[:, t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1], 1)


def discount_weights(continues: torch.Tensor, gamma: float, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight `b h` of step t: c_start prod_{i<t} gamma * c_i, the discounted chance to reach s_t. `start` `b`: 1 - is_terminal
    of the real start s_0 (None: 1), so a rollout from a terminal frame, where the episode has ended, counts for
    nothing (as in DreamerV3)."""
    first = torch.ones_like(continues[:, :1]) if start is None else start.to(continues.dtype)[:, None]
    disc = torch.cat([first, gamma * continues[:, :-1]], 1)
    return torch.cumprod(disc, 1)


class ReturnNormalizer(nn.Module):
    """EMA of the 5th and 95th percentiles of λ-returns (the first batch sets them); scale = max(1, p95 - p5).

    Buffers, so it checkpoints with the module's state_dict; batches with non-finite percentiles are ignored."""

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95):
        super().__init__()
        self.decay = decay
        self.register_buffer("quantiles", torch.tensor([low, high]), persistent=False)
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # batches absorbed

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> None:
        # Under torchrun every rank holds 1/N of the returns: the percentiles of them all, as one process would take
        # them, so every rank scales its advantages alike and the normalizer stays identical across ranks.
        q = torch.quantile(distributed.gathered(returns.detach().float().flatten()), self.quantiles)
        ok = torch.isfinite(q).all()
        keep = torch.where(self.count > 0, self.decay, 0.0)  # without a sync
        new = keep * torch.stack([self.low, self.high]) + (1 - keep) * q
        self.low.copy_(torch.where(ok, new[0], self.low))
        self.high.copy_(torch.where(ok, new[1], self.high))
        self.count += ok.long()

    def scale(self) -> torch.Tensor:
        return (self.high - self.low).clamp_min(1.0)


class ActorCritic(nn.Module):
    """Actor, critic, slow critic and return normalizer, with an Adam optimizer (eps 1e-5) each for actor and critic.

    Move it to its device before the first update (the optimizers' state follows the parameters then).
    `state_dict()` covers the weights, slow critic and normalizer; `optimizer_state()` the optimizers."""

    def __init__(self, dyn: DynamicsConfig, cfg: Optional[ActorCriticConfig] = None):
        super().__init__()
        self.cfg = cfg = cfg or ActorCriticConfig()
        self.actor = Actor(dyn, cfg)
        self.critic = Critic(dyn, cfg)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.normalizer = ReturnNormalizer(cfg.return_norm_decay)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr, eps=1e-5)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, eps=1e-5)

    def optimizer_state(self) -> dict:
        return {"actor": self.actor_opt.state_dict(), "critic": self.critic_opt.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.actor_opt.load_state_dict(state["actor"])
        self.critic_opt.load_state_dict(state["critic"])

    @torch.no_grad()
    def act(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor], sample: bool = True,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Actions `b` for states `b k v` / `b g`: sampled from the policy, or its most likely action."""
        if sample:
            return self.actor.sample(slot_codes, frame_codes, generator)
        return self.actor(slot_codes, frame_codes).argmax(-1)

    def forward(self, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Actor and critic losses on an imagined trajectory (float32), and their stats. A module forward, so
        `update` can run it through DistributedDataParallel."""
        c = self.cfg
        b, h = traj.actions.shape
        frames = traj.frame_codes
        logits = self.critic(traj.slot_codes.flatten(0, 1),
                             frames.flatten(0, 1) if frames is not None else None).unflatten(0, (b, h + 1))
        start_slots = traj.slot_codes[:, :-1].flatten(0, 1)  # (b h) k v
        start_frames = frames[:, :-1].flatten(0, 1) if frames is not None else None  # (b h) g
        with torch.no_grad():
            values = twohot.mean(logits)  # b h+1
            slow = self.slow_critic.value(start_slots, start_frames).view(b, h)
            returns = lambda_returns(traj.rewards.float(), values, traj.continues.float(), c.gamma, c.lam)  # b h
            weights = discount_weights(traj.continues.float(), c.gamma, traj.start_continues)  # b h
            self.normalizer.update(returns)
            adv = (returns - values[:, :-1]) / self.normalizer.scale()  # b h
        dist = self.actor.dist(start_slots, start_frames)
        log_prob = dist.log_prob(traj.actions.flatten()).view(b, h)
        entropy = dist.entropy().view(b, h)
        actor_loss = (weights * (-adv * log_prob - c.entropy * entropy)).mean()
        value_logits = logits[:, :-1]
        critic_loss = (weights * (twohot.loss(value_logits, returns) + c.slow_reg * twohot.loss(value_logits, slow))
                       ).mean()
        stats = {"loss_actor": actor_loss.detach(), "loss_critic": critic_loss.detach(),
                 "entropy": entropy.detach().mean(), "return": returns.mean(), "value": values[:, :-1].mean(),
                 "advantage": adv.mean(), "return_scale": self.normalizer.scale(),
                 "return_low": self.normalizer.low.clone(), "return_high": self.normalizer.high.clone()}
        return actor_loss, critic_loss, stats

    def update(self, traj: Trajectory, parallel: Optional[nn.Module] = None) -> dict:
        """One actor and one critic step on an imagined trajectory, then the slow-critic EMA step.

        One backward through the sum of both losses (their parameters are disjoint, so each part gets its own
        gradient), then each part is clipped and stepped on its own. A non-finite loss skips both steps (the
        weights stay as they were), a non-finite gradient skips its part's; stats report it (skipped_actor,
        skipped_critic, skipped in {0, 1}). `parallel`: this module wrapped in DistributedDataParallel, whose
        backward averages the gradients over ranks (every rank then takes the same branches). Safe under
        autocast: the losses are computed in float32."""
        c = self.cfg
        actor_loss, critic_loss, stats = (parallel or self)(traj)
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(actor_loss) & torch.isfinite(critic_loss))
        if not distributed.all_true(finite, actor_loss.device):
            stats.update(skipped=1.0, skipped_actor=1.0, skipped_critic=1.0)
            return stats
        (actor_loss + critic_loss).backward()
        for name, module, opt in (("actor", self.actor, self.actor_opt), ("critic", self.critic, self.critic_opt)):
            grad_norm = nn.utils.clip_grad_norm_(module.parameters(), c.grad_clip)
            ok = bool(torch.isfinite(grad_norm))
            stats[f"skipped_{name}"] = float(not ok)
            if ok:
                opt.step()
                stats[f"grad_norm_{name}"] = grad_norm
            opt.zero_grad(set_to_none=True)
        stats["skipped"] = max(stats["skipped_actor"], stats["skipped_critic"])
        if not stats["skipped_critic"]:
            with torch.no_grad():
                for slow_p, p in zip(self.slow_critic.parameters(), self.critic.parameters()):
                    slow_p.lerp_(p, 1 - c.ema_decay)
        return stats
