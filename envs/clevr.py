"""CLEVR-like scenes: a batched torch ray caster that mimics CLEVR v1.0, and a CLEVR v1.0 loader.

Why: object-centric models trained on generated scenes are evaluated on real CLEVR renders, so the
generator copies CLEVR's scene statistics and look while being cheap enough to make training batches
on the fly (CPU or GPU).

Scene sampling (CPU, one ``torch.Generator`` per call, so a seed gives the same layout on every
device) follows CLEVR's ``render_images.py``:

* 3-10 objects (configurable); shape, size, material, color uniform; rotation uniform in [0, 360)
  degrees about z; x, y uniform in [-3, 3]; every object rests on the ground plane z = 0 (center
  height r, or r / sqrt(2) for a cube, whose half-side is r / sqrt(2)).
* Spacing: ``center distance - r1 - r2 >= 0.25`` with r the size radius (0.35 / 0.7).  For cubes
  this is the circumradius of the footprint (CLEVR uses the half-side), so objects never
  interpenetrate.  CLEVR's margin rule is kept too: along the camera's left and behind directions
  every pair of objects is at least 0.4 apart (so left/right/front/behind are unambiguous).
* Placement is batched: object slots are placed in order, each at the first of
  ``placement_candidates`` random positions that keeps the rules (rejection sampling).  A scene in
  which some object finds no position is restarted with new positions and sizes, as CLEVR does,
  at most ``placement_attempts`` times; after that its unplaceable objects are dropped (measured:
  0.04% of the objects of 1280 scenes with 3-10 objects).
* Visibility: every object needs at least 200 pixels at 480x320 (scaled to the rendered pixel
  count; for crop=True, visible inside the crop) in the pixel-center instance mask.  Objects that
  fail are moved to fresh positions for up to ``visibility_retries`` rounds (only the affected
  scenes are re-cast); objects still hidden are dropped (measured: 0.4% of the objects full frame,
  2.6% with the crop, which mostly thins out 9-10 object scenes; never below ``min_objects``).
  The candidate positions for these rounds are drawn before any rendering, so the random stream
  never depends on pixels; masks still decide, so a borderline pixel differing between CPU and
  GPU can, very rarely, change a layout.
* Camera at (7.48, -6.51, 5.34) with Blender Euler XYZ rotation (63.6, 0.6, 46.7) degrees, 35 mm
  lens on a 32 mm sensor (horizontal FOV 49.1 deg), 3:2 frame; location jittered by +-0.5 per
  coordinate.  Area lights key/back/fill with strengths 100/50/30, jittered by +-1 per coordinate.

Rendering is analytic ray casting in torch, batched over scenes (Python loops only run over object
slots, lights and ray chunks).  Camera rays find the nearest hit among spheres, capped z-cylinders,
z-rotated boxes (slab test in the box frame) and the floor; each slot is only tested on the pixels
of its projected bounding box.  Shading is linear (converted to sRGB at the end, the CLEVR colors
being the albedos' sRGB values): Lambertian rubber with a faint sheen, a Lambertian floor, metal
with a color-tinted mirror bounce (other objects, the floor, a dark sky) plus glossy highlights,
and a sky-dome ambient term.  Soft shadows use an analytic penumbra model in which each occluder is
a vertical capsule (exact for spheres, an approximation for cylinders and cubes), evaluated only
inside a conservative screen box of its shadow.  Every indexed write hits unique indices (or
adds integers), so results are deterministic on GPU as well, also under
``torch.use_deterministic_algorithms(True)``.

The full 3:2 camera frame is rendered straight into the requested H x W grid (what resizing a
480x320 render to H x W would give, aspect squash included), or with ``crop=True`` the Slot
Attention object-discovery window (rows 29:221, cols 64:256 of the frame at 240x320).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write, check_folder
from .errors import DataError, UsageError

SHAPES = ("cube", "sphere", "cylinder")
SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")
COLORS = ("gray", "blue", "brown", "yellow", "red", "green", "purple", "cyan")  # one-hot order
COLOR_RGB = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
MAX_OBJECTS = 10
PROPERTY_DIM = 19  # x, y, z, size(2), material(2), shape(3), color(8), real flag

SIZE_RADIUS = {"small": 0.35, "large": 0.7}
FRAME_W, FRAME_H = 480, 320  # CLEVR v1.0 image size
CLEVR_MIN_PIXELS = 200  # CLEVR's min visible pixels per object at 480x320
MIN_DIST, MARGIN = 0.25, 0.4  # CLEVR placement rules

CAMERA_LOCATION = (7.48, -6.51, 5.34)
CAMERA_EULER_DEG = (63.6, 0.6, 46.7)
TAN_HALF_FOV = 16.0 / 35.0  # half sensor width / focal length
LIGHT_LOCATIONS = ((6.45, -2.91, 4.26), (-1.17, 2.65, 5.82), (-4.67, -4.01, 3.01))  # key, back, fill
LIGHT_STRENGTHS = (100.0, 50.0, 30.0)
# Normalized (u0, u1, v0, v1) frame window of the Slot Attention discovery crop.
CROP_WINDOW = (64 / 320, 256 / 320, 29 / 240, 221 / 240)

# Look (linear radiometry): tuned by eye towards CLEVR renders and their background statistics.
_EXPOSURE = 0.28  # scales the light strengths
_AMBIENT = 0.48  # irradiance from the (unmodelled) world light and inter-reflections
_GROUND_ALBEDO = 0.2
_LIGHT_RADIUS = 0.6  # area-light radius for the penumbra model
_ENV = 0.03  # radiance seen by reflection rays that miss everything
_ENV_BOUNCE = 0.2  # radiance a metal surface reflects when its reflection is not traced
_RUBBER_SHEEN, _RUBBER_SHININESS = 0.06, 12.0
_METAL_DIFFUSE, _METAL_REFLECT, _METAL_GLOSS, _METAL_HIGHLIGHT = 0.08, 1.0, 0.015, 2.5
_CHUNK = 1 << 18  # elements per (rays x objects) tensor: keeps working sets cache-sized on CPU
_CHUNK_GPU = 1 << 24  # the same on GPUs, where per-chunk launches and syncs, not caches, bound the speed
_GROUP_RAYS = 1 << 22  # camera rays per render group (bounds the per-pixel buffers)

_FIX = "download CLEVR or generate scenes with `python run.py generate --out DIR --split SPLIT`"
_LAYOUT_HINT = ("expected CLEVR v1.0 layout root/images/<split>/*.png and "
                "root/scenes/CLEVR_<split>_scenes.json; " + _FIX)


@dataclass(eq=False)
class SceneBatch:
    """A batch of rendered scenes.

    images: b 3 h w float32 in [0, 1]; masks: b h w int64 (0 = background, i+1 = object i);
    targets: b MAX_OBJECTS PROPERTY_DIM float32 (zero rows for absent objects);
    scenes: CLEVR scene dicts, objects in the same order as targets and mask ids (built from the
    compacted `layout` on first access: training batches never need them, and they cost Python
    time per object).
    """

    images: torch.Tensor
    masks: torch.Tensor
    targets: torch.Tensor
    layout: _Layout = field(repr=False)

    @cached_property
    def scenes(self) -> list[dict]:
        """CLEVR scene dicts of the batch (built once, on first access)."""
        return _scene_dicts(self.layout)


# ----------------------------------------------------------------------------------------------
# Camera


def _camera_rotation() -> np.ndarray:
    """Blender Euler XYZ rotation (camera-to-world; camera looks down -z, up is +y)."""
    a, b, c = np.radians(CAMERA_EULER_DEG)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


CAMERA_ROTATION = _camera_rotation()  # 3 3, columns = camera right, up, back in world coordinates


def _plane_directions() -> dict[str, list[float]]:
    """CLEVR's scene 'directions': camera behind/left projected onto the ground, and up."""
    behind, left = -CAMERA_ROTATION[:, 2].copy(), -CAMERA_ROTATION[:, 0].copy()
    behind[2] = left[2] = 0.0
    behind, left = behind / np.linalg.norm(behind), left / np.linalg.norm(left)
    up = np.array([0.0, 0.0, 1.0])
    vecs = {"behind": behind, "front": -behind, "left": left, "right": -left, "above": up, "below": -up}
    return {k: [float(x) for x in v] for k, v in vecs.items()}


