"""The frame token: codes, decoding, gradients through the straight-through one-hots, learning."""
import pytest
import torch

from world_model.frame_tokenizer import FrameTokenizer, FrameTokenizerConfig


def test_shapes_and_gradients():
    torch.manual_seed(0)
    tok = FrameTokenizer(FrameTokenizerConfig(vars=3, codes=5, channels=4, target=8), resolution=32)
    images = torch.rand(2, 3, 32, 32)
    codes, loss = tok(images)
    assert codes.shape == (2, 3) and codes.dtype == torch.int64 and codes.max() < 5
    assert tok.decode(codes).shape == (2, 3, 8, 8)
    loss.backward()
    assert tok.encoder[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder


def test_training_codes_are_the_argmax_ones_while_the_decoder_reads_samples():
    """In training the reconstruction decodes sampled one-hots (every code stays in play), but the codes returned,
    the dynamics' targets, are the argmax ones acting reads: no sampling noise in them."""
    torch.manual_seed(0)
    tok = FrameTokenizer(FrameTokenizerConfig(vars=6, codes=5, channels=4, target=8), resolution=32).train()
    tok.encoder[-1].weight.data.zero_()  # uniform logits: a sample is almost never the argmax of all 6 x 40 codes
    images = torch.rand(40, 3, 32, 32)
    logits = tok.logits(images)
    assert torch.equal(tok(images)[0], logits.argmax(-1)) and torch.equal(tok.codes(images), logits.argmax(-1))
    assert not torch.equal(tok.onehots(logits).argmax(-1), logits.argmax(-1))  # the decoder's input is sampled


def test_learns_to_tell_frames_apart():
    torch.manual_seed(0)
    tok = FrameTokenizer(FrameTokenizerConfig(vars=2, codes=4, channels=8, target=8), resolution=16)
    images = torch.zeros(4, 3, 16, 16)
    for i in range(4):  # four flat colors
        images[i, i % 3] = 1.0 if i < 3 else 0.5
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = tok(images)[1].item()
    for _ in range(300):
        opt.zero_grad()
        codes, loss = tok(images)
        loss.backward()
        opt.step()
    tok.eval()
    codes, loss = tok(images)
    assert loss.item() < first / 10
    assert len({tuple(c.tolist()) for c in codes}) == 4  # a distinct code word per frame


def test_status_tokens_are_appended_to_the_codes():
    """An env's status tokens (NetHack's bottom line) follow the learned codes as they are; the reconstruction
    loss is the frame's alone. A tokenizer made for status tokens refuses to run without them."""
    torch.manual_seed(0)
    cfg = FrameTokenizerConfig(vars=3, codes=16, channels=4, target=8)
    tok, plain = FrameTokenizer(cfg, resolution=16, status_vars=2), FrameTokenizer(cfg, resolution=16)
    plain.load_state_dict(tok.state_dict())  # no parameters of its own: the status is not learned
    images, status = torch.rand(2, 3, 16, 16), torch.tensor([[15, 0], [3, 9]], dtype=torch.uint8)
    tok.eval(), plain.eval()
    codes, loss = tok(images, status)
    plain_codes, plain_loss = plain(images)
    assert codes.shape == (2, 5) and codes.dtype == torch.int64
    assert torch.equal(codes[:, :3], plain_codes) and torch.equal(codes[:, 3:], status.long()) and loss == plain_loss
    assert torch.equal(tok.codes(images, status), codes)
    with pytest.raises(ValueError, match="appends the env's 2 status tokens to its codes; got none"):
        tok(images)


def test_bad_resolution():
    with pytest.raises(ValueError, match="divisible by 8"):
        FrameTokenizer(FrameTokenizerConfig(), resolution=30)


def test_frame_token_loss_is_each_frames_mean_squared_error():
    """The tokenizer's loss per frame is the MEAN squared error over the low-resolution target's 3 x t x t entries:
    a decoder that draws black against mid-gray frames scores 0.25 (a sum would score 0.25 x 3 x 8 x 8 = 48)."""
    from recording import Recording

    from world_model.frame_tokenizer import FrameTokenizer, FrameTokenizerConfig

    tok = FrameTokenizer(FrameTokenizerConfig(vars=2, codes=4, channels=4, target=8), 16).eval()
    tok.decoder = Recording(torch.zeros(3, 3, 8, 8))
    _, loss = tok(torch.full((3, 3, 16, 16), 0.5), reduce=False)
    torch.testing.assert_close(loss, torch.full((3,), 0.25))


def test_frame_token_gradients_go_through_the_uniform_mixed_softmax():
    """Straight-through one-hots carry the gradient of probs = (1 - unimix) softmax + unimix / codes: at uniform logits
    over 4 codes, d onehot_0 / d logits = 0.99 x 1/4 x ([1, 0, 0, 0] - 1/4) = 0.99 x [0.1875, -0.0625, -0.0625, -0.0625]
    (without the mixing it would lack the 0.99)."""
    from world_model.frame_tokenizer import FrameTokenizer, FrameTokenizerConfig

    tok = FrameTokenizer(FrameTokenizerConfig(vars=1, codes=4, channels=4, target=8, unimix=0.01), 16).eval()
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    tok.onehots(logits)[0, 0, 0].backward()
    torch.testing.assert_close(logits.grad[0, 0], 0.99 * torch.tensor([0.1875, -0.0625, -0.0625, -0.0625]))


def test_the_reconstruction_target_is_the_area_downsampled_frame():
    """A fine checkerboard (area mean 0.25 per 2x2 cell, where nearest-pixel sampling gives 0 or 1) with a brighter
    top half and a darker left band (a flip in either axis would show): the target is avg_pool2d, and a decoder
    that outputs exactly it has zero loss."""
    from recording import Recording

    tok = FrameTokenizer(FrameTokenizerConfig(vars=2, codes=4, channels=4, target=8), 16).eval()
    img = torch.zeros(1, 3, 16, 16)
    img[..., ::2, ::2] = 1.0
    img[..., :8, :] += 0.5
    img[..., :, :4] -= 0.25
    want = torch.nn.functional.avg_pool2d(img, 2)
    torch.testing.assert_close(tok.target(img), want)
    tok.decoder = Recording(want.clone())
    _, loss = tok(img, reduce=False)
    assert loss.abs().max().item() < 1e-10


def test_the_code_logits_are_fp32_under_autocast():
    """Under bf16 autocast the convolutions run in bf16 and the last layer, the logits, in fp32: a near tie's code
    does not flip by rounding (CPU bf16 autocast stands in for CUDA's)."""
    torch.manual_seed(0)
    tok = FrameTokenizer(FrameTokenizerConfig(vars=4, codes=8, channels=8), 32).eval()
    images = torch.rand(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tok.logits(images)
        features = tok.encoder[:-1](images)
    assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, tok.encoder[-1](features.float()).unflatten(-1, (4, 8)))
