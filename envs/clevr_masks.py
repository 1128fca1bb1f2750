"""DeepMind's CLEVR with masks (the multi-object-datasets release, `clevr_with_masks_train.tfrecords`: 100k scenes
at 320x240 with an instance mask per object), converted once into the CLEVR v1.0 layout `ClevrDataset` reads:
images/<split>/ and masks/<split>/ PNGs (mask pixel k: the scene's k-th object, 0 the background) and
scenes/CLEVR_<split>_scenes.json. Scored with `data.crop=true data.max_objects=6`, this is the Slot Attention /
IODINE object-discovery protocol on CLEVR6: train on the first 70k scenes, evaluate FG-ARI on the scenes after them.

Why convert rather than read in place: the release is one GZIP stream of ~3.2 MB records (320 GB unpacked), so
random access means unpacking everything before the record; the conversion reads it once (the pixels as numpy
views, no TensorFlow). The objects' attribute codes (colour 1-8, shape 1-3, ...) are kept as numbers: the release
does not document which code is which colour, so set prediction, which needs the names, is refused on such a root
(train set prediction on CLEVR v1.0's scenes)."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
from PIL import Image

from .atomic import atomic_write, check_clevr_out
from .errors import DataError, UsageError
from .tfrecord import parse_example, read_records

HEIGHT, WIDTH, ENTITIES = 240, 320, 11  # entity 0: the background; unused entities are all-zero padding
CODES = ("color", "shape", "size", "material")  # one byte per entity, meaning undocumented
SHAPES = {"image": (HEIGHT, WIDTH, 3), "mask": (ENTITIES, HEIGHT, WIDTH), "visibility": (ENTITIES,),
          "x": (ENTITIES,), "y": (ENTITIES,), "z": (ENTITIES,), "rotation": (ENTITIES,), "pixel_coords": (ENTITIES, 3),
          **{code: (ENTITIES,) for code in CODES}}
RAW = ("image", "mask", *CODES)  # features of one-byte strings: raw uint8 values
SOURCE = "clevr_with_masks"  # the scenes file's info["source"]: attributes as codes, not names


def decode_scene(example: dict, where: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One parsed record as (image uint8 `h w 3`, instance ids uint8 `h w`, objects): the objects are the entities
    1-10 whose visibility is 1, in order, object k owning the pixels of id k + 1."""
    for key, shape in SHAPES.items():
        value, size = example.get(key), int(np.prod(shape))
        kind = np.uint8 if key in RAW else np.float32
        if value is None:
            raise DataError(f"{where} is not a CLEVR-with-masks record: it has no feature {key!r}")
        if not isinstance(value, np.ndarray) or value.dtype != kind or value.size != size:
            held = f"{len(value)} {value.dtype if isinstance(value, np.ndarray) else 'byte-string'} values"
            raise DataError(f"{where} is not a CLEVR-with-masks record: feature {key!r} holds {held}, expected {size} "
                            f"{'one-byte strings' if kind is np.uint8 else 'floats'} ({'x'.join(map(str, shape))})")
    image = example["image"].reshape(SHAPES["image"])
    masks = example["mask"].reshape(SHAPES["mask"])
    visible = [e for e in range(1, ENTITIES) if example["visibility"][e] > 0.5]
    ids = np.zeros(ENTITIES, np.uint8)
    ids[visible] = np.arange(1, len(visible) + 1)
    owner = masks.argmax(0)  # the masks are 0 or 255 and cover each pixel once; a pixel none covers is background
    coords = example["pixel_coords"].reshape(ENTITIES, 3)
    objects = [{"3d_coords": [float(example[a][e]) for a in "xyz"], "pixel_coords": coords[e].tolist(),
                "rotation": float(example["rotation"][e]), "codes": {k: int(example[k][e]) for k in CODES}}
               for e in visible]
    return np.ascontiguousarray(image), ids[owner], objects


def _remove_unfinished(root: Path, split: str) -> int:
    """Remove the images and masks a conversion wrote for `split` before it stopped short of the split's scenes file
    (they are not part of any split); returns how many."""
    files = [f for kind in ("images", "masks") for f in (root / kind / split).glob("CLEVR_with_masks_*.png")]
    for f in files:
        f.unlink()
    return len(files)


