"""World-model dynamics: a block-causal transformer over slot, frame and action tokens.

Each time step contributes K slot tokens, one frame token (optional) and one action token. A token at
step t attends to every token of steps <= t, so the outputs of step t (which has seen step t's action)
predict step t+1: each slot token its slot's next codes, the frame token the next frame codes, the action
token the next reward (symlog two-hot) and continuation. Each slot index adds a fixed random tag to its tokens:
without one, two slots whose codes tie at step t would be the same token and get the same prediction for t+1,
whatever their histories. The encoder's initial slots are exchangeable, so the tags are arbitrary but persistent
identities (slot k follows one object), and the model is equivariant to permuting slots with their tags. A
preallocated KV cache makes imagination cost one step per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from envs.errors import UsageError

from . import twohot

SLOT, FRAME, ACTION = 0, 1, 2  # token types


@dataclass
class DynamicsConfig:
    num_slots: int = 8
    num_vars: int = 4  # VQ latent variables per slot (slot codes are b t k v ints in [0, num_codes))
    num_codes: int = 16
    frame_vars: int = 8  # frame-token codes b t g ints in [0, frame_codes); 0 = no frame token
    frame_codes: int = 16
    num_actions: int = 17
    embed_dim: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    max_steps: int = 64  # longest context in time steps (size of the learned time embedding)
    dropout: float = 0.0
    reward_bins: int = 255
    slot_tags: bool = True  # a fixed random tag per slot index (false: none, e.g. to measure what they give)


@dataclass
class Predictions:
    """Read from step t's outputs, about step t+1."""

    slot_logits: torch.Tensor  # b t k v c
    frame_logits: Optional[torch.Tensor]  # b t g c_g (None without a frame token)
    reward_logits: torch.Tensor  # b t bins (symlog two-hot)
    cont_logits: torch.Tensor  # b t (Bernoulli, 1 = the episode continues)


@dataclass
class KVCache:
    """Preallocated keys/values of every layer for `max_steps` steps; `steps` of them are filled.

    Meant for imagination under torch.no_grad(): steps are written in place.
    """

    keys: list[torch.Tensor]  # per layer: b heads (max_steps*S) head_dim
    values: list[torch.Tensor]  # per layer: b heads (max_steps*S) head_dim
    max_steps: int
    steps: int = 0


