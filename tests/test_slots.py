"""Slot modules: the GMM's EM algebra, gradients, numerical stability, carry-over; Slot Attention; VQ-SA."""
import math

import pytest
import torch
import torch.nn.functional as F

from world_model.slots import SlotMixture, make_slot_module
from world_model.slots.gmm import component_coefs, gaussian_log_likelihood, mixture_features
from world_model.slots.vq import SlotQuantizer, temperature


def naive_log_likelihood(x, mu, logsigma):
    """Direct diagonal-Gaussian log density (minus the 2*pi constant), materializing b n k d."""
    diff = x[:, :, None, :] - mu[:, None, :, :]
    return (-0.5 * diff ** 2 / torch.exp(2 * logsigma[:, None]) - logsigma[:, None]).sum(-1)


def test_expanded_mahalanobis_matches_direct():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 8, generator=g, dtype=torch.float64)
    mu = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    logsigma = 0.3 * torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gaussian_log_likelihood(x, mu, logsigma), naive_log_likelihood(x, mu, logsigma))
    log_pi = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1)
    joint = mixture_features(x) @ component_coefs(mu, logsigma, log_pi).transpose(1, 2)  # log pi_k N(x_n | k)
    torch.testing.assert_close(joint, naive_log_likelihood(x, mu, logsigma) + log_pi.unsqueeze(1))


