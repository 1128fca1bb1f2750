"""TFRecord files of `tf.train.Example` records, read without TensorFlow: enough to convert a dataset released in that
format (DeepMind's multi-object datasets) once into files the loaders here read.

Framing (TensorFlow's record_writer): per record a little-endian uint64 length, the masked CRC-32C of those 8 bytes,
the data, the masked CRC-32C of the data; both checksums are checked, so a damaged record is named as it is read
(not at the end of a GZIP stream, whose own CRC covers the whole file). A GZIP file is one gzip stream around all
records.
"""
from __future__ import annotations

import contextlib
import gzip
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import google_crc32c
import numpy as np

from .errors import DataError

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (Castagnoli): rotated right by 15 bits plus a constant, so that a CRC stored in
    data has a CRC of its own."""
    c = google_crc32c.value(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path: Union[str, Path], read: Optional[Callable[[int], None]] = None) -> Iterator[bytes]:
    """Each record's bytes, in file order; a file that is not TFRecord, or is cut short or damaged, raises DataError
    naming the record. `read(n)`, after each record: the bytes of the file read so far (compressed ones for GZIP, so
    the file's size is their total)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder: pass the TFRecord file in it (e.g. clevr_with_masks_train.tfrecords)")
    if not path.is_file():
        raise DataError(f"TFRecord file {path} not found")
    index = 0
    try:
        with open(path, "rb") as disk:
            # plain records open on a header whose length checksum holds; a GZIP file on gzip's magic bytes, which
            # a plain file's first record length (...8B1F) may also begin with
            start = disk.read(12)
            plain = len(start) == 12 and masked_crc32c(start[:8]) == struct.unpack("<I", start[8:])[0]
            gz = not plain and start[:2] == b"\x1f\x8b"
            disk.seek(0)
            with gzip.GzipFile(fileobj=disk, mode="rb") if gz else contextlib.nullcontext(disk) as f:
                while True:
                    head = f.read(12)
                    if not head:
                        return
                    if len(head) < 12:
                        raise DataError(f"{path} ends inside record {index}'s header: the file is cut short")
                    length, length_crc = struct.unpack("<QI", head)
                    if masked_crc32c(head[:8]) != length_crc:
                        raise DataError(f"{path}: record {index}'s length fails its checksum: not a TFRecord file, or "
                                        "damaged there")
                    data, tail = f.read(length), f.read(4)
                    if len(data) < length or len(tail) < 4:
                        raise DataError(f"{path} ends inside record {index}: the file is cut short")
                    if masked_crc32c(data) != struct.unpack("<I", tail)[0]:
                        raise DataError(f"{path}: record {index}'s data fails its checksum: the file is damaged there")
                    yield data
                    index += 1
                    if read is not None:
                        read(disk.tell())
    except (OSError, EOFError, zlib.error) as e:  # gzip: a bad stream, its CRC failing, or a stream cut short
        raise DataError(f"{path}: reading record {index} failed ({e}): the file is damaged or cut short") from None


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("a varint runs past the end")
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise ValueError("a varint beyond 64 bits")
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """A protobuf message's (field number, wire type, value): an int for varints, a memoryview for length-delimited
    fields, bytes for fixed 32/64-bit ones (groups, deprecated and absent from these messages, are refused)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError(f"field {number} runs past the end")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ValueError(f"field {number} runs past the end")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        else:
            raise ValueError(f"field {number} has wire type {wire}")
        yield number, wire, value


def _one_byte_entries(buf: memoryview, key: str) -> np.ndarray:
    """A BytesList whose entries are each one byte (how a FixedLenFeature of tf.string holds raw uint8 values) as
    uint8 `n`, without a Python object per entry."""
    raw = np.frombuffer(buf, np.uint8)
    if len(raw) % 3 or not ((raw[0::3] == 0x0A).all() and (raw[1::3] == 1).all()):  # tag (field 1, bytes), length 1
        raise ValueError(f"feature {key!r} is not a list of one-byte strings")
    return raw[2::3]


def _floats(buf: memoryview) -> np.ndarray:
    """FloatList.value (field 1), packed or not."""
    parts = [np.frombuffer(v, "<f4") for number, wire, v in _fields(buf) if number == 1 and wire in (2, 5)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _ints(buf: memoryview) -> np.ndarray:
    """Int64List.value (field 1), packed or not (varints; a negative one is its 64-bit two's complement)."""
    values = []
    for number, wire, v in _fields(buf):
        if number == 1 and wire == 2:  # packed
            pos = 0
            while pos < len(v):
                value, pos = _varint(v, pos)
                values.append(value)
        elif number == 1 and wire == 0:
            values.append(v)
    return np.array(values, np.uint64).astype(np.int64)


def parse_example(data: bytes, raw: Iterable[str] = (), where: str = "a record") -> dict[str, Union[np.ndarray,
                                                                                              list[bytes]]]:
    """A serialized tf.train.Example as {feature name: values}: a float32 / int64 array for a FloatList / Int64List,
    a list of bytes for a BytesList, except for the features named in `raw`, whose BytesList of one-byte entries
    (raw pixels) comes as a uint8 array. Malformed data raises DataError naming `where`."""
    out: dict = {}
    raw = set(raw)
    try:
        for number, wire, features in _fields(memoryview(data)):
            if number != 1 or wire != 2:  # Example.features
                continue
            for n, w, entry in _fields(features):  # Features.feature: map<string, Feature> entries
                if n != 1 or w != 2:
                    continue
                key, value = "", memoryview(b"")  # protobuf's defaults for a missing key or value
                for k, kw, v in _fields(entry):
                    if k == 1 and kw == 2:
                        key = bytes(v).decode()
                    elif k == 2 and kw == 2:
                        value = v
                kinds = [(k, v) for k, kw, v in _fields(value) if k in (1, 2, 3) and kw == 2]  # the oneof kind
                kind, body = kinds[-1] if kinds else (0, memoryview(b""))
                if kind == 1 and key in raw:
                    out[key] = _one_byte_entries(body, key)
                elif kind == 1:  # bytes_list
                    out[key] = [bytes(v) for k, kw, v in _fields(body) if k == 1 and kw == 2]
                elif kind == 2:  # float_list
                    out[key] = _floats(body)
                elif kind == 3:  # int64_list
                    out[key] = _ints(body)
                else:
                    out[key] = []
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where} does not parse as a tf.train.Example of this dataset ({e})") from None
    return out
