"""Disentanglement of VQ-SA slot codes: which object property does each latent variable encode?

Slots are matched to ground-truth objects (Hungarian on predicted property rows for set prediction,
on mask overlap otherwise); over the matched objects, every latent variable gets the table
p(property = value | code) per property, drawn as a heatmap PNG, and its mutual information with each property,
summarized in `summary.json` as in the VQ-SA paper's figure. The best match is read from the adjusted mutual
information (AMI: 0 on average for codes independent of the property), since plain NMI grows with a property's number
of values and would favour color (8) over size or material (2) for codes that encode neither; it must beat what the
codes reach with shuffled labels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from envs.clevr_layout import ATTRIBUTE_SLICES, ATTRIBUTES
from envs.errors import UsageError

from .config import PretrainConfig
from .metrics import hungarian_assign, trim_padding
from .pretrain import load_run
from .sources import EVAL_SEED, eval_batches, use_clevr_root
from .updates import autocast
from .rundir import check_out_dir, fixed_rng, resolve_device
from .visualize import clear_outputs

# The discrete properties, in table order: (value names, slice of the 19-entry target row).
PROPERTIES = {name: (ATTRIBUTES[name], ATTRIBUTE_SLICES[name]) for name in ("shape", "size", "material", "color")}
NO_VQ = "visualize --codes needs a VQ encoder (model.vq.enabled=true)"


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts of each (value of a, value of b) pair, `values_a values_b` float."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {a.size} and {b.size}")
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    return np.bincount(ia * len(ub) + ib, minlength=len(ua) * len(ub)).reshape(len(ua), len(ub)).astype(np.float64)


def _mutual_info(joint: np.ndarray) -> float:
    n = joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)  # marginal counts
    nz = joint > 0
    return max(float((joint[nz] / n * np.log(joint[nz] * n / np.outer(pa, pb)[nz])).sum()), 0.0)


def _expected_mutual_info(joint: np.ndarray) -> float:
    """E[MI] of two labelings with these marginals under random permutation (the hypergeometric model of Vinh,
    Epps and Bailey 2010): the chance level AMI subtracts."""
    from scipy.special import gammaln

    n = int(joint.sum())
    total = 0.0
    for ai in joint.sum(1).astype(np.int64):
        for bj in joint.sum(0).astype(np.int64):
            nij = np.arange(max(1, ai + bj - n), min(ai, bj) + 1, dtype=np.float64)
            log_p = (gammaln(ai + 1) + gammaln(bj + 1) + gammaln(n - ai + 1) + gammaln(n - bj + 1) - gammaln(n + 1)
                     - gammaln(nij + 1) - gammaln(ai - nij + 1) - gammaln(bj - nij + 1)
                     - gammaln(n - ai - bj + nij + 1))
            total += float((nij / n * np.log(n * nij / (ai * bj)) * np.exp(log_p)).sum())
    return total


def _one_valued(joint: np.ndarray) -> Optional[float]:
    """NMI and AMI of labelings one of which takes a single value: 1.0 when both do (or none has any), 0.0 when only
    one does; None otherwise."""
    if joint.shape[0] <= 1 and joint.shape[1] <= 1:
        return 1.0
    return 0.0 if joint.shape[0] == 1 or joint.shape[1] == 1 else None


def _nmi(joint: np.ndarray) -> float:
    fixed = _one_valued(joint)
    if fixed is not None:
        return fixed
    mi = _mutual_info(joint)
    return mi / (0.5 * (_entropy(joint.sum(1)) + _entropy(joint.sum(0)))) if mi > 0 else 0.0


def _ami_baseline(joint: np.ndarray) -> tuple[float, float]:
    """E[MI] and AMI's denominator for labelings with these marginals: shuffling one labeling changes neither."""
    emi = _expected_mutual_info(joint)
    denominator = 0.5 * (_entropy(joint.sum(1)) + _entropy(joint.sum(0))) - emi
    eps = np.finfo(np.float64).eps  # as sklearn: a zero denominator (both labelings fixed by their marginals)
    return emi, min(denominator, -eps) if denominator < 0 else max(denominator, eps)


