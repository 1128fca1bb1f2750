"""Tests for world_model.metrics: CLEVR AP (vs. a literal loop reference) and (fg-)ARI (vs. sklearn)."""

import math

import numpy as np
import pytest

from world_model import metrics
from world_model.metrics import ari, clevr_ap_table, clevr_average_precision, fg_ari

ALL_THRESHOLDS = (None, -1, 1.0, 0.5, 0.25, 0.125, 0.0625)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def obj(xyz, size=0, material=0, shape=0, color=0, last=1.0):
    """One 19-dim CLEVR row: [xyz, size(2), material(2), shape(3), color(8), last]."""
    row = np.zeros(19)
    row[:3] = xyz
    row[3 + size] = 1
    row[5 + material] = 1
    row[7 + shape] = 1
    row[10 + color] = 1
    row[18] = last
    return row


def pad_row():
    return np.zeros(19)  # all-zero padding target (flag 0)


def reference_ap(pred, target, distance_threshold):
    """Literal loop transcription of the Slot Attention reference evaluation (the trusted oracle)."""
    batch, n_pred, size = pred.shape
    flat = pred.reshape(batch * n_pred, size)
    order = np.argsort(flat[:, -1])[::-1]

    def decode(row):
        return (row[:3], int(np.argmax(row[3:5])), int(np.argmax(row[5:7])),
                int(np.argmax(row[7:10])), int(np.argmax(row[10:18])), row[18])

    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    claimed = set()
    for det, flat_idx in enumerate(order):
        image = int(flat_idx // n_pred)
        p_xyz, *p_attr, _ = decode(flat[flat_idx])
        best_distance, best_id = 10000, None
        for t_id in range(target.shape[1]):
            t_xyz, *t_attr, real = decode(target[image, t_id])
            if real and p_attr == t_attr:
                d = np.linalg.norm((t_xyz - p_xyz) * 6.0)
                if d < best_distance:
                    best_distance, best_id = d, t_id
        no_thr = distance_threshold is None or distance_threshold == -1
        if (no_thr or best_distance < distance_threshold) and best_id is not None \
                and (image, best_id) not in claimed:
            tp[det] = 1
            claimed.add((image, best_id))
        else:
            fp[det] = 1
    if not tp.size:
        return 0.0
    acc_tp, acc_fp = np.cumsum(tp), np.cumsum(fp)
    recall = np.array(acc_tp / np.sum(target[:, :, -1]), dtype=np.float32)
    precision = np.array(acc_tp / (acc_tp + acc_fp), dtype=np.float32)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    for i in range(precision.size - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    idx = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx]))


def random_clevr(seed, batch, n_pred, n_tgt, dtype=np.float64):
    """Random predictions/targets with few attribute values, tied confidences and near-duplicates."""
    rng = np.random.default_rng(seed)

    def rows(n, noise):
        out = np.zeros((batch, n, 19))
        out[..., :3] = rng.random((batch, n, 3))
        for start, width in ((3, 2), (5, 2), (7, 3), (10, 8)):
            value = rng.integers(0, 2, size=(batch, n))  # only 2 values used -> many matches
            out[..., start:start + width] = noise * rng.random((batch, n, width))
            np.put_along_axis(out[..., start:start + width], value[..., None], 1.0, axis=-1)
        return out

    target = rows(n_tgt, 0.0)
    target[..., 18] = rng.random((batch, n_tgt)) < 0.7
    target[target[..., 18] == 0] = 0.0  # padding rows are all zeros
    target[:, 0, 18] = 1.0
    target[:, 0, 3] = 1.0
    pred = rows(n_pred, 0.5)
    # Put many predictions near some target (small offsets) so thresholds matter, and copy
    # attributes so they match.
    src = rng.integers(0, n_tgt, size=(batch, n_pred))
    near = rng.random((batch, n_pred)) < 0.6
    tgt_src = np.take_along_axis(target, src[..., None], axis=1)
    pred[near, :18] = tgt_src[near, :18]
    pred[near, :3] += rng.normal(0.0, 0.015, size=(near.sum(), 3))
    pred[..., 18] = rng.integers(0, 5, size=(batch, n_pred)) / 4.0  # heavy confidence ties
    return pred.astype(dtype), target.astype(dtype)


# --------------------------------------------------------------------------
# CLEVR AP: hand-computed cases
# --------------------------------------------------------------------------


