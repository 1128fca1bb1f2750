"""Slot Attention (Locatello et al., 2020): softmax over slots, weighted mean, GRU + residual MLP."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class SlotAttention(nn.Module):
    """The baseline slot module; slots are `b k dim`, attention `b k n`."""

    def __init__(self, in_dim: int, num_slots: int, dim: int = 64, iters: int = 3, mlp_hidden: int = 128,
                 implicit_grad: bool = False, eps: float = 1e-8):
        super().__init__()
        if iters < 1 or num_slots < 1:
            raise ValueError(f"SlotAttention needs iters >= 1 and num_slots >= 1, got {iters} and {num_slots}")
        self.num_slots, self.dim, self.iters, self.eps = num_slots, dim, iters, eps
        self.out_dim = dim
        self.implicit_grad = implicit_grad
        # Learned Gaussian init, sampled with the reparameterization trick so mu and sigma get gradients.
        self.init_mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        self.init_logsigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        if implicit_grad:  # no gradient reaches them: frozen, so DistributedDataParallel expects none
            self.init_mu.requires_grad_(False)
            self.init_logsigma.requires_grad_(False)
        self.norm_input = nn.LayerNorm(in_dim)
        self.to_k = nn.Linear(in_dim, dim, bias=False)
        self.to_v = nn.Linear(in_dim, dim, bias=False)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.norm_slots = nn.LayerNorm(dim)
        self.gru = nn.GRUCell(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.ReLU(inplace=True), nn.Linear(mlp_hidden, dim))

    def initial_slots(self, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        noise = torch.randn(batch, self.num_slots, self.dim, device=device, dtype=dtype)
        return self.init_mu + self.init_logsigma.exp() * noise

    def step(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration: slots `b k d` attend over keys/values `b n d` -> updated slots, attention `b k n`."""
        b, n_slots, d = slots.shape
        q = self.to_q(self.norm_slots(slots))
        logits = torch.einsum("bnd,bkd->bnk", k, q) / math.sqrt(d)
        attn = logits.softmax(dim=-1) + self.eps  # b n k, normalized over slots
        weights = attn / attn.sum(dim=1, keepdim=True)
        updates = torch.einsum("bnk,bnd->bkd", weights, v)
        slots = self.gru(updates.reshape(-1, d), slots.reshape(-1, d)).reshape(b, n_slots, d)
        slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn.transpose(1, 2)

    def forward(self, inputs: torch.Tensor, init: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs `b n in_dim`, init `b k dim` (e.g. the previous frame's slots) -> slots `b k dim`, attn `b k n`."""
        inputs = self.norm_input(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)
        slots = self.initial_slots(inputs.shape[0], inputs.device, inputs.dtype) if init is None else init
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.implicit_grad):  # no graph to discard
            for _ in range(self.iters - 1):
                slots, _ = self.step(slots, k, v)
        if self.implicit_grad:  # the last iteration on detached slots: the first-order implicit gradient
            slots = slots.detach()
        return self.step(slots, k, v)