def _ami(joint: np.ndarray, baseline: Optional[tuple[float, float]] = None) -> float:
    fixed = _one_valued(joint)
    if fixed is not None:
        return fixed
    if joint.shape[0] == joint.shape[1] and ((joint > 0).sum(0) == 1).all():  # the same up to renaming
        return 1.0
    emi, denominator = baseline or _ami_baseline(joint)
    return (_mutual_info(joint) - emi) / denominator


def normalized_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """NMI of two integer labelings, MI / mean(H(a), H(b)) as sklearn's default; 1.0 when both are constant
    (or empty), 0.0 when only one is."""
    return _nmi(_contingency(a, b))


def adjusted_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """AMI of two integer labelings, (MI - E[MI]) / (mean(H(a), H(b)) - E[MI]) as sklearn's default: 0 on average
    for independent labelings whatever their numbers of values, 1 for identical ones up to renaming; 1.0 when both
    are constant (or empty), 0.0 when only one is."""
    return _ami(_contingency(a, b))


def _match_by_properties(pred: np.ndarray, targets: np.ndarray) -> np.ndarray:
    targets = trim_padding(targets, pred.shape[1])
    out = []
    for i in range(pred.shape[0]):
        real = np.flatnonzero(targets[i, :, -1] > 0.5)
        if real.size == 0:
            continue
        # Squared L2 over the 19 entries: the set loss's Huber cost up to scale, as |diff| < 1 for rows in [0, 1].
        cost = ((pred[i][:, None] - targets[i][real][None]) ** 2).sum(-1)  # k n_real
        slots = hungarian_assign(cost[None])[0]  # n_real
        out += [(i, s, o) for s, o in zip(slots, real)]
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def _match_by_masks(slot_masks: np.ndarray, gt_masks: np.ndarray) -> np.ndarray:
    b, k = slot_masks.shape[:2]
    n = int(gt_masks.max(initial=0))
    soft = slot_masks.reshape(b, k, -1).astype(np.float32)  # b k p
    onehot = (gt_masks.reshape(b, -1, 1) == np.arange(1, n + 1)).astype(np.float32)  # b p n, background dropped
    inter = soft @ onehot  # b k n
    area = onehot.sum(1)  # b n
    iou = inter / np.maximum(soft.sum(-1)[:, :, None] + area[:, None, :] - inter, 1e-8)  # soft IoU, b k n
    out = []
    for i in range(b):
        present = np.flatnonzero(area[i] > 0)
        slots, cols = linear_sum_assignment(-iou[i][:, present])
        out += [(i, s, present[c]) for s, c in zip(slots, cols)]
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def match_slots_to_objects(*, pred=None, targets=None, slot_masks=None, gt_masks=None) -> np.ndarray:
    """Optimal slot-object pairs per image, as (image, slot, object) rows `m 3`; object i is target row i and
    mask id i + 1. Give pred `b k 19` + targets `b n 19` (real objects only, squared-L2 cost), or
    slot_masks `b k h w` (soft, e.g. attention maps) + gt_masks `b h w` (0 = background; max soft IoU)."""
    if pred is not None and targets is not None and slot_masks is None and gt_masks is None:
        return _match_by_properties(np.asarray(pred, dtype=np.float64), np.asarray(targets, dtype=np.float64))
    if slot_masks is not None and gt_masks is not None and pred is None and targets is None:
        return _match_by_masks(np.asarray(slot_masks), np.asarray(gt_masks))
    raise ValueError("match_slots_to_objects needs either pred and targets, or slot_masks and gt_masks")


def target_properties(targets: np.ndarray) -> np.ndarray:
    """Target rows `... 19` -> discrete property indices `... 4` in PROPERTIES order (argmax of each one-hot)."""
    return np.stack([targets[..., s].argmax(-1) for _, s in PROPERTIES.values()], axis=-1)