def test_perfect_predictions_give_ap_one():
    # Two images with 3 real objects + 1 padding; predictions copy the objects with confidence 1,
    # and one extra low-confidence prediction per image (ranked last, so precision stays 1
    # at every recall level) -> AP = 1 at all thresholds.
    t = np.stack([
        np.stack([obj([.1, .2, .3], 0, 1, 2, 3), obj([.5, .5, .5], 1, 0, 1, 7), obj([.9, .1, .4], 1, 1, 0, 0),
                  pad_row()]),
        np.stack([obj([.3, .3, .3], 0, 0, 0, 1), obj([.6, .2, .8], 1, 0, 2, 5), obj([.2, .9, .1], 0, 1, 1, 2),
                  pad_row()]),
    ])
    p = t.copy()
    p[:, :3, 18] = 1.0
    p[:, 3] = obj([.5, .5, .5], 0, 0, 0, 4, last=0.1)  # color 4 matches nothing -> FP at the end
    for thr in ALL_THRESHOLDS:
        assert clevr_average_precision(p, t, thr) == pytest.approx(1.0, abs=1e-7)
    table = clevr_ap_table(p, t)
    assert set(table) == {"AP_inf", "AP_1", "AP_0.5", "AP_0.25", "AP_0.125", "AP_0.0625"}
    assert all(v == pytest.approx(100.0) for v in table.values())


def test_hand_computed_fp_in_the_middle():
    # Targets: A (color 0) and B (color 1). Predictions ranked by confidence:
    #   p1 (0.9) = A           -> TP    tp=[1,0,1], fp=[0,1,0]
    #   p2 (0.8) = A, color 2  -> FP (no attribute match)
    #   p3 (0.7) = B           -> TP
    # precision = [1, 1/2, 2/3], recall = [1/2, 1/2, 1]
    # padded: recall [0, .5, .5, 1, 1], precision [0, 1, .5, 2/3, 0]
    # right-to-left max: precision [1, 1, 2/3, 2/3, 0]; recall changes at i=1 and i=3:
    # AP = (.5 - 0) * 1 + (1 - .5) * 2/3 = 5/6.
    t = np.stack([obj([.2, .2, .2], color=0), obj([.8, .8, .8], color=1)])[None]
    p = np.stack([obj([.2, .2, .2], color=0, last=.9), obj([.2, .2, .2], color=2, last=.8),
                  obj([.8, .8, .8], color=1, last=.7)])[None]
    for thr in ALL_THRESHOLDS:
        assert clevr_average_precision(p, t, thr) == pytest.approx(5 / 6, abs=1e-6)
        assert clevr_average_precision(p, t, thr) == pytest.approx(reference_ap(p, t, thr), abs=1e-12)


def test_claimed_target_is_not_reassigned():
    # Same attributes for T0 (x=.5) and T1 (x=.9). p1 (0.9) at x=.5 -> nearest T0 -> TP.
    # p2 (0.8) at x=.52: distances T0 = .02*6 = .12, T1 = .38*6 = 2.28 -> nearest is T0, already
    # claimed -> FP (the reference does NOT fall back to T1).
    # precision [1, .5], recall [.5, .5]; padded recall [0, .5, .5, 1], precision [0, 1, .5, 0]
    # -> max-from-right [1, 1, .5, 0]; changes at i=1, i=3: AP = .5 * 1 + .5 * 0 = 0.5
    # (with a fallback it would be 1.0).
    t = np.stack([obj([.5, .5, .5]), obj([.9, .5, .5])])[None]
    p = np.stack([obj([.5, .5, .5], last=.9), obj([.52, .5, .5], last=.8)])[None]
    assert clevr_average_precision(p, t, None) == pytest.approx(0.5, abs=1e-7)
    assert clevr_average_precision(p, t, None) == reference_ap(p, t, None)


def test_distance_threshold():
    # Offset 0.05 in [0,1] units = 0.3 on the [-3,3] scale: passes 0.5 and 1, fails 0.25.
    # Failing: precision [0], recall [0]; padded recall [0, 0, 1] -> AP = 1 * 0 = 0.
    t = obj([.5, .5, .5])[None, None]
    p = obj([.55, .5, .5], last=.9)[None, None]
    assert clevr_average_precision(p, t, 0.5) == pytest.approx(1.0)
    assert clevr_average_precision(p, t, 1.0) == pytest.approx(1.0)
    assert clevr_average_precision(p, t, 0.25) == 0.0
    table = clevr_ap_table(p, t)
    assert table == pytest.approx({"AP_inf": 100.0, "AP_1": 100.0, "AP_0.5": 100.0, "AP_0.25": 0.0,
                                   "AP_0.125": 0.0, "AP_0.0625": 0.0})


