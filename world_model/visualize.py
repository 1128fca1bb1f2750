"""Pictures of slot decompositions: colored segmentations and per-slot grids for tensorboard and PNGs."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

# A fixed qualitative palette: slot i (or instance id i) is always drawn in the same color.
PALETTE = torch.tensor([
    [0.90, 0.10, 0.29], [0.24, 0.71, 0.29], [1.00, 0.88, 0.10], [0.00, 0.51, 0.78], [0.96, 0.51, 0.19],
    [0.57, 0.12, 0.71], [0.27, 0.94, 0.94], [0.94, 0.20, 0.90], [0.82, 0.96, 0.24], [0.98, 0.75, 0.83],
    [0.00, 0.50, 0.50], [0.86, 0.75, 1.00], [0.67, 0.43, 0.16], [1.00, 0.98, 0.78], [0.50, 0.00, 0.00],
    [0.67, 1.00, 0.76], [0.50, 0.50, 0.00], [1.00, 0.84, 0.71], [0.00, 0.00, 0.50], [0.50, 0.50, 0.50],
])


def colorize(ids: torch.Tensor) -> torch.Tensor:
    """Integer maps `b h w` -> RGB `b 3 h w` in [0, 1] (ids wrap around the palette)."""
    return PALETTE.to(ids.device)[ids.long() % len(PALETTE)].permute(0, 3, 1, 2)


def mask_confidence(masks: torch.Tensor) -> torch.Tensor:
    """How far each pixel's largest mask is from uniform: `b k h w` -> `b 1 h w`, 0 where every slot holds 1/k, 1
    where one slot holds it all. The segmentation pictures fade by it, so that masks that separate nothing (every
    slot drawing the whole frame) do not look like a decomposition."""
    k = masks.shape[1]
    if k == 1:
        return torch.ones_like(masks)
    return ((masks.amax(1, keepdim=True) - 1 / k) / (1 - 1 / k)).clamp(0, 1)


def segmentation(masks: torch.Tensor) -> torch.Tensor:
    """Soft masks `b k h w` -> RGB `b 3 h w`: each pixel in its largest slot's color, faded to white by
    `mask_confidence`."""
    return 1 - mask_confidence(masks) * (1 - colorize(masks.argmax(1)))


def tile(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """`n 3 h w` -> one `3 H W` grid image with `nrow` images per row and white padding."""
    n, c, h, w = images.shape
    ncol = (n + nrow - 1) // nrow
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad, dtype=images.dtype, device=images.device)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def decomposition_grid(images: torch.Tensor, masks: torch.Tensor, recon: Optional[torch.Tensor] = None,
                       rgb: Optional[torch.Tensor] = None, max_images: int = 4) -> torch.Tensor:
    """One row per image: input, reconstruction (left out when there is none: set-prediction models have no
    decoder), colored segmentation (faded where the masks are near uniform: `mask_confidence`), then each slot's
    masked RGB (or the input under the slot's mask).

    images `b 3 h w` in [0, 1], masks `b k h w` (soft, summing to 1 over k), recon `b 3 h w`, rgb `b k 3 h w`.
    """
    images, masks = images[:max_images].float().cpu(), masks[:max_images].float().cpu()
    if masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} are not at the images' size {tuple(images.shape[-2:])}")
    k = masks.shape[1]
    seg = segmentation(masks)
    cols = [images, *([recon[:max_images].float().cpu().clamp(0, 1)] if recon is not None else []), seg]
    per_slot = masks.unsqueeze(2) * (rgb[:max_images].float().cpu().clamp(0, 1) if rgb is not None
                                     else images.unsqueeze(1))
    per_slot = per_slot + (1 - masks.unsqueeze(2))  # white where the slot is absent
    rows = torch.cat([torch.stack(cols, 1), per_slot], dim=1)  # b (cols+k) 3 h w
    return tile(rows.flatten(0, 1), nrow=len(cols) + k)


def decomposition_labels(recon: bool, num_slots: int) -> list[str]:
    """The column names of a `decomposition_grid` row (without a reconstruction, a set-prediction model's: its masks
    are the slots' attention maps)."""
    return ["input", *(["reconstruction"] if recon else []), "segmentation" if recon else "attention",
            *(f"slot {i}" for i in range(num_slots))]


def edit_labels(slot: int, var: int, values: list[int]) -> list[str]:
    """The column names of an `edit_codes` row: the input, its reconstruction, the edited slot, then each code value
    decoded."""
    return ["input", "reconstruction", f"slot {slot}", *(f"slot {slot} var {var}: {v}" for v in values)]


PNG_MIN_SIDE = 128  # grids are upscaled (nearest) until each picture is at least this many pixels wide


def _factor(side: int) -> int:
    return max(1, -(-PNG_MIN_SIDE // side))


def upscale(grid: torch.Tensor, side: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of a `3 H W` grid of `side`-pixel pictures to at least PNG_MIN_SIDE each (PNGs
    and tensorboard pictures of 32-pixel frames stay legible)."""
    factor = _factor(side)
    return grid if factor <= 1 else F.interpolate(grid[None], scale_factor=factor, mode="nearest")[0]


def labeled(grid: torch.Tensor, labels: list[str], side: int, pad: int = 2,
            colors: Optional[dict[int, torch.Tensor]] = None, factor: Optional[int] = None) -> torch.Tensor:
    """A `3 H W` grid of `side`-pixel pictures (as `tile` pads them, then `upscale`d, or scaled by `factor`) with a
    white strip above it naming each column (Pillow's built-in font: no font file is read); `colors` {column: RGB
    in [0, 1]} puts a swatch of that color before the column's name (a slot's color in the segmentation)."""
    from PIL import Image, ImageDraw, ImageFont

    factor = factor or _factor(side)
    cell, gap = side * factor, pad * factor
    strip = Image.new("RGB", (grid.shape[-1], 16), "white")
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    for i, text in enumerate(labels):
        left = gap + i * (cell + gap) + 2
        if colors and i in colors:
            draw.rectangle((left, 3, left + 9, 12), fill=tuple(int(round(float(c) * 255)) for c in colors[i]))
            left += 13
        draw.text((left, 2), text, fill="black", font=font)
    header = from_pil(strip).to(grid.dtype)  # 3 16 W
    return torch.cat([header, grid.cpu()], 1)


def decomposition_picture(images: torch.Tensor, masks: torch.Tensor, recon: Optional[torch.Tensor] = None,
                          rgb: Optional[torch.Tensor] = None, max_images: int = 4) -> torch.Tensor:
    """`decomposition_grid` as the PNGs and tensorboard show it: upscaled, under a strip naming the columns (each
    slot's beside a swatch of its segmentation color)."""
    side = images.shape[-1]
    grid = decomposition_grid(images, masks, recon, rgb, max_images)
    labels = decomposition_labels(recon is not None, masks.shape[1])
    first = len(labels) - masks.shape[1]  # slot i's column, in the color the segmentation paints it
    colors = {first + i: PALETTE[i % len(PALETTE)] for i in range(masks.shape[1])}
    return labeled(upscale(grid, side), labels, side, colors=colors)


def annotated(picture: torch.Tensor, texts: list[list[Optional[str]]], side: int, pad: int = 2,
              strip: int = 16) -> torch.Tensor:
    """A `labeled` picture with texts[r][c] written on a white band at the bottom of the cell in row r, column c
    (None: nothing), e.g. what a set-prediction slot predicts for that image."""
    from PIL import ImageDraw, ImageFont

    factor = _factor(side)
    cell, gap = side * factor, pad * factor
    image = to_pil(picture)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    bands = []
    for r, row in enumerate(texts):
        for c, text in enumerate(row):
            if text:
                left, top = gap + c * (cell + gap), strip + gap + r * (cell + gap) + cell - 12
                draw.rectangle((left, top, left + cell - 1, top + 11), fill="white")
                draw.text((left + 2, top), text, fill="black", font=font)
                bands.append((slice(top, top + 12), slice(left, left + cell)))
    drawn, out = from_pil(image), picture.float().cpu().clone()
    for rows, cols in bands:  # the rest keeps its values (a PNG round trip would round them to 1/255)
        out[:, rows, cols] = drawn[:, rows, cols]
    return out


PREDICTION_COLUMNS = ["real", "decoded", "imagined"]


def prediction_grid(real: torch.Tensor, decoded: torch.Tensor, imagined: torch.Tensor, ahead: Sequence[int]
                    ) -> torch.Tensor:
    """The `wm/real_decoded_imagined` picture of train-wm, eval-wm and the agent alike: a row per time step, its real
    frame | that frame's codes decoded | the dynamics' open-loop prediction of it (white where the model was given
    the frame), under a strip naming the columns. Each `t 3 r r` in [0, 1]; `ahead[i]`: how many steps row i is
    after the last frame the model was given, written on its real frame ("given" for 0). Returns `3 H W`."""
    side = real.shape[-1]
    rows = torch.stack([real, decoded, imagined], 1).flatten(0, 1).float().cpu().clamp(0, 1)  # (t 3) 3 r r
    picture = labeled(upscale(tile(rows, nrow=len(PREDICTION_COLUMNS)), side), PREDICTION_COLUMNS, side)
    return annotated(picture, [[f"+{n} steps" if n else "given"] for n in ahead], side)


def video_frame(pictures: torch.Tensor, labels: list[str], scale: int) -> np.ndarray:
    """One video frame: `pictures` (`n 3 r r` in [0, 1]) side by side, upscaled `scale` times (nearest), under a
    strip naming each: `H W 3` uint8."""
    grid = F.interpolate(tile(pictures.float().cpu(), nrow=len(pictures))[None], scale_factor=scale, mode="nearest")[0]
    return to_uint8(labeled(grid, labels, pictures.shape[-1], factor=scale))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """`3 h w` in [0, 1] -> `h w 3` uint8 (a PNG's or a video frame's pixels)."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def to_pil(image: torch.Tensor):
    """`3 h w` in [0, 1] -> a Pillow RGB image."""
    from PIL import Image

    return Image.fromarray(to_uint8(image))


def from_pil(image) -> torch.Tensor:
    """A Pillow RGB image -> `3 h w` float in [0, 1]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def clear_outputs(out) -> None:
    """Remove what an earlier `visualize` left in `out` (either mode: frames, edits, codes, videos, tensorboard
    events, code figures), which could outnumber or mix with this call's files, and say so."""
    stale = [*out.glob("frame_*.png"), *out.glob("edit_*.png"), *out.glob("codes.npy"), *out.glob("*_slots.mp4"),
             *out.glob("*_slots.gif"), *(out / "tb").glob("events.*"), *out.glob("codes_var*.png")]
    for path in stale:
        path.unlink()
    if stale:
        print(f"note: replaced an earlier visualize's pictures in {out}", file=sys.stderr)


def save_png(image: torch.Tensor, path) -> None:
    """`3 h w` in [0, 1] -> PNG file."""
    to_pil(image).save(path)