def block_causal_mask(start: int, new_steps: int, tokens_per_step: int, device=None) -> Optional[torch.Tensor]:
    """Boolean mask `(new*S) ((start+new)*S)`: queries of steps start.. see keys of steps <= theirs.

    None when every query may see every key (a single new step)."""
    if new_steps == 1:
        return None
    q_step = start + torch.arange(new_steps * tokens_per_step, device=device) // tokens_per_step
    k_step = torch.arange((start + new_steps) * tokens_per_step, device=device) // tokens_per_step
    return k_step[None, :] <= q_step[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise UsageError(f"embed_dim={dim} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[tuple[torch.Tensor, torch.Tensor]], start: int) -> torch.Tensor:
        """x `b n d`; with a cache (keys, values) the n new tokens are written from token `start` on."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # b h n e each
        dtype = q.dtype
        if cache is not None:
            keys, values = cache
            keys[:, :, start:start + n] = k
            values[:, :, start:start + n] = v
            k, v = keys[:, :, :start + n], values[:, :, :start + n]
            q = q.to(k.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.to(dtype).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, cache, start):
        x = x + self.drop(self.attn(self.norm1(x), mask, cache, start))
        return x + self.drop(self.mlp(self.norm2(x)))


def _check_shape(name: str, x: torch.Tensor, expected: tuple, labels: str) -> None:
    """Raise ValueError unless x has the expected shape (None entries match anything)."""
    if x.ndim != len(expected) or any(e is not None and s != e for s, e in zip(x.shape, expected)):
        raise ValueError(f"{name} must have shape ({labels}), got {tuple(x.shape)}")


class CodeEmbedding(nn.Embedding):
    """Discrete codes `... v` (v variables of `num_codes` each) -> one token `... d`: the sum of one learned
    embedding per variable, a linear map of the concatenated one-hots. The dynamics' and the policy's tokens."""

    def __init__(self, num_vars: int, num_codes: int, dim: int):
        super().__init__(num_vars * num_codes, dim)
        self.register_buffer("offsets", torch.arange(num_vars) * num_codes, persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return super().forward(codes + self.offsets).sum(-2)


class SlotDynamics(nn.Module):
    """The block-causal transformer over each step's slot, frame and action tokens: next codes, reward and
    continuation logits (`forward`), with a KV cache for imagination one step at a time."""

    def __init__(self, cfg: DynamicsConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.tokens_per_step = cfg.num_slots + (1 if cfg.frame_vars else 0) + 1
        self.slot_embed = CodeEmbedding(cfg.num_vars, cfg.num_codes, d)
        # fixed (seeded, saved with the weights): the same on every rank and in every build; N(0, 1) as the embeddings
        tags = torch.randn(cfg.num_slots, d, generator=torch.Generator().manual_seed(0))
        self.register_buffer("slot_tags", tags if cfg.slot_tags else torch.zeros_like(tags))
        if cfg.frame_vars:
            self.frame_embed = CodeEmbedding(cfg.frame_vars, cfg.frame_codes, d)
        self.action_embed = nn.Embedding(cfg.num_actions, d)
        self.time_embed = nn.Embedding(cfg.max_steps, d)
        self.type_embed = nn.Embedding(3, d)
        types = [SLOT] * cfg.num_slots + ([FRAME] if cfg.frame_vars else []) + [ACTION]
        self.register_buffer("token_types", torch.tensor(types), persistent=False)  # S
        self.register_buffer("frame_code_mask", None, persistent=False)  # g c: see limit_frame_codes
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.slot_head = nn.Linear(d, cfg.num_vars * cfg.num_codes)
        if cfg.frame_vars:
            self.frame_head = nn.Linear(d, cfg.frame_vars * cfg.frame_codes)
        self.reward_head = nn.Linear(d, cfg.reward_bins)
        self.cont_head = nn.Linear(d, 1)
        # DreamerV3: a zero reward head starts imagination at reward 0 instead of a random large value.
        nn.init.zeros_(self.reward_head.weight)
        nn.init.zeros_(self.reward_head.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "slot_tags"  # a checkpoint from before the tags: zeros, so it predicts as it trained
        state_dict.setdefault(key, torch.zeros_like(self.slot_tags))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def limit_frame_codes(self, counts: list[int]) -> None:
        """Each frame variable's own number of codes (the learned codes and the status tokens share `frame_codes`
        classes, the largest count): logits past a variable's count are -inf, so neither training nor imagination
        puts mass on a code the tokenizer never gives."""
        c = self.cfg
        if len(counts) != c.frame_vars or not all(0 < n <= c.frame_codes for n in counts):
            raise ValueError(f"{c.frame_vars} code counts in (0, {c.frame_codes}] for the {c.frame_vars} frame "
                             f"variables, got {counts}")
        mask = torch.arange(c.frame_codes) >= torch.tensor(counts)[:, None]  # g c
        self.frame_code_mask = mask.to(self.token_types.device) if mask.any() else None

    def init_cache(self, batch: int, max_steps: int, device, dtype=torch.float32) -> KVCache:
        """An empty KV cache for up to `max_steps` steps; dtype should match the attention's (e.g. bf16 autocast)."""
        if max_steps > self.cfg.max_steps:
            raise ValueError(f"cache max_steps={max_steps} exceeds the model's max_steps={self.cfg.max_steps}")
        c = self.cfg
        shape = (batch, c.heads, max_steps * self.tokens_per_step, c.embed_dim // c.heads)
        return KVCache(keys=[torch.empty(shape, device=device, dtype=dtype) for _ in self.blocks],
                       values=[torch.empty(shape, device=device, dtype=dtype) for _ in self.blocks],
                       max_steps=max_steps)

    def _validate(self, slot_codes, frame_codes, actions, cache) -> None:
        c = self.cfg
        b, t = actions.shape[:2] if actions.ndim >= 2 else (None, None)
        _check_shape("actions", actions, (b, t), "batch, time")
        _check_shape("slot_codes", slot_codes, (b, t, c.num_slots, c.num_vars),
                     f"batch={b}, time={t}, num_slots={c.num_slots}, num_vars={c.num_vars}")
        if c.frame_vars:
            if frame_codes is None:
                raise ValueError(f"frame_codes must have shape (batch={b}, time={t}, frame_vars={c.frame_vars}), got None")
            _check_shape("frame_codes", frame_codes, (b, t, c.frame_vars), f"batch={b}, time={t}, frame_vars={c.frame_vars}")
        elif frame_codes is not None:
            raise ValueError("frame_codes must be None when frame_vars=0 (no frame token)")
        start = cache.steps if cache is not None else 0
        limit = cache.max_steps if cache is not None else c.max_steps
        if cache is not None and start + t > limit:
            raise RuntimeError(f"KV cache overflow: it holds {start} of {limit} steps and cannot take {t} more "
                               f"(init_cache with a larger max_steps, up to {c.max_steps})")
        if cache is not None and cache.keys[0].shape[0] != b:
            raise ValueError(f"inputs have batch {b} but the cache was made for batch {cache.keys[0].shape[0]}")
        if t > limit:
            raise ValueError(f"sequence of {t} steps exceeds max_steps={limit}")

    def forward(self, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor], actions: torch.Tensor,
                cache: Optional[KVCache] = None) -> Predictions:
        """slot_codes `b t k v`, frame_codes `b t g` (None without frame token), actions `b t` (ints).

        With a cache, the t steps follow the cached ones; predictions cover the new steps only."""
        self._validate(slot_codes, frame_codes, actions, cache)
        c, s_per = self.cfg, self.tokens_per_step
        b, t = actions.shape
        start = cache.steps if cache is not None else 0
        tokens = [self.slot_embed(slot_codes) + self.slot_tags]  # b t k d
        if c.frame_vars:
            tokens.append(self.frame_embed(frame_codes[..., None, :]))  # b t 1 d
        tokens.append(self.action_embed(actions)[:, :, None])  # b t 1 d
        x = torch.cat(tokens, 2) + self.type_embed(self.token_types)  # b t S d
        x = x + self.time_embed(torch.arange(start, start + t, device=x.device))[:, None]
        x = self.drop(x.flatten(1, 2))  # b (t S) d
        mask = block_causal_mask(start, t, s_per, x.device)
        for i, block in enumerate(self.blocks):
            layer_cache = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = block(x, mask, layer_cache, start * s_per)
        if cache is not None:
            cache.steps += t
        x = self.norm(x).view(b, t, s_per, -1)  # b t S d
        k = c.num_slots
        slot_logits = self.slot_head(x[:, :, :k]).view(b, t, k, c.num_vars, c.num_codes)
        frame_logits = self.frame_head(x[:, :, k]).view(b, t, c.frame_vars, c.frame_codes) if c.frame_vars else None
        if self.frame_code_mask is not None:
            frame_logits = frame_logits.masked_fill(self.frame_code_mask, float("-inf"))
        act = x[:, :, -1]  # b t d
        return Predictions(slot_logits, frame_logits, self.reward_head(act), self.cont_head(act).squeeze(-1))


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor], count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of x `b t`, over the entries where mask `b t` is True (all without a mask; 0 where none is). `count`
    replaces the mask's own count as the divisor: under data parallelism the ranks' mean count (at least 1 / ranks),
    so that once DDP averages the ranks' gradients every valid entry of every rank weighs the same, as in one
    process on the concatenated batch."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / (m.sum().clamp_min(1.0) if count is None else count.to(x.dtype))