@torch.no_grad()
def collect_code_properties(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device, n_images: int,
                            match: str = "auto") -> dict:
    """Codes and ground-truth properties of the slot-matched objects of `n_images` held-out scenes.

    match: "properties" (set prediction), "masks" (decoder masks, else attention maps) or "auto"
    (properties for task=setpred, masks otherwise). Returns codes `m v`, properties `m 4`, the matches
    `m 3` (image, slot, object) and counts of images and real objects.
    """
    if not cfg.model.vq.enabled:
        raise UsageError(NO_VQ)
    if n_images < 1:
        raise ValueError(f"need at least one image, got n_images={n_images}")
    if match == "auto":
        match = "properties" if cfg.task == "setpred" else "masks"
    if match not in ("properties", "masks"):
        raise ValueError(f"match={match!r} is not one of auto, properties, masks")
    if match == "properties" and cfg.task != "setpred":
        raise UsageError("match=properties needs a set-prediction run (task=setpred)")
    was_training = model.training
    model.eval()
    codes, props, pairs, images, objects = [], [], [], 0, 0
    with fixed_rng(EVAL_SEED, device):  # same slot-init noise every call, caller's RNG untouched
        for batch in eval_batches(cfg, device, n_images):
            if batch.get("targets") is None:
                raise UsageError(f"data.source={cfg.data.source} has no object labels: code/property tables need "
                                 "CLEVR-style scenes (data.source=generated or clevr)")
            x = batch["images"]
            with autocast(device, cfg.train.amp):
                enc, out = model(x)
            targets = batch["targets"].float().cpu().numpy()  # b n 19
            real = targets[targets[..., -1] > 0.5]
            if len(real) and not any(real[:, sl].any() for _, sl in PROPERTIES.values()):
                raise UsageError("these scenes' objects have no shape, size, material or color (CLEVR with masks, "
                                 "converted, names none): code/property tables need generated scenes or CLEVR v1.0")
            if match == "properties":
                m = match_slots_to_objects(pred=out.float().cpu().numpy(), targets=targets)
            else:
                if batch.get("masks") is None:
                    raise UsageError("matching slots by masks needs ground-truth masks: this CLEVR directory has no "
                                     "masks/<split>/ (write scenes with masks via `run.py generate`)")
                maps = out.masks.squeeze(2) if cfg.task == "discovery" else enc.attn_maps(tuple(x.shape[-2:]))
                m = match_slots_to_objects(slot_masks=maps.float().cpu().numpy(), gt_masks=batch["masks"].cpu().numpy())
            batch_codes = enc.codes.cpu().numpy()  # b k v
            codes.append(batch_codes[m[:, 0], m[:, 1]])
            props.append(target_properties(targets[m[:, 0], m[:, 2]]))
            pairs.append(m + np.array([images, 0, 0]))
            images += x.shape[0]
            objects += int((targets[..., -1] > 0.5).sum())
    model.train(was_training)
    v = cfg.model.vq.num_vars
    return {"codes": np.concatenate(codes).reshape(-1, v), "properties": np.concatenate(props).reshape(-1, 4),
            "matches": np.concatenate(pairs).reshape(-1, 3), "property_names": list(PROPERTIES),
            "num_codes": cfg.model.vq.num_codes, "images": images, "objects": objects, "match": match}


def _value_names(name: str, column: np.ndarray) -> list[str]:
    if name in PROPERTIES:
        return list(PROPERTIES[name][0])
    return [str(i) for i in range(int(column.max(initial=0)) + 1)]


CHANCE_SHUFFLES = 20  # per property: a variable's best AMI beats all p x 20 shuffled ones by chance ~1 in 21


