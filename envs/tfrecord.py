"""TFRecord files of `tf.train.Example` records, read without TensorFlow: enough to convert a dataset released in that
format (DeepMind's multi-object datasets) once into files the loaders here read.

Framing (TensorFlow's record_writer): per record a little-endian uint64 length, the masked CRC-32C of those 8 bytes,
the data, the masked CRC-32C of the data. A GZIP file is one gzip stream around all records. The length's CRC is
checked (a misframed or cut file is found at the record it breaks); the data's is not (pure Python would take
seconds per megabyte), but a GZIP stream carries its own CRC of everything, which Python's gzip checks at its end.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np

from .errors import DataError

_CASTAGNOLI = 0x82F63B78  # CRC-32C's polynomial, bit-reflected
_MASK_DELTA = 0xA282EAD8


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _CASTAGNOLI if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`: crc32c(b"123456789") == 0xE3069283."""
    c = 0xFFFFFFFF
    for byte in data:
        c = _TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits plus a constant, so a CRC stored in data has another CRC."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _open(path: Path) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")  # GZIP or plain records


def read_records(path: Union[str, Path]) -> Iterator[bytes]:
    """Each record's bytes, in file order; a file that is not TFRecord, or is cut short or damaged, raises DataError
    naming the record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"TFRecord file {path} not found")
    index = 0
    try:
        with _open(path) as f:
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
                data = f.read(length)
                if len(data) < length or len(f.read(4)) < 4:
                    raise DataError(f"{path} ends inside record {index}: the file is cut short")
                yield data
                index += 1
    except (OSError, EOFError) as e:  # gzip: a bad stream, its CRC failing, or a stream cut short
        raise DataError(f"{path}: reading record {index} failed ({e}): the file is damaged or cut short") from None


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("a varint runs past the end")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """A protobuf message's (field number, wire type, value): an int for varints, a memoryview for length-delimited
    fields, bytes for fixed 32/64-bit ones."""
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
            value, pos = bytes(buf[pos:pos + size]), pos + size
        else:
            raise ValueError(f"field {number} has wire type {wire}")
        yield number, wire, value


def _bytes_list(buf: memoryview) -> list[bytes]:
    """BytesList.value (field 1), each entry as bytes."""
    return [bytes(v) for number, wire, v in _fields(buf) if number == 1 and wire == 2]


def _one_byte_entries(buf: memoryview) -> np.ndarray:
    """A BytesList whose entries are all one byte long (how a FixedLenFeature of tf.string shape [..] holds raw
    uint8 values, one per entry) as uint8 `n`, without a Python object per entry; None when it is not one."""
    raw = np.frombuffer(buf, np.uint8)
    if len(raw) % 3 or not ((raw[0::3] == 0x0A).all() and (raw[1::3] == 1).all()):  # tag (field 1, bytes), length 1
        return None
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


def parse_example(data: bytes) -> dict[str, Union[np.ndarray, list[bytes]]]:
    """A serialized tf.train.Example as {feature name: values}: a float32 / int64 array for a FloatList / Int64List,
    a uint8 array for a BytesList of one-byte entries (raw pixels), else a list of bytes."""
    out: dict = {}
    try:
        for number, wire, features in _fields(memoryview(data)):
            if number != 1 or wire != 2:  # Example.features
                continue
            for n, w, entry in _fields(features):  # Features.feature: map<string, Feature> entries
                if n != 1 or w != 2:
                    continue
                key, value = None, memoryview(b"")
                for k, kw, v in _fields(entry):
                    if k == 1 and kw == 2:
                        key = bytes(v).decode()
                    elif k == 2 and kw == 2:
                        value = v
                kinds = [(k, v) for k, kw, v in _fields(value) if kw == 2]  # Feature: the oneof kind
                kind, body = kinds[-1] if kinds else (0, memoryview(b""))
                if kind == 1:  # bytes_list
                    raw = _one_byte_entries(body)
                    out[key] = raw if raw is not None else _bytes_list(body)
                elif kind == 2:  # float_list
                    out[key] = _floats(body)
                elif kind == 3:  # int64_list
                    out[key] = _ints(body)
                else:
                    out[key] = []
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"a record is not a tf.train.Example ({e})") from None
    return out