def dynamics_loss(pred: Predictions, slot_codes: torch.Tensor, frame_codes: Optional[torch.Tensor],
                  rewards: torch.Tensor, continues: torch.Tensor,
                  mask: Optional[torch.Tensor] = None, count: Optional[torch.Tensor] = None, status_vars: int = 0
                  ) -> tuple[torch.Tensor, dict]:
    """Next-step losses over a whole sequence: predictions at t against targets at t+1.

    slot_codes `b t k v`, frame_codes `b t g` or None, rewards `b t`, continues `b t` (1 = continues),
    mask `b t` bool (False excludes that step as a target), `count`: the divisor of the masked means in place of the
    targets' count (`masked_mean`). Returns (loss, detached stats); the accuracies are in % (as the evaluations'),
    those of the learned frame codes (`acc_frame`) and of the env's status tokens, the last `status_vars` frame
    codes (`acc_status`), apart."""
    target_mask = mask[:, 1:] if mask is not None else None

    def step_mean(x, m):  # masked_mean over the targets' count
        return masked_mean(x, m, count)

    def codes_ce(logits, target):  # logits b t ... c, target b t ... -> (ce b t, hits b t ... in %)
        logits = logits[:, :-1].float()
        target = target[:, 1:]
        ce = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
        return ce.flatten(2).mean(-1), (logits.argmax(-1) == target).float() * 100

    slot_ce, slot_hits = codes_ce(pred.slot_logits, slot_codes)
    stats = {"loss_slots": step_mean(slot_ce, target_mask), "acc_slots": step_mean(slot_hits.flatten(2).mean(-1),
                                                                                   target_mask)}
    if pred.frame_logits is not None:
        frame_ce, frame_hits = codes_ce(pred.frame_logits, frame_codes)  # hits b t g: the learned codes, then status
        learned = frame_hits.shape[-1] - status_vars
        stats["loss_frame"] = step_mean(frame_ce, target_mask)
        stats["acc_frame"] = step_mean(frame_hits[..., :learned].mean(-1), target_mask)
        if status_vars:
            stats["acc_status"] = step_mean(frame_hits[..., learned:].mean(-1), target_mask)
    stats["loss_reward"] = step_mean(twohot.loss(pred.reward_logits[:, :-1], rewards[:, 1:]), target_mask)
    cont = F.binary_cross_entropy_with_logits(pred.cont_logits[:, :-1].float(), continues[:, 1:].float(),
                                              reduction="none")
    stats["loss_cont"] = step_mean(cont, target_mask)
    loss = sum(v for name, v in stats.items() if name.startswith("loss_"))
    stats = {name: v.detach() for name, v in stats.items()}
    stats["loss"] = loss.detach()
    return loss, stats


def _sample(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Categorical samples over the last dim (Gumbel-max); temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
    return (logits.float() / temperature + gumbel).argmax(-1)


def sample_step(pred: Predictions, temperature: float = 1.0, generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The next step from pred's last step: slot codes `b k v`, frame codes `b g` (or None),
    reward `b` (two-hot mean) and continuation probability `b`."""
    slots = _sample(pred.slot_logits[:, -1], temperature, generator)
    frame = _sample(pred.frame_logits[:, -1], temperature, generator) if pred.frame_logits is not None else None
    return slots, frame, twohot.mean(pred.reward_logits[:, -1]), torch.sigmoid(pred.cont_logits[:, -1].float())
