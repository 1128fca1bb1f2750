"""Hungarian-matched set loss against brute force; decoder and encoder contracts."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from world_model.config import ModelConfig, VQConfig
from world_model.decoders import SpatialBroadcastDecoder
from world_model.losses import hungarian_huber_loss
from world_model.perception import SetPredictor, SlotAutoencoder, SlotEncoder


def brute_force_loss(pred, target):
    total = 0.0
    for p, t in zip(pred, target):
        cost = F.huber_loss(*torch.broadcast_tensors(p[:, None], t[None]), reduction="none").mean(-1)
        k = cost.shape[0]
        total += min(sum(cost[perm[j], j] for j in range(k)) for perm in itertools.permutations(range(k)))
    return total / pred.shape[0]


def test_hungarian_loss_is_optimal_matching():
    torch.manual_seed(0)
    pred, target = torch.rand(4, 5, 19), torch.rand(4, 5, 19)
    loss, match = hungarian_huber_loss(pred, target)
    torch.testing.assert_close(loss, torch.as_tensor(brute_force_loss(pred, target), dtype=loss.dtype))
    assert sorted(match[0].tolist()) == list(range(5))


def test_hungarian_loss_permutation_invariant_and_pads():
    torch.manual_seed(0)
    pred, target = torch.rand(2, 6, 19), torch.rand(2, 4, 19)
    loss, _ = hungarian_huber_loss(pred, target)
    loss_perm, _ = hungarian_huber_loss(pred[:, torch.randperm(6)], target)
    torch.testing.assert_close(loss, loss_perm)
    padded = F.pad(target, (0, 0, 0, 2))
    torch.testing.assert_close(loss, hungarian_huber_loss(pred, padded)[0])
    torch.testing.assert_close(loss, hungarian_huber_loss(pred, F.pad(target, (0, 0, 0, 5)))[0])  # trims padding
    with pytest.raises(ValueError, match="num_slots"):
        hungarian_huber_loss(pred[:, :3], target)


def test_a_non_finite_prediction_gives_a_non_finite_loss_not_a_solver_error():
    """scipy's solver refuses NaN costs; the loss is non-finite instead, so the update is skipped, not the run ended."""
    target = torch.rand(2, 4, 19)
    pred = target.clone().requires_grad_()
    with torch.no_grad():
        pred[1, 2, 5] = float("nan")
    loss, match = hungarian_huber_loss(pred, target)
    assert not torch.isfinite(loss) and loss.requires_grad and match.shape == (2, 4)


def test_hungarian_loss_zero_for_permuted_targets():
    target = torch.rand(3, 5, 19)
    pred = target[:, torch.tensor([3, 1, 4, 0, 2])]
    assert hungarian_huber_loss(pred, target)[0].item() == pytest.approx(0.0, abs=1e-7)


def test_decoder_masks_normalized_and_resolution_checked():
    dec = SpatialBroadcastDecoder(slot_dim=8, resolution=32, channels=8, init_size=8)
    out = dec(torch.randn(2, 3, 8))
    assert out.recon.shape == (2, 3, 32, 32) and out.rgb.shape == (2, 3, 3, 32, 32)
    torch.testing.assert_close(out.masks.sum(1), torch.ones(2, 1, 32, 32))
    with pytest.raises(ValueError, match="power of 2"):
        SpatialBroadcastDecoder(slot_dim=8, resolution=48, init_size=8)


def small_cfg(**kw):
    base = dict(num_slots=4, slot_dim=8, mlp_hidden=16, cnn_channels=[8, 8], cnn_strides=[2, 2], feature_dim=8,
                decoder_channels=8, head_hidden=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("slots", ["gmm", "slot_attention"])
@pytest.mark.parametrize("vq", [False, True])
def test_encoder_contract(slots, vq):
    torch.manual_seed(0)
    enc = SlotEncoder(small_cfg(slots=slots, vq=VQConfig(enabled=vq, num_vars=3, num_codes=5)))
    out = enc(torch.rand(2, 3, 32, 32))
    d = 16 if slots == "gmm" else 8
    assert out.slots.shape == (2, 4, d) and out.raw_slots.shape == (2, 4, d)
    assert out.attn.shape == (2, 4, 64) and out.grid == (8, 8)
    assert out.attn_maps((32, 32)).shape == (2, 4, 32, 32)
    assert (out.codes is not None) == vq and (out.kl is not None) == vq
    nxt = enc(torch.rand(2, 3, 32, 32), prev_slots=out.raw_slots)  # carry-over between frames
    assert nxt.slots.shape == out.slots.shape
    with pytest.raises(ValueError, match="batch, 3, h, w"):
        enc(torch.rand(2, 32, 32, 3))


def test_task_models_forward_backward():
    torch.manual_seed(0)
    ae = SlotAutoencoder(small_cfg(), resolution=32)
    enc, dec = ae(torch.rand(2, 3, 32, 32))
    dec.recon.mean().backward()
    # every weight (the slot module's initialization and neural M-step too) gets a finite, nonzero gradient
    stuck = [name for name, p in ae.named_parameters()
             if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum()]
    assert not stuck
    sp = SetPredictor(small_cfg(vq=VQConfig(enabled=True)))
    enc, pred = sp(torch.rand(2, 3, 32, 32))
    assert pred.shape == (2, 4, 19) and ((pred >= 0) & (pred <= 1)).all()


@pytest.mark.parametrize("slots", ["gmm", "slot_attention"])
def test_models_train_under_bf16_autocast(slots):
    """The mixed-precision path CUDA uses (bf16 autocast), exercised with CPU autocast."""
    from world_model.pretrain import compute_loss

    torch.manual_seed(0)
    cfg = small_cfg(slots=slots, vq=VQConfig(enabled=True))
    images = torch.rand(2, 3, 32, 32)
    targets = torch.rand(2, 4, 19)
    for task, model in (("setpred", SetPredictor(cfg)), ("discovery", SlotAutoencoder(cfg, resolution=32))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, stats, _ = compute_loss(model, task, {"images": images, "targets": targets}, beta=0.01)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_huber_is_linear_beyond_delta():
    """Past |error| = 1 the Huber loss is |error| - 0.5 (an error of 2 in one of 19 entries: 1.5 / 19), not the
    squared error's 2 / 19."""
    target = torch.zeros(1, 1, 19)
    pred = target.clone()
    pred[0, 0, 0] = 2.0
    loss, _ = hungarian_huber_loss(pred, target)
    assert loss.item() == pytest.approx(1.5 / 19)