def code_property_tables(codes: np.ndarray, properties: np.ndarray, num_codes: int,
                         property_names: Sequence[str]) -> dict:
    """Per latent variable: p(property = value | code) tables, and NMI and AMI with every property.

    codes `m v` in [0, num_codes), properties `m p` (non-negative ints; CLEVR names get CLEVR value names).
    Returns counts `v c` (objects per code), p[var][prop] `c values` (rows of unused codes are NaN),
    nmi and ami `v p`, chance_ami `v` (the highest AMI a variable's codes reach with any property's labels shuffled,
    seeded), and per variable the best-matching property (highest AMI; None unless it beats its chance_ami) with its
    AMI and NMI.
    """
    codes, properties = np.asarray(codes, dtype=np.int64), np.asarray(properties, dtype=np.int64)
    if codes.ndim != 2 or properties.ndim != 2 or codes.shape[0] != properties.shape[0]:
        raise ValueError(f"need codes (m, v) and properties (m, p), got {codes.shape} and {properties.shape}")
    if properties.shape[1] != len(property_names):
        raise ValueError(f"{properties.shape[1]} property columns but {len(property_names)} names")
    values = [_value_names(name, properties[:, j]) for j, name in enumerate(property_names)]
    v, p = codes.shape[1], properties.shape[1]
    counts = np.stack([np.bincount(codes[:, i], minlength=num_codes) for i in range(v)])  # v c
    tables, nmi, ami, chance = [], np.zeros((v, p)), np.zeros((v, p)), np.full(v, -np.inf)
    rng = np.random.default_rng(0)  # the shuffled labels of the chance level, the same on every call
    shuffled = [[rng.permutation(properties[:, j]) for _ in range(CHANCE_SHUFFLES)] for j in range(p)]
    for i in range(v):
        row = []
        for j in range(p):
            nv = len(values[j])
            joint = np.bincount(codes[:, i] * nv + properties[:, j], minlength=num_codes * nv).reshape(num_codes, nv)
            with np.errstate(invalid="ignore", divide="ignore"):
                row.append(joint / counts[i][:, None])  # c values; 0/0 = NaN for unused codes
            table = _contingency(codes[:, i], properties[:, j])
            nmi[i, j] = _nmi(table)
            baseline = _ami_baseline(table) if _one_valued(table) is None else None  # E[MI] once for the shuffles
            ami[i, j] = _ami(table, baseline)
            chance[i] = max(chance[i], *(_ami(_contingency(codes[:, i], labels), baseline) for labels in shuffled[j]))
        tables.append(row)
    best = ami.argmax(1)
    return {"num_codes": num_codes, "property_names": list(property_names), "value_names": values,
            "counts": counts, "p": tables, "nmi": nmi, "ami": ami, "chance_ami": chance,
            "best_property": [property_names[j] if ami[i, j] > chance[i] else None for i, j in enumerate(best)],
            "best_ami": ami[np.arange(v), best], "best_nmi": nmi[np.arange(v), best]}


def summarize(tables: dict) -> dict:
    """The JSON-able part of `code_property_tables`: NMI and AMI tables (variables x properties) and best matches."""
    names = tables["property_names"]
    return {
        "num_vars": len(tables["nmi"]), "num_codes": tables["num_codes"], "properties": names,
        "matched_objects": int(tables["counts"][0].sum()) if len(tables["counts"]) else 0,
        "nmi": [{n: round(float(x), 6) for n, x in zip(names, row)} for row in tables["nmi"]],
        "ami": [{n: round(float(x), 6) for n, x in zip(names, row)} for row in tables["ami"]],
        "best": [{"variable": i, "property": prop, "ami": round(float(a), 6), "chance_ami": round(float(c), 6),
                  "nmi": round(float(x), 6)}
                 for i, (prop, a, c, x) in enumerate(zip(tables["best_property"], tables["best_ami"],
                                                         tables["chance_ami"], tables["best_nmi"]))],
        "codes_used": [int((c > 0).sum()) for c in tables["counts"]],
    }


CELL, GAP, PAD = 20, 6, 6
WHITE, DARK, UNUSED = np.array([255.0, 255, 255]), np.array([8.0, 48, 107]), (170, 170, 170)


def _color(p: float) -> tuple[int, int, int]:
    """Probability in [0, 1] -> white..dark blue; NaN (unused code) -> gray."""
    if not np.isfinite(p):
        return UNUSED
    return tuple(int(round(c)) for c in WHITE + (DARK - WHITE) * min(max(p, 0.0), 1.0))


