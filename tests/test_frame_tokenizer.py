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
