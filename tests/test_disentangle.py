"""Code/property disentanglement: NMI and AMI vs sklearn, tables, slot-object matching, the end-to-end figure."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from world_model.config import PretrainConfig, load_config, save_config
from world_model.disentangle import (NO_VQ, adjusted_mutual_info, code_property_tables, collect_code_properties,
                                     disentanglement, match_slots_to_objects, normalized_mutual_info,
                                     target_properties)
from world_model.pretrain import build_model
from world_model.rundir import RunDir

TINY = [
    "model.num_slots=4", "model.slot_dim=8", "model.mlp_hidden=16", "model.cnn_channels=[8,8]",
    "model.cnn_strides=[2,2]", "model.feature_dim=8", "model.head_hidden=16", "model.decoder_channels=8",
    "data.resolution=32", "data.max_objects=4", "train.threads=2",
]


def make_run(path, *overrides):
    """A run directory as `pretrain` leaves it (config + checkpoint) holding an untrained tiny model; training
    steps are skipped because the optimizer's first use imports torch._dynamo (seconds)."""
    cfg = load_config(PretrainConfig, None, TINY + list(overrides))
    torch.manual_seed(0)
    run = RunDir(path)
    run.path.mkdir(parents=True)
    save_config(cfg, run.config_path)
    run.save_checkpoint({"step": 0, "model": build_model(cfg).state_dict()})
    return cfg


@pytest.mark.parametrize("ours,trusted,identical_pair", [
    (normalized_mutual_info, normalized_mutual_info_score, ([0, 0, 1, 1], [0, 1, 0, 1], 0.0)),
    (adjusted_mutual_info, adjusted_mutual_info_score, ([0, 1], [1, 0], 1.0))])