def _heatmap(tables: dict, var: int):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    counts, names, values = tables["counts"][var], tables["property_names"], tables["value_names"]
    c = tables["num_codes"]
    row_labels = [f"code {k}  n={counts[k]}" for k in range(c)]
    best, ami, chance = tables["best_property"][var], tables["best_ami"][var], tables["chance_ami"][var]
    title = (f"variable {var}: best match {best}, AMI = {ami:.3f} (chance {chance:.3f}; NMI "
             f"{tables['best_nmi'][var]:.3f})" if best else
             f"variable {var}: no property above chance (best AMI {ami:.3f}, shuffled labels reach {chance:.3f})")
    line = max(size(t)[1] for t in [title, *names, *row_labels]) + 4
    label_w = max(size(t)[0] for t in row_labels) + PAD
    value_h = max(size(t)[0] for vs in values for t in vs) + PAD
    group_w = [len(vs) * CELL for vs in values]
    grid_w = sum(group_w) + GAP * (len(values) - 1)
    top = PAD + line + line + value_h  # title, property names, rotated value names
    width = max(PAD + label_w + grid_w + PAD, PAD + size(title)[0] + PAD)
    height = top + c * CELL + PAD + CELL // 2 + line + PAD  # grid, then a color bar with its labels
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((PAD, PAD), title, fill="black", font=font)
    x0 = PAD + label_w
    for k, text in enumerate(row_labels):
        draw.text((x0 - PAD - size(text)[0], top + k * CELL + (CELL - line) // 2 + 2), text, fill="black", font=font)
    x = x0
    for j, (name, vs) in enumerate(zip(names, values)):
        draw.text((x, PAD + line), name, fill="black", font=font)
        for u, text in enumerate(vs):
            w, h = size(text)
            label = Image.new("RGB", (w + 2, line), "white")
            ImageDraw.Draw(label).text((1, 0), text, fill="black", font=font)
            label = label.rotate(90, expand=True)  # reads bottom to top, ending just above the column
            img.paste(label, (x + u * CELL + (CELL - label.width) // 2, top - 2 - label.height))
        table = tables["p"][var][j]  # c values
        for k in range(c):
            for u in range(len(vs)):
                cx, cy = x + u * CELL, top + k * CELL
                draw.rectangle([cx, cy, cx + CELL - 1, cy + CELL - 1], fill=_color(table[k, u]), outline=(225, 225, 225))
        x += group_w[j] + GAP
    bar_y, bar_w = top + c * CELL + PAD, min(grid_w, 10 * CELL)
    for t in range(bar_w):
        draw.line([x0 + t, bar_y, x0 + t, bar_y + CELL // 2], fill=_color(t / max(bar_w - 1, 1)))
    draw.text((x0, bar_y + CELL // 2 + 2), "p = 0", fill="black", font=font)
    draw.text((x0 + bar_w - size("1")[0], bar_y + CELL // 2 + 2), "1", fill="black", font=font)
    return img


def save_code_heatmaps(tables: dict, out_dir: str | Path, info: Optional[dict] = None) -> list[Path]:
    """One PNG per latent variable (rows = codes, columns = property values; gray = unused code) and
    summary.json (`summarize(tables)` plus `info`); returns the written paths, summary.json last."""
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)  # an earlier figure's (perhaps of more variables) or decomposition's
    paths = []
    for var in range(len(tables["nmi"])):
        path = out / f"codes_var{var}.png"
        _heatmap(tables, var).save(path)
        paths.append(path)
    summary = {**summarize(tables), **(info or {}), "pngs": [p.name for p in paths]}
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return paths + [summary_path]


def disentanglement(run_dir: str, out_dir: str, n_images: int = 1000, device="cpu",
                     clevr_root: Optional[str] = None, step: Optional[int] = None) -> dict:
    """`run.py visualize --codes`: code/property heatmaps and NMI summary of a VQ run on held-out scenes (those of
    `clevr_root`, a CLEVR v1.0 directory, when given); `step`: its checkpoint kept at that evaluation."""
    check_out_dir(out_dir)  # before minutes of evaluation
    device = resolve_device(device) if isinstance(device, str) else device
    cfg, model, state = load_run(run_dir, device, step)
    use_clevr_root(cfg, clevr_root, run_dir)
    data = collect_code_properties(model, cfg, device, n_images)
    if len(data["codes"]) == 0:
        raise UsageError(f"no slot was matched to an object in {data['images']} images")
    tables = code_property_tables(data["codes"], data["properties"], data["num_codes"], data["property_names"])
    info = {"run_dir": str(run_dir), "step": int(state.get("step", 0)), "images": data["images"],
            "objects": data["objects"], "match": data["match"]}
    paths = save_code_heatmaps(tables, out_dir, info)
    return json.loads(paths[-1].read_text())
