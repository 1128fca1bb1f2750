"""VQ-SA slot quantizer: each slot becomes a few categorical latents over learned code embeddings.

For latent variable i the logits over its codes are bilinear forms slot^T W_i e_{i,c}; training samples
relaxed one-hots with Gumbel-softmax at an annealed temperature, evaluation takes the argmax. The
quantized slot (what decoders and heads consume) is a linear map of the chosen code embeddings, and
KL(q(z|x) || uniform) regularizes the posteriors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform) of each slot's code distributions, summed over its variables: logits `... k v c` -> `... k`."""
    log_q = logits.log_softmax(-1)
    return (log_q.exp() * (log_q + math.log(logits.shape[-1]))).sum(-1).sum(-1)


@dataclass
class Quantized:
    slots: torch.Tensor  # b k d, quantized
    codes: torch.Tensor  # b k v int64: each variable's most likely code (training's `slots` use a Gumbel sample)
    logits: torch.Tensor  # b k v c
    kl_slots: torch.Tensor  # b k: each slot's KL to the uniform prior, summed over its variables

    @property
    def kl(self) -> torch.Tensor:
        """The KL term: the mean over slots (a world model averages `kl_slots` over its valid frames instead)."""
        return self.kl_slots.mean()


def temperature(step: int, tau_start: float, tau_end: float, anneal_steps: int) -> float:
    """Exponential anneal from tau_start to tau_end over anneal_steps, then constant."""
    if not (tau_start > 0 and tau_end > 0):
        raise ValueError(f"Gumbel-softmax temperatures must be above 0, got tau_start={tau_start}, tau_end={tau_end}")
    frac = min(max(step, 0) / max(anneal_steps, 1), 1.0)
    return tau_start * (tau_end / tau_start) ** frac


class SlotQuantizer(nn.Module):
    """VQ-SA: each slot `b k d` -> `num_vars` categorical codes of `num_codes` values (Gumbel-softmax over bilinear
    logits, KL to the uniform prior) -> the slot rebuilt from the codes' embeddings. `slot_width`: d, a slot's size
    (a GMM slot is concat(mu, logsigma): 2 x model.slot_dim; `SlotEncoder.slot_width` has it)."""

    def __init__(self, slot_width: int, num_vars: int = 4, num_codes: int = 16, code_dim: int = 32,
                 hard: bool = False):
        super().__init__()
        self.slot_width, self.num_vars, self.num_codes, self.code_dim, self.hard = (slot_width, num_vars, num_codes,
                                                                                    code_dim, hard)
        self.codebooks = nn.Parameter(torch.randn(num_vars, num_codes, code_dim))  # v c e
        self.bilinear = nn.Parameter(torch.randn(num_vars, slot_width, code_dim) / math.sqrt(slot_width))  # v d e
        self.norm = nn.LayerNorm(slot_width)
        self.out = nn.Linear(num_vars * code_dim, slot_width)
        self.register_buffer("tau", torch.tensor(1.0), persistent=False)

    def set_temperature(self, tau: float) -> None:
        """The Gumbel-softmax temperature of training's samples. Not saved with the weights: a training loop sets it
        each step (`temperature`), and evaluation takes the argmax codes, which it does not change."""
        if not tau > 0:
            raise ValueError(f"the Gumbel-softmax temperature must be above 0, got {tau}")
        self.tau.fill_(tau)

    def embed(self, onehots: torch.Tensor) -> torch.Tensor:
        """(relaxed) one-hots `b k v c` -> quantized slots `b k d`."""
        emb = torch.einsum("bkvc,vce->bkve", onehots.to(self.codebooks.dtype), self.codebooks)
        return self.out(emb.flatten(-2))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes `b k v` -> quantized slots `b k d` (pictures of predicted codes, code edits)."""
        return self.embed(F.one_hot(codes, self.num_codes).float())

    def forward(self, slots: torch.Tensor) -> Quantized:
        """slots `b k slot_width` -> codes, logits, KL and quantized slots (a Gumbel sample in training)."""
        if slots.shape[-1] != self.slot_width:
            raise ValueError(f"slots of width {slots.shape[-1]} into a SlotQuantizer of slot_width {self.slot_width} "
                             "(a GMM slot is concat(mu, logsigma): 2 x model.slot_dim)")
        with torch.autocast(slots.device.type, enabled=False):  # fp32: bf16 rounding would flip near-tied codes
            proj = torch.einsum("bkd,vde->bkve", self.norm(slots.float()), self.bilinear)
            logits = torch.einsum("bkve,vce->bkvc", proj, self.codebooks) / math.sqrt(self.code_dim)
        codes = logits.argmax(-1)
        if self.training:
            onehots = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard, dim=-1)
        else:
            onehots = F.one_hot(codes, self.num_codes).float()
        return Quantized(slots=self.embed(onehots).to(slots.dtype), codes=codes, logits=logits,
                         kl_slots=kl_to_uniform(logits))
