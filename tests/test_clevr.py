"""Tests for envs.clevr: the CLEVR-like generator (layout rules, look, camera) and the CLEVR loader."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import envs.clevr as clevr
import envs.clevr_render as clevr_render
from envs.clevr import (
    CAMERA_LOCATION, COLOR_RGB, COLORS, DIRECTIONS, MATERIALS, MAX_OBJECTS, PROPERTY_DIM, SHAPES, SIZE_RADIUS,
    SIZES, ClevrDataset, DataError, SceneGenerator, project_to_frame, scenes_to_targets, write_dataset,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Render single-threaded: the renderer issues many mid-sized ops, and intra-op threads turn
    those into scheduler waits when the CPU is shared with other jobs (seconds -> minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch():
    """A 48x48 batch shared by the layout and look tests."""
    return SceneGenerator(resolution=(48, 48)).generate(24, seed=7)


def test_determinism():
    gen = SceneGenerator(resolution=(32, 32))
    a, b, c = gen.generate(4, seed=3), gen.generate(4, seed=3), gen.generate(4, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.targets, b.targets)
    assert a.scenes == b.scenes
    assert not torch.equal(a.images, c.images) and not torch.equal(a.targets, c.targets)


def test_output_format(batch):
    b = len(batch.scenes)
    assert batch.images.shape == (b, 3, 48, 48) and batch.images.dtype == torch.float32
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert batch.masks.shape == (b, 48, 48) and batch.masks.dtype == torch.int64
    assert batch.targets.shape == (b, MAX_OBJECTS, PROPERTY_DIM) and batch.targets.dtype == torch.float32
    torch.testing.assert_close(batch.targets, scenes_to_targets(batch.scenes), rtol=0, atol=0)


@pytest.mark.parametrize("seed, objects", [(0, (3, 10)), (1, (1, 4)), (2, (8, 10)), (3, (5, 5))])
def test_targets_equal_scene_dict_targets(seed, objects):
    """Targets are built from the layout tensors, scene dicts only on first access; both agree exactly."""
    out = SceneGenerator(resolution=(16, 16), min_objects=objects[0], max_objects=objects[1]).generate(12, seed=seed)
    assert "scenes" not in vars(out)  # not built by generate
    assert torch.equal(out.targets, scenes_to_targets(out.scenes))
    assert out.scenes is out.scenes  # built once


@pytest.mark.parametrize("objects", [(3, 10), (10, 10)])
def test_a_scene_that_loses_an_object_restarts_with_its_count(objects):
    """A scene whose object stays hidden (crowded under the crop) restarts whole, as CLEVR's does, with the count
    drawn for it (generate's first draw): no scene ends with fewer objects, so the counts stay uniform."""
    batch = SceneGenerator(resolution=(32, 32), crop=True, min_objects=objects[0],
                           max_objects=objects[1]).generate(24, seed=5)
    drawn = torch.randint(objects[0], objects[1] + 1, (24,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(batch.targets[:, :, -1].sum(1).long(), drawn)


def test_one_more_restart_leaves_every_other_scene_as_it_was(monkeypatch):
    """Which scenes restart depends on rendered pixels, where a borderline one may differ on another device: one more
    restart (scene 0 forced to lose an object) leaves every other scene, restarted ones included, as it was."""
    gen = SceneGenerator(resolution=(32, 32), crop=True)
    restarted = []
    restart = SceneGenerator._restarted
    monkeypatch.setattr(SceneGenerator, "_restarted", lambda self, count, rows, seed, attempt: restarted.append(
        rows.tolist()) or restart(self, count, rows, seed, attempt))
    plain = gen.generate(24, seed=5)
    assert {r for rows in restarted for r in rows} - {0}  # other scenes restart too
    enforce, calls = SceneGenerator._enforce_visibility, []

    def lose_one(self, layout, candidates):  # the first pass: scene 0 loses its last object
        enforce(self, layout, candidates)
        if not calls:
            layout.present[0, layout.present[0].nonzero().max()] = False
        calls.append(1)

    monkeypatch.setattr(SceneGenerator, "_enforce_visibility", lose_one)
    forced = gen.generate(24, seed=5)
    assert torch.equal(forced.images[1:], plain.images[1:]) and torch.equal(forced.masks[1:], plain.masks[1:])


def test_layout_rules(batch):
    gen_min_pixels = SceneGenerator(resolution=(48, 48)).min_pixels
    for i, scene in enumerate(batch.scenes):
        objects = scene["objects"]
        assert 3 <= len(objects) <= 10
        assert scene["image_filename"].startswith("CLEVR_") and scene["image_index"] == i
        for obj in objects:
            assert obj["shape"] in SHAPES and obj["size"] in SIZES and obj["material"] in MATERIALS
            assert obj["color"] in COLORS and 0 <= obj["rotation"] < 360
            x, y, z = obj["3d_coords"]
            r = SIZE_RADIUS[obj["size"]]
            assert -3 <= x <= 3 and -3 <= y <= 3
            assert z == pytest.approx(r)  # resting on the floor, a cube as CLEVR's: half-side r (z 0.7 when large)
        for j, a in enumerate(objects):
            for b in objects[j + 1:]:
                (xa, ya, _), (xb, yb, _) = a["3d_coords"], b["3d_coords"]
                gap = math.hypot(xa - xb, ya - yb) - SIZE_RADIUS[a["size"]] - SIZE_RADIUS[b["size"]]
                assert gap >= 0.25
                for axis in ("left", "behind"):  # CLEVR's margin rule
                    d = DIRECTIONS[axis]
                    assert abs((xa - xb) * d[0] + (ya - yb) * d[1]) >= 0.4
        # mask ids: exactly the objects of the scene, each visible, consistent with the targets
        ids, counts = batch.masks[i].unique(return_counts=True)
        visible = dict(zip(ids.tolist(), counts.tolist()))
        assert set(visible) - {0} == set(range(1, len(objects) + 1))
        assert all(visible[k] >= gen_min_pixels for k in range(1, len(objects) + 1))
        assert batch.targets[i, :, -1].sum() == len(objects)
        assert torch.all(batch.targets[i, len(objects):] == 0)


def test_scene_json_fields(batch):
    scene = batch.scenes[0]
    json.dumps(scene)  # serializable
    assert set(scene["directions"]) == {"behind", "front", "left", "right", "above", "below"}
    for v in scene["directions"].values():
        assert np.linalg.norm(v) == pytest.approx(1.0)
    assert abs(np.dot(DIRECTIONS["left"], DIRECTIONS["behind"])) < 1e-12  # the camera does not roll
    # CLEVR's own (every scene of CLEVR v1.0 has these), from a camera at (7.48, -6.51) rounded to 2 decimals
    np.testing.assert_allclose(DIRECTIONS["behind"], [-0.754490315914154, 0.6563112735748291, 0.0], atol=3e-4)
    np.testing.assert_allclose(DIRECTIONS["left"], [-0.6563112735748291, -0.7544902563095093, 0.0], atol=3e-4)
    assert DIRECTIONS["above"] == [0.0, 0.0, 1.0]
    for obj in scene["objects"]:
        px, py, depth = obj["pixel_coords"]
        assert isinstance(px, int) and isinstance(py, int) and depth > 0
    assert set(scene["relationships"]) == {"left", "right", "front", "behind"}


def _chromaticity(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / rgb.sum()


def test_rubber_colors_match_clevr_palette(batch):
    palette = {c: _chromaticity(COLOR_RGB[c]) for c in COLORS}
    checked = 0
    for i, scene in enumerate(batch.scenes):
        for j, obj in enumerate(scene["objects"]):
            mask = batch.masks[i] == j + 1
            if obj["material"] != "rubber" or mask.sum() < 10:
                continue
            mean = batch.images[i][:, mask].mean(1).numpy()
            nearest = min(palette, key=lambda c: np.abs(_chromaticity(mean) - palette[c]).sum())
            assert nearest == obj["color"], (obj, mean)
            checked += 1
    assert checked >= 20


def test_metal_looks_different_from_rubber(batch):
    """Metal shows highlights and reflections: higher intensity spread inside its mask."""
    spread = {"metal": [], "rubber": []}
    for i, scene in enumerate(batch.scenes):
        intensity = batch.images[i].mean(0)
        for j, obj in enumerate(scene["objects"]):
            values = intensity[batch.masks[i] == j + 1]
            if values.numel() >= 20:
                spread[obj["material"]].append(float(values.std() / values.mean()))
    assert len(spread["metal"]) >= 10 and len(spread["rubber"]) >= 10
    assert np.median(spread["metal"]) > 1.2 * np.median(spread["rubber"])


def test_camera_projection_and_pixel_coords():
    center = project_to_frame(np.zeros((1, 3)), np.array(CAMERA_LOCATION))[0]
    assert abs(center[0] - 240) < 40 and abs(center[1] - 160) < 40 and center[2] > 0
    gen = SceneGenerator(resolution=(64, 96), min_objects=1, max_objects=1, camera_jitter=0, light_jitter=0)
    out = gen.generate(6, seed=1)
    for i, scene in enumerate(out.scenes):
        px, py, _ = scene["objects"][0]["pixel_coords"]
        unjittered = project_to_frame(np.array([scene["objects"][0]["3d_coords"]]), np.array(CAMERA_LOCATION))[0]
        assert (px, py) == (round(unjittered[0]), round(unjittered[1]))
        row, col = min(int(py * 64 / 320), 63), min(int(px * 96 / 480), 95)
        assert out.masks[i, row, col] == 1  # the object's center projects onto its own mask
        rows, cols = (out.masks[i] == 1).nonzero(as_tuple=True)
        centroid = ((cols.double().mean() + 0.5) * 480 / 96, (rows.double().mean() + 0.5) * 320 / 64)
        assert math.hypot(centroid[0] - px, centroid[1] - py) < 25


def test_the_camera_reproduces_a_clevr_scene():
    """CLEVR_val_000000's five objects (3d_coords -> pixel_coords at 480x320, and depth): the camera aimed at the
    origin from a location fitted within CLEVR's jitter gives every pixel to its rounding and every depth to 1e-5.
    A camera that keeps one rotation whatever its jitter (the Euler angles this generator used before) misses by
    pixels at any location."""
    from scipy.optimize import least_squares

    coords = np.array([[-1.4937210083007812, -1.9936031103134155, 0.699999988079071],
                       [1.555708646774292, -2.104736566543579, 0.699999988079071],
                       [-2.342184543609619, -0.5205014944076538, 0.3499999940395355],
                       [-0.8073106408119202, 1.914123773574829, 0.699999988079071],
                       [2.6763813495635986, 0.03453871235251427, 0.3499999940395355]])
    pixels = np.array([[119, 131, 10.801968574523926], [198, 190, 8.60103988647461], [161, 118, 12.372727394104004],
                       [282, 100, 12.495001792907715], [337, 195, 9.161211967468262]])
    fit = least_squares(lambda at: ((project_to_frame(coords, at) - pixels) / [0.5, 0.5, 1e-5]).ravel(),
                        np.array(CAMERA_LOCATION))
    assert np.abs(fit.x - CAMERA_LOCATION).max() <= 0.5  # within the jitter
    error = np.abs(project_to_frame(coords, fit.x) - pixels)
    assert error[:, :2].max() <= 0.5 and error[:, 2].max() < 1e-5

    def fixed_rotation(points, at):  # Blender Euler XYZ (63.6, 0.6, 46.7) degrees, as before
        a, b, c = np.radians([63.6, 0.6, 46.7])
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        cam = (points - at) @ (rz @ ry @ rx)
        return np.stack([(0.5 + cam[:, 0] / -cam[:, 2] / (32 / 35)) * 480,
                         (0.5 - cam[:, 1] / -cam[:, 2] / (32 / 35 * 320 / 480)) * 320, -cam[:, 2]], 1)

    old = least_squares(lambda at: ((fixed_rotation(coords, at) - pixels) / [0.5, 0.5, 1e-5]).ravel(),
                        np.array(CAMERA_LOCATION))
    assert np.abs(fixed_rotation(coords, old.x) - pixels)[:, :2].max() > 5


def test_crop_is_the_clevr6_view_of_the_frame():
    """The discovery crop shows what Slot Attention's CLEVR6 crop (rows 29:221, columns 64:256 of CLEVR with masks'
    320x240 frames) shows: those pixels of a 4:3 frame; of CLEVR v1.0's shorter 3:2 frame, the rows at the same view
    angles (47:623 of 640). Same layout (visibility check off): the 192x192 crop render is every third pixel of
    rows 47:623, columns 192:768 of the frame rendered at 960x640, pixel centre on pixel centre."""
    crop_window = clevr_render.crop_window
    assert crop_window(320, 240) == pytest.approx((0.2, 0.8, 29 / 240, 221 / 240), abs=1e-12)
    assert crop_window(480, 320) == pytest.approx((0.2, 0.8, 47 / 640, 623 / 640), abs=1e-12)
    kw = dict(min_visible_pixels=0, min_objects=4, max_objects=6)
    full = SceneGenerator(resolution=(640, 960), **kw).generate(1, seed=5)
    crop = SceneGenerator(resolution=(192, 192), crop=True, **kw).generate(1, seed=5)
    assert full.scenes == crop.scenes
    window = full.images[:, :, 48:623:3, 193:768:3]
    assert (window - crop.images).abs().max() < 1e-3
    assert (full.masks[:, 48:623:3, 193:768:3] == crop.masks).float().mean() > 0.999


def test_supersampling_keeps_center_masks():
    plain = SceneGenerator(resolution=(32, 32)).generate(3, seed=2)
    smooth = SceneGenerator(resolution=(32, 32), supersample=2).generate(3, seed=2)
    assert torch.equal(plain.masks, smooth.masks)
    assert (plain.images - smooth.images).abs().mean() < 0.02


def test_culled_shadows_match_brute_force(monkeypatch):
    """Shadow tiles are conservative: evaluating every occluder on every pixel changes nothing."""
    gen = SceneGenerator(resolution=(40, 60))
    culled = gen.generate(4, seed=11).images
    everywhere = torch.tensor([-1.0, 1e4, -1.0, 1e4])
    monkeypatch.setattr(clevr_render, "_shadow_boxes", lambda scene, grid, light: everywhere.expand(*scene.size, 4))
    assert torch.equal(culled, gen.generate(4, seed=11).images)


def test_write_dataset_round_trip(tmp_path, monkeypatch):
    generated = []  # the batches write_dataset renders
    original = SceneGenerator.generate
    monkeypatch.setattr(SceneGenerator, "generate", lambda self, *a: generated.append(original(self, *a)) or
                        generated[-1])
    path = write_dataset(tmp_path, 4, split="val", seed=0, batch_size=4)
    assert path == tmp_path / "scenes" / "CLEVR_val_scenes.json"
    assert len(generated) == 1 and generated[0].images.shape == (4, 3, 320, 480)
    png = Image.open(tmp_path / "images" / "val" / "CLEVR_val_000003.png")
    assert png.size == (480, 320)
    written = torch.from_numpy(np.asarray(png, dtype=np.float32) / 255).permute(2, 0, 1)
    assert (written - generated[0].images[3]).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantized
    written = json.loads(path.read_text())
    scenes = written["scenes"]
    assert [s["image_filename"] for s in scenes] == [f"CLEVR_val_{i:06d}.png" for i in range(4)]
    assert {k: written["info"][k] for k in ("seed", "batch_size", "device")} == {"seed": 0, "batch_size": 4,
                                                                                 "device": "cpu"}  # to write it again

    ds = ClevrDataset(tmp_path, split="val", resolution=(32, 32))
    assert len(ds) == 4
    torch.testing.assert_close(torch.stack([ds[i]["target"] for i in range(4)]), generated[0].targets)
    item = ds[2]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert int(item["mask"].max()) <= int(item["target"][:, -1].sum())
    crop = ClevrDataset(tmp_path, split="val", resolution=(16, 16), crop=True, max_images=2)
    assert len(crop) == 2 and crop[1]["image"].shape == (3, 16, 16) and crop[1]["mask"].shape == (16, 16)
    before = path.read_bytes()  # refused before rendering: a split written again, a bad name, another kind of folder
    with pytest.raises(ValueError, match="already holds split 'val'"):
        write_dataset(tmp_path, 1, split="val")
    with pytest.raises(ValueError, match="a split name is letters"):
        write_dataset(tmp_path, 1, split="a/b")
    (tmp_path / "episodes").mkdir()
    (tmp_path / "episodes" / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is an episode dataset \(meta.json, episodes/\), not a CLEVR root"):
        write_dataset(tmp_path / "episodes", 1)
    assert path.read_bytes() == before and len(generated) == 1 and not (tmp_path / "images" / "a").exists()


# ------------------------------------------------------------------------------------------------
# DataError cases: one line, naming the fix


def _fake_clevr(root, scenes=None, size=(480, 320)):
    """A minimal CLEVR v1.0 tree with one image."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "scenes").mkdir()
    Image.new("RGBA", size, (128, 128, 128, 255)).save(root / "images" / "val" / "CLEVR_val_000000.png")
    obj = {"3d_coords": [0.5, -1.0, 0.35], "pixel_coords": [240, 160, 10.0], "rotation": 12.0,
           "size": "small", "material": "metal", "shape": "sphere", "color": "red"}
    scenes = scenes if scenes is not None else [{"image_index": 0, "image_filename": "CLEVR_val_000000.png",
                                                  "split": "val", "objects": [obj]}]
    (root / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"info": {}, "scenes": scenes}))
    return obj


def _error(root, **kwargs):
    with pytest.raises(DataError) as info:
        ds = ClevrDataset(root, split="val", **kwargs)
        ds[0]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_loader_reads_real_layout(tmp_path):
    obj = _fake_clevr(tmp_path)
    ds = ClevrDataset(tmp_path, split="val", resolution=(20, 30))
    item = ds[0]
    assert set(item) == {"image", "target"}  # no masks dir: no mask
    assert item["image"].shape == (3, 20, 30) and torch.allclose(item["image"], torch.tensor(128 / 255))
    row = item["target"][0]
    assert row[:3].tolist() == pytest.approx([(v + 3) / 6 for v in obj["3d_coords"]])
    assert row[-1] == 1 and item["target"][1:].abs().sum() == 0
    onehots = row[3:-1]
    assert onehots.sum() == 4 and onehots[SIZES.index("small")] == 1
    assert onehots[2 + MATERIALS.index("metal")] == 1 and onehots[4 + SHAPES.index("sphere")] == 1
    assert onehots[7 + COLORS.index("red")] == 1


def test_loader_filters_crowded_scenes(tmp_path):
    obj = _fake_clevr(tmp_path)
    scenes = [{"image_filename": "CLEVR_val_000000.png", "objects": [obj] * 11},
              {"image_filename": "CLEVR_val_000000.png", "objects": [obj] * 10}]
    (tmp_path / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"scenes": scenes}))
    ds = ClevrDataset(tmp_path, split="val")
    assert len(ds) == 1 and ds.targets[0, :, -1].sum() == 10
    with pytest.raises(DataError, match="max_objects"):
        scenes_to_targets(scenes)
    scenes += [{"image_filename": "CLEVR_val_000000.png", "objects": [obj] * n} for n in (3, 6, 7, 2)]
    (tmp_path / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"scenes": scenes}))
    clevr6 = ClevrDataset(tmp_path, split="val", min_objects=3, max_objects=6)  # the paper's CLEVR6
    assert clevr6.targets[:, :, -1].sum(1).tolist() == [3, 6] and clevr6.targets.shape[1] == 10
    assert "no scenes with 8 to 9 objects (data.min_objects, data.max_objects)" in _error(tmp_path, min_objects=8,
                                                                                          max_objects=9)


def test_missing_paths(tmp_path):
    hint = "root/images/<split>/*.png and root/scenes/CLEVR_<split>_scenes.json"
    message = _error(tmp_path / "nope")
    assert "not found" in message and hint in message and "python run.py generate --out DIR" in message
    (tmp_path / "scenes").mkdir()
    assert "images dir" in _error(tmp_path) and hint in _error(tmp_path)
    (tmp_path / "images" / "val").mkdir(parents=True)
    assert "scenes file" in _error(tmp_path) and (f"{tmp_path}/scenes holds no JSON file; CLEVR v1.0 names a split's "
                                                  "scenes CLEVR_val_scenes.json") in _error(tmp_path)


def test_the_usual_wrong_roots_are_answered_with_the_right_one(tmp_path):
    """The folder above CLEVR_v1.0, its images/ folder, a split it lacks, and the test split (no scenes)."""
    _fake_clevr(tmp_path / "CLEVR_v1.0")
    (tmp_path / "CLEVR_v1.0" / "images" / "test").mkdir()
    root = tmp_path / "CLEVR_v1.0"
    assert f"the CLEVR root is {root} (pass that folder)" in _error(tmp_path)
    assert f"the CLEVR root is {root}, the folder that holds images/ and scenes/" in _error(root / "images")
    with pytest.raises(DataError, match=r"images holds the splits test, val, not Val"):
        ClevrDataset(root, split="Val")
    with pytest.raises(DataError, match="test split ships no scenes file .*: evaluate on val"):
        ClevrDataset(root, split="test")
    assert (f"{root / 'images' / 'val'} is the images folder of split val; the CLEVR root is {root} (pass that "
            "folder)") in _error(root / "images" / "val")
    assert (f"the CLEVR root is {root} (pass that folder); CLEVR v1.0's test split ships no scenes file: evaluate on "
            "val") in _error(root / "images" / "test")
    (root / "images" / "train").mkdir()
    assert (f"the CLEVR root is {root} (pass that folder); its split train: --split train, or data.split=train" in
            _error(root / "images" / "train"))
    (root / "scenes" / "CLEVR_val_scenes.json").rename(root / "scenes" / "scenes_val.json")
    assert (f"{root}/scenes holds scenes_val.json; CLEVR v1.0 names a split's scenes CLEVR_val_scenes.json" in
            _error(root))
    flat = tmp_path / "flat"  # the PNGs straight in images/
    (flat / "images").mkdir(parents=True)
    (flat / "scenes").mkdir()
    (root / "images" / "val" / "CLEVR_val_000000.png").rename(flat / "images" / "CLEVR_val_000000.png")
    assert f"{flat}/images holds the PNGs themselves; CLEVR v1.0 keeps each split's in images/<split>/" in _error(flat)
    (tmp_path / "CLEVR_v1.0.zip").write_bytes(b"PK")
    assert "CLEVR_v1.0.zip is a file, not a folder (a zip? unpack it" in _error(tmp_path / "CLEVR_v1.0.zip")
    scenes = root / "scenes" / "scenes_val.json"
    assert f"{scenes} is a scenes file; the CLEVR root is {root} (pass that folder)" in _error(scenes)
    (tmp_path / "episodes").mkdir()  # an episode dataset of `run.py collect`
    (tmp_path / "episodes" / "meta.json").write_text("{}")
    assert (f"{tmp_path / 'episodes'} is an episode dataset of `run.py collect`, not a CLEVR root: pretrain on its "
            f"frames with `run.py pretrain --data {tmp_path / 'episodes'}`") in _error(tmp_path / "episodes")


def test_malformed_json(tmp_path):
    _fake_clevr(tmp_path)
    (tmp_path / "scenes" / "CLEVR_val_scenes.json").write_text('{"scenes": [\n  {"objects": [}\n]}')
    message = _error(tmp_path)
    assert "malformed JSON" in message and "CLEVR_val_scenes.json" in message and "line 2" in message
    assert "col" in message


@pytest.mark.parametrize("drop", ["objects", "image_filename"])
def test_scene_missing_key(tmp_path, drop):
    obj = _fake_clevr(tmp_path)
    scene = {"image_filename": "CLEVR_val_000000.png", "objects": [obj]}
    del scene[drop]
    (tmp_path / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"scenes": [scene]}))
    assert f"lacks required key '{drop}'" in _error(tmp_path)


def test_object_missing_key_and_unknown_value(tmp_path):
    obj = _fake_clevr(tmp_path)
    path = tmp_path / "scenes" / "CLEVR_val_scenes.json"
    del obj["3d_coords"]
    path.write_text(json.dumps({"scenes": [{"image_filename": "CLEVR_val_000000.png", "objects": [obj]}]}))
    assert "lacks required key '3d_coords'" in _error(tmp_path)
    obj.update({"3d_coords": [0, 0, 0.35], "color": "pink"})
    path.write_text(json.dumps({"scenes": [{"image_filename": "CLEVR_val_000000.png", "objects": [obj]}]}))
    message = _error(tmp_path)
    assert "unknown color 'pink'" in message and "cyan" in message
    for coords in ([0, float("nan"), 0.35], [0, True, 0.35], [float("inf"), 0, 0]):  # json writes NaN and reads it
        obj.update({"3d_coords": coords, "color": "red"})
        path.write_text(json.dumps({"scenes": [{"image_filename": "CLEVR_val_000000.png", "objects": [obj]}]}))
        assert "expected [x, y, z] finite numbers" in _error(tmp_path)


def test_wrong_image_size(tmp_path):
    _fake_clevr(tmp_path, size=(320, 240))
    message = _error(tmp_path)
    assert "CLEVR_val_000000.png" in message and "320x240" in message and "480x320" in message


def test_a_resized_copy_of_the_frame_reads_as_the_original(tmp_path):
    """A 240x160 copy (CLEVR's 3:2 frame, resized) gives what the 480x320 original gives, cropped too, with its
    window in its own pixels."""
    from envs.clevr import write_dataset

    write_dataset(tmp_path / "full", 1, split="val", seed=0, batch_size=1)
    small = tmp_path / "small"
    shutil.copytree(tmp_path / "full", small)
    for folder in ("images", "masks"):
        png = small / folder / "val" / "CLEVR_val_000000.png"
        with Image.open(png) as img:
            img.resize((240, 160), Image.Resampling.BOX if folder == "images" else Image.Resampling.NEAREST).save(png)
    for crop in (False, True):
        a, b = (ClevrDataset(root, split="val", resolution=(16, 16), crop=crop)[0] for root in (tmp_path / "full", small))
        assert (a["image"] - b["image"]).abs().mean() < 0.02 and (a["mask"] == b["mask"]).float().mean() > 0.9


def test_images_the_scenes_list_but_the_folder_lacks_are_refused_at_once(tmp_path):
    """Found when the dataset is opened (before a run's first step), not when a batch first reaches them."""
    _fake_clevr(tmp_path, scenes=[{"image_filename": f"CLEVR_val_{i:06d}.png", "objects": [{
        "3d_coords": [0.5, -1.0, 0.35], "pixel_coords": [240, 160, 10.0], "size": "small", "material": "metal",
        "shape": "sphere", "color": "red"}]} for i in range(3)])
    with pytest.raises(DataError, match=r"2 of the 3 images that CLEVR_val_scenes.json lists are not in .*images/val "
                       r"\(the first: CLEVR_val_000001.png\)"):
        ClevrDataset(tmp_path, split="val")


def test_damaged_image_and_empty_scene_list(tmp_path):
    _fake_clevr(tmp_path)
    png = tmp_path / "images" / "val" / "CLEVR_val_000000.png"
    data = png.read_bytes()
    for damaged in (data[:len(data) // 2], b"not a png at all"):
        png.write_bytes(damaged)
        message = _error(tmp_path)
        assert "CLEVR image" in message and "CLEVR_val_000000.png is damaged" in message
        assert message.endswith("restore it from the dataset's original files (a root `python run.py generate` "
                                "wrote: write it again, `python run.py generate --out DIR`)")
    png.write_bytes(data)
    # no scene in the object-count range: the range the file holds, not advice to download or generate
    assert _error(tmp_path, min_objects=2, max_objects=3).endswith(
        "holds no scenes with 2 to 3 objects (data.min_objects, data.max_objects); its 1 scenes have 1 to 1: set "
        "data.min_objects and data.max_objects to meet them")
    (tmp_path / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"scenes": []}))
    assert "holds no scenes with 1 to 10 objects (data.min_objects, data.max_objects); it holds no scenes" in \
        _error(tmp_path)


def test_a_mask_that_is_not_a_map_of_object_ids_is_named(tmp_path):
    """An RGB picture in masks/ (a mask saved in color) is a one-line DataError naming it, not a crash in FG-ARI."""
    write_dataset(tmp_path, 1, split="val", min_objects=1, max_objects=2)
    mask = tmp_path / "masks" / "val" / "CLEVR_val_000000.png"
    with Image.open(mask) as img:
        assert img.mode == "L"
        img.convert("RGB").save(mask)
    message = _error(tmp_path, resolution=16)
    assert message.startswith(f"CLEVR mask {mask} is a RGB image, not a map of object ids (one channel")


def test_generator_takes_an_int_resolution_and_refuses_an_empty_batch():
    gen = clevr.SceneGenerator(resolution=24, max_objects=3)
    assert gen.generate(1, seed=0).images.shape == (1, 3, 24, 24)
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        gen.generate(0, seed=0)


def test_target_rows_follow_the_layout_the_metrics_and_the_head_read():
    """One object, written as a CLEVR scene: its row has the coordinates first, each property's one-hot at the slice
    the AP metric and the code/property tables read it from, and the real-object flag last."""
    from world_model.metrics import ATTRIBUTE_SLICES, CLEVR_ELEMENT_SIZE

    obj = {"3d_coords": [1.5, -3.0, 0.7], "size": "small", "material": "metal", "shape": "cylinder", "color": "cyan"}
    row = scenes_to_targets([{"objects": [obj]}])[0, 0]
    assert PROPERTY_DIM == CLEVR_ELEMENT_SIZE == len(row) == 19  # pinned: trained heads and checkpoints rely on it
    assert ATTRIBUTE_SLICES == {"size": slice(3, 5), "material": slice(5, 7), "shape": slice(7, 10),
                                "color": slice(10, 18)}
    assert row[:3].tolist() == pytest.approx([0.75, 0.0, 3.7 / 6])  # (coords + 3) / 6
    values = {"size": SIZES, "material": MATERIALS, "shape": SHAPES, "color": COLORS}
    for name, where in ATTRIBUTE_SLICES.items():
        assert row[where].tolist() == [float(v == obj[name]) for v in values[name]], name
    assert row[-1] == 1.0 and sum(s.stop - s.start for s in ATTRIBUTE_SLICES.values()) == CLEVR_ELEMENT_SIZE - 4
