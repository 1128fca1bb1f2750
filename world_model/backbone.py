"""CNN feature extractor with Slot Attention's soft positional embedding, shared by every slot module."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from envs.errors import UsageError


def position_grid(height: int, width: int, device=None) -> torch.Tensor:
    """The 4-channel grid [y, x, 1-y, 1-x] in [0, 1] that positional embeddings project.  # h w 4"""
    ys = torch.linspace(0.0, 1.0, height, device=device)
    xs = torch.linspace(0.0, 1.0, width, device=device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
    return torch.cat([grid, 1.0 - grid], dim=-1)


class SoftPositionEmbed(nn.Module):
    """Adds a learned linear projection of the coordinate grid to channels-last features."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # b h w d
        return x + self.proj(position_grid(x.shape[1], x.shape[2], x.device).to(x.dtype))


class CNNBackbone(nn.Module):
    """Conv stack -> position embedding -> LayerNorm + MLP; returns features `b n d` and the grid size."""

    def __init__(self, channels=(64, 64, 64, 64), strides=(1, 2, 2, 1), kernel: int = 5, out_dim: int = 64):
        super().__init__()
        if len(channels) != len(strides):
            raise UsageError(f"cnn_channels ({len(channels)}) and cnn_strides ({len(strides)}) must have equal length")
        layers, c_in = [], 3
        for c, s in zip(channels, strides):
            layers += [nn.Conv2d(c_in, c, kernel, stride=s, padding=kernel // 2), nn.ReLU(inplace=True)]
            c_in = c
        self.cnn = nn.Sequential(*layers)
        self.pos = SoftPositionEmbed(c_in)
        self.norm = nn.LayerNorm(c_in)
        self.mlp = nn.Sequential(nn.Linear(c_in, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images `b 3 h w` in [0, 1] -> features `b (h' w') d`, (h', w')."""
        x = self.cnn(images * 2.0 - 1.0)
        h, w = x.shape[-2:]
        x = self.pos(rearrange(x, "b c h w -> b h w c"))
        x = self.mlp(self.norm(x))
        return rearrange(x, "b h w d -> b (h w) d"), (h, w)