def test_padding_targets_never_match():
    # T0 real (color 0 at .2), T1 padding (flag 0) identical to p1.
    # p1 (0.9) matches only the padding row -> FP; p2 (0.8) matches T0 -> TP.
    # precision [0, .5], recall [0, 1]; padded recall [0, 0, 1, 1], precision [0, 0, .5, 0]
    # -> max-from-right [.5, .5, .5, 0]; recall changes at i=2 only: AP = 1 * .5 = 0.5.
    t = np.stack([obj([.2, .2, .2], color=0), obj([.8, .8, .8], color=3, last=0.0)])[None]
    p = np.stack([obj([.8, .8, .8], color=3, last=.9), obj([.2, .2, .2], color=0, last=.8)])[None]
    assert clevr_average_precision(p, t, None) == pytest.approx(0.5)
    # All-zero padding rows decode to attributes (0,0,0,0) at the origin; a prediction there
    # must still be a false positive.
    t2 = np.stack([obj([.2, .2, .2], color=1), pad_row()])[None]
    p2 = np.stack([obj([0, 0, 0], last=.9)])[None]
    assert clevr_average_precision(p2, t2, None) == 0.0


def test_no_threshold_none_equals_minus_one():
    p, t = random_clevr(0, 20, 6, 5)
    assert clevr_average_precision(p, t, None) == clevr_average_precision(p, t, -1)
    assert clevr_ap_table(p, t, thresholds=(-1,))["AP_inf"] == clevr_ap_table(p, t)["AP_inf"]


def test_distance_ties_go_to_lowest_index():
    # Two identical targets at the same place; p1 claims T0 (lowest index), p2's nearest is
    # again T0 (tie -> lowest index, claimed targets included) -> FP.
    t = np.stack([obj([.5, .5, .5]), obj([.5, .5, .5])])[None]
    p = np.stack([obj([.5, .5, .5], last=.9), obj([.5, .5, .5], last=.8)])[None]
    assert clevr_average_precision(p, t, None) == pytest.approx(0.5)
    assert clevr_average_precision(p, t, None) == reference_ap(p, t, None)


def test_different_pred_and_target_counts_and_empty():
    p, t = random_clevr(3, 7, 11, 4)
    assert clevr_average_precision(p, t, 0.5) == pytest.approx(reference_ap(p, t, 0.5), abs=1e-12)
    assert clevr_average_precision(p[:, :0], t, None) == 0.0  # reference: no detections -> 0
    assert np.isnan(clevr_average_precision(p, np.zeros_like(t), None))  # no real targets


# --------------------------------------------------------------------------
# CLEVR AP: random comparison with the literal reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed,batch,n_pred,n_tgt", [
    (0, 30, 10, 10), (1, 25, 11, 10), (2, 40, 7, 5), (3, 10, 4, 9), (4, 1, 12, 3), (5, 60, 3, 3),
])
def test_matches_reference_loop(seed, batch, n_pred, n_tgt):
    p, t = random_clevr(seed, batch, n_pred, n_tgt)
    table = clevr_ap_table(p, t, thresholds=ALL_THRESHOLDS[1:])
    for thr in ALL_THRESHOLDS:
        expected = reference_ap(p, t, thr)
        assert clevr_average_precision(p, t, thr) == pytest.approx(expected, abs=1e-6)
        assert table[metrics.ap_table_key(thr)] == pytest.approx(100.0 * expected, abs=1e-4)


def test_matches_reference_loop_float32_and_duplicates():
    p, t = random_clevr(7, 30, 10, 8, dtype=np.float32)
    t[:, 1] = t[:, 0]  # duplicated targets -> exact distance ties
    p[:, 1, :18] = p[:, 0, :18]  # duplicated predictions
    for thr in ALL_THRESHOLDS:
        assert clevr_average_precision(p, t, thr) == pytest.approx(reference_ap(p, t, thr), abs=1e-6)


