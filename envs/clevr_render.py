"""The ray caster behind `envs.clevr`'s CLEVR-like scenes: CLEVR's camera, lights and frame, and the renderer.

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
Attention object-discovery window (`crop_window`: the view of rows 29:221, cols 64:256 of CLEVR with masks'
320x240 frames).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FRAME_W, FRAME_H = 480, 320  # CLEVR v1.0 image size
CAMERA_LOCATION = (7.48, -6.51, 5.34)  # before the jitter
TAN_HALF_FOV = 16.0 / 35.0  # half sensor width / focal length
LIGHT_LOCATIONS = ((6.45, -2.91, 4.26), (-1.17, 2.65, 5.82), (-4.67, -4.01, 3.01))  # key, back, fill
LIGHT_STRENGTHS = (100.0, 50.0, 30.0)


def crop_window(width: int, height: int) -> tuple[float, float, float, float]:
    """(u0, u1, v0, v1): the fractions of a width x height frame that show what the Slot Attention CLEVR6 crop (rows
    29:221, columns 64:256) shows of CLEVR with masks' 320x240 frames. CLEVR's camera fixes the horizontal field of
    view, so the columns are the same fractions at any aspect, and the rows are fixed by their view angle: on CLEVR
    v1.0's shorter 3:2 frame they are rows 47:623 of 640, not 29/240..221/240 (which would stretch the crop 12.5%
    vertically)."""
    def v(row: int) -> float:  # the 320x240 frame's row `row` as a fraction of this frame's height
        return (1 - (1 - 2 * row / 240) * (240 / 320) / (height / width)) / 2
    return 64 / 320, 256 / 320, v(29), v(221)


CROP_WINDOW = crop_window(FRAME_W, FRAME_H)  # the discovery crop of the rendered (CLEVR v1.0) frame

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


def camera_rotation(camera: torch.Tensor) -> torch.Tensor:
    """Camera-to-world rotations `... 3 3` (columns: right, up, back; the camera looks down its -back) of cameras at
    `... 3`, each aimed at the world origin with no roll, as CLEVR's camera is (it tracks the origin, so the jitter
    turns it too): with its location the only unknown, this model gives CLEVR_val_000000's five pixel_coords to
    their rounding and their depths to 1e-6 (`tests/test_clevr.py::test_the_camera_reproduces_a_clevr_scene`)."""
    back = camera / camera.norm(dim=-1, keepdim=True)
    up = torch.zeros_like(back)
    up[..., 2] = 1.0
    right = torch.linalg.cross(up, back)
    right = right / right.norm(dim=-1, keepdim=True)
    return torch.stack([right, torch.linalg.cross(back, right), back], -1)


def project_to_frame(points: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """World points `n 3` -> `n 3` (px, py, depth) in 480x320 pixel units, as CLEVR's pixel_coords
    (before rounding), seen from a camera at `camera` (`3`): x right, y down, depth along the view axis."""
    cam = (points - camera) @ camera_rotation(torch.as_tensor(camera, dtype=torch.float64)).numpy()  # n 3
    depth = -cam[:, 2]
    u = 0.5 + cam[:, 0] / depth / (2 * TAN_HALF_FOV)
    v = 0.5 - cam[:, 1] / depth / (2 * TAN_HALF_FOV * FRAME_H / FRAME_W)
    return np.stack([u * FRAME_W, v * FRAME_H, depth], axis=1)


# Rays are flat lists (one entry per ray, with its scene index); object fields are gathered per ray, either for one
# slot (`m`) or for all slots (`m n`), and every kernel below is elementwise with broadcasting, so the same code
# serves both.


class Scene:
    """Device tensors for a group of scenes: camera `b 3`, lights `b 3 3`, and per-object fields
    (geometry, shadow capsule, material, linear albedo, metal tint) stored flat as `(b n)` columns
    so that a list of (scene, object) pairs is one cheap gather per field."""

    def __init__(self, fields: dict[str, torch.Tensor], camera: torch.Tensor, lights: torch.Tensor,
                 device: torch.device):
        """fields: per-object `b n` (or `b n 3`) tensors: geometry (cx, cy, cz, cos, sin, half, foot), shadow
        capsule (rho, z0, z1), flags (box, sphere, valid, metal), linear albedo and metal tint."""
        self.size = fields["valid"].shape
        self.columns = {k: (v if k in _FLAGS else v.float()).flatten(0, 1).contiguous().to(device)
                        for k, v in fields.items()}  # (b n) or (b n) 3
        self.camera = camera.float().to(device)
        self.rotation = camera_rotation(camera.double()).float().to(device)  # b 3 3, made on the CPU
        self.lights = lights.float().to(device)

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
class Grid:
    """Sub-pixel ray grid over a normalized frame window (u0, u1, v0, v1); dirs: `h*w 3` in the camera's frame
    (`rays` turns them into each scene's world directions)."""

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
        return cls(height, width, window, (cam / cam.norm(dim=-1, keepdim=True)).float().to(device))

    def rays(self, scene: "Scene") -> torch.Tensor:
        """Unit world directions `b p 3` of the grid's rays from each scene's camera. Elementwise float32 ops only
        (no matmul, no reduction), each rounded alike everywhere: equal rays on every device."""
        x, y, z = (v[None, :, None] for v in self.dirs.unbind(-1))  # 1 p 1
        r = scene.rotation[:, None]  # b 1 3 3
        world = x * r[..., 0] + y * r[..., 1] + z * r[..., 2]  # b p 3
        return world / torch.sqrt(world[..., 0:1] ** 2 + world[..., 1:2] ** 2 + world[..., 2:3] ** 2)

    def everything(self, device) -> torch.Tensor:
        """The box `4` covering the whole grid."""
        return torch.tensor([0.0, self.height - 1, 0.0, self.width - 1], device=device)

    def boxes(self, points: torch.Tensor, scene: "Scene") -> torch.Tensor:
        """Grid-index bounding boxes `b ... 4` (row0, row1, col0, col1; inclusive, may lie
        outside the grid) of world points `b ... k 3` seen from the scenes' cameras; the whole grid
        when a point is not in front of the camera (its projection bounds nothing)."""
        shape = points.shape
        rel = points.reshape(shape[0], -1, 3) - scene.camera[:, None]
        cam = rel @ scene.rotation
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


def _camera_hits(scene: Scene, grid: Grid, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hits of the camera rays `dirs` (`b p 3`): distance `b p` and slot `b p` (-1 = floor).  Each object
    slot is only tested on the pixels of its projected bounding box (one unique index list per slot, so
    the min-updates are deterministic on every device)."""
    b, n = scene.size
    flat_dirs = dirs.flatten(0, 1)  # (b p) 3
    t = torch.full((len(flat_dirs),), float("inf"), device=dirs.device)
    slot = torch.full_like(t, -1, dtype=torch.long)
    boxes = grid.boxes(_object_corners(scene), scene)  # b n 4
    valid = scene.field("valid")
    for j in range(n):
        sidx, flat = grid.candidates(boxes[:, j], valid[:, j])
        if sidx.numel() == 0:
            continue
        o = scene.camera.index_select(0, sidx).unbind(-1)
        d = flat_dirs.index_select(0, flat).unbind(-1)
        tj = _hit_distance(o, d, scene.slot(sidx, j, _GEOMETRY))
        cur = t.index_select(0, flat)
        closer = tj < cur
        t[flat] = torch.where(closer, tj, cur)
        slot[flat] = torch.where(closer, j, slot.index_select(0, flat))
    t, slot = t.view(b, -1), slot.view(b, -1)
    t_floor = torch.where(dirs[..., 2] < 0, -scene.camera[:, 2:3] / dirs[..., 2], float("inf"))  # b p
    slot = torch.where(t < t_floor, slot, -1)
    return torch.minimum(t, t_floor), slot


def _object_corners(scene: Scene) -> torch.Tensor:
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


def _shadow_boxes(scene: Scene, grid: Grid, light: int) -> torch.Tensor:
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
    forward = -scene.rotation[:, None, None, None, :, 2]  # b 1 1 1 3
    cam = scene.camera[:, None, None, None, :]
    depth_src, depth_q = ((src - cam) * forward).sum(-1), ((q - cam) * forward).sum(-1)  # affine along the ray
    slope = (depth_q - depth_src).unsqueeze(-1)
    lam = torch.where(slope < 0, torch.minimum(lam, (0.1 - depth_src.unsqueeze(-1)) / slope.clamp(max=-1e-6)), lam)
    pts = src.unsqueeze(-2) + lam.unsqueeze(-1) * (q - src).unsqueeze(-2)  # b n 8 8 2 3
    b, n = corners.shape[:2]
    boxes = grid.boxes(pts.reshape(b, n, -1, 3), scene)
    # A light corner at or below an object's top: the shadow may reach the horizon, use the grid.
    unbounded = (drop < 0.05).flatten(2).any(-1)
    return torch.where(unbounded[..., None], grid.everything(boxes.device), boxes)


def _shadow_visibility(scene: Scene, grid: Grid, p, slot: torch.Tensor, light: int) -> torch.Tensor:
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


def _shade(scene: Scene, sidx, p, n, view, slot, vis, bounce: bool) -> torch.Tensor:
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


def _trace(scene: Scene, sidx, o, d, exclude) -> torch.Tensor:
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


def render(scene: Scene, grid: Grid, shade: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Camera rays over the grid: sRGB colors `b p 3` in [0, 1] (None unless shade) and the hit
    slot `b p` (-1 = floor)."""
    dirs = grid.rays(scene)  # b p 3; all point below the horizon in CLEVR's frame, so every ray hits something
    t, slot = _camera_hits(scene, grid, dirs)
    if not shade:
        return None, slot
    p = [scene.camera[:, i:i + 1] + t * dirs[..., i] for i in range(3)]  # 3 x (b p)
    vis = [_shadow_visibility(scene, grid, p, slot, i) for i in range(len(LIGHT_STRENGTHS))]
    flat_dirs, flat_slot = dirs.flatten(0, 1), slot.flatten()
    flat_p = [v.flatten() for v in p]
    out = []
    chunk = _chunk(dirs.device) // 4
    for c in range(0, flat_slot.shape[0], chunk):
        sidx = torch.arange(c, min(c + chunk, flat_slot.shape[0]), device=dirs.device) // dirs.shape[1]
        pc, sc, dc = [v[c:c + chunk] for v in flat_p], flat_slot[c:c + chunk], flat_dirs[c:c + chunk].unbind(-1)
        n = _floor_or_object_normals(pc, scene.slot(sidx, sc, _GEOMETRY), sc >= 0)
        pc = [pc[i] + 1e-4 * n[i] for i in range(3)]
        out.append(linear_to_srgb(_shade(scene, sidx, pc, n, dc, sc, [v[c:c + chunk] for v in vis], bounce=True)))
    return torch.cat(out).view(*slot.shape, 3), slot


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(1e-8) ** (1 / 2.4) - 0.055)
