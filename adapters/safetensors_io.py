"""Untrusted safetensors headers, read and checked before any tensor byte is touched.

`read_header(path)` returns every tensor's dtype, shape and *absolute* byte range in the
file. Checked against the file: header length, UTF-8 JSON object, known dtypes, integer
shapes, `end - start == prod(shape) * itemsize`, ranges inside the data section, no
overlaps. Any violation raises `CheckpointError` naming the file and the tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import msgspec

from .errors import CheckpointError
from .spec import DTYPE_SIZES

# The reference implementation refuses headers above 100 MB; so do we (a corrupt length
# field must not make us allocate gigabytes).
MAX_HEADER_BYTES = 100_000_000


class TensorEntry(msgspec.Struct, frozen=True):
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    length: int


class SafetensorsHeader(msgspec.Struct, frozen=True):
    path: str
    data_start: int  # absolute offset of the data section (8 + header length)
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"file is {size} bytes, too short for a safetensors header",
                                      fix="the file is truncated; re-create it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(path, f"header length {n} does not fit a file of {size} bytes",
                                      fix="the file is truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"header is not valid UTF-8 JSON ({e})",
                              fix="the file is corrupted; re-create it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, "header is not a JSON object", fix="the file is corrupted; re-create it")
    data_start = 8 + n
    data_len = size - data_start
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        tensors[name] = _check_entry(path, name, info, data_start, data_len)
    _check_no_overlap(path, tensors)
    return SafetensorsHeader(str(path), data_start, tensors, metadata)


def _check_entry(path: Path, name: str, info: object, data_start: int, data_len: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise CheckpointError(path, "entry is not an object", tensor=name)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(path, f"unknown dtype {dtype!r}", tensor=name,
                              fix=f"expected one of {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(path, f"bad shape {shape!r}", tensor=name)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
        raise CheckpointError(path, f"bad data_offsets {offsets!r}", tensor=name)
    begin, end = offsets
    want = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != want:
        raise CheckpointError(path, f"data_offsets span {end - begin} bytes but {dtype}{shape} needs {want}",
                              tensor=name, fix="the header is corrupted; re-create the file")
    if end > data_len:
        raise CheckpointError(path, f"data_offsets end {end} is past the data section ({data_len} bytes)",
                              tensor=name, fix="the file is truncated; re-create it")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, end - begin)


def _check_no_overlap(path: Path, tensors: dict[str, TensorEntry]) -> None:
    last_end, last_name = -1, None
    for t in sorted(tensors.values(), key=lambda t: (t.offset, t.length)):
        if t.length and t.offset < last_end:
            raise CheckpointError(path, f"bytes overlap those of {last_name}", tensor=t.name,
                                  fix="the header is corrupted; re-create the file")
        if t.length:
            last_end, last_name = t.offset + t.length, t.name
