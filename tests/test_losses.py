"""Hungarian-matched set loss against brute force; decoder and encoder contracts."""
import itertools
import math

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


def test_decoder_composites_each_slots_rgb_by_a_softmax_over_slots():
    """The decoder's 4 output channels are RGB (0..2) then the mask logit (3); masks are a softmax over the slots and
    the reconstruction is the mask-weighted SUM of the slots' RGB (alpha compositing), not their mean. Two slots with
    logits 0 and ln 3: masks 1/4 and 3/4; RGB 0.2 and 0.6: recon 0.05 + 0.45 = 0.5 (the mean would be 0.25)."""
    from recording import Recording

    from world_model.decoders import SpatialBroadcastDecoder

    dec = SpatialBroadcastDecoder(slot_dim=4, resolution=8, channels=4, init_size=8)
    out = torch.zeros(2, 4, 8, 8)  # (b k) c h w, b=1, k=2
    out[0, :3], out[1, :3] = 0.2, 0.6
    out[0, 3], out[1, 3] = 0.0, math.log(3.0)
    dec.net = Recording(out)
    d = dec(torch.zeros(1, 2, 4))
    torch.testing.assert_close(d.masks[0, :, 0], torch.tensor([0.25, 0.75])[:, None, None].expand(2, 8, 8))
    torch.testing.assert_close(d.rgb[0, 1], torch.full((3, 8, 8), 0.6))
    torch.testing.assert_close(d.recon, torch.full((1, 3, 8, 8), 0.5))


def test_decoder_broadcasts_slots_with_the_position_grid_y_x_then_1_minus():
    """Each slot is broadcast over the init grid and the soft position embedding added: with zero slots and an
    identity projection, the conv stack sees the grid [y, x, 1-y, 1-x] itself (y down the rows, x along the
    columns): [0,0,1,1] at the top left, [0,1,1,0] at the top right, [1,0,0,1] at the bottom left."""
    from recording import Recording

    from world_model.decoders import SpatialBroadcastDecoder

    dec = SpatialBroadcastDecoder(slot_dim=4, resolution=8, channels=4, init_size=8)
    with torch.no_grad():
        dec.pos.proj.weight.copy_(torch.eye(4))
        dec.pos.proj.bias.zero_()
    dec.net = Recording(torch.zeros(2, 4, 8, 8))
    dec(torch.zeros(1, 2, 4))
    x = dec.net.seen  # (b k) d h w
    assert x.shape == (2, 4, 8, 8)
    torch.testing.assert_close(x[1, :, 0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(x[1, :, 0, 7], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(x[1, :, 7, 0], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(x[0, :, 3, 5], torch.tensor([3 / 7, 5 / 7, 4 / 7, 2 / 7]))


def test_set_prediction_head_squashes_by_a_sigmoid():
    """The head's 19 entries are a sigmoid of the MLP's output (as Slot Attention), not a clamp: a zero MLP output
    predicts 0.5 everywhere, an output of ln 3 predicts 0.75."""
    from world_model.decoders import SetPredictionHead

    head = SetPredictionHead(slot_dim=4, hidden=8)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    torch.testing.assert_close(head(torch.randn(2, 3, 4)), torch.full((2, 3, 19), 0.5))
    with torch.no_grad():
        head.mlp[2].bias.fill_(math.log(3.0))
    torch.testing.assert_close(head(torch.randn(1, 1, 4)), torch.full((1, 1, 19), 0.75))


def test_backbone_maps_images_from_0_1_to_minus_1_1():
    """The conv stack reads images scaled to [-1, 1]: black is -1, white 1, mid-gray 0."""
    from recording import Recording

    from world_model.backbone import CNNBackbone

    bb = CNNBackbone(channels=(4,), strides=(1,), kernel=3, out_dim=4)
    bb.cnn = Recording(torch.zeros(3, 4, 2, 2))
    bb(torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.full((3, 2, 2), 0.5)]))
    torch.testing.assert_close(bb.cnn.seen[:, 0, 0, 0], torch.tensor([-1.0, 1.0, 0.0]))


def test_the_huber_loss_is_linear_beyond_1_on_both_sides():
    """One coordinate 2 too low: Huber gives 2 - 0.5 = 1.5, averaged over the 19 entries."""
    target = torch.zeros(1, 1, 19)
    target[0, 0, 0] = 2.0
    loss, _ = hungarian_huber_loss(torch.zeros(1, 1, 19), target)
    assert loss.item() == pytest.approx(1.5 / 19)


def test_the_decoder_keeps_each_images_slots_together():
    """The broadcast net's `(b k) c h w` output regrouped: image 1's slots paint 1, image 0's paint 0, so each
    image's mixture is its own constant."""
    from recording import Recording

    dec = SpatialBroadcastDecoder(slot_dim=4, resolution=8, channels=4, init_size=8)
    out = torch.zeros(4, 4, 8, 8)
    out[2:4, :3] = 1.0
    dec.net = Recording(out)
    d = dec(torch.zeros(2, 2, 4))
    torch.testing.assert_close(d.recon[1], torch.ones(3, 8, 8))
    torch.testing.assert_close(d.recon[0], torch.zeros(3, 8, 8))


def test_the_decoders_mask_logits_learn_from_the_reconstruction():
    torch.manual_seed(0)
    dec = SpatialBroadcastDecoder(slot_dim=4, resolution=8, channels=4, init_size=8)
    d = dec(torch.randn(2, 3, 4))
    F.mse_loss(d.recon, torch.rand(2, 3, 8, 8)).backward()
    assert dec.net[-1].weight.grad[3].abs().sum() > 0