def convert(tfrecords: Union[str, Path], out: Union[str, Path], train_scenes: int = 70000,
            val_scenes: Optional[int] = None, splits: Iterable[str] = ("train", "val"),
            progress: bool = False) -> dict[str, int]:
    """Write records [0, train_scenes) as split train and the next `val_scenes` (None: all the rest) as split val,
    those of `splits` only (records of a split left out are read past, not decoded); returns the scenes written per
    split. Each split's scenes file comes once the split is whole (train's when the first val record is read, or
    fails to read: a file damaged or cut short among the val records keeps train), so a split is whole once it
    exists; a split `out` already holds is refused before anything is read, and the images of one a conversion left
    unfinished (stopped, or failed) are removed first."""
    from tqdm import tqdm

    splits = list(splits)
    if not splits or any(s not in ("train", "val") for s in splits):
        raise UsageError(f"--splits {','.join(splits)}: the splits are train and val")
    if train_scenes < 0 or (val_scenes is not None and val_scenes < 0):
        raise UsageError("--train-scenes and --val-scenes count scenes: 0 or more")
    for split, n, other in (("train", train_scenes, "val"), ("val", val_scenes, "train")):
        if split in splits and n == 0:
            raise UsageError(f"--{split}-scenes 0 leaves split {split} empty: pass --splits {other} to write only that")
    root = check_clevr_out(out)
    for split in splits:
        path = root / "scenes" / f"CLEVR_{split}_scenes.json"
        if path.exists():
            raise UsageError(f"--out {root} already holds split {split!r} ({path}): pass another --out, or remove that "
                             f"file and images/{split}/, masks/{split}/ to write it again")
    left = sum(_remove_unfinished(root, split) for split in splits)
    if left:
        print(f"note: removed {left} files an unfinished conversion left in {root}", file=sys.stderr)
    # the record after the last one wanted (None: the file's end)
    end = train_scenes if "val" not in splits else None if val_scenes is None else train_scenes + val_scenes
    scenes: dict[str, list] = {s: [] for s in splits}
    wanted = None if end is None else end - (0 if "train" in splits else train_scenes)
    by_bytes = wanted is None and Path(tfrecords).is_file()  # to the file's end: its bytes are the bar's total
    bar = tqdm(total=Path(tfrecords).stat().st_size if by_bytes else wanted, desc="convert CLEVR with masks",
               unit="B" if by_bytes else " scenes", unit_scale=by_bytes, disable=not progress, dynamic_ncols=True)

    def add(record: bytes, index: int, split: str) -> None:
        where = f"{tfrecords} record {index}"
        image, ids, objects = decode_scene(parse_example(record, RAW, where), where)
        name = f"CLEVR_with_masks_{index:06d}.png"
        for kind, pixels in (("images", image), ("masks", ids)):  # plain writes: the split is whole once its scenes
            folder = root / kind / split                           # file (written last) exists
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / name)
        scenes[split].append({"image_index": index, "image_filename": name, "split": split, "objects": objects})
        if by_bytes:
            bar.set_postfix_str(f"{sum(map(len, scenes.values()))} scenes", refresh=False)
        else:
            bar.update(1)

    written = set()

    def write(split: str) -> None:
        """The split's scenes file: written once the split is whole, so that it is kept if a later record fails."""
        written.add(split)
        info = {"split": split, "version": "1.0", "source": SOURCE, "tfrecords": str(Path(tfrecords).resolve()),
                "attributes": "codes"}
        path = root / "scenes" / f"CLEVR_{split}_scenes.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f, s=scenes[split], i=info: f.write(json.dumps({"info": i, "scenes": s}).encode()))

    read = 0
    records = read_records(tfrecords, (lambda n: bar.update(n - bar.n)) if by_bytes else None)
    try:
        for index, record in enumerate(itertools.islice(records, end)):  # not one past the end: it may be damaged
            read += 1
            if index == train_scenes and "train" in scenes:  # train is whole: kept if the val records fail
                write("train")
            split = "train" if index < train_scenes else "val"
            if split in scenes:
                add(record, index, split)
    except DataError as e:
        if "train" in scenes and "train" not in written and len(scenes["train"]) == train_scenes and "val" in splits:
            write("train")  # the first val record is the damaged one
        kept = (" (split train is written whole: once the file is whole again, e.g. downloaded again, convert the "
                 "rest with --splits val)") if "train" in written else ""
        raise DataError(f"{e}{kept}") from None
    bar.close()
    if not all(scenes.values()):  # before any scenes file: a retry with other counts finds no split written
        for split in splits:
            _remove_unfinished(root, split)
        raise DataError(f"{tfrecords} holds {read} records" + (
            f", all of them in split train (--train-scenes {train_scenes}) and none left for split val: pass "
            f"--train-scenes N with N < {read} for a val split" if read else ""))
    if "train" in scenes and len(scenes["train"]) < train_scenes:
        print(f"note: {tfrecords} holds {read} records: split train got {len(scenes['train'])} scenes, not the "
              f"--train-scenes {train_scenes} asked for", file=sys.stderr)
    if val_scenes is not None and "val" in scenes and len(scenes["val"]) < val_scenes:
        print(f"note: {tfrecords} holds {read} records: split val got {len(scenes['val'])} scenes, not the "
              f"--val-scenes {val_scenes} asked for", file=sys.stderr)
    for split in splits:
        if split not in written:  # (train is, when a val record came)
            write(split)
    return {split: len(held) for split, held in scenes.items()}