def test_chunked_distance_search(monkeypatch):
    p, t = random_clevr(11, 50, 10, 10)
    full = clevr_ap_table(p, t)
    monkeypatch.setattr(metrics, "_MAX_DIST_ELEMENTS", 700)  # forces 2-image chunks
    assert clevr_ap_table(p, t) == full


def test_clevr_validation():
    p, t = random_clevr(0, 4, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        clevr_average_precision(p[..., :18], t, None)
    with pytest.raises(ValueError, match="shape"):
        clevr_average_precision(p, t[0], None)
    with pytest.raises(ValueError, match="batch size mismatch"):
        clevr_average_precision(p, t[:3], None)
    bad = p.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="pred contains NaN or infinite values"):
        clevr_ap_table(bad, t)
    bad = t.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="target contains NaN or infinite values"):
        clevr_ap_table(p, bad)
    import torch  # tensors, with grad, as a model's outputs: the same table as their numpy values

    assert clevr_ap_table(torch.tensor(p, requires_grad=True), torch.tensor(t)) == clevr_ap_table(p, t)
    with pytest.raises(ValueError):
        clevr_average_precision(p, t, -0.5)


# --------------------------------------------------------------------------
# ARI
# --------------------------------------------------------------------------


def test_ari_hand_computed():
    # Identical partitions up to relabeling -> 1.
    assert ari(np.array([[0, 0, 1, 1, 2]]), np.array([[5, 5, 3, 3, 9]]))[0] == 1.0
    # true [0,0,1,1], pred [0,1,0,1]: contingency all ones -> sum n_ij^2 = 4, sum a_i^2 = sum b_j^2 = 8,
    # n = 4: tp = 0, fp = fn = 4, tn = 16 - 4 - 4 - 4 = 4;
    # ARI = 2 (0*4 - 4*4) / ((0+4)(4+4) + (0+4)(4+4)) = -32 / 64 = -0.5.
    assert ari(np.array([[0, 0, 1, 1]]), np.array([[0, 1, 0, 1]]))[0] == pytest.approx(-0.5)
    # true [1,1,1,2,2,2], pred [1,1,2,2,3,3]: sum C(n_ij,2) = 1+0+0+1 = 2, sum C(a_i,2) = 3+3 = 6,
    # sum C(b_j,2) = 1+1+1 = 3, C(6,2) = 15, expected = 6*3/15 = 1.2, max = (6+3)/2 = 4.5,
    # ARI = (2 - 1.2) / (4.5 - 1.2) = 8/33.
    assert ari(np.array([[1, 1, 1, 2, 2, 2]]), np.array([[1, 1, 2, 2, 3, 3]]))[0] == pytest.approx(8 / 33)


def test_fg_ari_hand_computed():
    # Background (0) pixels are ignored whatever their predicted id; the foreground is the
    # 8/33 example above, then an identical-up-to-relabeling image, then an all-background one.
    true = np.array([[0, 1, 1, 1, 0, 2, 2, 2], [0, 0, 3, 3, 4, 4, 4, 0], [0] * 8])
    pred = np.array([[7, 1, 1, 2, 7, 2, 3, 3], [1, 2, 9, 9, 1, 1, 1, 6], [1, 2, 3, 4, 5, 6, 7, 8]])
    out = fg_ari(true, pred)
    assert out.dtype == np.float64 and out.shape == (3,)
    assert out[0] == pytest.approx(8 / 33)
    assert out[1] == 1.0
    assert np.isnan(out[2])  # no foreground -> NaN (use np.nanmean)
    # Single foreground pixel / all foreground in one object with one predicted id -> 1.0 (sklearn).
    assert fg_ari(np.array([[0, 0, 5]]), np.array([[1, 2, 3]]))[0] == 1.0
    assert fg_ari(np.array([[2, 2, 2, 0]]), np.array([[4, 4, 4, 1]]))[0] == 1.0


def _sklearn_fg_ari(true, pred, exclude_background):
    from sklearn.metrics import adjusted_rand_score

    out = []
    for t, p in zip(true.reshape(len(true), -1), pred.reshape(len(pred), -1)):
        keep = t != 0 if exclude_background else np.ones_like(t, dtype=bool)
        out.append(adjusted_rand_score(t[keep], p[keep]) if keep.any() else np.nan)
    return np.array(out)


