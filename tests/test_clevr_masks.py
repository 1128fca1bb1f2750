"""CLEVR with masks (DeepMind's multi-object-datasets TFRecords) read without TensorFlow and converted to a CLEVR
root: records written by trusted code (the protobuf library serializes the Examples, tensorboard's RecordWriter
frames them) read back exactly, and the converted root scores FG-ARI."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch

import run
from envs.clevr import ClevrDataset
from envs.clevr_masks import convert
from envs.errors import DataError, UsageError
from envs.tfrecord import masked_crc32c, parse_example, read_records

H, W, E = 240, 320, 11


def example_class():
    """tf.train.Example (TensorFlow's example.proto / feature.proto field numbers) as a protobuf-library class."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="test_example.proto", package="tfx", syntax="proto3")

    def message(name, fields, into=None):
        m = (f.message_type if into is None else into).add(name=name)
        for number, (field, kind, label, type_name, oneof) in enumerate(fields, 1):
            spec = m.field.add(name=field, number=number, type=kind, label=label)
            if type_name:
                spec.type_name = type_name
            if oneof is not None:
                spec.oneof_index = oneof
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [("value", F.TYPE_BYTES, rep, None, None)])
    message("FloatList", [("value", F.TYPE_FLOAT, rep, None, None)])
    message("Int64List", [("value", F.TYPE_INT64, rep, None, None)])
    feature = message("Feature", [("bytes_list", F.TYPE_MESSAGE, opt, ".tfx.BytesList", 0),
                                  ("float_list", F.TYPE_MESSAGE, opt, ".tfx.FloatList", 0),
                                  ("int64_list", F.TYPE_MESSAGE, opt, ".tfx.Int64List", 0)])
    feature.oneof_decl.add(name="kind")
    features = message("Features", [("feature", F.TYPE_MESSAGE, rep, ".tfx.Features.FeatureEntry", None)])
    entry = message("FeatureEntry", [("key", F.TYPE_STRING, opt, None, None),
                                     ("value", F.TYPE_MESSAGE, opt, ".tfx.Feature", None)], into=features.nested_type)
    entry.options.map_entry = True
    message("Example", [("features", F.TYPE_MESSAGE, opt, ".tfx.Features", None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tfx.Example"))


Example = example_class()


def scene_record(objects: int, seed: int, padding_at: int = 2) -> tuple[bytes, np.ndarray, np.ndarray, dict]:
    """A CLEVR-with-masks record (serialized) of `objects` boxes, with entity `padding_at` unused (all-zero mask,
    visibility 0) and the objects in the entities around it; also its image, the instance ids the conversion
    should give (object k: id k + 1) and the features."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    owner = np.zeros((H, W), np.int64)
    entities = [e for e in range(1, E) if e != padding_at][:objects]
    ids = np.zeros((H, W), np.uint8)
    for k, e in enumerate(entities):
        top, left = 30 + 60 * (k // 4), 70 + 45 * (k % 4)
        owner[top:top + 40, left:left + 30] = e
        ids[top:top + 40, left:left + 30] = k + 1
    masks = np.stack([(owner == e) * 255 for e in range(E)]).astype(np.uint8)[..., None]  # 11 h w 1
    visibility = np.zeros(E, np.float32)
    visibility[[0, *entities]] = 1.0
    floats = {k: np.where(visibility > 0, rng.uniform(-3, 3, E), 0.0).astype(np.float32)
              for k in ("x", "y", "z", "rotation")}
    floats["visibility"] = visibility
    floats["pixel_coords"] = rng.uniform(0, 300, (E, 3)).astype(np.float32)
    codes = {k: np.where(visibility > 0, rng.integers(1, n + 1, E), 0).astype(np.uint8)
             for k, n in (("color", 8), ("shape", 3), ("size", 2), ("material", 2))}
    codes["color"][0] = 0  # the background's codes are 0
    ex = Example()
    for key, pixels in (("image", image), ("mask", masks), *codes.items()):
        ex.features.feature[key].bytes_list.value.extend([bytes([v]) for v in pixels.ravel().tolist()])
    for key, values in floats.items():
        ex.features.feature[key].float_list.value.extend(values.ravel().tolist())
    return ex.SerializeToString(), image, ids, {**floats, **codes}


def write_records(path, records, compress=True):
    from tensorboard.summary.writer.record_writer import RecordWriter

    writer = RecordWriter(gzip.open(path, "wb") if compress else open(path, "wb"))
    for record in records:
        writer.write(record)
    writer.close()
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Four scenes as the release stores them (one GZIP file): 3 and 7 objects, then 2 and 4."""
    scenes = [scene_record(n, seed) for seed, n in enumerate((3, 7, 2, 4))]
    path = write_records(tmp_path_factory.mktemp("release") / "clevr_with_masks_train.tfrecords",
                         [s[0] for s in scenes])
    return path, scenes


def test_checksums_are_masked_as_tensorflow_masks_them():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as trusted

    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    assert masked_crc32c(data) == trusted(data) and masked_crc32c(b"") == trusted(b"")
    assert masked_crc32c(b"123456789") == trusted(b"123456789") == 0xC78AB0E5  # CRC-32C's check value, masked


def test_examples_the_protobuf_library_writes_parse_back(tmp_path):
    ex = Example()
    ex.features.feature["words"].bytes_list.value.extend([b"cube", b"", b"sphere"])
    ex.features.feature["pixels"].bytes_list.value.extend([b"\x00", b"\xff", b"\x07"])
    ex.features.feature["letter"].bytes_list.value.extend([b"a"])  # one byte, yet a string: only `raw` reads pixels
    ex.features.feature["floats"].float_list.value.extend([1.5, -2.25, 3e6])
    ex.features.feature["ints"].int64_list.value.extend([0, 300, -5, 2 ** 40])
    ex.features.feature["empty"].float_list.value.extend([])
    parsed = parse_example(ex.SerializeToString(), raw=["pixels"])
    assert parsed["words"] == [b"cube", b"", b"sphere"] and parsed["letter"] == [b"a"]
    assert parsed["pixels"].dtype == np.uint8 and parsed["pixels"].tolist() == [0, 255, 7]
    assert parsed["floats"].dtype == np.float32 and parsed["floats"].tolist() == [1.5, -2.25, 3e6]
    assert parsed["ints"].tolist() == [0, 300, -5, 2 ** 40]
    assert parsed["empty"].size == 0
    # an unpacked FloatList (proto2 writers), by hand: two fixed32 fields of number 1
    floats = b"".join(b"\x0d" + struct.pack("<f", v) for v in (0.5, 4.0))
    feature = b"\x12" + bytes([len(floats)]) + floats  # Feature.float_list
    entry = b"\x0a\x01f" + b"\x12" + bytes([len(feature)]) + feature  # key "f", value
    features = b"\x0a" + bytes([len(entry)]) + entry
    assert parse_example(b"\x0a" + bytes([len(features)]) + features)["f"].tolist() == [0.5, 4.0]
    with pytest.raises(DataError, match="record 7 does not parse as a tf.train.Example of this dataset"):
        parse_example(b"\x0a\x20\x0a", where="record 7")  # a field longer than the record
    ints = b"\x08" + b"\xff" * 9 + b"\x7f"  # Int64List.value: a 10-byte varint with bits past the 64th
    feature = b"\x1a" + bytes([len(ints)]) + ints  # Feature.int64_list
    entry = b"\x0a\x01i" + b"\x12" + bytes([len(feature)]) + feature
    features = b"\x0a" + bytes([len(entry)]) + entry
    with pytest.raises(DataError, match=r"record 8 does not parse .*\(a varint beyond 64 bits\)"):
        parse_example(b"\x0a" + bytes([len(features)]) + features, where="record 8")
    with pytest.raises(DataError, match="feature 'words' is not a list of one-byte strings"):
        parse_example(ex.SerializeToString(), raw=["words"])


def test_records_read_back_from_plain_and_gzip_files_and_damage_is_named(tmp_path):
    records = [b"first", b"", bytes(range(256)) * 3]
    for compress in (False, True):
        path = write_records(tmp_path / f"r{compress}.tfrecords", records, compress)
        read = []
        assert list(read_records(path, read.append)) == records
        assert len(read) == 3 and read == sorted(read) and read[-1] == path.stat().st_size  # bytes on disk so far
    for offset, what in ((12 + 5 + 4 + 1, "length"), (12 + 5 + 4 + 12 + 40, "data")):  # in record 1, record 2
        raw = bytearray((tmp_path / "rFalse.tfrecords").read_bytes())
        raw[offset] ^= 1
        (tmp_path / "bad.tfrecords").write_bytes(bytes(raw))
        with pytest.raises(DataError, match=f"record {1 if what == 'length' else 2}'s {what} fails its checksum"):
            list(read_records(tmp_path / "bad.tfrecords"))
    packed = bytearray((tmp_path / "rTrue.tfrecords").read_bytes())
    packed[len(packed) // 2] ^= 0xFF  # inside the deflate stream: zlib's error, not a traceback
    (tmp_path / "bad.gz").write_bytes(bytes(packed))
    with pytest.raises(DataError, match="the file is damaged"):
        list(read_records(tmp_path / "bad.gz"))
    (tmp_path / "cut.tfrecords").write_bytes((tmp_path / "rFalse.tfrecords").read_bytes()[:-10])
    with pytest.raises(DataError, match="ends inside record 2: the file is cut short"):
        list(read_records(tmp_path / "cut.tfrecords"))
    (tmp_path / "cut.gz").write_bytes((tmp_path / "rTrue.tfrecords").read_bytes()[:-6])  # gzip's trailer
    with pytest.raises(DataError, match="the file is damaged or cut short"):
        list(read_records(tmp_path / "cut.gz"))
    for compress in (False, True):  # a first record 0x8B1F bytes long: its length opens with gzip's magic
        path = write_records(tmp_path / f"magic{compress}.tfrecords", [b"x" * 0x8B1F], compress)
        assert list(read_records(path)) == [b"x" * 0x8B1F]
    (tmp_path / "text.tfrecords").write_text("not records at all\n")
    with pytest.raises(DataError, match="record 0's length fails its checksum: not a TFRecord file"):
        list(read_records(tmp_path / "text.tfrecords"))
    with pytest.raises(DataError, match="not found"):
        list(read_records(tmp_path / "missing.tfrecords"))
    with pytest.raises(DataError, match="is a folder: pass the TFRecord file in it"):
        list(read_records(tmp_path))


def test_converted_scenes_keep_pixels_ids_and_objects(release, tmp_path):
    path, scenes = release
    assert convert(path, tmp_path / "c", train_scenes=2) == {"train": 2, "val": 2}
    full = ClevrDataset(tmp_path / "c", "val", resolution=(H, W))  # the frame as it is: no resize
    for i, (_, image, ids, features) in enumerate(scenes[2:]):
        item = full[i]
        assert torch.equal(item["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        assert torch.equal(item["mask"], torch.from_numpy(ids.astype(np.int64)))  # the padding entity skipped
        n = int(features["visibility"][1:].sum())
        target = full.targets[i]
        visible = np.flatnonzero(features["visibility"][1:]) + 1
        xyz = np.stack([features[k][visible] for k in "xyz"], 1)
        assert torch.allclose(target[:n, :3], torch.from_numpy((xyz + 3) / 6).float())
        assert target[:n, -1].tolist() == [1.0] * n and not target[n:].any()
        assert not target[:, 3:-1].any()  # the attributes' meaning is not known: no one-hot claims one
    listed = json.loads((tmp_path / "c" / "scenes" / "CLEVR_val_scenes.json").read_text())
    obj = listed["scenes"][0]["objects"][1]  # entity 3 (entity 2 is the padding)
    assert obj["codes"] == {k: int(scenes[2][3][k][3]) for k in ("color", "shape", "size", "material")}
    assert listed["info"]["source"] == "clevr_with_masks" and listed["scenes"][0]["image_index"] == 2
    six = ClevrDataset(tmp_path / "c", "train", resolution=(128, 128), crop=True, max_objects=6)
    assert len(six) == 1 and six[0]["mask"].shape == (128, 128)  # CLEVR6 drops the 7-object scene
    crop = torch.from_numpy(scenes[0][2][29:221, 64:256].astype(np.int64))  # the discovery window, nearest resize
    resized = torch.nn.functional.interpolate(crop[None, None].float(), size=(128, 128), mode="nearest-exact")
    assert torch.equal(six[0]["mask"], resized[0, 0].long())


def test_converting_a_split_alone_and_refusing_to_write_one_twice(release, tmp_path, capsys):
    path, _ = release
    assert convert(path, tmp_path / "b", train_scenes=3, splits=["val"], progress=True) == {"val": 1}
    bar = capsys.readouterr().err.strip().split("\r")[-1]  # to the file's end, of unknown length: a bar of its bytes
    assert bar.startswith("convert CLEVR with masks: 100%") and bar.endswith(", 1 scenes]")
    assert convert(path, tmp_path / "c", train_scenes=3, val_scenes=1, splits=["val"]) == {"val": 1}
    assert convert(path, tmp_path / "v", train_scenes=2, val_scenes=5, splits=["val"]) == {"val": 2}
    assert "split val got 2 scenes, not the --val-scenes 5 asked for" in capsys.readouterr().err
    assert not (tmp_path / "c" / "images" / "train").exists()
    assert len(ClevrDataset(tmp_path / "c", "val")) == 1
    with pytest.raises(UsageError, match="already holds split 'val'"):
        convert(path, tmp_path / "c", splits=["val"])
    with pytest.raises(DataError, match=r"holds 4 records, all of them in split train \(--train-scenes 70000\) and "
                                        "none left for split val: pass --train-scenes N with N < 4 for a val split"):
        convert(path, tmp_path / "d")
    assert not (tmp_path / "d" / "scenes").exists()  # no split written: the same command with fewer is not refused
    assert not list((tmp_path / "d" / "images" / "train").iterdir())  # nor its images left behind
    assert convert(path, tmp_path / "d", train_scenes=3) == {"train": 3, "val": 1}
    assert "--train-scenes" not in capsys.readouterr().err
    # a conversion stopped before its scenes file: its images go before the next one writes a split there
    (tmp_path / "d" / "images" / "val" / "CLEVR_with_masks_000009.png").write_bytes(b"")
    (tmp_path / "d" / "scenes" / "CLEVR_val_scenes.json").unlink()
    assert convert(path, tmp_path / "d", train_scenes=2, splits=["val"]) == {"val": 2}
    assert "note: removed 3 files an unfinished conversion left in" in capsys.readouterr().err  # its 2, and ours
    assert sorted(f.name for f in (tmp_path / "d" / "images" / "val").iterdir()) == \
        ["CLEVR_with_masks_000002.png", "CLEVR_with_masks_000003.png"]
    assert convert(path, tmp_path / "t", train_scenes=70, splits=["train"]) == {"train": 4}
    assert "split train got 4 scenes, not the --train-scenes 70 asked for" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--val-scenes 0 leaves split val empty: pass --splits train"):
        convert(path, tmp_path / "d", val_scenes=0)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # another kind of folder: nothing mixed into it
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    for folder, kind in (("run", "a run directory"), ("data", "an episode dataset")):
        with pytest.raises(UsageError, match=f"--out .*{folder} is {kind}.*, not a CLEVR root; choose another --out"):
            convert(path, tmp_path / folder, train_scenes=3)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoints"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["meta.json"]
    other = Example()  # another dataset's record: an image, but no masks
    other.features.feature["image"].bytes_list.value.extend([b"\x00"] * (H * W * 3))
    with pytest.raises(DataError, match="record 0 is not a CLEVR-with-masks record: it has no feature 'mask'"):
        convert(write_records(tmp_path / "other.tfrecords", [other.SerializeToString()]), tmp_path / "e",
                train_scenes=1, splits=["train"])
    colorless = Example()
    colorless.ParseFromString(scene_record(2, 0)[0])
    del colorless.features.feature["color"]
    with pytest.raises(DataError, match="record 0 is not a CLEVR-with-masks record: it has no feature 'color'"):
        convert(write_records(tmp_path / "colorless.tfrecords", [colorless.SerializeToString()]), tmp_path / "f",
                train_scenes=1, splits=["train"])


def test_a_file_cut_short_among_the_val_records_keeps_the_whole_train_split(release, tmp_path):
    path, _ = release
    raw = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.tfrecords"
    cut.write_bytes(raw[:-100])  # inside record 3, the second val scene
    with pytest.raises(DataError, match=r"ends inside record 3: the file is cut short \(split train is written whole: "
                                        r"once the file is whole again, e.g. downloaded again, convert the rest with "
                                        r"--splits val\)"):
        convert(cut, tmp_path / "c", train_scenes=2)
    assert len(ClevrDataset(tmp_path / "c", "train")) == 2
    assert not (tmp_path / "c" / "scenes" / "CLEVR_val_scenes.json").exists()
    with pytest.raises(DataError, match=r"ends inside record 3: the file is cut short \(split train is written whole"):
        convert(cut, tmp_path / "f", train_scenes=3)  # the first val record is the one cut
    assert len(ClevrDataset(tmp_path / "f", "train")) == 3
    assert convert(cut, tmp_path / "o", train_scenes=3, splits=["train"]) == {"train": 3}  # record 3 is not read
    with pytest.raises(DataError, match=r"ends inside record 3: the file is cut short$"):
        convert(cut, tmp_path / "t", train_scenes=4)  # train itself is cut short: nothing written
    assert not (tmp_path / "t" / "scenes").exists()


def test_cli_converts_and_discovery_scores_fg_ari_on_it_while_set_prediction_is_refused(release, tmp_path, capsys):
    path, _ = release
    out = tmp_path / "c"
    assert run.main(["convert-clevr-masks", "--tfrecords", str(path), "--out", str(out), "--train-scenes", "2",
                     "--splits", "train, val", "--no-progress"]) == 0
    assert f"wrote 2 train and 2 val scenes to {out}" in capsys.readouterr().out
    assert run.main(["convert-clevr-masks", "--tfrecords", str(path), "--out", str(tmp_path / "t"), "--train-scenes",
                     "2", "--splits", "train", "--no-progress"]) == 0
    assert "FG-ARI: convert split val too (--splits), then python run.py pretrain" in capsys.readouterr().out
    tiny = ["data.source=clevr", f"data.root={out}", "data.split=train", "data.eval_split=val", "data.crop=true",
            "data.resolution=32", "data.max_objects=6", "data.eval_images=2", "train.steps=1", "train.batch_size=2",
            "train.threads=1"]
    assert run.main(["pretrain", "--config", "clevr_discovery_tiny", "--run-dir", str(tmp_path / "r"),
                     "--no-progress", *tiny]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    scored = next(r for r in rows if "eval/fg_ari" in r)  # the 4-object val scene (the preset keeps 3 to 6 objects)
    assert scored["eval/images"] == 1 and -100.0 <= scored["eval/fg_ari"] <= 100.0
    assert (f"note: split val of {out} holds 1 scene of 3-6 objects, fewer than data.eval_images=2: the evaluations "
            "score those") in capsys.readouterr().err
    capsys.readouterr()
    assert run.main(["pretrain", "--config", "clevr_tiny", "--run-dir", str(tmp_path / "s"), "--no-progress",
                     *tiny, "task=setpred"]) == 2
    assert "converted from CLEVR with masks" in capsys.readouterr().err