def test_expanded_log_likelihood_keeps_float32_precision_for_tight_components():
    """The expanded form's terms cancel (x mu / s^2 against x^2 / 2s^2): at sigma = 0.03 over 64 unit-scale dims
    they are ~1e5 while the result is ~1e2. In full fp32 the error stays ~0.02 nats; TF32 matmuls (10-bit mantissa)
    would make it tens of nats, which is why CUDA runs keep fp32 matmuls at full precision (`rundir.set_precision`)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 64, generator=g, dtype=torch.float64)
    x = centers[torch.randint(4, (1, 256), generator=g)] + 0.03 * torch.randn(1, 256, 64, generator=g, dtype=torch.float64)
    mu = centers[None] + 0.015 * torch.randn(1, 4, 64, generator=g, dtype=torch.float64)
    logsigma = torch.full((1, 4, 64), math.log(0.03), dtype=torch.float64)
    exact = naive_log_likelihood(x, mu, logsigma)
    fp32 = gaussian_log_likelihood(x.float(), mu.float(), logsigma.float()).double()
    assert (fp32 - exact).abs().max() < 0.05


def test_e_step_assigns_separated_clusters():
    gmm = SlotMixture(in_dim=2, num_slots=2, dim=2, iters=1, temperature=1.0)
    x = torch.tensor([[[-5.0, 0.0], [-5.1, 0.1], [5.0, 0.0], [5.2, -0.1]]])
    mu = torch.tensor([[[-5.0, 0.0], [5.0, 0.0]]])
    probs = gmm.e_step(mixture_features(x), mu, torch.zeros(1, 2, 2), torch.log(torch.full((1, 2), 0.5)))
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4))
    assert (probs.argmax(-1) == torch.tensor([[0, 0, 1, 1]])).all()
    assert probs.max(-1).values.min() > 0.999


def test_e_step_uses_pi_and_log_determinant():
    gmm = SlotMixture(in_dim=1, num_slots=2, dim=1, iters=1, temperature=1.0)
    h = mixture_features(torch.zeros(1, 1, 1))  # x = 0
    mu = torch.zeros(1, 2, 1)
    # Same mean and sigma: responsibilities equal pi.
    probs = gmm.e_step(h, mu, torch.zeros(1, 2, 1), torch.log(torch.tensor([[0.8, 0.2]])))
    torch.testing.assert_close(probs, torch.tensor([[[0.8, 0.2]]]))
    # Same mean, equal pi, sigma 1 vs e: at x = mu the density ratio is exp(1) (log-det term).
    probs = gmm.e_step(h, mu, torch.tensor([[[0.0], [1.0]]]), torch.log(torch.tensor([[0.5, 0.5]])))
    torch.testing.assert_close(probs[0, 0, 0] / probs[0, 0, 1], torch.tensor(math.e))


def test_tempered_e_step():
    torch.manual_seed(0)
    x, mu, logsigma = torch.randn(2, 7, 4), torch.randn(2, 3, 4), 0.2 * torch.randn(2, 3, 4)
    log_pi = torch.log_softmax(torch.randn(2, 3), -1)
    h = mixture_features(x)
    exact = SlotMixture(in_dim=4, num_slots=3, dim=4, temperature=1.0).e_step(h, mu, logsigma, log_pi)
    default = SlotMixture(in_dim=4, num_slots=3, dim=4)
    assert default.temperature == 2.0  # sqrt(dim)
    tempered = default.e_step(h, mu, logsigma, log_pi)
    torch.testing.assert_close(tempered, torch.softmax(exact.log() / 2.0, -1))  # (pi N)^(1/T), renormalized
    assert tempered.max() < exact.max()


def test_m_step_reestimates_sigma_and_pi():
    torch.manual_seed(0)
    gmm = SlotMixture(in_dim=4, num_slots=3, dim=4, iters=1).double()
    x = torch.randn(2, 30, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    mu0 = torch.randn(2, 3, 4, dtype=torch.float64)
    ls0 = torch.zeros(2, 3, 4, dtype=torch.float64)
    log_pi0 = torch.full((2, 3), -math.log(3), dtype=torch.float64)
    mu, logsigma, log_pi, probs = gmm.step(mixture_features(x), mu0, ls0, log_pi0)
    w = probs / probs.sum(1, keepdim=True)  # b n k
    var = torch.einsum("bnk,bnkd->bkd", w, (x[:, :, None] - mu[:, None]) ** 2)  # around the updated mean
    torch.testing.assert_close(logsigma, 0.5 * torch.log(var))
    torch.testing.assert_close(log_pi.exp(), probs.mean(1))
    assert not torch.allclose(log_pi.exp(), torch.full_like(log_pi, 1 / 3))  # pi really moves
    fixed = SlotMixture(in_dim=4, num_slots=3, dim=4, iters=1, update_pi=False).double()
    fixed.load_state_dict(gmm.state_dict())
    _, logsigma_f, log_pi_f, probs_f = fixed.step(mixture_features(x), mu0, ls0, log_pi0)
    assert torch.equal(log_pi_f, log_pi0) and torch.equal(probs_f, probs)  # update_pi=False: pi stays 1/K


def test_e_step_without_log_determinant_scores_the_seed_pseudocode():
    """log_det=False: responsibilities ∝ pi exp(-0.5 sum_d (x - mu)^2 / sigma^2), the seed's scores, with no
    -sum log sigma (so a broad component is not penalized for its width)."""
    torch.manual_seed(0)
    x, mu, logsigma = torch.randn(2, 7, 4), torch.randn(2, 3, 4), 0.5 * torch.randn(2, 3, 4)
    log_pi = torch.log_softmax(torch.randn(2, 3), -1)
    gmm = SlotMixture(in_dim=4, num_slots=3, dim=4, temperature=1.0, log_det=False)
    scores = -0.5 * (((x[:, :, None] - mu[:, None]) / logsigma.exp()[:, None]) ** 2).sum(-1) + log_pi[:, None]
    torch.testing.assert_close(gmm.e_step(mixture_features(x), mu, logsigma, log_pi), torch.softmax(scores, -1))


@pytest.mark.parametrize("kind", ["gmm", "slot_attention"])
def test_shapes_and_init_gradients(kind):
    torch.manual_seed(0)
    m = make_slot_module(kind, in_dim=16, num_slots=5, dim=8, iters=3, mlp_hidden=32)
    slots, attn = m(torch.randn(2, 20, 16))
    assert slots.shape == (2, 5, 16 if kind == "gmm" else 8) and m.out_dim == slots.shape[-1]
    assert attn.shape == (2, 5, 20)
    torch.testing.assert_close(attn.sum(1), torch.ones(2, 20), atol=1e-5, rtol=0)
    slots.square().sum().backward()
    init_params = ["mu_mean", "mu_logstd", "logsigma_mean", "logsigma_logstd"] if kind == "gmm" else ["init_mu", "init_logsigma"]
    for name in init_params:
        grad = getattr(m, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["gmm", "slot_attention"])
def test_implicit_grad_detaches_all_but_last_iteration(kind):
    torch.manual_seed(0)
    m = make_slot_module(kind, in_dim=8, num_slots=3, dim=8, iters=3, mlp_hidden=16, implicit_grad=True)
    slots, _ = m(torch.randn(2, 10, 8))
    slots.sum().backward()
    init = m.mu_mean if kind == "gmm" else m.init_mu
    assert init.grad is None and not init.requires_grad  # frozen: DistributedDataParallel expects no gradient
    assert m.gru.weight_ih.grad is not None
    counts = []  # the iterations before the last build no graph: the tensors saved for backward are one step's
    for iters in (3, 1):
        m.iters, saved = iters, []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            m(torch.randn(2, 10, 8))
        counts.append(len(saved))
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("kind", ["gmm", "slot_attention"])
def test_carry_over_init_is_deterministic(kind):
    m = make_slot_module(kind, in_dim=8, num_slots=3, dim=8, iters=2, mlp_hidden=16)
    x = torch.randn(2, 10, 8)
    init = torch.randn(2, 3, m.out_dim)
    torch.manual_seed(1)
    a, _ = m(x, init)
    torch.manual_seed(2)
    b, _ = m(x, init)
    torch.testing.assert_close(a, b)
    c, _ = m(x)
    assert not torch.allclose(a, c)


def test_gmm_stable_under_bf16_and_extreme_inputs():
    torch.manual_seed(0)
    m = SlotMixture(in_dim=16, num_slots=6, dim=16, iters=5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for scale in (1e-4, 1.0, 1e4):
        for _ in range(3):
            x = torch.randn(4, 64, 16) * scale
            x[:, :32] = 0.0  # many identical inputs: zero variance components
            with torch.autocast("cpu", dtype=torch.bfloat16):
                slots, attn = m(x)
            assert torch.isfinite(slots).all() and torch.isfinite(attn).all()
            opt.zero_grad()
            slots.float().square().mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
            opt.step()


def test_the_m_step_network_and_the_vq_logits_run_in_fp32_under_autocast():
    """Under bf16 autocast the GMM's GRU+MLP (b k rows) and the VQ logits stay fp32: the variance is taken around an
    unrounded mean, and a near tie's code does not flip. Same initial slots, bf16 autocast vs none: equal slots and
    codes (the E-step and M-step statistics were fp32 already; in_dim = dim, so no projection rounds the inputs)."""
    torch.manual_seed(0)
    m = SlotMixture(in_dim=16, num_slots=4, dim=16, iters=3).eval()
    q = SlotQuantizer(slot_width=32, num_vars=4, num_codes=16, code_dim=8).eval()
    x, init = torch.randn(8, 64, 16), m.initial_slots(8, "cpu")
    plain = m(x, init)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m(x, init)[0]
        codes = q(plain).codes
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)
    assert torch.equal(codes, q(plain).codes)


def test_vq_codes_kl_and_decode():
    torch.manual_seed(0)
    q = SlotQuantizer(slot_width=12, num_vars=4, num_codes=8, code_dim=6)
    slots = torch.randn(2, 5, 12)
    q.eval()
    out = q(slots)
    assert out.codes.shape == (2, 5, 4) and out.codes.dtype == torch.int64
    assert out.slots.shape == (2, 5, 12) and out.kl >= 0
    torch.testing.assert_close(q.decode_codes(out.codes), out.slots)
    with pytest.raises(ValueError, match=r"slots of width 6 into a SlotQuantizer of slot_width 12 \(a GMM slot is"):
        q(slots[..., :6])  # model.slot_dim given where the GMM's 2 x slot_dim belongs
    q.train()
    q.set_temperature(0.5)
    soft = q(slots)
    assert not torch.allclose(soft.slots, out.slots)
    soft.slots.sum().backward()
    assert q.bilinear.grad is not None and q.codebooks.grad is not None
    # KL to uniform is zero for uniform posteriors (zero bilinear form) and log(C) per variable for one-hots.
    with torch.no_grad():
        q.bilinear.zero_()
    assert abs(q(slots).kl.item()) < 1e-6


def test_vq_kl_matches_definition():
    q = SlotQuantizer(slot_width=4, num_vars=2, num_codes=3, code_dim=2).eval()
    out = q(torch.randn(1, 2, 4))
    p = out.logits.softmax(-1)
    expected = (p * torch.log(p * 3)).sum(-1).sum(-1).mean()
    torch.testing.assert_close(out.kl, expected)


def test_temperature_schedule():
    assert temperature(0, 1.0, 0.1, 100) == pytest.approx(1.0)
    assert temperature(50, 1.0, 0.1, 100) == pytest.approx(math.sqrt(0.1))
    assert temperature(100, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert temperature(10_000, 1.0, 0.1, 100) == pytest.approx(0.1)


@pytest.mark.parametrize("slots, width", [("gmm", 16), ("slot_attention", 8)])
def test_encoder_inputs_are_checked_in_one_line(slots, width):
    """uint8 frames (0..255 would pass a shape check) and carried slots of another shape are refused, for either
    slot module alike (Slot Attention used to return as many slots as it was given)."""
    from world_model.config import ModelConfig
    from world_model.perception import SlotEncoder

    enc = SlotEncoder(ModelConfig(slots=slots, num_slots=3, slot_dim=8, cnn_channels=[8], cnn_strides=[2],
                                  feature_dim=8, mlp_hidden=16))
    images = torch.rand(2, 3, 16, 16)
    out = enc(images)
    assert out.raw_slots.shape == (2, 3, width) and enc(images, out.raw_slots).raw_slots.shape == (2, 3, width)
    with pytest.raises(ValueError, match="expects float images in \\[0, 1\\], got torch.uint8; convert env frames"):
        enc((images * 255).byte())
    for bad in (out.raw_slots[:, :2], out.raw_slots[..., :4]):
        with pytest.raises(ValueError, match=f"prev_slots must be .* = \\(2, 3, {width}\\), got"):
            enc(images, bad)


def test_modules_used_standalone_refuse_what_they_cannot_do_and_take_any_slot_count():
    """The slot modules and the autoencoder as library pieces: a carried-in slot count other than the built one
    works; zero iterations, a negative temperature, a wrong image size or dtype, a zero Gumbel temperature are
    refused in words instead of failing deep inside (or silently: a mis-sized reconstruction, NaN slots)."""
    from test_losses import small_cfg
    from world_model.perception import SlotAutoencoder

    x = torch.randn(2, 5, 6)
    gmm = SlotMixture(6, 3, 4)
    slots, weights = gmm(x, torch.randn(2, 5, 8))  # five carried-in slots, built for three
    assert slots.shape == (2, 5, 8) and weights.shape == (2, 5, 5)
    assert SlotMixture(6, 3, 4, temperature=0.0).temperature == SlotMixture(6, 3, 4).temperature == 2.0  # sqrt(d)
    for bad in (dict(iters=0), dict(temperature=-2.0)):
        with pytest.raises(ValueError):
            SlotMixture(6, 3, 4, **bad)
    with pytest.raises(ValueError, match="init must be slots"):
        gmm(x, torch.randn(2, 5, 4))
    ae = SlotAutoencoder(small_cfg(), resolution=32)
    with pytest.raises(ValueError, match="built for 32x32 images, got \\(64, 64\\)"):
        ae(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="images are torch.float16 but the encoder's weights torch.float32"):
        ae(torch.rand(2, 3, 32, 32, dtype=torch.float16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ae(torch.rand(2, 3, 32, 32, dtype=torch.bfloat16))  # under autocast, as training runs it
    with pytest.raises(ValueError, match="must be above 0"):
        SlotQuantizer(8).set_temperature(0.0)
    with pytest.raises(ValueError, match="must be above 0"):
        temperature(10, 0.0, 0.1, 100)


def test_slot_attention_by_hand():
    """One iteration with identity projections, the GRU passing its input through and the MLP's residual zeroed:
    the attention is the softmax over slots of LN(x) . LN(slots) / sqrt(d) (plus eps), and each slot is the
    attention-weighted mean of LN(x) over the inputs."""
    from world_model.slots.slot_attention import SlotAttention

    torch.manual_seed(0)
    m = SlotAttention(in_dim=4, num_slots=2, dim=4, iters=1)

    class PassThrough(torch.nn.Module):
        def forward(self, update, previous):
            return update

    m.gru = PassThrough()
    with torch.no_grad():
        for projection in (m.to_k, m.to_q, m.to_v):
            projection.weight.copy_(torch.eye(4))
        m.mlp[-1].weight.zero_()
        m.mlp[-1].bias.zero_()
        x, init = torch.randn(1, 5, 4), torch.randn(1, 2, 4)
        slots, attn = m(x, init)
    ln_x, ln_init = F.layer_norm(x, (4,)), F.layer_norm(init, (4,))
    expected = torch.softmax(ln_x @ ln_init.transpose(1, 2) / 2.0, -1) + m.eps  # b n k, over slots, / sqrt(4)
    torch.testing.assert_close(attn, expected.transpose(1, 2))
    weights = expected / expected.sum(1, keepdim=True)  # normalized over the inputs
    torch.testing.assert_close(slots, torch.einsum("bnk,bnd->bkd", weights, ln_x))


def _sampled_one_hots(hard: bool, tau: float) -> torch.Tensor:
    """The relaxed one-hots a training-mode quantizer embeds, at temperature `tau`."""
    torch.manual_seed(0)
    q = SlotQuantizer(slot_width=8, num_vars=2, num_codes=6, code_dim=4, hard=hard).train()
    q.set_temperature(tau)
    seen, embed = [], q.embed

    def recorded(one_hots: torch.Tensor) -> torch.Tensor:
        seen.append(one_hots.detach())
        return embed(one_hots)

    q.embed = recorded
    q(torch.randn(64, 3, 8))
    return seen[0]


def test_vq_samples_follow_the_temperature_and_the_hard_flag():
    """Gumbel-softmax samples sharpen as tau falls (near one-hot at 0.1, soft at 5); hard=False keeps them relaxed,
    hard=True makes every sample exactly one-hot (straight-through)."""
    cold, warm = _sampled_one_hots(False, 0.1), _sampled_one_hots(False, 5.0)
    assert cold.max(-1).values.mean() > 0.9 and warm.max(-1).values.mean() < 0.6
    assert ((warm > 0.01) & (warm < 0.99)).all(-1).any()
    hard = _sampled_one_hots(True, 5.0)
    assert ((hard == 0) | (hard == 1)).all() and torch.equal(hard.sum(-1), torch.ones(hard.shape[:-1]))


def test_vq_logits_by_hand():
    """The code logits are the bilinear form LN(slot)^T W e_c scaled by 1 / sqrt(code_dim): slot [3, 1] normalizes
    to [1, -1]; with W and the codebook the first two unit vectors, the logits are [1, -1] / sqrt(4)."""
    q = SlotQuantizer(slot_width=2, num_vars=1, num_codes=2, code_dim=4).eval()
    with torch.no_grad():
        q.bilinear.zero_()
        q.bilinear[0, 0, 0] = q.bilinear[0, 1, 1] = 1.0
        q.codebooks.zero_()
        q.codebooks[0, 0, 0] = q.codebooks[0, 1, 1] = 1.0
        out = q(torch.tensor([[[3.0, 1.0]]]))
    torch.testing.assert_close(out.logits, torch.tensor([[[[0.5, -0.5]]]]), atol=1e-4, rtol=0)


class NoGRU(torch.nn.Module):
    """A GRU stand-in that returns its update unchanged, so an iteration's output is the attention or M-step mean
    plus the (zeroed) MLP residual."""

    def forward(self, update, previous):
        return update


def test_gmm_m_step_by_hand():
    """One iteration with the GRU passed through and the MLP residual zeroed: the new means are the E-step's
    responsibility-weighted means of the normed inputs, and the returned weights are those responsibilities."""
    torch.manual_seed(0)
    m = SlotMixture(in_dim=4, num_slots=2, dim=4, iters=1, temperature=1.0)
    m.gru = NoGRU()
    with torch.no_grad():
        m.mlp[-1].weight.zero_()
        m.mlp[-1].bias.zero_()
        x, init = torch.randn(1, 6, 4), torch.randn(1, 2, 8)
        slots, weights = m(x, init)
    ln_x = F.layer_norm(x, (4,))
    mu0, logsigma0 = init.split(4, -1)
    probs = m.e_step(mixture_features(ln_x), mu0, logsigma0, torch.full((1, 2), -math.log(2)))  # b n k
    mean_x = torch.einsum("bnk,bnd->bkd", probs, ln_x) / probs.sum(1)[..., None]
    torch.testing.assert_close(slots[..., :4], mean_x)
    torch.testing.assert_close(weights, probs.transpose(1, 2))


def test_an_empty_component_gets_the_variance_floor():
    """A component far from every input takes no mass; its variance is the floor, not the spread of its (nonzero)
    updated mean around nothing."""
    from world_model.slots.gmm import LOG_VAR_MIN

    torch.manual_seed(0)
    m = SlotMixture(in_dim=2, num_slots=2, dim=2, iters=1, temperature=1.0)
    x = torch.randn(1, 10, 2)
    mu = torch.tensor([[[0.0, 0.0], [1e3, 1e3]]])
    mu_new, logsigma, _, probs = m.step(mixture_features(x), mu, torch.zeros(1, 2, 2),
                                        torch.full((1, 2), -math.log(2)))
    assert probs[0, :, 1].max() == 0
    assert mu_new[0, 1].abs().max() > 1e-2  # mu^2 alone would not reach the floor
    torch.testing.assert_close(logsigma[0, 1], torch.full((2,), 0.5 * LOG_VAR_MIN))


def test_implicit_gradient_is_the_gradient_through_the_last_step_only():
    """implicit_grad=True: the gradient equals running all but the last iteration without a graph, then one step."""
    torch.manual_seed(0)
    m = SlotMixture(in_dim=4, num_slots=3, dim=4, iters=3, implicit_grad=True).double()
    x, init = torch.randn(2, 10, 4, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    m(x, init)[0].square().sum().backward()
    got = m.norm_input.weight.grad.clone()
    m.zero_grad()
    h = mixture_features(m.project(m.norm_input(x)))
    mu, logsigma = init.split(4, -1)
    log_pi = torch.full((2, 3), -math.log(3), dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):
            mu, logsigma, log_pi, _ = m.step(h, mu, logsigma, log_pi)
    mu, logsigma, _, _ = m.step(h, mu, logsigma, log_pi)
    torch.cat([mu, logsigma], -1).square().sum().backward()
    torch.testing.assert_close(got, m.norm_input.weight.grad)


def test_gmm_keeps_float32_precision_when_the_features_share_a_large_offset():
    """Features 100 +- 0.05 (a projection's bias against a tight spread): the float32 slots and weights match float64.
    The expanded E_w[x^2] - 2 mu E_w[x] + mu^2 on uncentred features loses the variance in the rounding of 10^4."""
    torch.manual_seed(0)
    m = SlotMixture(in_dim=8, num_slots=3, dim=8, iters=3)
    with torch.no_grad():
        m.norm_input.weight.fill_(0.05)
        m.norm_input.bias.fill_(100.0)
    x, init = torch.randn(2, 40, 8), torch.randn(2, 3, 16) * 0.05
    init[..., :8] += 100.0
    slots, weights = m(x, init)
    slots64, weights64 = m.double()(x.double(), init.double())
    torch.testing.assert_close(slots.double(), slots64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weights.double(), weights64, rtol=1e-3, atol=1e-4)


def test_centred_steps_equal_the_uncentred_ones_also_for_an_empty_slot():
    """forward works on features centred per image; in float64 it gives what `step` on the raw features gives, also
    for a slot far from every input (mass ~ 0), whose GRU input stays the (empty) weighted mean 0, not the centre."""
    torch.manual_seed(0)
    m = SlotMixture(in_dim=4, num_slots=3, dim=4, iters=3, temperature=1.0).double()
    x = torch.randn(2, 30, 4, dtype=torch.float64) + 5.0
    init = torch.randn(2, 3, 8, dtype=torch.float64)
    init[:, 2, :4] = 1e3  # nothing near it
    slots, weights = m(x, init)
    h = mixture_features(m.project(m.norm_input(x)))
    mu, logsigma = init.split(4, -1)
    log_pi = torch.full((2, 3), -math.log(3), dtype=torch.float64)
    for _ in range(3):
        mu, logsigma, log_pi, probs = m.step(h, mu, logsigma, log_pi)
    assert float(probs[..., 2].sum(1).max().detach()) < 1e-6  # the far slot stayed empty
    torch.testing.assert_close(slots, torch.cat([mu, logsigma], -1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weights, probs.transpose(1, 2), rtol=1e-9, atol=1e-9)


def test_gmm_gradients_match_finite_differences():
    """gradcheck through two full iterations in float64: no gradient path is dropped or detached."""
    torch.manual_seed(0)
    m = SlotMixture(in_dim=3, num_slots=2, dim=3, iters=2, mlp_hidden=8).double()
    x = torch.randn(1, 12, 3, dtype=torch.float64, requires_grad=True)
    init = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: m(a, b)[0], (x, init), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["gmm", "slot_attention"])
def test_initial_slots_are_drawn_from_the_learned_gaussian(kind):
    """With mean 1 and log-std ln 2, 20000 initial slots have mean ~1 and std ~2."""
    m = make_slot_module(kind, in_dim=4, num_slots=1, dim=4, iters=1, mlp_hidden=8)
    mean, logstd = (m.mu_mean, m.mu_logstd) if kind == "gmm" else (m.init_mu, m.init_logsigma)
    with torch.no_grad():
        mean.fill_(1.0)
        logstd.fill_(math.log(2.0))
    torch.manual_seed(0)
    s = m.initial_slots(20000, "cpu")[..., :4]
    assert s.mean().item() == pytest.approx(1.0, abs=0.05) and s.std().item() == pytest.approx(2.0, rel=0.03)


def test_gmm_config_settings_reach_the_slot_module():
    from world_model.config import ModelConfig
    from world_model.perception import SlotEncoder

    enc = SlotEncoder(ModelConfig(slots="gmm", num_slots=3, slot_dim=8, cnn_channels=[8], cnn_strides=[2],
                                  feature_dim=8, mlp_hidden=16, gmm_temperature=1.0, gmm_log_det=False,
                                  gmm_update_pi=False))
    m = enc.slot_module
    assert m.temperature == 1.0 and m.log_det is False and m.update_pi is False


def test_slot_attention_averages_values_not_keys():
    """Keys and queries the identity, values twice it: with the GRU passed through and the MLP residual zeroed, the
    slots are twice the attention-weighted mean of the normed inputs."""
    from world_model.slots.slot_attention import SlotAttention

    torch.manual_seed(0)
    m = SlotAttention(in_dim=4, num_slots=2, dim=4, iters=1)
    m.gru = NoGRU()
    with torch.no_grad():
        m.to_k.weight.copy_(torch.eye(4))
        m.to_q.weight.copy_(torch.eye(4))
        m.to_v.weight.copy_(2 * torch.eye(4))
        m.mlp[-1].weight.zero_()
        m.mlp[-1].bias.zero_()
        x, init = torch.randn(1, 5, 4), torch.randn(1, 2, 4)
        slots, attn = m(x, init)
    w = attn.transpose(1, 2)  # b n k
    w = w / w.sum(1, keepdim=True)
    torch.testing.assert_close(slots, 2 * torch.einsum("bnk,bnd->bkd", w, F.layer_norm(x, (4,))))


def test_the_vq_kl_term_trains_the_bilinear_form():
    torch.manual_seed(0)
    q = SlotQuantizer(slot_width=6, num_vars=2, num_codes=4, code_dim=3).train()
    q(torch.randn(2, 3, 6)).kl.backward()
    assert q.bilinear.grad is not None and q.bilinear.grad.abs().sum() > 0


def test_vq_set_prediction_reads_coordinates_from_the_continuous_slot():
    """With VQ codes the 3 coordinates come from the continuous slot, the attributes and objectness from the
    quantized one (as the VQ-SA reference); without VQ there is one slot to read. A checkpoint from before (no flag
    in its state) reads everything from the quantized slot, as it trained; a new one keeps the flag."""
    from world_model.config import ModelConfig, VQConfig
    from world_model.perception import SetPredictor

    images = torch.rand(2, 3, 16, 16)
    for vq in (True, False):
        torch.manual_seed(0)
        model = SetPredictor(ModelConfig(num_slots=3, slot_dim=8, cnn_channels=[8], cnn_strides=[2], feature_dim=8,
                                         mlp_hidden=16, head_hidden=16, vq=VQConfig(enabled=vq))).eval()
        enc, pred = model(images)
        torch.testing.assert_close(pred[..., :3], model.head(enc.raw_slots)[..., :3])
        torch.testing.assert_close(pred[..., 3:], model.head(enc.slots)[..., 3:])
        assert vq == (not torch.allclose(model.head(enc.slots)[..., :3], pred[..., :3]))
        old = {k: v for k, v in model.state_dict().items() if k != "coords_from_slots"}
        model.load_state_dict(old)
        enc, pred = model(images)
        torch.testing.assert_close(pred, model.head(enc.slots))
        again = SetPredictor(model.encoder.cfg)
        again.load_state_dict(model.state_dict())  # the old checkpoint's flag, saved on: still from the quantized slot
        assert not again._coords_from_slots
        again.load_state_dict(SetPredictor(model.encoder.cfg).state_dict())
        assert again._coords_from_slots