def _random_id_maps(seed, batch=64, h=8, w=9):
    rng = np.random.default_rng(seed)
    n_true = rng.integers(1, 6, size=batch)
    n_pred = rng.integers(1, 17, size=batch)
    true = rng.integers(0, 11, size=(batch, h, w)) % (n_true[:, None, None] + 1)
    pred = rng.integers(0, 17, size=(batch, h, w)) % n_pred[:, None, None]
    # Correlate pred with true on some images so values span the whole range.
    corr = rng.random(batch) < 0.4
    pred[corr] = (true[corr] * 3 + (rng.random(true[corr].shape) < 0.1)) % 16
    # Degenerate images.
    pred[0] = 3                                                     # single cluster in pred
    pred[1] = np.arange(h * w).reshape(h, w)                         # all-distinct pred
    true[2] = 4                                                      # all foreground in one object
    true[3] = 2
    pred[3] = 9                                                      # both single cluster -> 1.0
    true[4] = 0                                                      # no foreground
    true[5] = 0
    true[5, 0, 0] = 1                                                # one foreground pixel
    true[6], pred[6] = true[7], pred[7] * 2 + 1                      # relabeled copy
    return true, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fg_ari_matches_sklearn(seed):
    true, pred = _random_id_maps(seed)
    expected = _sklearn_fg_ari(true, pred, exclude_background=True)
    got = fg_ari(true, pred)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert np.isnan(got[4])


@pytest.mark.parametrize("seed", [0, 1])
def test_ari_matches_sklearn(seed):
    true, pred = _random_id_maps(seed)
    np.testing.assert_allclose(ari(true, pred), _sklearn_fg_ari(true, pred, False), rtol=0, atol=1e-12)


def test_ari_large_ids_sparse_path_and_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    true, pred = _random_id_maps(5, batch=16)
    expected = _sklearn_fg_ari(true, pred, exclude_background=True)
    # Huge, sparse ids (forces relabeling) give the same result.
    got_big = fg_ari(true * 1_000_003, pred * 999_983 + 12_345_678)
    np.testing.assert_allclose(got_big, expected, rtol=0, atol=1e-12)
    # Sparse (np.unique) contingency path.
    monkeypatch.setattr(metrics, "_MAX_DENSE_TABLE", 10)
    np.testing.assert_allclose(fg_ari(true, pred), expected, rtol=0, atol=1e-12)
    # Torch tensors accepted, numpy float64 returned.
    got_t = fg_ari(torch.from_numpy(true), torch.from_numpy(pred).to(torch.int32))
    assert isinstance(got_t, np.ndarray) and got_t.dtype == np.float64
    np.testing.assert_allclose(got_t, expected, rtol=0, atol=1e-12)


def test_ari_validation():
    with pytest.raises(ValueError):
        fg_ari(np.zeros((2, 4), dtype=int), np.zeros((2, 5), dtype=int))
    with pytest.raises(ValueError):
        fg_ari(np.zeros((2, 4)), np.zeros((2, 4), dtype=int))  # float ids
    with pytest.raises(ValueError):
        ari(np.zeros((2, 4), dtype=int), -np.ones((2, 4), dtype=int))


def _row(xyz, size, material, shape, color, last):
    r = np.zeros(19)
    r[:3] = xyz
    r[3 + size] = r[5 + material] = r[7 + shape] = r[10 + color] = 1
    r[18] = last
    return r


def test_setpred_accuracy_hand_computed():
    from world_model.metrics import setpred_accuracy

    t1 = _row([0.5, 0.5, 0.5], 0, 0, 0, 0, 1)
    t2 = _row([0.1, 0.1, 0.1], 1, 1, 2, 7, 1)
    pad = np.zeros(19)
    target = np.stack([t1, t2, pad])[None]
    # Slots in another order: t2 exact; t1 with the wrong color and 0.05 off in x (0.3 on the [-3,3] scale);
    # one empty slot with low confidence.
    p1 = _row([0.55, 0.5, 0.5], 0, 0, 0, 3, 0.9)
    p2 = t2.copy()
    p3 = np.zeros(19)
    p3[18] = 0.1
    out = setpred_accuracy(np.stack([p3, p2, p1])[None], target)
    assert out["acc_size"] == out["acc_material"] == out["acc_shape"] == 100.0
    assert out["acc_color"] == 50.0 and out["acc_all"] == 50.0
    assert out["coord_err"] == pytest.approx((0.3 + 0.0) / 2)
    assert out["objectness"] == 100.0