DIRECTIONS = _plane_directions()


def project_to_frame(points: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """World points `n 3` -> `n 3` (px, py, depth) in 480x320 pixel units, as CLEVR's pixel_coords
    (before rounding): x right, y down, depth along the view axis."""
    cam = (points - camera) @ CAMERA_ROTATION  # n 3 in camera coordinates
    depth = -cam[:, 2]
    u = 0.5 + cam[:, 0] / depth / (2 * TAN_HALF_FOV)
    v = 0.5 - cam[:, 1] / depth / (2 * TAN_HALF_FOV * FRAME_H / FRAME_W)
    return np.stack([u * FRAME_W, v * FRAME_H, depth], axis=1)


# ----------------------------------------------------------------------------------------------
# Scene layout (sampled on CPU)


@dataclass
class _Layout:
    """Per-slot scene parameters on CPU; slot i is an object iff present[:, i]."""

    present: torch.Tensor  # b n bool
    xy: torch.Tensor  # b n 2
    shape: torch.Tensor  # b n int64 index into SHAPES
    size: torch.Tensor  # b n
    material: torch.Tensor  # b n
    color: torch.Tensor  # b n
    rotation: torch.Tensor  # b n degrees
    camera: torch.Tensor  # b 3
    lights: torch.Tensor  # b 3 3 (key, back, fill)

    def select(self, idx: torch.Tensor) -> "_Layout":
        """The scenes `idx` (copies)."""
        return _Layout(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def compacted(self) -> "_Layout":
        """Present objects moved to the front (order kept); trailing empty slots trimmed."""
        order = torch.argsort((~self.present).to(torch.int8), dim=1, stable=True)
        n = max(1, int(self.present.sum(1).max()))
        fields = {}
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            if f in ("camera", "lights"):
                fields[f] = v
            else:
                idx = order[:, :n].reshape(order.shape[0], n, *([1] * (v.dim() - 2))).expand(-1, -1, *v.shape[2:])
                fields[f] = v.gather(1, idx)
        return _Layout(**fields)

    def radius(self) -> torch.Tensor:
        """Size radius `b n` (0.35 / 0.7): the footprint's circumradius for every shape."""
        return torch.tensor([SIZE_RADIUS[s] for s in SIZES])[self.size]

    def height(self) -> torch.Tensor:
        """Center height `b n` of an object resting on the ground (cube half-side is r / sqrt 2)."""
        r = self.radius()
        return torch.where(self.shape == SHAPES.index("cube"), r / math.sqrt(2.0), r)

    def coords(self) -> torch.Tensor:
        """CLEVR 3d_coords `b n 3` in float64: ground position and center height."""
        return torch.cat([self.xy, self.height()[..., None]], -1).double()


def _place(layout: _Layout, slots: torch.Tensor, candidates: torch.Tensor) -> None:
    """Place the objects marked in `slots` (b n) in slot order, each at its first candidate position
    (`candidates`: b n k 2) that keeps CLEVR's spacing and margin rules against all other present
    objects; objects without such a candidate are marked absent.  Updates `layout` in place.

    Runs in NumPy on views of the layout's CPU tensors, only on the scenes placing each object and
    the slots occupied there: the slot loop runs ~30 times per batch (scene restarts), mostly on a
    few scenes, where torch's per-op overhead dominated.  Same float32 arithmetic as torch's."""
    radius = layout.radius().numpy()  # b n
    xy, present = layout.xy.numpy(), layout.present.numpy()  # views: writes update the layout
    candidates, slots = candidates.numpy(), slots.numpy()
    left, behind = DIRECTIONS["left"], DIRECTIONS["behind"]
    for i in np.flatnonzero(slots.any(0)):
        rows = np.flatnonzero(slots[:, i])  # m: scenes placing object i
        others = present[rows]  # m n
        others[:, i] = False
        cols = np.flatnonzero(others.any(0))  # c: slots holding an object in any of these scenes
        cand = candidates[rows, i]  # m k 2
        near = xy[rows][:, cols]  # m c 2
        dx = cand[:, :, None, 0] - near[:, None, :, 0]  # m k c
        dy = cand[:, :, None, 1] - near[:, None, :, 1]
        gap = np.sqrt(dx * dx + dy * dy) - radius[rows, i, None, None] - radius[rows][:, None, cols]
        ok = ((gap >= MIN_DIST) & (np.abs(dx * left[0] + dy * left[1]) >= MARGIN)
              & (np.abs(dx * behind[0] + dy * behind[1]) >= MARGIN))
        ok = ~(~ok & others[:, None, cols]).any(-1)  # m k
        placed = ok.any(-1)  # m
        xy[rows[placed], i] = cand[placed, ok[placed].argmax(-1)]  # first valid candidate
        present[rows, i] = placed


# ----------------------------------------------------------------------------------------------
# Ray casting.  Rays are flat lists (one entry per ray, with its scene index); object fields are
# gathered per ray, either for one slot (`m`) or for all slots (`m n`), and every kernel below is
# elementwise with broadcasting, so the same code serves both.


class _Scene:
    """Device tensors for a group of scenes: camera `b 3`, lights `b 3 3`, and per-object fields
    (geometry, shadow capsule, material, linear albedo, metal tint) stored flat as `(b n)` columns
    so that a list of (scene, object) pairs is one cheap gather per field."""

    def __init__(self, layout: _Layout, device: torch.device):
        r = layout.radius()
        cube = layout.shape == SHAPES.index("cube")
        sphere = layout.shape == SHAPES.index("sphere")
        half = torch.where(cube, r / math.sqrt(2.0), r)  # half-side / radius, also half-height
        theta = torch.deg2rad(layout.rotation)
        rho = torch.where(cube, 1.15 * half, half)  # shadow capsule radius; its top is the object's top
        rgb = torch.tensor([COLOR_RGB[c] for c in COLORS], dtype=torch.float32) / 255.0
        fields = {
            "cx": layout.xy[..., 0], "cy": layout.xy[..., 1], "cz": half, "cos": torch.cos(theta),
            "sin": torch.sin(theta), "half": half, "foot": r, "rho": rho,
            "z0": torch.where(sphere, half, torch.zeros_like(half)), "z1": torch.where(sphere, half, 2 * half - rho),
            "box": cube, "sphere": sphere, "valid": layout.present,
            "metal": layout.material == MATERIALS.index("metal"),
            "albedo": _srgb_to_linear(rgb)[layout.color],  # b n 3
            "tint": rgb[layout.color],  # b n 3: metal reflectance (brighter than the albedo)
        }
        self.size = layout.present.shape
        self.columns = {k: (v if k in _FLAGS else v.float()).flatten(0, 1).contiguous().to(device)
                        for k, v in fields.items()}  # (b n) or (b n) 3
        self.camera = layout.camera.float().to(device)
        self.lights = layout.lights.float().to(device)

    def field(self, key: str) -> torch.Tensor:
        """One field `b n` for all objects."""
        return self.columns[key].view(*self.size)

    def _gather(self, index: torch.Tensor, keys) -> dict[str, torch.Tensor]:
        """Fields `keys` (shaped like `index`; "albedo", "tint" with a trailing 3) of the objects at
        flat (scene * n + slot) positions `index`."""
        flat = index.flatten()
        return {k: self.columns[k].index_select(0, flat).view(*index.shape, *self.columns[k].shape[1:])
                for k in keys}

    def slot(self, sidx: torch.Tensor, slot, keys) -> dict[str, torch.Tensor]:
        """Fields `keys`, each `m` ("albedo", "tint": `m 3`), of object `slot` (int, or `m` tensor
        with negatives clamped) in scenes `sidx` (m,)."""
        return self._gather(sidx * self.size[1] + (slot if isinstance(slot, int) else slot.clamp_min(0)), keys)

    def rows(self, sidx: torch.Tensor, keys) -> dict[str, torch.Tensor]:
        """Fields `keys`, each `m n`, of all objects of scenes `sidx` (m,)."""
        return self._gather(sidx[:, None] * self.size[1] + torch.arange(self.size[1], device=sidx.device), keys)


_FLAGS = ("box", "sphere", "valid", "metal")
_GEOMETRY = ("cx", "cy", "cz", "cos", "sin", "half", "box", "sphere", "valid")  # for hits and normals
_PROXY = ("cx", "cy", "z0", "z1", "rho", "valid")  # for shadows
_MATERIAL = ("metal", "albedo", "tint")


@dataclass
class _Grid:
    """Sub-pixel ray grid over a normalized frame window (u0, u1, v0, v1); dirs: `h*w 3` world."""

    height: int
    width: int
    window: tuple
    dirs: torch.Tensor

    @classmethod
    def make(cls, height, width, crop, device):
        window = CROP_WINDOW if crop else (0.0, 1.0, 0.0, 1.0)
        u0, u1, v0, v1 = window
        v = v0 + (v1 - v0) * (torch.arange(height, dtype=torch.float64) + 0.5) / height
        u = u0 + (u1 - u0) * (torch.arange(width, dtype=torch.float64) + 0.5) / width
        y = ((1 - 2 * v) * TAN_HALF_FOV * FRAME_H / FRAME_W)[:, None].expand(height, width)
        x = ((2 * u - 1) * TAN_HALF_FOV)[None, :].expand(height, width)
        cam = torch.stack([x, y, -torch.ones_like(x)], -1).reshape(-1, 3)  # p 3, camera frame
        world = cam @ torch.from_numpy(CAMERA_ROTATION).T  # float64 on CPU: equal rays on every device
        return cls(height, width, window, (world / world.norm(dim=-1, keepdim=True)).float().to(device))

    def everything(self, device) -> torch.Tensor:
        """The box `4` covering the whole grid."""
        return torch.tensor([0.0, self.height - 1, 0.0, self.width - 1], device=device)

    def boxes(self, points: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """Grid-index bounding boxes `b ... 4` (row0, row1, col0, col1; inclusive, may lie
        outside the grid) of world points `b ... k 3` seen from cameras `b 3`; the whole grid
        when a point is not in front of the camera (its projection bounds nothing)."""
        shape = points.shape
        rel = points.reshape(shape[0], -1, 3) - camera[:, None]
        cam = rel @ torch.as_tensor(CAMERA_ROTATION, dtype=rel.dtype, device=rel.device)
        depth = -cam[..., 2]
        behind = (depth < 0.05).view(shape[:-1]).any(-1)
        depth = depth.clamp_min(0.05)
        u = 0.5 + cam[..., 0] / depth / (2 * TAN_HALF_FOV)
        v = 0.5 - cam[..., 1] / depth / (2 * TAN_HALF_FOV * FRAME_H / FRAME_W)
        u0, u1, v0, v1 = self.window
        col = ((u - u0) / (u1 - u0) * self.width - 0.5).view(shape[:-1])
        row = ((v - v0) / (v1 - v0) * self.height - 0.5).view(shape[:-1])
        box = torch.stack([row.amin(-1).floor() - 1, row.amax(-1).ceil() + 1,
                           col.amin(-1).floor() - 1, col.amax(-1).ceil() + 1], -1)
        return torch.where(behind[..., None], self.everything(box.device), box)

    def candidates(self, box: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scene indices `m` and flat (scene * pixels + pixel) indices `m` of the grid pixels inside
        boxes `b 4` of active scenes (row-major within each box)."""
        top = box[:, 0].clamp(0, self.height - 1).long()
        left = box[:, 2].clamp(0, self.width - 1).long()
        rows = (box[:, 1].clamp(-1, self.height - 1).long() - top + 1).clamp_min(0)
        cols = (box[:, 3].clamp(-1, self.width - 1).long() - left + 1).clamp_min(0)
        count = torch.where(active, rows * cols, 0)
        sidx = torch.repeat_interleave(torch.arange(len(count), device=box.device), count)
        offset = torch.arange(len(sidx), device=box.device) - (count.cumsum(0) - count).index_select(0, sidx)
        width = cols.index_select(0, sidx)
        row = top.index_select(0, sidx) + offset // width
        col = left.index_select(0, sidx) + offset % width
        return sidx, (sidx * self.height + row) * self.width + col


def _hit_distance(o, d, f):
    """Entry distance of rays (origin o, unit direction d: 3 tensors) into objects f (broadcast);
    inf where missed.  Each object is tested in its own frame (translated, rotated by -theta about
    z) as a z-slab intersected with an xy-slab pair (cube) or a quadric (cylinder x^2 + y^2 = r^2,
    sphere x^2 + y^2 + z^2 = r^2, which lies inside its slab)."""
    c, s, h = f["cos"], f["sin"], f["half"]
    px, py, pz = o[0] - f["cx"], o[1] - f["cy"], o[2] - f["cz"]
    lx, ly = c * px + s * py, c * py - s * px
    ldx, ldy = c * d[0] + s * d[1], c * d[1] - s * d[0]
    dz = d[2]
    inf = torch.tensor(float("inf"), device=dz.device)

    inv = 1.0 / dz
    t0, t1 = (-h - pz) * inv, (h - pz) * inv
    enter, leave = torch.minimum(t0, t1), torch.maximum(t0, t1)

    inv = 1.0 / ldx
    ax0, ax1 = (-h - lx) * inv, (h - lx) * inv
    inv = 1.0 / ldy
    ay0, ay1 = (-h - ly) * inv, (h - ly) * inv
    box_in = torch.maximum(torch.minimum(ax0, ax1), torch.minimum(ay0, ay1))
    box_out = torch.minimum(torch.maximum(ax0, ax1), torch.maximum(ay0, ay1))

    k = f["sphere"].to(dz.dtype)
    qa = (ldx * ldx + ldy * ldy + k * dz * dz).clamp_min(1e-12)
    qb = lx * ldx + ly * ldy + k * pz * dz
    qc = lx * lx + ly * ly + k * pz * pz - h * h
    disc = qb * qb - qa * qc
    root = disc.clamp_min(0).sqrt()
    q_in = torch.where(disc >= 0, (-qb - root) / qa, inf)
    q_out = (-qb + root) / qa

    enter = torch.maximum(enter, torch.where(f["box"], box_in, q_in))
    leave = torch.minimum(leave, torch.where(f["box"], box_out, q_out))
    return torch.where(f["valid"] & (enter < leave) & (enter > 0), enter, inf)


def _occlusion(p, light, f):
    """Occluded fraction of an area light (center `light`: 3 tensors) at points p by occluders f.

    Each occluder is a vertical capsule; the closest approach h between the shadow ray and its axis
    segment is exact, and the occluded fraction is the overlap of the occluder's and the light's discs seen
    from the point: radius rho vs. penumbra radius w = R_light * s (s: fraction of the way to the
    light), giving sharp contact shadows that soften with distance."""
    dx, dy, dz = light[0] - p[0], light[1] - p[1], light[2] - p[2]
    inv_xy2 = 1.0 / (dx * dx + dy * dy).clamp_min(1e-12)
    inv_d2 = 1.0 / (dx * dx + dy * dy + dz * dz)
    qx, qy = f["cx"] - p[0], f["cy"] - p[1]
    s = (qx * dx + qy * dy) * inv_xy2  # ray parameter (0 at p, 1 at the light) closest to the axis line
    cross = qx * dy - qy * dx
    zc = p[2] + s * dz
    ez = zc - torch.minimum(torch.maximum(zc, f["z0"]), f["z1"])  # height beyond the segment there
    h = torch.sqrt(cross * cross * inv_xy2 + ez * ez * (dx * dx + dy * dy) * inv_d2)  # to the segment
    s = s - ez * dz * inv_d2  # parameter of the ray point closest to the segment
    rho = f["rho"]
    w = (_LIGHT_RADIUS * s).clamp_min(1e-4)
    occ = ((rho + w - h) / (2 * torch.minimum(rho, w))).clamp(0, 1) * (rho / w).square().clamp(max=1)
    return torch.where(f["valid"] & (s > 0) & (s < 1), occ, torch.zeros_like(occ))


def _object_normals(p, f):
    """Outward unit normals (3 tensors) at surface points p of objects f."""
    px, py, pz = p[0] - f["cx"], p[1] - f["cy"], p[2] - f["cz"]
    c, s = f["cos"], f["sin"]
    lx, ly = c * px + s * py, c * py - s * px
    ax, ay, az = lx.abs(), ly.abs(), pz.abs()
    zero = torch.zeros_like(lx)
    cap = torch.where(f["box"], az >= torch.maximum(ax, ay), az >= torch.sqrt(lx * lx + ly * ly)) & ~f["sphere"]
    side_x = torch.where(f["box"], torch.where(ax >= ay, torch.sign(lx), zero), lx)
    side_y = torch.where(f["box"], torch.where(ax >= ay, zero, torch.sign(ly)), ly)
    nx = torch.where(cap, zero, side_x)
    ny = torch.where(cap, zero, side_y)
    nz = torch.where(cap, torch.sign(pz), torch.where(f["sphere"], pz, zero))
    nx, ny = c * nx - s * ny, s * nx + c * ny  # back to world
    norm = torch.sqrt(nx * nx + ny * ny + nz * nz).clamp_min(1e-12)
    return nx / norm, ny / norm, nz / norm


def _camera_hits(scene: _Scene, grid: _Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest camera-ray hits: distance `b p` and slot `b p` (-1 = floor).  Each object slot is
    only tested on the pixels of its projected bounding box (one unique index list per slot, so
    the min-updates are deterministic on every device)."""
    b, n = scene.size
    dirs = grid.dirs
    t = torch.full((b * dirs.shape[0],), float("inf"), device=dirs.device)  # flat (b p)
    slot = torch.full_like(t, -1, dtype=torch.long)
    boxes = grid.boxes(_object_corners(scene), scene.camera)  # b n 4
    valid = scene.field("valid")
    for j in range(n):
        sidx, flat = grid.candidates(boxes[:, j], valid[:, j])
        if sidx.numel() == 0:
            continue
        o = scene.camera.index_select(0, sidx).unbind(-1)
        d = dirs.index_select(0, flat - sidx * dirs.shape[0]).unbind(-1)
        tj = _hit_distance(o, d, scene.slot(sidx, j, _GEOMETRY))
        cur = t.index_select(0, flat)
        closer = tj < cur
        t[flat] = torch.where(closer, tj, cur)
        slot[flat] = torch.where(closer, j, slot.index_select(0, flat))
    t, slot = t.view(b, -1), slot.view(b, -1)
    t_floor = torch.where(dirs[:, 2] < 0, -scene.camera[:, 2:3] / dirs[:, 2], float("inf"))  # b p
    slot = torch.where(t < t_floor, slot, -1)
    return torch.minimum(t, t_floor), slot


def _object_corners(scene: _Scene) -> torch.Tensor:
    """World corners `b n 8 3` of each object's axis-aligned bounding box (contains its shadow
    capsule above the floor too)."""
    f = {k: scene.field(k) for k in ("cx", "cy", "foot", "half")}
    sx = torch.tensor([-1.0, 1.0], device=f["cx"].device)
    x = f["cx"][..., None] + f["foot"][..., None] * sx  # b n 2
    y = f["cy"][..., None] + f["foot"][..., None] * sx
    z = torch.stack([torch.zeros_like(f["half"]), 2 * f["half"]], -1)
    b, n = f["cx"].shape
    return torch.stack(torch.broadcast_tensors(x[..., :, None, None], y[..., None, :, None], z[..., None, None, :]),
                       -1).view(b, n, 8, 3)


def _shadow_boxes(scene: _Scene, grid: _Grid, light: int) -> torch.Tensor:
    """Grid boxes `b n 4` bounding where each object can shadow points at heights 0..(tallest top)
    from the light.  The penumbra model only uses light points within _LIGHT_RADIUS of the center,
    so the region lies in the hull of the object's box corners projected from the corners of a
    cube around the light onto the planes z = 0 and z = top (clipped at the camera's near plane)."""
    corners = _object_corners(scene)  # b n 8 3
    signs = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=corners.dtype,
                         device=corners.device)
    lights = scene.lights[:, light, None, :] + _LIGHT_RADIUS * signs  # b 8 3
    q = corners[:, :, :, None, :]  # b n 8 1 3
    src = lights[:, None, None, :, :]  # b 1 1 8 3
    top = torch.where(scene.field("valid"), 2 * scene.field("half"), 0).amax(1)  # b
    planes = torch.stack([torch.zeros_like(top), top], -1)[:, None, None, None, :]  # b 1 1 1 2
    drop = (src[..., 2] - q[..., 2]).unsqueeze(-1)  # b n 8 8 1
    lam = ((src[..., 2:3] - planes) / drop.clamp_min(1e-3)).clamp_min(1.0)  # b n 8 8 2: q + lam (q - src)
    forward = -torch.as_tensor(CAMERA_ROTATION[:, 2], dtype=corners.dtype, device=corners.device)
    cam = scene.camera[:, None, None, None, :]
    depth_src, depth_q = ((src - cam) * forward).sum(-1), ((q - cam) * forward).sum(-1)  # affine along the ray
    slope = (depth_q - depth_src).unsqueeze(-1)
    lam = torch.where(slope < 0, torch.minimum(lam, (0.1 - depth_src.unsqueeze(-1)) / slope.clamp(max=-1e-6)), lam)
    pts = src.unsqueeze(-2) + lam.unsqueeze(-1) * (q - src).unsqueeze(-2)  # b n 8 8 2 3
    b, n = corners.shape[:2]
    boxes = grid.boxes(pts.reshape(b, n, -1, 3), scene.camera)
    # A light corner at or below an object's top: the shadow may reach the horizon, use the grid.
    unbounded = (drop < 0.05).flatten(2).any(-1)
    return torch.where(unbounded[..., None], grid.everything(boxes.device), boxes)


def _shadow_visibility(scene: _Scene, grid: _Grid, p, slot: torch.Tensor, light: int) -> torch.Tensor:
    """Visible fraction `(b p)` (flat) of one light at the camera-ray hit points p (3 x `b p`); occluders are
    only evaluated inside their shadow boxes, never on their own surface."""
    vis = torch.ones_like(p[0]).flatten()
    flat_p, flat_slot = [v.flatten() for v in p], slot.flatten()
    boxes = _shadow_boxes(scene, grid, light)
    valid = scene.field("valid")
    for j in range(scene.size[1]):
        sidx, flat = grid.candidates(boxes[:, j], valid[:, j])
        if sidx.numel() == 0:
            continue
        points = [v.index_select(0, flat) for v in flat_p]
        occ = _occlusion(points, scene.lights[:, light].index_select(0, sidx).unbind(-1), scene.slot(sidx, j, _PROXY))
        occ = torch.where(flat_slot.index_select(0, flat) == j, 0.0, occ)
        vis[flat] = vis.index_select(0, flat) * (1.0 - occ)
    return vis


def _floor_or_object_normals(p, f, on_obj):
    """Normals (3 tensors): the object's where on_obj, else the floor's +z."""
    n = _object_normals(p, f)
    zero = torch.zeros_like(p[0])
    return torch.where(on_obj, n[0], zero), torch.where(on_obj, n[1], zero), torch.where(on_obj, n[2], zero + 1)


def _shade(scene: _Scene, sidx, p, n, view, slot, vis, bounce: bool) -> torch.Tensor:
    """Linear radiance `m 3` leaving points p (normals n, incoming view directions, slot -1 =
    floor) towards the viewer, given per-light visibilities vis (list of `m`).  Floor: Lambert;
    rubber: Lambert plus a faint sheen; metal: a little Lambert plus a color-tinted mirror
    reflection (traced once if `bounce`, else a uniform environment) and glossy highlights."""
    f = scene.slot(sidx, slot, _MATERIAL)
    on_obj = slot >= 0
    metal = on_obj & f["metal"]
    irradiance = _AMBIENT * (0.5 + 0.5 * n[2])  # sky-dome ambient: full on the floor, half on walls
    to_light, power = [], []
    for i, strength in enumerate(LIGHT_STRENGTHS):
        lv = [scene.lights[:, i, j].index_select(0, sidx) - p[j] for j in range(3)]
        dist2 = lv[0] * lv[0] + lv[1] * lv[1] + lv[2] * lv[2]
        inv = torch.rsqrt(dist2)
        to_light.append([v * inv for v in lv])
        power.append(_EXPOSURE * strength / dist2 * vis[i])
        irradiance = irradiance + power[i] * (n[0] * to_light[i][0] + n[1] * to_light[i][1]
                                              + n[2] * to_light[i][2]).clamp_min(0)
    albedo = torch.where(on_obj[:, None], f["albedo"], _GROUND_ALBEDO)  # m 3
    rgb = albedo * (torch.where(metal, _METAL_DIFFUSE, 1.0) * irradiance)[:, None]

    obj = on_obj.nonzero().squeeze(1)  # highlights only exist on objects
    if obj.numel() == 0:
        return rgb
    pick = lambda v: v.index_select(0, obj)  # noqa: E731
    no, vo, is_metal = [pick(v) for v in n], [pick(v) for v in view], pick(metal)
    vn = vo[0] * no[0] + vo[1] * no[1] + vo[2] * no[2]
    refl = [vo[j] - 2 * vn * no[j] for j in range(3)]  # mirror direction
    sheen = torch.zeros_like(vn)
    gloss = torch.zeros_like(vn)
    for lv, pw in zip(to_light, power):
        lv, pw = [pick(v) for v in lv], pick(pw)
        half = [lv[j] - vo[j] for j in range(3)]
        hn = (half[0] * no[0] + half[1] * no[1] + half[2] * no[2]) * torch.rsqrt(
            (half[0] * half[0] + half[1] * half[1] + half[2] * half[2]).clamp_min(1e-12))
        sheen = sheen + pw * hn.clamp_min(0).pow(_RUBBER_SHININESS)
        rl = refl[0] * lv[0] + refl[1] * lv[1] + refl[2] * lv[2]
        gloss = gloss + _METAL_HIGHLIGHT * pw * torch.exp((rl - 1) / _METAL_GLOSS)
    mirror = torch.full((len(obj), 3), _ENV_BOUNCE, device=vn.device)
    if bounce:
        idx = is_metal.nonzero().squeeze(1)
        if idx.numel():
            start = [p[j].index_select(0, obj[idx]) + 1e-4 * no[j][idx] for j in range(3)]
            mirror[idx] = _trace(scene, sidx[obj[idx]], start, [v[idx] for v in refl], exclude=slot[obj[idx]])
    extra = torch.where(is_metal[:, None], _METAL_REFLECT * pick(f["tint"]) * (mirror + gloss[:, None]),
                        _RUBBER_SHEEN * sheen[:, None])
    return rgb.index_add(0, obj, extra)


def _chunk(device: torch.device) -> int:
    """Elements per (rays x objects) working tensor on `device` (results do not depend on it)."""
    return _CHUNK if device.type == "cpu" else _CHUNK_GPU


def _trace(scene: _Scene, sidx, o, d, exclude) -> torch.Tensor:
    """Radiance `m 3` arriving along secondary rays (o, d: 3 x `m`) that leave object `exclude`:
    all objects are tested (no culling, these rays are few), shading has no further bounce."""
    n_slots = scene.size[1]
    slots = torch.arange(n_slots, device=sidx.device)
    chunk = max(1, _chunk(sidx.device) // n_slots)
    out = []
    for c in range(0, sidx.shape[0], chunk):
        s, ex = sidx[c:c + chunk], exclude[c:c + chunk]
        oc, dc = [v[c:c + chunk] for v in o], [v[c:c + chunk] for v in d]
        rows = scene.rows(s, _GEOMETRY + _PROXY[2:5])  # m n
        rows["valid"] = rows["valid"] & (slots != ex[:, None])
        t, slot = _hit_distance([v[:, None] for v in oc], [v[:, None] for v in dc], rows).min(-1)
        t_floor = torch.where(dc[2] < -1e-6, -oc[2] / dc[2], float("inf"))
        slot = torch.where(t < t_floor, slot, -1)
        t = torch.minimum(t, t_floor)
        sky = torch.isinf(t)
        t = torch.where(sky, 0.0, t)
        p = [oc[i] + t * dc[i] for i in range(3)]
        n = _floor_or_object_normals(p, scene.slot(s, slot, _GEOMETRY), slot >= 0)
        p = [p[i] + 1e-4 * n[i] for i in range(3)]
        own = slots == slot[:, None]  # m n: a point is never shadowed by its own object
        pn = [v[:, None] for v in p]
        vis = [(1 - torch.where(own, 0.0, _occlusion(pn, [v[:, None] for v in light.unbind(-1)], rows))).prod(-1)
               for light in scene.lights[s].unbind(1)]
        rgb = _shade(scene, s, p, n, dc, slot, vis, bounce=False)
        out.append(torch.where(sky[:, None], _ENV, rgb))
    return torch.cat(out)


def _render(scene: _Scene, grid: _Grid, shade: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Camera rays over the grid: sRGB colors `b p 3` in [0, 1] (None unless shade) and the hit
    slot `b p` (-1 = floor)."""
    t, slot = _camera_hits(scene, grid)
    if not shade:
        return None, slot
    dirs = grid.dirs  # all point below the horizon in CLEVR's frame, so every ray hits something
    p = [scene.camera[:, i:i + 1] + t * dirs[:, i] for i in range(3)]  # 3 x (b p)
    vis = [_shadow_visibility(scene, grid, p, slot, i) for i in range(len(LIGHT_STRENGTHS))]
    n_pix, flat_slot = dirs.shape[0], slot.flatten()
    flat_p = [v.flatten() for v in p]
    out = []
    chunk = _chunk(dirs.device) // 4
    for c in range(0, flat_slot.shape[0], chunk):
        idx = torch.arange(c, min(c + chunk, flat_slot.shape[0]), device=dirs.device)
        sidx = idx // n_pix
        pc, sc = [v[c:c + chunk] for v in flat_p], flat_slot[c:c + chunk]
        dc = dirs.index_select(0, idx - sidx * n_pix).unbind(-1)
        n = _floor_or_object_normals(pc, scene.slot(sidx, sc, _GEOMETRY), sc >= 0)
        pc = [pc[i] + 1e-4 * n[i] for i in range(3)]
        out.append(_linear_to_srgb(_shade(scene, sidx, pc, n, dc, sc, [v[c:c + chunk] for v in vis], bounce=True)))
    return torch.cat(out).view(*slot.shape, 3), slot


def _srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(1e-8) ** (1 / 2.4) - 0.055)


# ----------------------------------------------------------------------------------------------
# Generator


class SceneGenerator:
    """Batched CLEVR-like scene sampler and renderer (see the module docstring for the rules).

    resolution: (h, w) output size (an int: square); the 3:2 frame (or, with crop=True, the discovery crop window)
    is squashed into it.  supersample: s x s rays per pixel averaged for anti-aliasing (masks come
    from the pixel-center ray).  camera_jitter / light_jitter: CLEVR's per-scene position jitter
    (0 disables it).  placement_candidates / placement_attempts: positions tried per object / scene
    restarts.  visibility_retries: rounds that move hidden objects.  min_visible_pixels: CLEVR's
    threshold at 480x320 (0 disables the visibility check).
    """

    def __init__(self, resolution=(128, 128), min_objects=3, max_objects=10, crop=False, supersample=1,
                 device="cpu", camera_jitter=0.5, light_jitter=1.0, placement_candidates=64,
                 placement_attempts=30, visibility_retries=3, min_visible_pixels=CLEVR_MIN_PIXELS):
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise UsageError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                             f"got {min_objects}, {max_objects}")
        if supersample < 1:
            raise UsageError(f"supersample must be >= 1, got {supersample}")
        if isinstance(resolution, int):  # a square, as data.resolution gives it
            resolution = (resolution, resolution)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.min_objects, self.max_objects = min_objects, max_objects
        self.crop, self.supersample = crop, int(supersample)
        self.device = torch.device(device)
        self.camera_jitter, self.light_jitter = camera_jitter, light_jitter
        self.placement_candidates, self.placement_attempts = placement_candidates, placement_attempts
        self.visibility_retries = visibility_retries
        h, w = self.resolution
        frame_fraction = (CROP_WINDOW[1] - CROP_WINDOW[0]) * (CROP_WINDOW[3] - CROP_WINDOW[2]) if crop else 1.0
        # CLEVR's pixel threshold scaled to this render's pixels per frame area (0: no check).
        scaled = min_visible_pixels * h * w / (FRAME_W * FRAME_H * frame_fraction)
        self.min_pixels = max(1.0, scaled) if min_visible_pixels > 0 else 0.0
        self._center_grid = _Grid.make(h, w, crop, self.device)
        self._grid = _Grid.make(h * self.supersample, w * self.supersample, crop, self.device)

    def generate(self, batch_size: int, seed: int) -> SceneBatch:
        """Sample and render `batch_size` scenes; bit-identical for the same seed and device."""
        if batch_size < 1:
            raise UsageError(f"batch_size must be positive, got {batch_size}")
        gen = torch.Generator().manual_seed(int(seed))
        layout, retry_candidates = self._sample(batch_size, gen)
        self._enforce_visibility(layout, retry_candidates)
        layout = layout.compacted()
        h, w, s = *self.resolution, self.supersample
        images, masks = [], []
        group = max(1, _GROUP_RAYS // (h * w * s * s))  # scenes rendered together: bounds memory
        for start in range(0, batch_size, group):
            scene = _Scene(layout.select(torch.arange(start, min(start + group, batch_size))), self.device)
            rgb, slots = _render(scene, self._grid, shade=True)
            images.append(rgb.view(-1, h, s, w, s, 3).mean((2, 4)).permute(0, 3, 1, 2))
            if s > 1:
                _, slots = _render(scene, self._center_grid, shade=False)
            masks.append((slots + 1).view(-1, h, w))
        return SceneBatch(images=torch.cat(images).contiguous(), masks=torch.cat(masks),
                          targets=_targets(layout).to(self.device), layout=layout)

    def _sample(self, b: int, gen: torch.Generator) -> tuple[_Layout, torch.Tensor]:
        """Random attributes, jittered camera/lights and placement (whole-scene restarts for scenes
        whose objects do not all fit, at most placement_attempts); also the candidate positions for
        visibility retries (`r b n k 2`), drawn before any rendering so that the random stream
        never depends on rendered pixels."""
        n, k = self.max_objects, self.placement_candidates

        def uniform(*shape, scale=1.0):  # uniform in [-scale, scale]
            return torch.rand(*shape, generator=gen).mul_(2).sub_(1).mul_(scale)

        count = torch.randint(self.min_objects, self.max_objects + 1, (b,), generator=gen)
        layout = _Layout(
            present=torch.zeros(b, n, dtype=torch.bool), xy=torch.zeros(b, n, 2),
            shape=torch.randint(0, len(SHAPES), (b, n), generator=gen),
            size=torch.randint(0, len(SIZES), (b, n), generator=gen),
            material=torch.randint(0, len(MATERIALS), (b, n), generator=gen),
            color=torch.randint(0, len(COLORS), (b, n), generator=gen),
            rotation=torch.rand(b, n, generator=gen) * 360.0,
            camera=torch.tensor(CAMERA_LOCATION) + uniform(b, 3, scale=self.camera_jitter),
            lights=torch.tensor(LIGHT_LOCATIONS) + uniform(b, 3, 3, scale=self.light_jitter),
        )
        retry_candidates = uniform(self.visibility_retries, b, n, k, 2, scale=3.0)
        wanted = torch.arange(n)[None, :] < count[:, None]  # b n
        rows = torch.arange(b)
        for attempt in range(self.placement_attempts):  # CLEVR restarts scenes whose objects do not fit
            sub = layout.select(rows)
            sub.present[:] = False
            if attempt:  # a restart redraws the sizes too, as CLEVR's does
                sub.size = torch.randint(0, len(SIZES), (len(rows), n), generator=gen)
            _place(sub, wanted[rows], uniform(len(rows), n, k, 2, scale=3.0))
            layout.xy[rows], layout.present[rows], layout.size[rows] = sub.xy, sub.present, sub.size
            rows = rows[(sub.present != wanted[rows]).any(1)]
            if len(rows) == 0:
                break
        return layout, retry_candidates

    def _visible_pixels(self, layout: _Layout) -> torch.Tensor:
        """Pixels `b n` of each slot in the pixel-center instance mask."""
        _, slots = _render(_Scene(layout, self.device), self._center_grid, shade=False)
        n = layout.present.shape[1]
        ids = slots + 1 + (n + 1) * torch.arange(slots.shape[0], device=self.device)[:, None]  # b p
        counts = torch.zeros(slots.shape[0] * (n + 1), dtype=torch.long, device=self.device)
        counts.scatter_add_(0, ids.flatten(), torch.ones_like(ids.flatten()))
        return counts.view(-1, n + 1)[:, 1:].cpu()

    def _enforce_visibility(self, layout: _Layout, retry_candidates: torch.Tensor) -> None:
        """Move objects with too few visible pixels (bounded rounds, re-casting only the affected
        scenes); objects still hidden afterwards are dropped.  Updates `layout` in place."""
        pixels = self._visible_pixels(layout)
        for candidates in retry_candidates:
            hidden = layout.present & (pixels < self.min_pixels)
            rows = hidden.any(1).nonzero().squeeze(1)
            if rows.numel() == 0:
                return
            sub = layout.select(rows)
            sub.present &= ~hidden[rows]
            _place(sub, hidden[rows], candidates[rows])
            layout.xy[rows], layout.present[rows] = sub.xy, sub.present
            pixels[rows] = self._visible_pixels(sub)
        layout.present &= pixels >= self.min_pixels


def _scene_dicts(layout: _Layout) -> list[dict]:
    """CLEVR scene-JSON dicts (objects, pixel_coords at 480x320, directions, relationships); the
    split is "new" (write_dataset renames images into its split)."""
    coords = layout.coords().numpy()  # b n 3
    fields = {k: getattr(layout, k).tolist() for k in ("present", "rotation", "size", "material", "shape", "color")}
    cameras = layout.camera.double().numpy()  # b 3
    scenes = []
    for b, present in enumerate(fields["present"]):
        idx = [i for i, p in enumerate(present) if p]
        xyz = coords[b, idx]  # m 3
        pix = project_to_frame(xyz, cameras[b])
        objects = [{
            "3d_coords": xyz[j].tolist(),
            "pixel_coords": [int(round(pix[j, 0])), int(round(pix[j, 1])), float(pix[j, 2])],
            "rotation": fields["rotation"][b][i],
            "size": SIZES[fields["size"][b][i]], "material": MATERIALS[fields["material"][b][i]],
            "shape": SHAPES[fields["shape"][b][i]], "color": COLORS[fields["color"][b][i]],
        } for j, i in enumerate(idx)]
        scenes.append({
            "image_index": b, "image_filename": f"CLEVR_new_{b:06d}.png", "split": "new", "objects": objects,
            "directions": {k: list(v) for k, v in DIRECTIONS.items()}, "relationships": _relationships(xyz),
        })
    return scenes


def _relationships(coords: np.ndarray, eps: float = 0.2) -> dict[str, list[list[int]]]:
    """CLEVR relationships: rel[d][i] lists objects j with (c_j - c_i) . d > eps."""
    out = {}
    for name in ("left", "right", "front", "behind"):
        proj = coords @ np.array(DIRECTIONS[name])  # n
        out[name] = [[j for j in range(len(coords)) if j != i and proj[j] - proj[i] > eps]
                     for i in range(len(coords))]
    return out


# ----------------------------------------------------------------------------------------------
# Targets and datasets


def _check_object(obj, where: str) -> None:
    """Raise DataError unless `obj` has the keys and attribute values targets need."""
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a JSON object; fix the scene file to the CLEVR v1.0 scene schema")
    for key in ("3d_coords", "size", "material", "shape", "color"):
        if key not in obj:
            raise DataError(f"{where} lacks required key '{key}'; fix the scene file to the CLEVR v1.0 "
                            f"scene schema or regenerate it with `python run.py generate --out DIR`")
    for key, allowed in (("size", SIZES), ("material", MATERIALS), ("shape", SHAPES), ("color", COLORS)):
        if obj[key] not in allowed:
            raise DataError(f"{where} has unknown {key} {obj[key]!r}; expected one of {', '.join(allowed)} "
                            f"(fix the scene file or regenerate it)")
    c = obj["3d_coords"]
    if not (isinstance(c, (list, tuple)) and len(c) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in c)):
        raise DataError(f"{where} has 3d_coords {c!r}; expected [x, y, z] finite numbers (fix the scene file)")


def scenes_to_targets(scenes: list[dict], max_objects: int = MAX_OBJECTS, source: str = "scenes") -> torch.Tensor:
    """Slot Attention set-prediction targets `b max_objects 19` from CLEVR scene dicts (rows as `_target_rows`).
    Scenes with more than max_objects objects raise DataError (filter them first)."""
    b = len(scenes)
    xyz = np.zeros((b, max_objects, 3), dtype=np.float64)
    attrs = {k: np.zeros((b, max_objects), dtype=np.int64) for k in ("size", "material", "shape", "color")}
    present = np.zeros((b, max_objects), dtype=bool)
    names = {"size": SIZES, "material": MATERIALS, "shape": SHAPES, "color": COLORS}
    for i, scene in enumerate(scenes):
        objects = scene.get("objects") if isinstance(scene, dict) else None
        if not isinstance(objects, list):
            raise DataError(f"{source}: scene {i} lacks an 'objects' list; fix the scene file to the CLEVR "
                            f"v1.0 scene schema or regenerate it with `python run.py generate --out DIR`")
        if len(objects) > max_objects:
            raise DataError(f"{source}: scene {i} has {len(objects)} objects > max_objects={max_objects}; "
                            f"filter such scenes out first (ClevrDataset keeps scenes with <= {MAX_OBJECTS})")
        for j, obj in enumerate(objects):
            _check_object(obj, f"{source}: scene {i} object {j}")
            xyz[i, j] = obj["3d_coords"]
            for k, values in names.items():
                attrs[k][i, j] = values.index(obj[k])
            present[i, j] = True
    return _target_rows(torch.from_numpy(xyz), *(torch.from_numpy(attrs[k]) for k in names),
                        torch.from_numpy(present)).float()


def _target_rows(xyz, size, material, shape, color, present) -> torch.Tensor:
    """Property rows `b n 19` in float64: [(3d coords + 3) / 6 (x, y, z), size, material, shape, color one-hots,
    1], zero rows where not `present`. xyz `b n 3` float64; attribute indices and present `b n`."""
    onehots = [torch.nn.functional.one_hot(v, len(values)).double()
               for v, values in ((size, SIZES), (material, MATERIALS), (shape, SHAPES), (color, COLORS))]
    rows = torch.cat([(xyz + 3.0) / 6.0, *onehots, torch.ones(*present.shape, 1, dtype=torch.float64)], -1)
    return torch.where(present[..., None], rows, 0.0)


def _targets(layout: _Layout) -> torch.Tensor:
    """scenes_to_targets(_scene_dicts(layout)) of a compacted layout (`b MAX_OBJECTS 19`), straight from its
    tensors, without per-object Python."""
    b, n = layout.present.shape
    out = torch.zeros(b, MAX_OBJECTS, PROPERTY_DIM, dtype=torch.float64)
    out[:, :n] = _target_rows(layout.coords(), layout.size, layout.material, layout.shape, layout.color, layout.present)
    return out.float()


def dataset_batch_seed(seed: int, split: str, batch: int) -> int:
    """Generator seed of batch `batch` in write_dataset(seed=seed, split=split); hashed so that
    different splits and seeds never share batches."""
    digest = hashlib.sha256(f"clevr/{seed}/{split}/{batch}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def write_dataset(root, n_images: int, split: str = "train", seed: int = 0, batch_size: int = 64,
                  min_objects: int = 3, max_objects: int = 10, supersample: int = 1, device="cpu",
                  write_masks: bool = True) -> Path:
    """Render `n_images` scenes at 480x320 into the CLEVR v1.0 layout under `root`:
    images/<split>/CLEVR_<split>_%06d.png, scenes/CLEVR_<split>_scenes.json and (extension)
    masks/<split>/CLEVR_<split>_%06d.png holding uint8 instance ids.  Batch k uses seed
    dataset_batch_seed(seed, split, k).  Returns the scenes JSON path. Refuses, before rendering, a split that
    `root` already holds (its scenes file would be replaced and its extra images left behind), and a root that is
    an episode dataset or a run directory."""
    if not re.fullmatch(r"\w[\w.-]*", split):
        raise UsageError(f"--split {split!r}: a split name is letters, digits, '_', '-' or '.' (e.g. train, val)")
    root = check_folder(root, "--out")
    image_dir, mask_dir, scene_dir = root / "images" / split, root / "masks" / split, root / "scenes"
    for mark, what in (("meta.json", "an episode dataset"), ("checkpoints", "a run directory")):
        if (root / mark).exists():
            raise UsageError(f"--out {root} holds {mark}: {what}, not a CLEVR root; choose another --out")
    path = scene_dir / f"CLEVR_{split}_scenes.json"
    if path.exists():
        raise UsageError(f"--out {root} already holds split {split!r} ({path}): pass another --split or --out, or "
                         f"remove that file and images/{split}/ to write it again")
    for d in (image_dir, scene_dir) + ((mask_dir,) if write_masks else ()):
        d.mkdir(parents=True, exist_ok=True)
    gen = SceneGenerator(resolution=(FRAME_H, FRAME_W), min_objects=min_objects, max_objects=max_objects,
                         supersample=supersample, device=device)
    scenes = []
    for k, start in enumerate(range(0, n_images, batch_size)):
        batch = gen.generate(min(batch_size, n_images - start), dataset_batch_seed(seed, split, k))
        images = (batch.images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        masks = batch.masks.to(torch.uint8).cpu().numpy()
        for j, scene in enumerate(batch.scenes):
            index = start + j
            name = f"CLEVR_{split}_{index:06d}.png"
            scene.update(image_index=index, image_filename=name, split=split)
            Image.fromarray(images[j]).save(image_dir / name)
            if write_masks:
                Image.fromarray(masks[j]).save(mask_dir / name)
            scenes.append(scene)
    info = {"split": split, "version": "1.0", "license": "generated", "generator": "envs.clevr", "seed": seed}
    atomic_write(path, lambda f: f.write(json.dumps({"info": info, "scenes": scenes}).encode()))  # last: the split
    return path  # is whole once its scenes file exists


class ClevrDataset(torch.utils.data.Dataset):
    """CLEVR v1.0 (real or written by write_dataset) as Slot Attention inputs and targets.

    Like Slot Attention's preprocessing, only scenes with min_objects to max_objects objects are kept (CLEVR6:
    max_objects=6; never more than MAX_OBJECTS, the targets' rows); images
    are resized whole (bilinear, antialiased; the 3:2 frame is squashed) to `resolution`, or with
    crop=True the discovery crop window is cut first.  Items: image (3 h w float32 in [0, 1]),
    target (MAX_OBJECTS 19 float32) and, when root/masks/<split>/ exists, mask (h w int64, resized
    nearest).  Problems on disk raise DataError with a one-line message naming the fix.
    """

    def __init__(self, root, split="val", resolution=(128, 128), crop=False, max_images=None, min_objects=1,
                 max_objects=MAX_OBJECTS):
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise UsageError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
        root = Path(root)
        self.image_dir = root / "images" / split
        scenes_path = root / "scenes" / f"CLEVR_{split}_scenes.json"
        for what, path in (("root", root), ("images dir", self.image_dir), ("scenes file", scenes_path)):
            if not path.exists():
                raise DataError(f"CLEVR {what} {path} not found: {_LAYOUT_HINT}")
        try:
            data = json.loads(scenes_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON in {scenes_path} at line {e.lineno} col {e.colno}: {e.msg}; "
                            f"re-download the scenes file or regenerate it with `python run.py generate --out DIR`"
                            ) from None
        scenes = data.get("scenes") if isinstance(data, dict) else None
        if not isinstance(scenes, list):
            raise DataError(f"{scenes_path} has no top-level 'scenes' list; expected the CLEVR v1.0 scene "
                            f"schema; {_FIX}")
        for i, scene in enumerate(scenes):
            for key, kind in (("image_filename", str), ("objects", list)):
                if not isinstance(scene, dict) or not isinstance(scene.get(key), kind):
                    raise DataError(f"{scenes_path}: scene {i} lacks required key '{key}' (a {kind.__name__}); "
                                    f"fix the scene file to the CLEVR v1.0 scene schema or regenerate it with "
                                    f"`python run.py generate --out DIR`")
        scenes = [s for s in scenes if min_objects <= len(s["objects"]) <= max_objects][:max_images]
        if not scenes:
            raise DataError(f"{scenes_path} holds no scenes with {min_objects} to {max_objects} objects (data.min_objects, "
                            f"data.max_objects); {_FIX}")
        self.targets = scenes_to_targets(scenes, source=str(scenes_path))
        self.filenames = [s["image_filename"] for s in scenes]
        mask_dir = root / "masks" / split
        self.mask_dir = mask_dir if mask_dir.is_dir() else None
        if isinstance(resolution, int):  # a square, as data.resolution gives it
            resolution = (resolution, resolution)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        u0, u1, v0, v1 = CROP_WINDOW if crop else (0.0, 1.0, 0.0, 1.0)
        self.box = (u0 * FRAME_W, v0 * FRAME_H, u1 * FRAME_W, v1 * FRAME_H)

    def __len__(self) -> int:
        return len(self.filenames)

    def _load(self, path: Path, what: str) -> Image.Image:
        """Open a 480x320 PNG or raise DataError naming the file."""
        if not path.is_file():
            raise DataError(f"CLEVR {what} {path} not found: {_LAYOUT_HINT}")
        try:
            with Image.open(path) as img:
                if img.size != (FRAME_W, FRAME_H):
                    raise DataError(f"{path} is {img.size[0]}x{img.size[1]} but CLEVR v1.0 {what}s are "
                                    f"{FRAME_W}x{FRAME_H}; use the original files or regenerate them with "
                                    f"`python run.py generate --out DIR`")
                img.load()
        except (OSError, SyntaxError) as e:  # PIL: truncated or unidentifiable image data
            raise DataError(f"CLEVR {what} {path} is damaged ({str(e).splitlines()[0]}); {_FIX}") from None
        return img

    def __getitem__(self, i: int) -> dict:
        h, w = self.resolution
        img = self._load(self.image_dir / self.filenames[i], "image").convert("RGB")
        img = img.resize((w, h), Image.Resampling.BILINEAR, box=self.box)
        item = {"image": torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1),
                "target": self.targets[i]}
        if self.mask_dir is not None:
            mask = self._load(self.mask_dir / self.filenames[i], "mask")
            mask = mask.resize((w, h), Image.Resampling.NEAREST, box=self.box)
            item["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        return item
