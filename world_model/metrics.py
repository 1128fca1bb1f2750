"""Evaluation metrics: CLEVR property-prediction AP and (foreground) ARI.

* ``clevr_average_precision`` / ``clevr_ap_table`` reproduce the set-prediction
  average precision of the Slot Attention paper (Locatello et al. 2020), quirks
  included, but vectorized with numpy so that tens of thousands of detections
  are scored in milliseconds.
* ``fg_ari`` / ``ari`` compute per-image Adjusted Rand Index values that match
  ``sklearn.metrics.adjusted_rand_score`` exactly, batched via bincount-based
  contingency tables (sklearn is not needed at runtime).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import numpy as np

from envs.clevr_layout import ATTRIBUTE_SLICES, PROPERTY_DIM as CLEVR_ELEMENT_SIZE
from envs.errors import UsageError

__all__ = [
    "CLEVR_ELEMENT_SIZE",
    "DEFAULT_AP_THRESHOLDS",
    "clevr_average_precision",
    "clevr_ap_table",
    "ap_table_key",
    "fg_ari",
    "ari",
    "ATTRIBUTE_SLICES",
    "hungarian_assign",
    "setpred_accuracy",
    "trim_padding",
]

# The row layout (CLEVR_ELEMENT_SIZE entries: x, y, z, the ATTRIBUTE_SLICES one-hots, the last) is `envs.clevr_layout`'s.
DEFAULT_AP_THRESHOLDS = (None, 1.0, 0.5, 0.25, 0.125, 0.0625)
# The reference starts its running-best distance at this value.
_REFERENCE_START_DISTANCE = 10000.0
# Upper bound on elements of the [chunk, pred, target, 3] distance tensor.
_MAX_DIST_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------
# CLEVR average precision
# --------------------------------------------------------------------------


def _is_no_threshold(distance_threshold: Optional[float]) -> bool:
    return distance_threshold is None or distance_threshold == -1


def _check_threshold(distance_threshold: Optional[float]) -> Optional[float]:
    """The threshold as a number (a 0-d tensor or array read out), or None for none; refuses what is not one."""
    if hasattr(distance_threshold, "item") and getattr(distance_threshold, "ndim", 1) == 0:
        distance_threshold = distance_threshold.item()
    if _is_no_threshold(distance_threshold):
        return None
    if not isinstance(distance_threshold, numbers.Real) or isinstance(distance_threshold, bool):
        raise ValueError(f"distance_threshold must be None, -1 or a positive number, got {distance_threshold!r}")
    if np.isnan(distance_threshold):
        raise ValueError(f"distance_threshold must not be NaN, got {distance_threshold!r}")
    if distance_threshold < 0:
        raise ValueError(f"distance_threshold must be None, -1 or non-negative, got {distance_threshold!r}")
    return distance_threshold


def ap_table_key(distance_threshold: Optional[float]) -> str:
    """Key used by ``clevr_ap_table``: "AP_inf" for no threshold, else e.g. "AP_0.5"."""
    if _is_no_threshold(distance_threshold):
        return "AP_inf"
    return f"AP_{float(distance_threshold):g}"


def _numpy(x: Any) -> np.ndarray:
    """numpy arrays, and torch tensors on any device (with or without grad; half precision as float32)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() and x.element_size() < 4 else x).numpy()
    return np.asarray(x)


def _validate_clevr_inputs(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    pred = _numpy(pred)
    target = _numpy(target)
    for name, arr in (("pred", pred), ("target", target)):
        if arr.ndim != 3 or arr.shape[-1] != CLEVR_ELEMENT_SIZE:
            raise ValueError(
                f"{name} must have shape [batch, n, {CLEVR_ELEMENT_SIZE}], got {tuple(arr.shape)}"
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
                or arr.dtype == np.bool_):
            raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"batch size mismatch: pred has {pred.shape[0]} images, target has {target.shape[0]}")
    for name, arr in (("pred", pred), ("target", target)):
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    flags = target[..., -1]
    if not ((flags == 0) | (flags == 1)).all():  # counted as real by truth, summed as recall's denominator
        raise ValueError("target's last entry is the real-object flag: each must be 0 or 1, got "
                         f"{np.unique(flags[(flags != 0) & (flags != 1)])[:5].tolist()}")
    return pred, target


