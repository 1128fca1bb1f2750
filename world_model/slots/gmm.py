"""Slot Mixture Module (Kirilenko et al.): slots as the components of a Gaussian mixture over features.

Each iteration is one EM step: the E-step computes responsibilities from the diagonal-Gaussian
log-likelihood plus log pi; the M-step updates the means through a GRU + residual MLP (the neural
bridge of the seed's pseudocode) and re-estimates log-sigma and pi in closed form from the weights.
Slots are concat(mu, logsigma). The E- and M-step statistics run in fp32 even under bf16 autocast,
and both steps are one matmul each against the features [x, -x^2/2, 1], so no `b n k d` tensor is built.

The E-step can be tempered (deterministic-annealing EM: responsibilities ∝ (pi_j N(x | mu_j, sigma_j))^(1/T)).
With T = 1 (the exact posterior) over d = 64 learned feature dimensions the log-likelihood gaps between
components are tens of nats, assignments are hard from the first iteration, and together with the
re-estimated pi a few components absorb every input (measured: 5 of 10 slots with < 1% mass after 1.5k
set-prediction steps). The default T = sqrt(d) keeps the responsibilities soft, as Slot Attention's
1/sqrt(d) logit scale does; `temperature=1.0` gives the textbook E-step.

The expanded sums (x^2 beside x mu) cancel catastrophically when the features share an offset large
against the components' spread, so both steps work on x - c, c each image's mean feature: the
likelihoods and variances are unchanged by the shift, and mu stays in the features' own coordinates.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

LOG_VAR_MIN = math.log(1e-4)  # clamp on the re-estimated variance; keeps 1/sigma^2 finite
LOG_PI_MIN = math.log(1e-6)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors; leave fp32/fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def mixture_features(x: torch.Tensor) -> torch.Tensor:
    """x `b n d` -> h = [x, -x^2/2, 1] `b n 2d+1`: the sufficient statistics of a diagonal Gaussian, plus a one."""
    return torch.cat([x, -0.5 * x * x, x.new_ones(x.shape[:-1]).unsqueeze(-1)], dim=-1)


def component_coefs(mu: torch.Tensor, logsigma: torch.Tensor, log_pi: torch.Tensor, log_det: bool = True) -> torch.Tensor:
    """mu/logsigma `b k d`, log_pi `b k` -> c `b k 2d+1` with h @ c^T = log(pi N(x | mu, diag(sigma^2))) + d/2 log(2 pi).

    log N = sum_d [x mu/s^2 - x^2/(2 s^2)] - sum_d [mu^2/(2 s^2) + log s]: one matmul against mixture_features(x),
    with no `b n k d` tensor. log_det=False leaves out -sum_d log s (the scores of the seed's pseudocode).
    """
    inv_var = torch.exp(-2.0 * logsigma)  # b k d
    mu_inv_var = mu * inv_var
    const = torch.sub(log_pi, (mu * mu_inv_var).sum(-1), alpha=0.5)  # b k
    if log_det:
        const = const - logsigma.sum(-1)
    return torch.cat([mu_inv_var, inv_var, const.unsqueeze(-1)], dim=-1)


def gaussian_log_likelihood(x: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor) -> torch.Tensor:
    """log N(x | mu, diag(sigma^2)) up to the constant -d/2 log(2 pi).  x `b n d`, mu/logsigma `b k d` -> `b n k`."""
    coefs = component_coefs(mu, logsigma, logsigma.new_zeros(logsigma.shape[:-1]))
    return torch.bmm(mixture_features(x), coefs.transpose(1, 2))


class SlotMixture(nn.Module):
    """GMM slot module; slots are `b k 2*dim` = concat(mu, logsigma), mixture weights `b k n`."""

    def __init__(self, in_dim: int, num_slots: int, dim: int = 64, iters: int = 3, mlp_hidden: int = 128,
                 implicit_grad: bool = False, temperature: Optional[float] = None, log_det: bool = True,
                 update_pi: bool = True, eps: float = 1e-8):
        super().__init__()
        if iters < 1 or num_slots < 1:
            raise ValueError(f"SlotMixture needs iters >= 1 and num_slots >= 1, got {iters} and {num_slots}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"E-step temperature must be 0 (meaning sqrt(dim)) or more, got {temperature}")
        self.log_det, self.update_pi = log_det, update_pi
        self.num_slots, self.dim, self.iters, self.eps = num_slots, dim, iters, eps
        self.temperature = math.sqrt(dim) if not temperature else float(temperature)  # None or 0: sqrt(dim)
        self.out_dim = 2 * dim
        self.implicit_grad = implicit_grad
        # Learned Gaussian priors over the initial mu and logsigma (reparameterized samples).
        self.mu_mean = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        self.mu_logstd = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        self.logsigma_mean = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        self.logsigma_logstd = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        if implicit_grad:  # no gradient reaches them: frozen, so DistributedDataParallel expects none
            for p in (self.mu_mean, self.mu_logstd, self.logsigma_mean, self.logsigma_logstd):
                p.requires_grad_(False)
        self.norm_input = nn.LayerNorm(in_dim)
        self.project = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.gru = nn.GRUCell(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.ReLU(inplace=True), nn.Linear(mlp_hidden, dim))

    def initial_slots(self, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        shape = (batch, self.num_slots, self.dim)
        mu = self.mu_mean + self.mu_logstd.exp() * torch.randn(shape, device=device, dtype=dtype)
        logsigma = self.logsigma_mean + self.logsigma_logstd.exp() * torch.randn(shape, device=device, dtype=dtype)
        return torch.cat([mu, logsigma], dim=-1)

    def e_step(self, h: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor, log_pi: torch.Tensor):
        """Responsibilities p(c=j | x_i) at the E-step temperature, normalized over slots, `b n k` (fp32).
        h = mixture_features(x)."""
        logits = torch.bmm(h, component_coefs(mu, logsigma, log_pi, self.log_det).transpose(1, 2))  # b n k
        return torch.softmax(logits * (1.0 / self.temperature), dim=-1)

    def step(self, h, mu, logsigma, log_pi, center: torch.Tensor | float = 0.0):
        """One EM iteration on h = mixture_features(x - center) `b n 2d+1` (fp32), center `b 1 d` or 0: returns
        mu, logsigma, log_pi, probs."""
        b, k, d = mu.shape
        with torch.autocast(h.device.type, enabled=False):
            probs = self.e_step(h, _fp32(mu) - center, logsigma, log_pi)  # b n k
            stats = torch.bmm(probs.transpose(1, 2), h)  # b k 2d+1: sum_n p x, -sum_n p x^2/2, mass (x centred)
            mass = stats[..., -1:]  # b k 1
            inv_mass = torch.reciprocal(mass + self.eps)
            mean_x, neg_half_mean_x2 = (stats[..., :-1] * inv_mass).split(d, dim=-1)  # weighted means over inputs
            # sum_n p x / (mass + eps), as on uncentred features: an empty slot's input stays 0
            gru_in = mean_x + center * (mass * inv_mass)
        with torch.autocast(h.device.type, enabled=False):  # b k rows: fp32 costs nothing, and the variance
            mu = _fp32(mu)                                    # below is taken around this mu, which bf16 would round
            mu = self.gru(gru_in.to(mu.dtype).reshape(-1, d), mu.reshape(-1, d)).reshape(b, k, d)
            mu = mu + self.mlp(self.norm_mlp(mu))
            mu32 = mu - center
            # Weighted variance around the *updated* mean, as in the seed: E_w[x^2] - 2 mu E_w[x] + mu^2
            # (mu^2 scaled by mass/(mass+eps), so an empty slot gets the clamp): -2 (-E_w[x^2]/2 + mu (E_w[x] - mu/2)).
            mu_r = torch.mul(mu32, mass * inv_mass)  # mu mass/(mass+eps)
            neg_half_var = torch.addcmul(neg_half_mean_x2, mu32, torch.sub(mean_x, mu_r, alpha=0.5))
            logsigma = 0.5 * torch.log((-2.0 * neg_half_var).clamp_min(math.exp(LOG_VAR_MIN)))
            if self.update_pi:
                log_pi = torch.log((mass.squeeze(-1) * (1.0 / h.shape[1])).clamp_min(math.exp(LOG_PI_MIN)))
        return mu, logsigma, log_pi, probs

    def forward(self, inputs: torch.Tensor, init: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs `b n in_dim`, init `b k 2*dim` (e.g. the previous frame's slots; any k) -> slots `b k 2*dim`, weights
        `b k n`."""
        x = self.project(self.norm_input(inputs))
        b = x.shape[0]
        if init is not None and (init.ndim != 3 or init.shape[0] != b or init.shape[2] != self.out_dim):
            raise ValueError(f"init must be slots `batch={b}, k, {self.out_dim}` (concat(mu, logsigma)), got "
                             f"{tuple(init.shape)}")
        slots = self.initial_slots(b, x.device, x.dtype) if init is None else init
        mu, logsigma = slots.split(self.dim, dim=-1)
        with torch.autocast(x.device.type, enabled=False):
            logsigma = _fp32(logsigma)
            x32 = _fp32(x)
            center = x32.mean(dim=1, keepdim=True).detach()  # b 1 d; the results do not depend on it
            h = mixture_features(x32 - center)  # b n 2d+1, shared by every iteration
        k = slots.shape[1]
        log_pi = torch.full((b, k), -math.log(k), device=x.device, dtype=x.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.implicit_grad):  # no graph to discard
            for _ in range(self.iters - 1):
                mu, logsigma, log_pi, _ = self.step(h, mu, logsigma, log_pi, center)
        if self.implicit_grad:  # the last iteration on detached slots: the first-order implicit gradient
            mu, logsigma, log_pi = mu.detach(), logsigma.detach(), log_pi.detach()
        mu, logsigma, log_pi, probs = self.step(h, mu, logsigma, log_pi, center)
        slots = torch.cat([mu, logsigma.to(mu.dtype)], dim=-1)
        return slots, probs.transpose(1, 2)
