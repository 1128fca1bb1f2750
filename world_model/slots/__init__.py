"""Slot modules: the Slot Mixture Module (GMM) and the Slot Attention baseline.

Both map features `b n d_in` (and optionally the previous frame's slots) to slots `b k d_out`
and per-slot assignment weights `b k n`, so they are interchangeable behind `make_slot_module`.
"""
from __future__ import annotations

from torch import nn

from .gmm import SlotMixture
from .slot_attention import SlotAttention


def make_slot_module(kind: str, in_dim: int, num_slots: int, dim: int, iters: int, mlp_hidden: int,
                     implicit_grad: bool = False, gmm_temperature: float = 0.0, gmm_log_det: bool = True,
                     gmm_update_pi: bool = True) -> nn.Module:
    """gmm_*: the GMM's E-step temperature (0 = sqrt(dim)), log-determinant term and pi re-estimation (ignored by
    Slot Attention)."""
    common = dict(in_dim=in_dim, num_slots=num_slots, dim=dim, iters=iters, mlp_hidden=mlp_hidden,
                  implicit_grad=implicit_grad)
    if kind == "gmm":
        return SlotMixture(**common, temperature=gmm_temperature or None, log_det=gmm_log_det, update_pi=gmm_update_pi)
    if kind == "slot_attention":
        return SlotAttention(**common)
    raise ValueError(f"unknown slot module {kind!r}: use one of gmm, slot_attention")


__all__ = ["SlotMixture", "SlotAttention", "make_slot_module"]