def test_mutual_information_matches_sklearn(ours, trusted, identical_pair):
    """NMI and AMI against sklearn on random labelings and by hand: renamed labels score 1, a constant against a
    varying labeling 0, two constants (or nothing) 1; a last case each (independent halves: NMI 0; two singletons
    renamed: AMI 1, where its chance level equals the mutual information)."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 300))
        a = rng.integers(-3, int(rng.integers(-2, 12)), size=n)
        b = rng.integers(0, int(rng.integers(1, 6)), size=n) * 7 if trial % 3 else (a * 2 + rng.integers(0, 2, n)) % 5
        assert ours(a, b) == pytest.approx(trusted(a, b), abs=1e-10)
    hand = [([0, 0, 1, 1], [5, 5, 2, 2], 1.0), ([0, 1, 2, 3], [1, 1, 1, 1], 0.0), ([3, 3, 3], [7, 7, 7], 1.0),
            ([], [], 1.0), identical_pair]
    for a, b, want in hand:
        assert ours(np.array(a), np.array(b)) == pytest.approx(want, abs=1e-12)
        assert trusted(a, b) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="length"):
        ours(np.zeros(3), np.zeros(4))


def test_codes_that_encode_nothing_match_no_property_where_nmi_would_pick_color():
    """Codes drawn independently of the properties: plain NMI is highest for color (8 values against 2 and 3),
    AMI stays near 0 for all, and the best match is None unless it beats what shuffled labels reach (about one
    variable in 21 by chance)."""
    rng = np.random.default_rng(4)
    m = 300
    props = np.stack([rng.integers(0, 3, m), rng.integers(0, 2, m), rng.integers(0, 2, m), rng.integers(0, 8, m)], 1)
    codes = rng.integers(0, 16, (m, 8))
    t = code_property_tables(codes, props, 16, ["shape", "size", "material", "color"])
    assert (t["nmi"].argmax(1) == 3).mean() >= 0.75  # what the figure's headline said before: color
    assert np.abs(t["ami"]).max() < 0.05 and (t["ami"].max(1) > 0).any()  # above 0 by chance, yet...
    named = [b for b in t["best_property"] if b is not None]  # ...rarely above chance (1 in 21 a variable)
    assert len(named) <= 1 and all(t["best_ami"][i] > t["chance_ami"][i] for i, b in enumerate(t["best_property"]) if b)


def test_tables_identify_a_variable_that_is_a_property():
    rng = np.random.default_rng(1)
    m = 20000
    props = np.stack([rng.integers(0, 3, m), rng.integers(0, 2, m), rng.integers(0, 2, m), rng.integers(0, 8, m)], 1)
    perm = np.array([5, 2, 9])  # shape -> code, codes other than these three unused
    codes = np.stack([perm[props[:, 0]], rng.integers(0, 16, m)], 1)  # m v
    t = code_property_tables(codes, props, 16, ["shape", "size", "material", "color"])
    assert t["nmi"][0, 0] == pytest.approx(1.0) and t["best_property"][0] == "shape"
    assert t["ami"][0, 0] == pytest.approx(1.0) and np.abs(t["ami"][1]).max() < 0.01
    assert t["nmi"][1].max() < 0.01 and t["nmi"][0, 1:].max() < 0.01
    shape = t["p"][0][0]  # c 3
    np.testing.assert_array_equal(shape[perm], np.eye(3))
    unused = np.setdiff1d(np.arange(16), perm)
    assert np.isnan(shape[unused]).all() and (t["counts"][0, unused] == 0).all()
    assert t["counts"][0].sum() == t["counts"][1].sum() == m
    np.testing.assert_allclose(np.nansum(t["p"][1][3], 1), 1.0)  # each used code's row is a distribution
    assert t["value_names"][3][0] == "gray" and len(t["p"][0][3]) == 16


def test_match_by_masks_finds_swapped_slots():
    gt = np.zeros((1, 8, 8), dtype=np.int64)
    gt[0, 1:4, 1:4] = 1  # object 0, top left
    gt[0, 5:8, 5:8] = 2  # object 1, bottom right
    maps = np.zeros((1, 3, 8, 8), dtype=np.float32)
    maps[0, 0, 4:, 4:] = 1.0  # slot 0 covers object 1 (and some background)
    maps[0, 2, :4, :4] = 0.9  # slot 2 covers object 0
    maps[0, 1] = 1.0 - maps[0, 0] - maps[0, 2]  # slot 1: the background, overlapping both objects a little
    m = match_slots_to_objects(slot_masks=maps, gt_masks=gt)
    assert sorted(map(tuple, m.tolist())) == [(0, 0, 1), (0, 2, 0)]
    gt[0, gt[0] == 1] = 0  # object 0 not visible: only object 1 is matched
    assert match_slots_to_objects(slot_masks=torch.from_numpy(maps), gt_masks=torch.from_numpy(gt)).tolist() == [[0, 0, 1]]


def test_match_by_properties_uses_real_objects_only():
    rng = np.random.default_rng(2)
    targets = np.zeros((2, 10, 19))
    targets[:, :3] = rng.random((2, 3, 19))
    targets[:, :3, -1] = 1.0
    targets[1, 2] = 0.0  # image 1 has two objects
    pred = np.full((2, 4, 19), 0.5)
    order = [2, 0, 3]  # object j predicted by slot order[j]
    pred[:, order] = targets[:, :3] + 0.01
    m = match_slots_to_objects(pred=pred, targets=targets)
    assert m.tolist() == [[0, 2, 0], [0, 0, 1], [0, 3, 2], [1, 2, 0], [1, 0, 1]]
    props = target_properties(targets[m[:, 0], m[:, 2]])
    assert props.shape == (5, 4) and props[:, 0].max() < 3 and props[:, 3].max() < 8
    with pytest.raises(ValueError, match="either"):
        match_slots_to_objects(pred=pred, gt_masks=np.zeros((2, 4, 4), dtype=np.int64))


@pytest.mark.parametrize("task", ["setpred", "discovery"])
def test_disentanglement_writes_heatmaps_and_summary(tmp_path, task):
    make_run(tmp_path / "run", f"task={task}", "model.vq.enabled=true", "model.vq.num_vars=3", "model.vq.num_codes=5")
    summary = disentanglement(str(tmp_path / "run"), str(tmp_path / "out"), n_images=16)
    assert summary["match"] == ("properties" if task == "setpred" else "masks")
    assert summary["images"] == 16 and 0 < summary["matched_objects"] <= summary["objects"]
    assert summary["num_vars"] == 3 and len(summary["nmi"]) == 3 and len(summary["best"]) == 3
    for row in summary["nmi"]:
        assert set(row) == {"shape", "size", "material", "color"}
        assert all(np.isfinite(x) and 0 <= x <= 1 for x in row.values())
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    for name in summary["pngs"]:
        with Image.open(tmp_path / "out" / name) as img:
            assert img.mode == "RGB" and img.height > 5 * 20 and img.width > 15 * 20  # 5 code rows, 15 value columns
    (tmp_path / "out" / "codes_var7.png").write_bytes(b"")  # an earlier figure's, of more variables: removed
    disentanglement(str(tmp_path / "run"), str(tmp_path / "out"), n_images=4)
    assert sorted(p.name for p in (tmp_path / "out").glob("codes_var*.png")) == summary["pngs"]


def test_setpred_run_matched_by_attention_maps(tmp_path):
    cfg = make_run(tmp_path / "run", "model.vq.enabled=true", "model.vq.num_codes=4")
    model = build_model(cfg)
    data = collect_code_properties(model, cfg, torch.device("cpu"), 8, match="masks")
    assert data["codes"].shape == (len(data["properties"]), 4) and data["codes"].max() < 4
    assert data["matches"][:, 0].max() < 8 and 0 < len(data["codes"]) <= data["objects"]


def test_non_vq_run_is_refused(tmp_path):
    make_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"^visualize --codes needs a VQ encoder \(model.vq.enabled=true\)$"):
        disentanglement(str(tmp_path / "run"), str(tmp_path / "out"), n_images=4)
    assert NO_VQ.count("\n") == 0 and not (tmp_path / "out").exists()


def test_unlabeled_frames_are_refused(tmp_path, monkeypatch):
    import world_model.disentangle as dis

    cfg = make_run(tmp_path / "run", "task=discovery", "model.vq.enabled=true")
    monkeypatch.setattr(dis, "eval_batches", lambda *a, **k: iter([{"images": torch.rand(2, 3, 32, 32)}]))
    with pytest.raises(ValueError, match="no object labels"):
        collect_code_properties(build_model(cfg), cfg, torch.device("cpu"), 2)


def test_scenes_without_attribute_names_are_refused(tmp_path, monkeypatch):
    """CLEVR with masks, converted: objects with positions and objectness but no attribute one-hots would all read as
    a small gray rubber cube and draw a confident, meaningless figure."""
    import world_model.disentangle as dis

    cfg = make_run(tmp_path / "run", "task=discovery", "model.vq.enabled=true")
    targets = torch.zeros(2, 4, 19)
    targets[:, :2, :3], targets[:, :2, -1] = 0.5, 1.0  # two objects per scene: coordinates and objectness only
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, :8, :8], masks[:, 20:, 20:] = 1, 2
    batch = {"images": torch.rand(2, 3, 32, 32), "targets": targets, "masks": masks}
    monkeypatch.setattr(dis, "eval_batches", lambda *a, **k: iter([batch]))
    with pytest.raises(ValueError, match="no shape, size, material or color"):
        collect_code_properties(build_model(cfg), cfg, torch.device("cpu"), 2)


def test_summary_counts_the_codes_each_variable_uses():
    """codes_used counts the codes with at least one object: variable 0 uses codes 0 and 2 of 4, variable 1 only
    code 3; matched_objects is the number of objects (40); variable 0 is the property, above what shuffled labels
    reach, variable 1 (one code) says nothing."""
    from world_model.disentangle import code_property_tables, summarize

    codes = np.array([[0, 3], [0, 3], [2, 3], [0, 3]] * 10)
    props = np.array([[0], [0], [1], [0]] * 10)
    s = summarize(code_property_tables(codes, props, 4, ["size"]))
    assert s["codes_used"] == [2, 1] and s["matched_objects"] == 40
    assert s["best"][0] == {"variable": 0, "property": "size", "ami": 1.0, "chance_ami": s["best"][0]["chance_ami"],
                            "nmi": 1.0} and s["best"][0]["chance_ami"] < 0.5 and s["nmi"][1] == {"size": 0.0}
    assert s["best"][1] == {"variable": 1, "property": None, "ami": 0.0, "chance_ami": 0.0, "nmi": 0.0}  # one code
    few = code_property_tables(codes[:4], props[:4], 4, ["size"])  # 4 objects: a shuffle matches too, so no call
    assert few["ami"][0, 0] == 1.0 and few["best_property"][0] is None
