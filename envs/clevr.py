"""CLEVR-like scenes: a batched torch ray caster that mimics CLEVR v1.0, and a CLEVR v1.0 loader.

Why: object-centric models trained on generated scenes are evaluated on real CLEVR renders, so the
generator copies CLEVR's scene statistics and look while being cheap enough to make training batches
on the fly (CPU or GPU).

Scene sampling (CPU, one ``torch.Generator`` per call, so a seed gives the same layout on every
device) follows CLEVR's ``render_images.py``:

* 3-10 objects (configurable); shape, size, material, color uniform; rotation uniform in [0, 360)
  degrees about z; x, y uniform in [-3, 3]; every object rests on the ground plane z = 0 at center
  height r, the size radius (0.35 / 0.7): a sphere's or cylinder's radius and a cube's half-side.
  (CLEVR's script means to shrink cubes by sqrt(2), but tests its shape name against "Cube" where
  the name is "SmoothCube_v2", so real CLEVR cubes have half-side r: its large cubes sit at z 0.7.)
* Spacing: ``center distance - r1 - r2 >= 0.25``, as CLEVR, so a cube's corners (at r * sqrt(2)) can
  cut slightly into a neighbour, as they do in CLEVR.  CLEVR's
  margin rule is kept too: along the camera's left and behind directions every pair of objects is at
  least 0.4 apart (so left/right/front/behind are unambiguous).
* Placement is batched: object slots are placed in order, each at the first of
  ``placement_candidates`` random positions that keeps the rules (rejection sampling).  A scene in
  which some object finds no position is restarted with new positions and sizes, as CLEVR does,
  at most ``placement_attempts`` times (0.04% of the objects of 1280 scenes with 3-10 objects found
  none after that; their scenes go to the whole-scene restarts below).
* Visibility: every object needs at least 200 pixels at 480x320 (scaled to the rendered pixel
  count; for crop=True, visible inside the crop) in the pixel-center instance mask.  Objects that
  fail are moved to fresh positions for up to ``visibility_retries`` rounds (only the affected
  scenes are re-cast).  A scene with an object still hidden, or one that found no position, is
  then restarted whole with the object count drawn for it, as CLEVR restarts it, at most
  ``placement_attempts`` times (after that its missing objects stay dropped), so the counts stay
  uniform over min_objects..max_objects; dropping the objects had thinned out the crowded scenes
  (71 of 1280 scenes with 3-10 objects and the crop had 10).  ``.ci/scene-restarts.py`` over 1280
  scenes at 64x64: 58 whole-scene restarts with 3-10 objects full frame, 258 with the crop, 1563
  with 10 objects and the crop; no scene was left short.
  The candidate positions for the retry rounds are drawn before any rendering, and each restart
  draws from a generator of its own scene and attempt; masks still decide which scenes restart, so
  a borderline pixel differing between CPU and GPU can, very rarely, change that scene's layout,
  and only its.
* Camera at (7.48, -6.51, 5.34), jittered by +-0.5 per coordinate, aimed at the world origin with
  no roll (CLEVR's camera tracks the origin, so the jitter turns it as well as moving it), 35 mm
  lens on a 32 mm sensor (horizontal FOV 49.1 deg), 3:2 frame.
  Area lights key/back/fill with strengths 100/50/30, jittered by +-1 per coordinate.

The renderer (analytic ray casting in torch, batched over scenes) is `envs.clevr_render`.
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

from . import clevr_masks
from .atomic import atomic_write, check_clevr_out
from .clevr_render import (CAMERA_LOCATION, CROP_WINDOW, FRAME_H, FRAME_W, LIGHT_LOCATIONS, Grid,
                           Scene, camera_rotation, crop_window, project_to_frame, render, srgb_to_linear)
from .clevr_layout import ATTRIBUTES, COLORS, MATERIALS, MAX_OBJECTS, PROPERTY_DIM, SHAPES, SIZES
from .errors import DataError, UsageError

COLOR_RGB = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}

SIZE_RADIUS = {"small": 0.35, "large": 0.7}
CLEVR_MIN_PIXELS = 200  # CLEVR's min visible pixels per object at 480x320
MIN_DIST, MARGIN = 0.25, 0.4  # CLEVR placement rules
_GROUP_RAYS = 1 << 22  # camera rays per render group (bounds the per-pixel buffers)

FRAME_SAMPLE = 8  # images (and masks) whose frame a dataset checks when opened, evenly spaced over its list
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


def _plane_directions() -> dict[str, list[float]]:
    """CLEVR's scene 'directions': camera behind/left projected onto the ground, and up. CLEVR's are the same in every
    scene, its unjittered camera's (they are taken before the jitter turns the camera)."""
    rotation = camera_rotation(torch.tensor(CAMERA_LOCATION, dtype=torch.float64)).numpy()
    behind, left = -rotation[:, 2].copy(), -rotation[:, 0].copy()
    behind[2] = left[2] = 0.0
    behind, left = behind / np.linalg.norm(behind), left / np.linalg.norm(left)
    up = np.array([0.0, 0.0, 1.0])
    vecs = {"behind": behind, "front": -behind, "left": left, "right": -left, "above": up, "below": -up}
    return {k: [float(x) for x in v] for k, v in vecs.items()}