def _nearest_matching_targets(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every prediction, the reference's nearest attribute-matching real target.

    Returns (best_dist, best_id), both [batch, n_pred] (best_dist in the coordinate
    difference dtype, e.g. float32 for float32 inputs); best_id is -1 where no real
    target has identical argmax attributes (best_dist is then the start value 10000).
    Ties go to the lowest target index; claimed targets are not excluded (reference).
    """
    batch, n_pred, _ = pred.shape
    n_tgt = target.shape[1]
    # Dtype the reference's `(target_coords - pred_coords) * 6.` would have.
    dist_dtype = np.result_type(pred.dtype, target.dtype)
    if not np.issubdtype(dist_dtype, np.floating):
        dist_dtype = np.dtype(np.float64)  # integer difference * 6. -> float64
    best_dist = np.full((batch, n_pred), _REFERENCE_START_DISTANCE, dtype=dist_dtype)
    best_id = np.full((batch, n_pred), -1, dtype=np.int64)
    if n_tgt == 0 or n_pred == 0 or batch == 0:
        return best_dist, best_id

    # Argmax-decoded attributes: [batch, n, 4] (first index on ties, like tf/np argmax).
    pred_attr = np.stack([pred[..., s].argmax(-1) for s in ATTRIBUTE_SLICES.values()], axis=-1)
    tgt_attr = np.stack([target[..., s].argmax(-1) for s in ATTRIBUTE_SLICES.values()], axis=-1)
    tgt_real = target[..., -1].astype(bool)  # [batch, n_tgt]; truthiness as in `if real_obj:`

    chunk = max(1, _MAX_DIST_ELEMENTS // max(1, n_pred * n_tgt * 3))
    for start in range(0, batch, chunk):
        sl = slice(start, start + chunk)
        # match: [b, n_pred, n_tgt]
        match = (pred_attr[sl, :, None, :] == tgt_attr[sl, None, :, :]).all(-1) & tgt_real[sl, None, :]
        diff = (target[sl, None, :, :3].astype(dist_dtype) - pred[sl, :, None, :3].astype(dist_dtype)) * 6.0
        dist = np.sqrt((diff * diff).sum(-1))  # [b, n_pred, n_tgt]
        # Reference updates only on `distance < best_distance` starting from 10000.
        valid = match & (dist < _REFERENCE_START_DISTANCE)
        masked = np.where(valid, dist, np.asarray(np.inf, dtype=dist.dtype))
        idx = masked.argmin(-1)  # first minimum -> lowest index on ties
        has = valid.any(-1)
        best_id[sl] = np.where(has, idx, -1)
        best_dist[sl] = np.where(has, np.take_along_axis(masked, idx[..., None], -1)[..., 0],
                                 _REFERENCE_START_DISTANCE)
    return best_dist, best_id


def _average_precision_from_tp(tp: np.ndarray, total_real: Any) -> float:
    """All-point interpolated AP from ranked TP flags (every detection is TP or FP)."""
    if tp.size == 0:
        return 0.0
    acc_tp = np.cumsum(tp, dtype=np.float64)
    acc_fp = np.cumsum(1.0 - tp, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = acc_tp / total_real
        precision = np.divide(acc_tp, acc_fp + acc_tp)
    # The reference casts to float32 before interpolation (then concatenates with float64).
    precision = np.concatenate([[0.0], precision.astype(np.float32), [0.0]])
    recall = np.concatenate([[0.0], recall.astype(np.float32), [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # non-increasing from the right
    idx = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx]))


def _ap_for_threshold(ranked_dist: np.ndarray, ranked_key: np.ndarray, distance_threshold: Optional[float],
                      total_real: Any) -> float:
    # ranked_dist / ranked_key: [n_detections] in confidence order; key = -1 if no match.
    candidate = ranked_key >= 0
    if not _is_no_threshold(distance_threshold):
        # Compare in the distance dtype, like the reference's numpy-scalar `<` (NEP 50).
        candidate &= ranked_dist < np.asarray(distance_threshold).astype(ranked_dist.dtype)
    tp = np.zeros(ranked_key.shape[0], dtype=np.float64)
    cand_pos = np.flatnonzero(candidate)
    if cand_pos.size:
        # A candidate is a TP iff it is the first (in ranked order) to claim its (image, target).
        _, first = np.unique(ranked_key[cand_pos], return_index=True)
        tp[cand_pos[first]] = 1.0
    return _average_precision_from_tp(tp, total_real)


def _clevr_aps(pred: np.ndarray, target: np.ndarray, thresholds: Sequence[Optional[float]]) -> list[float]:
    batch, n_pred, _ = pred.shape
    n_tgt = target.shape[1]
    total_real = np.sum(target[:, :, -1])  # reference: np.sum(attributes[:, :, -1])
    if batch * n_pred == 0:
        return [0.0 for _ in thresholds]  # reference: `if not precision.size: return 0.`
    if total_real == 0:
        return [float("nan") for _ in thresholds]  # recall undefined (reference gives NaN too)

    best_dist, best_id = _nearest_matching_targets(pred, target)  # [batch, n_pred] each
    conf = pred.reshape(batch * n_pred, CLEVR_ELEMENT_SIZE)[:, -1]
    order = np.argsort(conf)[::-1]  # exactly the reference's ranking (tie order included)
    image = order // n_pred
    flat_id = best_id.reshape(-1)[order]
    ranked_key = np.where(flat_id >= 0, image * n_tgt + flat_id, -1)  # unique (image, target) key
    ranked_dist = best_dist.reshape(-1)[order]
    return [_ap_for_threshold(ranked_dist, ranked_key, t, total_real) for t in thresholds]


def clevr_average_precision(pred: Any, target: Any, distance_threshold: Optional[float]) -> float:
    """CLEVR object-property AP exactly as in the Slot Attention reference evaluation.

    pred: [batch, n_pred, 19], last column = confidence; target: [batch, n_tgt, 19],
    last column = real-object flag. Coordinates in [0,1] (distances are measured on
    the [-3,3] scale). The one-hot blocks (`ATTRIBUTE_SLICES`) follow `envs.clevr_layout`'s SIZES,
    MATERIALS, SHAPES and COLORS; a prediction's attributes are its argmax in each block.
    Predictions are ranked by confidence over the whole batch (ties as the reference's
    reversed argsort orders them). A prediction's candidate is the nearest real target of
    its image with the same four attributes; it is a true positive when strictly closer
    than distance_threshold (the reference's `<`; None or -1: no distance check) and the
    first in the ranking to claim that target, else a false positive (no second-nearest
    target is tried, as in the reference).
    Returns AP as a fraction in [0, 1] (0.0 with no predictions, NaN if there are no real
    targets); `clevr_ap_table` gives percent.
    """
    pred, target = _validate_clevr_inputs(pred, target)
    return _clevr_aps(pred, target, [_check_threshold(distance_threshold)])[0]


def clevr_ap_table(pred: Any, target: Any,
                   thresholds: Sequence[Optional[float]] = DEFAULT_AP_THRESHOLDS) -> dict[str, float]:
    """AP in percent for several distance thresholds, sharing the nearest-target search.

    Keys: "AP_inf" (None or -1) and "AP_<t:g>", e.g. "AP_1", "AP_0.5", "AP_0.0625".
    """
    pred, target = _validate_clevr_inputs(pred, target)
    thresholds = [_check_threshold(t) for t in thresholds]
    keys = [ap_table_key(t) for t in thresholds]
    if len(set(keys)) < len(keys):  # None and -1 are one column
        raise ValueError(f"thresholds {thresholds} name the same column twice: {keys}")
    aps = _clevr_aps(pred, target, thresholds)
    return {ap_table_key(t): 100.0 * ap for t, ap in zip(thresholds, aps)}


# --------------------------------------------------------------------------
# Adjusted Rand Index
# --------------------------------------------------------------------------

# Dense contingency tables are used while batch * n_true_labels * n_pred_labels stays below this.
_MAX_DENSE_TABLE = 1 << 24


def _to_int_ids(x: Any, name: str) -> np.ndarray:
    x = _numpy(x)
    if x.ndim > 3 and x.shape[1] > 1:  # b k h w: per-slot masks (soft or hard), not an id map
        raise ValueError(f"{name} of shape {x.shape} looks like per-slot masks [batch, slots, h, w]: pass id maps "
                         "[batch, h, w] (e.g. masks.argmax(1))")
    if x.dtype == np.bool_:
        x = x.astype(np.int64)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must be an integer id map, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [batch, ...] with at least one spatial dim, got {x.shape}")
    return x.reshape(x.shape[0], -1).astype(np.int64, copy=False)  # [batch, n_pixels]


def _compact(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel non-negative ids to 0..K-1 when the id range is large; returns (ids, K)."""
    if ids.size == 0:
        return ids, 1
    k = int(ids.max()) + 1
    if k <= 4096:
        return ids, k
    uniq, inv = np.unique(ids, return_inverse=True)
    return inv.reshape(ids.shape).astype(np.int64), int(uniq.size)


def _per_image_sum_sq(image: np.ndarray, key: np.ndarray, key_space: int, batch: int) -> np.ndarray:
    """sum over cells of count^2 per image, for cells `key` (in [0, key_space)) of image `image`."""
    # image, key: [n_pixels_total]; returns [batch] int64.
    if batch * key_space <= _MAX_DENSE_TABLE:
        counts = np.bincount(image * key_space + key, minlength=batch * key_space).reshape(batch, key_space)
        return (counts * counts).sum(1)
    uniq, counts = np.unique(image * key_space + key, return_counts=True)
    out = np.zeros(batch, dtype=np.int64)
    np.add.at(out, uniq // key_space, counts.astype(np.int64) ** 2)
    return out


def _batched_ari(true_ids: Any, pred_ids: Any, exclude_background: bool) -> np.ndarray:
    t = _to_int_ids(true_ids, "true_ids")  # [batch, n]
    p = _to_int_ids(pred_ids, "pred_ids")  # [batch, n]
    if t.shape != p.shape:
        raise ValueError(f"true_ids and pred_ids must have the same batch size and pixel count, "
                         f"got {np.shape(true_ids)} and {np.shape(pred_ids)}")
    if (t.size and t.min() < 0) or (p.size and p.min() < 0):
        raise ValueError("ids must be non-negative integers")
    batch = t.shape[0]

    keep = t != 0 if exclude_background else np.ones(t.shape, dtype=bool)  # [batch, n]
    image = np.broadcast_to(np.arange(batch, dtype=np.int64)[:, None], t.shape)[keep]  # [m]
    tv, kt = _compact(t[keep])  # [m]
    pv, kp = _compact(p[keep])  # [m]

    n = np.bincount(image, minlength=batch).astype(np.int64)  # pixels per image
    sum_sq = _per_image_sum_sq(image, tv * kp + pv, kt * kp, batch)  # sum_ij n_ij^2
    sum_a2 = _per_image_sum_sq(image, tv, kt, batch)  # sum_i a_i^2 (true cluster sizes)
    sum_b2 = _per_image_sum_sq(image, pv, kp, batch)  # sum_j b_j^2 (pred cluster sizes)

    # Pair confusion matrix exactly as sklearn.metrics.cluster.pair_confusion_matrix.
    tp = sum_sq - n
    fp = sum_b2 - sum_sq
    fn = sum_a2 - sum_sq
    tn = n * n - fp - fn - sum_sq

    out = np.full(batch, np.nan, dtype=np.float64)
    for i in range(batch):  # Python ints, as sklearn does, to avoid int64 overflow
        if n[i] == 0:
            continue  # no (foreground) pixels: ARI undefined -> NaN
        tpi, fpi, fni, tni = int(tp[i]), int(fp[i]), int(fn[i]), int(tn[i])
        if fni == 0 and fpi == 0:
            out[i] = 1.0
        else:
            out[i] = 2.0 * (tpi * tni - fni * fpi) / ((tpi + fni) * (fni + tni) + (tpi + fpi) * (fpi + tni))
    return out


def fg_ari(true_ids: Any, pred_ids: Any) -> np.ndarray:
    """Foreground ARI per image: ARI over pixels whose true id is non-zero (0 = background).

    true_ids, pred_ids: integer id maps [batch, h, w] or [batch, pixels] (numpy or torch; a single image is
    [1, h, w]); per-slot masks `b k h w` (a decoder's `Decoded.masks[:, :, 0]`, as training scores them, or the
    encoder's `attn_maps`) are refused: pass `masks.argmax(1)`. Returns float64 [batch].
    Images without foreground pixels get NaN (aggregate with np.nanmean).
    Matches sklearn.metrics.adjusted_rand_score on the kept pixels exactly.
    """
    return _batched_ari(true_ids, pred_ids, exclude_background=True)


def ari(true_ids: Any, pred_ids: Any) -> np.ndarray:
    """ARI per image over all pixels (no background exclusion); float64 [batch].

    Matches sklearn.metrics.adjusted_rand_score; an image with zero pixels gets NaN.
    """
    return _batched_ari(true_ids, pred_ids, exclude_background=False)


# --------------------------------------------------------------------------
# Set-prediction diagnostics
# --------------------------------------------------------------------------


def hungarian_assign(cost: np.ndarray) -> np.ndarray:
    """Optimal assignment per image: cost `b k n` (k >= n) -> the slot matched to each target, `b n`."""
    from scipy.optimize import linear_sum_assignment

    if cost.ndim != 3 or cost.shape[1] < cost.shape[2]:
        raise ValueError(f"cost must be `batch, slots, targets` with at least as many slots as targets, got "
                         f"{cost.shape}")
    out = np.empty((cost.shape[0], cost.shape[2]), dtype=np.int64)
    for i in range(cost.shape[0]):
        rows, cols = linear_sum_assignment(cost[i])
        out[i, cols] = rows
    return out


def trim_padding(target, k: int):
    """Drop target rows beyond k, which must be padding (real flag 0); numpy arrays or torch tensors."""
    if target.shape[1] <= k:
        return target
    if bool((target[:, k:, -1] > 0.5).any()):
        raise UsageError(f"images with more real objects than the {k} slots: set model.num_slots >= data.max_objects")
    return target[:, :k]


def setpred_accuracy(pred: Any, target: Any) -> dict[str, float]:
    """Per-attribute accuracy after optimal matching: a finer signal than AP early in training.

    Each image's slots are Hungarian-matched to its target rows (padding included) by the squared
    difference of all 19 entries; over the REAL targets, the percentage whose matched slot has the
    right argmax size / material / shape / color / all four, and the mean coordinate error on the
    [-3, 3] scale ("coord_err"). "objectness" is the percentage of all matched rows whose confidence
    is on the right side of 0.5. pred `b k 19`, target `b n 19` (rows beyond k must be padding).
    """
    pred, target = _validate_clevr_inputs(pred, target)
    target = trim_padding(target, pred.shape[1])
    cost = ((pred[:, :, None, :] - target[:, None, :, :]) ** 2).sum(-1)  # b k n
    slot = hungarian_assign(cost)  # b n
    matched = np.take_along_axis(pred, slot[..., None], axis=1)  # b n 19
    real = target[..., -1] > 0.5
    out = {}
    correct = np.ones(real.shape, dtype=bool)
    for name, s in ATTRIBUTE_SLICES.items():
        ok = matched[..., s].argmax(-1) == target[..., s].argmax(-1)
        out[f"acc_{name}"] = float(ok[real].mean() * 100) if real.any() else float("nan")
        correct &= ok
    out["acc_all"] = float(correct[real].mean() * 100) if real.any() else float("nan")
    err = np.linalg.norm((matched[..., :3] - target[..., :3]) * 6.0, axis=-1)
    out["coord_err"] = float(err[real].mean()) if real.any() else float("nan")
    out["objectness"] = float(((matched[..., -1] > 0.5) == real).mean() * 100)
    return out