def test_ap_decodes_every_color_including_the_last():
    """A prediction of color 0 for an object of color 7 (the last one) at the right place is no match."""
    target = obj([0.5, 0.5, 0.5], 0, 1, 2, 7)[None, None]
    pred = obj([0.5, 0.5, 0.5], 0, 1, 2, 0, last=0.9)[None, None]
    assert clevr_average_precision(pred, target, None) == 0.0
    assert clevr_average_precision(target, target, None) == 1.0


def test_setpred_matching_counts_the_confidence_column():
    """A real object and a non-object row with the same properties, 0.01 apart: by properties alone, slot 0 (which
    says "no object") would take the real one. With the confidence column in the cost it goes to slot 1, so both
    rows' objectness is right."""
    from world_model.metrics import setpred_accuracy

    target = np.stack([_row([0.5] * 3, 0, 0, 0, 0, 1), _row([0.51] * 3, 0, 0, 0, 0, 0)])[None]
    pred = np.stack([_row([0.5] * 3, 0, 0, 0, 0, 0), _row([0.51] * 3, 0, 0, 0, 0, 1)])[None]
    out = setpred_accuracy(pred, target)
    assert out["objectness"] == 100.0
    assert out["coord_err"] == pytest.approx(0.01 * 6 * math.sqrt(3))


def test_setpred_objectness_counts_the_non_object_rows_too():
    """Both slots say "object" but one target row is not one: objectness is 1 of 2 rows, 50%."""
    from world_model.metrics import setpred_accuracy

    target = np.stack([_row([0.5] * 3, 0, 0, 0, 0, 1), _row([0.1] * 3, 1, 1, 1, 1, 0)])[None]
    pred = np.stack([_row([0.5] * 3, 0, 0, 0, 0, 0.9), _row([0.1] * 3, 1, 1, 1, 1, 0.8)])[None]
    assert setpred_accuracy(pred, target)["objectness"] == 50.0


def test_inputs_that_would_give_a_wrong_number_are_refused():
    """Each of these used to return a number: garbage assignments, AP above 100%, ARI of one-hot masks."""
    import torch

    with pytest.raises(ValueError, match="at least as many slots as targets"):
        metrics.hungarian_assign(np.random.default_rng(0).random((1, 2, 5)))  # unmatched targets held garbage
    target = np.zeros((1, 2, 19), np.float32)
    target[..., [3, 5, 7, 10]] = 1.0
    target[0, 0, 18], target[0, 1, 18] = 1.0, 0.3
    with pytest.raises(ValueError, match=r"real-object flag: each must be 0 or 1, got \[0.3"):
        clevr_ap_table(target, target)  # counted real by truth but 0.3 in the denominator: AP 333%
    masks = np.zeros((2, 3, 4, 4), np.int64)  # b k h w per-slot masks
    with pytest.raises(ValueError, match="looks like per-slot masks"):
        fg_ari(masks, masks)
    with pytest.raises(ValueError, match=r"looks like per-slot masks .*masks.argmax\(1\)"):
        fg_ari(masks[:, 0], torch.softmax(torch.zeros(2, 3, 4, 4), 1))  # soft masks, as a decoder gives them
    assert fg_ari(masks[:, :1], masks[:, :1]).shape == (2,)  # b 1 h w is an id map
    target[0, 1, 18] = 0.0
    with pytest.raises(ValueError, match="name the same column twice"):
        clevr_ap_table(target, target, thresholds=[None, -1, 0.5])
    assert clevr_average_precision(target, target, torch.tensor(0.5)) == clevr_average_precision(target, target, 0.5)


def test_a_prediction_exactly_at_the_threshold_does_not_match():
    """CLEVR's reference counts a match at `distance < threshold`, strictly: a prediction 0.125 off in x (0.75 in
    CLEVR's 6-unit coordinates) is a miss at threshold 0.75 and a hit just above it."""
    def row(x: float, confidence: float) -> np.ndarray:
        r = np.zeros(19)
        r[:3] = [x, 0.5, 0.5]
        r[[3, 5, 7, 10]] = 1  # small, rubber, cube, gray
        r[18] = confidence
        return r

    target, pred = row(0.5, 1.0)[None, None], row(0.625, 0.9)[None, None]
    assert clevr_average_precision(pred, target, 0.75) == 0.0
    assert clevr_average_precision(pred, target, 0.7500001) == 1.0