DIRECTIONS = _plane_directions()


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

    def put(self, idx: torch.Tensor, scenes: "_Layout") -> None:
        """Replace the scenes `idx` by `scenes`."""
        for f in self.__dataclass_fields__:
            getattr(self, f)[idx] = getattr(scenes, f)

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
        """Size radius `b n` (0.35 / 0.7): a sphere's or cylinder's radius, a cube's half-side."""
        return torch.tensor([SIZE_RADIUS[s] for s in SIZES])[self.size]

    def height(self) -> torch.Tensor:
        """Center height `b n` of an object resting on the ground: its size radius, for every shape."""
        return self.radius()

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


def _scene(layout: _Layout, device: torch.device) -> Scene:
    """The renderer's view of a layout: each object's geometry, shadow capsule and material."""
    r = layout.radius()
    cube = layout.shape == SHAPES.index("cube")
    sphere = layout.shape == SHAPES.index("sphere")
    half = r  # half-side / radius, also half-height
    theta = torch.deg2rad(layout.rotation)
    rho = torch.where(cube, 1.15 * half, half)  # shadow capsule radius; its top is the object's top
    rgb = torch.tensor([COLOR_RGB[c] for c in COLORS], dtype=torch.float32) / 255.0
    fields = {
        "cx": layout.xy[..., 0], "cy": layout.xy[..., 1], "cz": half, "cos": torch.cos(theta),
        "sin": torch.sin(theta), "half": half, "foot": torch.where(cube, half * math.sqrt(2.0), half), "rho": rho,
        "z0": torch.where(sphere, half, torch.zeros_like(half)), "z1": torch.where(sphere, half, 2 * half - rho),
        "box": cube, "sphere": sphere, "valid": layout.present,
        "metal": layout.material == MATERIALS.index("metal"),
        "albedo": srgb_to_linear(rgb)[layout.color],  # b n 3
        "tint": rgb[layout.color],  # b n 3: metal reflectance (brighter than the albedo)
    }
    return Scene(fields, layout.camera, layout.lights, device)


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
        self._center_grid = Grid.make(h, w, crop, self.device)
        self._grid = Grid.make(h * self.supersample, w * self.supersample, crop, self.device)

    def generate(self, batch_size: int, seed: int) -> SceneBatch:
        """Sample and render `batch_size` scenes; bit-identical for the same seed and device."""
        if batch_size < 1:
            raise UsageError(f"batch_size must be positive, got {batch_size}")
        gen = torch.Generator().manual_seed(int(seed))
        count = torch.randint(self.min_objects, self.max_objects + 1, (batch_size,), generator=gen)
        layout, retry_candidates = self._sample(count, gen)
        self._enforce_visibility(layout, retry_candidates)
        rows = (layout.present.sum(1) < count).nonzero().squeeze(1)
        for attempt in range(self.placement_attempts):  # CLEVR restarts a scene that lost an object, keeping its count
            if rows.numel() == 0:
                break
            layout.put(rows, self._restarted(count, rows, int(seed), attempt))
            rows = rows[layout.present[rows].sum(1) < count[rows]]
        layout = layout.compacted()
        h, w, s = *self.resolution, self.supersample
        images, masks = [], []
        group = max(1, _GROUP_RAYS // (h * w * s * s))  # scenes rendered together: bounds memory
        for start in range(0, batch_size, group):
            scene = _scene(layout.select(torch.arange(start, min(start + group, batch_size))), self.device)
            rgb, slots = render(scene, self._grid, shade=True)
            images.append(rgb.view(-1, h, s, w, s, 3).mean((2, 4)).permute(0, 3, 1, 2))
            if s > 1:
                _, slots = render(scene, self._center_grid, shade=False)
            masks.append((slots + 1).view(-1, h, w))
        return SceneBatch(images=torch.cat(images).contiguous(), masks=torch.cat(masks),
                          targets=_targets(layout).to(self.device), layout=layout)

    def _restarted(self, count: torch.Tensor, rows: torch.Tensor, seed: int, attempt: int) -> _Layout:
        """New layouts of the scenes `rows` (`count[rows]` objects each), placed and checked for visibility
        together, each drawn from a generator of its own (seed, scene, attempt): which scenes restart
        depends on rendered pixels, and must not change what the others draw."""
        parts = [self._sample(count[r:r + 1], torch.Generator().manual_seed(int(np.random.SeedSequence(
            [seed % 2**64, r, attempt]).generate_state(1)[0]))) for r in rows.tolist()]
        layout = _Layout(*(torch.cat([getattr(p[0], f) for p in parts]) for f in _Layout.__dataclass_fields__))
        self._enforce_visibility(layout, torch.cat([p[1] for p in parts], 1))
        return layout

    def _sample(self, count: torch.Tensor, gen: torch.Generator) -> tuple[_Layout, torch.Tensor]:
        """Random attributes, jittered camera/lights and placement of `count` (`b`) objects per scene
        (restarts for scenes whose objects do not all fit, at most placement_attempts); also the
        candidate positions for visibility retries (`r b n k 2`), drawn before any rendering so that
        a scene's random stream never depends on rendered pixels."""
        b, n, k = len(count), self.max_objects, self.placement_candidates

        def uniform(*shape, scale=1.0):  # uniform in [-scale, scale]
            return torch.rand(*shape, generator=gen).mul_(2).sub_(1).mul_(scale)

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
        _, slots = render(_scene(layout, self.device), self._center_grid, shade=False)
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


def _check_object(obj, where: str, named: bool = True) -> None:
    """Raise DataError unless `obj` has the keys and attribute values targets need (`named`: the attributes too)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a JSON object; fix the scene file to the CLEVR v1.0 scene schema")
    for key in ("3d_coords", "size", "material", "shape", "color")[:None if named else 1]:
        if key not in obj:
            raise DataError(f"{where} lacks required key '{key}'; fix the scene file to the CLEVR v1.0 "
                            f"scene schema or regenerate it with `python run.py generate --out DIR`")
    for key, allowed in ATTRIBUTES.items() if named else ():
        if obj[key] not in allowed:
            raise DataError(f"{where} has unknown {key} {obj[key]!r}; expected one of {', '.join(allowed)} "
                            f"(fix the scene file or regenerate it)")
    c = obj["3d_coords"]
    if not (isinstance(c, (list, tuple)) and len(c) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in c)):
        raise DataError(f"{where} has 3d_coords {c!r}; expected [x, y, z] finite numbers (fix the scene file)")


def scenes_to_targets(scenes: list[dict], max_objects: int = MAX_OBJECTS, source: str = "scenes",
                      named: bool = True) -> torch.Tensor:
    """Slot Attention set-prediction targets `b max_objects 19` from CLEVR scene dicts (rows as `_target_rows`).
    Scenes with more than max_objects objects raise DataError (filter them first). `named=False`: scenes whose
    objects have no attribute names (CLEVR with masks) get rows of coordinates and objectness, zero one-hots."""
    b = len(scenes)
    xyz = np.zeros((b, max_objects, 3), dtype=np.float64)
    attrs = {k: np.zeros((b, max_objects), dtype=np.int64) for k in ATTRIBUTES}
    present = np.zeros((b, max_objects), dtype=bool)
    for i, scene in enumerate(scenes):
        objects = scene.get("objects") if isinstance(scene, dict) else None
        if not isinstance(objects, list):
            raise DataError(f"{source}: scene {i} lacks an 'objects' list; fix the scene file to the CLEVR "
                            f"v1.0 scene schema or regenerate it with `python run.py generate --out DIR`")
        if len(objects) > max_objects:
            raise DataError(f"{source}: scene {i} has {len(objects)} objects > max_objects={max_objects}; "
                            f"filter such scenes out first (ClevrDataset keeps scenes with <= {MAX_OBJECTS})")
        for j, obj in enumerate(objects):
            _check_object(obj, f"{source}: scene {i} object {j}", named)
            xyz[i, j] = obj["3d_coords"]
            for k, values in ATTRIBUTES.items() if named else ():
                attrs[k][i, j] = values.index(obj[k])
            present[i, j] = True
    rows = _target_rows(torch.from_numpy(xyz), {k: torch.from_numpy(v) for k, v in attrs.items()},
                        torch.from_numpy(present))
    if not named:
        rows[..., 3:-1] = 0.0  # no attribute is known: the zero codes' one-hots are not its value
    return rows.float()


def _target_rows(xyz: torch.Tensor, attrs: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
    """Property rows `b n 19` in float64, as ATTRIBUTE_SLICES lays them out: [(3d coords + 3) / 6 (x, y, z), the
    attributes' one-hots, 1], zero rows where not `present`. xyz `b n 3` float64; attrs {name: indices `b n`}."""
    onehots = [torch.nn.functional.one_hot(attrs[name], len(values)).double() for name, values in ATTRIBUTES.items()]
    rows = torch.cat([(xyz + 3.0) / 6.0, *onehots, torch.ones(*present.shape, 1, dtype=torch.float64)], -1)
    return torch.where(present[..., None], rows, 0.0)


def _targets(layout: _Layout) -> torch.Tensor:
    """scenes_to_targets(_scene_dicts(layout)) of a compacted layout (`b MAX_OBJECTS 19`), straight from its
    tensors, without per-object Python."""
    b, n = layout.present.shape
    out = torch.zeros(b, MAX_OBJECTS, PROPERTY_DIM, dtype=torch.float64)
    out[:, :n] = _target_rows(layout.coords(), {k: getattr(layout, k) for k in ATTRIBUTES}, layout.present)
    return out.float()


def dataset_batch_seed(seed: int, split: str, batch: int) -> int:
    """Generator seed of batch `batch` in write_dataset(seed=seed, split=split); hashed so that
    different splits and seeds never share batches."""
    digest = hashlib.sha256(f"clevr/{seed}/{split}/{batch}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def write_dataset(root, n_images: int, split: str = "train", seed: int = 0, batch_size: int = 64,
                  min_objects: int = 3, max_objects: int = 10, supersample: int = 1, device="cpu",
                  write_masks: bool = True, progress: bool = False) -> Path:
    """Render `n_images` scenes at 480x320 into the CLEVR v1.0 layout under `root`:
    images/<split>/CLEVR_<split>_%06d.png, scenes/CLEVR_<split>_scenes.json and (extension)
    masks/<split>/CLEVR_<split>_%06d.png holding uint8 instance ids.  Batch k uses seed
    dataset_batch_seed(seed, split, k).  Returns the scenes JSON path. Refuses, before rendering, a split that
    `root` already holds (its scenes file would be replaced and its extra images left behind), and a root that is
    an episode dataset or a run directory. `progress`: a progress bar over the scenes (it moves a batch at a time)."""
    from tqdm import tqdm

    if not re.fullmatch(r"\w[\w.-]*", split):
        raise UsageError(f"--split {split!r}: a split name is letters, digits, '_', '-' or '.' (e.g. train, val)")
    root = check_clevr_out(root)
    image_dir, mask_dir, scene_dir = root / "images" / split, root / "masks" / split, root / "scenes"
    path = scene_dir / f"CLEVR_{split}_scenes.json"
    if path.exists():
        raise UsageError(f"--out {root} already holds split {split!r} ({path}): pass another --split or --out, or "
                         f"remove that file and images/{split}/ to write it again")
    for d in (image_dir, scene_dir) + ((mask_dir,) if write_masks else ()):
        d.mkdir(parents=True, exist_ok=True)
    gen = SceneGenerator(resolution=(FRAME_H, FRAME_W), min_objects=min_objects, max_objects=max_objects,
                         supersample=supersample, device=device)
    scenes = []
    bar = tqdm(total=n_images, desc=f"generate {split}", unit="scene", disable=not progress, dynamic_ncols=True)
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
        bar.update(len(batch.scenes))
    bar.close()
    info = {"split": split, "version": "1.0", "license": "generated", "generator": "envs.clevr", "seed": seed,
            "batch_size": batch_size, "device": str(gen.device)}  # with the seed, what gives these scenes again
    atomic_write(path, lambda f: f.write(json.dumps({"info": info, "scenes": scenes}).encode()))  # last: the split
    return path  # is whole once its scenes file exists


def _root_hint(root: Path, split: str) -> str:
    """What a CLEVR root that lacks `split` most likely is instead, as advice; "" when nothing fits."""
    if root.is_file() and root.suffix == ".json" and root.parent.name == "scenes":
        return f"{root} is a scenes file; the CLEVR root is {root.parent.parent} (pass that folder)"
    if root.is_file():
        return f"{root} is a file, not a folder (a zip? unpack it and pass its CLEVR_v1.0 folder)"
    if (root / "meta.json").is_file():
        return (f"{root} is an episode dataset of `run.py collect`, not a CLEVR root: pretrain on its frames with "
                f"`run.py pretrain --data {root}`")
    if (root / "CLEVR_v1.0" / "images").is_dir():
        return f"the CLEVR root is {root / 'CLEVR_v1.0'} (pass that folder)"
    if root.name in ("images", "scenes") and (root.parent / "images").is_dir():
        return f"the CLEVR root is {root.parent}, the folder that holds images/ and scenes/ (pass that folder)"
    if root.parent.name == "images" and (root.parent.parent / "scenes").is_dir():
        other = ("; CLEVR v1.0's test split ships no scenes file: evaluate on val" if root.name == "test" else
                 f"; its split {root.name}: --split {root.name}, or data.split={root.name}" if root.name != split
                 else "")
        return (f"{root} is the images folder of split {root.name}; the CLEVR root is {root.parent.parent} (pass "
                f"that folder){other}")
    if split == "test" and (root / "images" / "test").is_dir():
        return "CLEVR v1.0's test split ships no scenes file (no object labels): evaluate on val"
    if (root / "images" / split).is_dir() and (root / "scenes").is_dir():  # the scenes file is what is missing
        found = sorted(p.name for p in (root / "scenes").glob("*.json"))
        return (f"{root}/scenes holds {', '.join(found) if found else 'no JSON file'}; CLEVR v1.0 names a split's "
                f"scenes CLEVR_{split}_scenes.json")
    if (root / "images").is_dir() and any((root / "images").glob("*.png")):
        return (f"{root}/images holds the PNGs themselves; CLEVR v1.0 keeps each split's in images/<split>/ "
                f"(e.g. images/{split}/)")
    try:
        splits = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
    except OSError:  # a folder that cannot be listed: no hint
        splits = []
    if splits and split not in splits:
        return f"{root}/images holds the split{'s' * (len(splits) > 1)} {', '.join(splits)}, not {split}"
    return ""


def check_layout(root: Path, split: str) -> tuple[Path, Path]:
    """A CLEVR v1.0 split's images folder and scenes file, or a one-line DataError saying what is missing and,
    where it can tell, which folder was meant."""
    image_dir, scenes_path = root / "images" / split, root / "scenes" / f"CLEVR_{split}_scenes.json"
    for what, path in (("root", root), ("images dir", image_dir), ("scenes file", scenes_path)):
        if not path.exists() or (what == "root" and not path.is_dir()):
            raise DataError(f"CLEVR {what} {path} not found: {_root_hint(root, split) or _LAYOUT_HINT}")
    return image_dir, scenes_path


class ClevrDataset(torch.utils.data.Dataset):
    """CLEVR v1.0 (real or written by write_dataset) as Slot Attention inputs and targets.

    Like Slot Attention's preprocessing, only scenes with min_objects to max_objects objects are kept (CLEVR6:
    max_objects=6; never more than MAX_OBJECTS, the targets' rows); images
    are resized whole (bilinear, antialiased; the 3:2 frame is squashed) to `resolution`, or with
    crop=True the discovery crop window is cut first.  Items: image (3 h w float32 in [0, 1]),
    target (MAX_OBJECTS 19 float32) and, when root/masks/<split>/ exists, mask (h w int64, resized
    nearest).  Problems on disk raise DataError with a one-line message naming the fix. A root converted from CLEVR
    with masks (`envs.clevr_masks`: 320x240 frames, attributes as codes) reads alike; its targets hold coordinates
    and objectness only (`named` is False).
    """

    def __init__(self, root, split="val", resolution=(128, 128), crop=False, max_images=None, min_objects=1,
                 max_objects=MAX_OBJECTS):
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise UsageError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
        root = Path(root)
        self.image_dir, scenes_path = check_layout(root, split)
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
        counts = [len(s["objects"]) for s in scenes]
        scenes = [s for s in scenes if min_objects <= len(s["objects"]) <= max_objects][:max_images]
        if not scenes:
            held = f"its {len(counts)} scenes have {min(counts)} to {max(counts)}" if counts else "it holds no scenes"
            raise DataError(f"{scenes_path} holds no scenes with {min_objects} to {max_objects} objects (data.min_objects, "
                            f"data.max_objects); {held}" + ("" if not counts else
                                                            ": set data.min_objects and data.max_objects to meet them"))
        info = data.get("info") if isinstance(data.get("info"), dict) else {}
        converted = info.get("source") == clevr_masks.SOURCE  # 320x240 frames, attribute codes of unknown meaning
        self.named = not converted
        self.frame, self.frame_name, self.frame_fix = (
            ((clevr_masks.WIDTH, clevr_masks.HEIGHT), "CLEVR with masks' 4:3 frame", "convert-clevr-masks --tfrecords F")
            if converted else ((FRAME_W, FRAME_H), "CLEVR v1.0's 3:2 frame", "generate"))
        self.targets = scenes_to_targets(scenes, source=str(scenes_path), named=self.named)
        self.filenames = [s["image_filename"] for s in scenes]
        mask_dir = root / "masks" / split
        self.mask_dir = mask_dir if mask_dir.is_dir() else None
        for what, folder in (("images", self.image_dir), ("masks", self.mask_dir)):  # now, not mid-run
            if folder is not None:
                present = {p.name for p in folder.iterdir()}
                missing = [f for f in self.filenames if f not in present]
                if missing:
                    raise DataError(f"{len(missing)} of the {len(self.filenames)} {what} that {scenes_path.name} lists "
                                    f"are not in {folder} (the first: {missing[0]}); {self._restore('them')}")
        if isinstance(resolution, int):  # a square, as data.resolution gives it
            resolution = (resolution, resolution)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.window = crop_window(*self.frame) if crop else (0.0, 1.0, 0.0, 1.0)  # u0 u1 v0 v1, of the frame
        # a folder written at another size is refused now, not mid-run: a few frames' headers read
        for i in np.unique(np.linspace(0, len(self.filenames) - 1, FRAME_SAMPLE).round().astype(int)):
            self._load(self.image_dir / self.filenames[i], "image", decode=False)
            if self.mask_dir is not None:
                self._load(self.mask_dir / self.filenames[i], "mask", decode=False)

    def __len__(self) -> int:
        return len(self.filenames)

    def _load(self, path: Path, what: str, decode: bool = True) -> Image.Image:
        """Open a PNG of CLEVR's 3:2 frame (480x320, or a resized copy) or raise DataError naming the file;
        `decode=False` reads its header only (the frame check on opening)."""
        if not path.is_file():
            raise DataError(f"CLEVR {what} {path} not found: {_LAYOUT_HINT}")
        try:
            with Image.open(path) as img:
                (w, h) = self.frame
                if img.size[0] * h != img.size[1] * w:
                    raise DataError(f"{path} is {img.size[0]}x{img.size[1]}, not {self.frame_name} ({w}x{h}); use "
                                    f"the original files or write them again with `python run.py {self.frame_fix} "
                                    "--out DIR`")
                if what == "mask" and img.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(f"CLEVR mask {path} is a {img.mode} image, not a map of object ids (one channel, "
                                    f"as the converter writes them); {self._restore('it')}")
                if decode:
                    img.load()
        except (OSError, SyntaxError) as e:  # PIL: truncated or unidentifiable image data
            raise DataError(f"CLEVR {what} {path} is damaged ({str(e).splitlines()[0]}); {self._restore('it')}"
                            ) from None
        return img

    def _restore(self, them: str) -> str:
        """The way out of a root whose files are damaged or missing."""
        return (f"restore {them} from the dataset's original files (a root `python run.py {self.frame_fix.split()[0]}` "
                f"wrote: write it again, `python run.py {self.frame_fix} --out DIR`)")

    def _box(self, img: Image.Image) -> tuple[float, float, float, float]:
        """The crop window in `img`'s pixels."""
        u0, u1, v0, v1 = self.window
        return (u0 * img.size[0], v0 * img.size[1], u1 * img.size[0], v1 * img.size[1])

    def __getitem__(self, i: int) -> dict:
        h, w = self.resolution
        img = self._load(self.image_dir / self.filenames[i], "image").convert("RGB")
        img = img.resize((w, h), Image.Resampling.BILINEAR, box=self._box(img))
        item = {"image": torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1),
                "target": self.targets[i]}
        if self.mask_dir is not None:
            mask = self._load(self.mask_dir / self.filenames[i], "mask")
            mask = mask.resize((w, h), Image.Resampling.NEAREST, box=self._box(mask))
            item["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        return item
