"""The packed expert store on disk: index structs, per-layer layout, and the layer writer.

One file per MoE layer, `layer_{l:03d}.safetensors`, a valid safetensors file laid out so
that ONE EXPERT = ONE CONTIGUOUS, 4 KiB-ALIGNED BYTE RANGE = ONE READ:

    [u64 header length][JSON header, padded with spaces so the data starts at a 4096 boundary]
    expert 0: expert.0.<role> ... (adjacent)  __pad__.0 (U8 zeros up to the next 4096 boundary)
    expert 1: ...

safetensors forbids holes between tensors, hence spaces in the header and explicit U8
`__pad__.{e}` tensors between experts. Every expert records `offset` (absolute, % 4096 == 0),
`length` (its real bytes) and `read_length` (`length` rounded up to 4096; the pad tensor
makes that range lie inside the file), so an O_DIRECT reader fetches
`[offset, offset + read_length)` and uses the first `length` bytes. Within an expert the
2-byte tensors come first, so every tensor offset is a multiple of its itemsize and a
reader can take `.view(dtype)` of a slice of one uint8 buffer without copying.

The layer file's `__metadata__["layer_meta"]` holds a `LayerMeta` (source digest, dtype,
every expert's entry with its checksum): a finished layer can be reused by a resumed
precompute, or its `store.json` entries rebuilt, without recomputing anything.
`store.json` (a `StoreIndex`) is written last and names everything a reader needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Iterable

import msgspec

from .spec import DTYPE_SIZES, ModelSpec, TensorSpec

ALIGN = 4096
FORMAT_VERSION = 1
FORMAT_NAME = "two-level-moe-cache/expert-store"
CHECKSUM_ALGORITHM = "crc32"  # zlib.crc32 of the expert's `length` bytes, 8 lowercase hex digits
INDEX_NAME = "store.json"
PLACEHOLDER_CHECKSUM = "00000000"  # same width as a real one: the header length never changes
# Store dtype name -> safetensors dtype of the dense tensors (mxfp4 keeps the source's dtypes).
STORE_DTYPES: dict[str, str | None] = {"bfloat16": "BF16", "float16": "F16", "mxfp4": None}


def layer_file_name(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def checksum(data: bytes | bytearray | memoryview) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


class StoreTensor(msgspec.Struct, frozen=True):
    """One tensor inside an expert's range; `offset` is relative to the expert's start."""

    role: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.role, self.dtype, self.shape).nbytes


class StoreExpert(msgspec.Struct, frozen=True):
    """Where one expert lies: `length` real bytes at absolute `offset` of `file`."""

    layer: int
    expert: int
    file: str
    offset: int
    length: int
    read_length: int  # length rounded up to ALIGN; the bytes past `length` are zero padding
    checksum: str
    tensors: tuple[StoreTensor, ...]


class SourceFile(msgspec.Struct, frozen=True):
    name: str  # relative to the source checkpoint directory
    size: int
    mtime_ns: int
    header_sha256: str  # of the safetensors header (length field + JSON)


class SourceIdentity(msgspec.Struct, frozen=True):
    adapter: str
    path: str
    files: tuple[SourceFile, ...]


class StoreLayer(msgspec.Struct, frozen=True):
    layer: int
    file: str
    size: int


class LayerMeta(msgspec.Struct, frozen=True):
    """Self-description of one finished layer file, kept in its safetensors `__metadata__`."""

    version: int
    layer: int
    dtype: str
    source_digest: str
    size: int
    experts: tuple[StoreExpert, ...]


class StoreIndex(msgspec.Struct, frozen=True):
    """`store.json`: everything a reader needs, written last and atomically."""

    version: int
    checksum_algorithm: str
    alignment: int
    dtype: str
    model: ModelSpec  # the source's description
    expert_tensors: tuple[TensorSpec, ...]  # one expert as stored here
    source: SourceIdentity
    source_digest: str
    layers: tuple[StoreLayer, ...]
    experts: tuple[StoreExpert, ...]

    @property
    def max_read_length(self) -> int:
        """Bytes of the largest expert as read from disk: one RAM slot, one staging buffer."""
        return max(x.read_length for x in self.experts)


_meta_encoder = msgspec.json.Encoder()
_meta_decoder = msgspec.json.Decoder(LayerMeta)


def source_digest(identity: SourceIdentity, dtype: str, tensors: tuple[TensorSpec, ...]) -> str:
    """What makes two stores interchangeable: same source bytes (not path), dtype and layout."""
    blob = _meta_encoder.encode([FORMAT_VERSION, identity.adapter, identity.files, dtype, tensors])
    return hashlib.sha256(blob).hexdigest()


def header_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        # A non-safetensors file (or a corrupt length) is identified by its first MiB instead.
        body = f.read(n) if 0 < n <= 100_000_000 else f.read(1 << 20)
    return hashlib.sha256(head + body).hexdigest()


class LayerPlan(msgspec.Struct, frozen=True):
    """The exact byte layout of one layer file, known before any expert is converted."""

    layer: int
    file: str
    dtype: str
    source_digest: str
    data_start: int
    size: int
    experts: tuple[StoreExpert, ...]  # checksums are placeholders

    def header(self, checksums: list[str] | None = None) -> bytes:
        """The full header (length field + JSON + space padding), exactly `data_start` bytes."""
        body = self.header_json(checksums)
        room = self.data_start - 8
        assert len(body) <= room, (len(body), room)
        return struct.pack("<Q", room) + body + b" " * (room - len(body))

    def header_json(self, checksums: list[str] | None = None) -> bytes:
        experts = self.experts
        if checksums is not None:
            experts = tuple(msgspec.structs.replace(x, checksum=c) for x, c in zip(experts, checksums, strict=True))
        meta = LayerMeta(FORMAT_VERSION, self.layer, self.dtype, self.source_digest, self.size, experts)
        obj: dict[str, object] = {"__metadata__": {"format": FORMAT_NAME,
                                                   "layer_meta": _meta_encoder.encode(meta).decode()}}
        for x in experts:
            rel = x.offset - self.data_start
            for t in x.tensors:
                obj[f"expert.{x.expert}.{t.role}"] = {"dtype": t.dtype, "shape": list(t.shape),
                                                      "data_offsets": [rel + t.offset, rel + t.offset + t.nbytes]}
            if x.read_length > x.length:
                obj[f"__pad__.{x.expert}"] = {"dtype": "U8", "shape": [x.read_length - x.length],
                                              "data_offsets": [rel + x.length, rel + x.read_length]}
        return json.dumps(obj, separators=(",", ":")).encode()


def plan_layer(layer: int, num_experts: int, tensors: tuple[TensorSpec, ...], dtype: str, digest: str) -> LayerPlan:
    # Widest itemsize first: every tensor offset is then a multiple of its itemsize.
    order = sorted(tensors, key=lambda t: -DTYPE_SIZES[t.dtype])
    rel, off = [], 0
    for t in order:
        assert off % DTYPE_SIZES[t.dtype] == 0, (t, off)
        rel.append(StoreTensor(t.role, t.dtype, t.shape, off))
        off += t.nbytes
    length, read_length = off, round_up(off)
    name = layer_file_name(layer)
    data_start = ALIGN
    while True:  # offsets are in the header, so grow the header room until it stops moving
        experts = tuple(StoreExpert(layer, e, name, data_start + e * read_length, length, read_length,
                                    PLACEHOLDER_CHECKSUM, tuple(rel)) for e in range(num_experts))
        plan = LayerPlan(layer, name, dtype, digest, data_start, data_start + num_experts * read_length, experts)
        need = round_up(8 + len(plan.header_json()))
        if need <= data_start:
            return plan
        data_start = need


def read_layer_meta(path: Path) -> LayerMeta:
    """The `LayerMeta` of a finished layer file (header checked by safetensors_io first)."""
    from .errors import CheckpointError
    from .safetensors_io import read_header

    hdr = read_header(path)
    raw = hdr.metadata.get("layer_meta")
    if hdr.metadata.get("format") != FORMAT_NAME or raw is None:
        raise CheckpointError(path, "not a layer file of the expert store (no layer_meta in __metadata__)",
                              fix="remove it or use another --out")
    try:
        return _meta_decoder.decode(raw)
    except msgspec.DecodeError as e:
        raise CheckpointError(path, f"layer_meta is invalid: {e}", fix="re-run precompute with --force") from None


class LayerWriter:
    """Writes one layer file at a temporary name; `finish` makes it durable and atomic."""

    def __init__(self, plan: LayerPlan, final: Path, partial: Path):
        self.plan, self.final, self.partial = plan, final, partial
        self._f = open(partial, "wb")
        self._f.write(plan.header())  # placeholder checksums; rewritten in place by finish()
        self._sums: list[str] = []

    def write_expert(self, parts: Iterable[bytes | bytearray | memoryview]) -> int:
        """Append the next expert's tensors (in plan order); returns its byte count."""
        x = self.plan.experts[len(self._sums)]
        crc, n = 0, 0
        for t, buf in zip(x.tensors, parts, strict=True):
            mv = memoryview(buf).cast("B")
            if mv.nbytes != t.nbytes:
                raise ValueError(f"expert {x.layer}/{x.expert} {t.role}: {mv.nbytes} bytes, layout says {t.nbytes}")
            crc = zlib.crc32(mv, crc)
            self._f.write(mv)
            n += mv.nbytes
        self._f.write(bytes(x.read_length - x.length))
        self._sums.append(f"{crc & 0xFFFFFFFF:08x}")
        return n

    def finish(self) -> LayerMeta:
        assert len(self._sums) == len(self.plan.experts)
        self._f.seek(0)
        self._f.write(self.plan.header(self._sums))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        assert self.partial.stat().st_size == self.plan.size
        os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        experts = tuple(msgspec.structs.replace(x, checksum=c) for x, c in zip(self.plan.experts, self._sums))
        return LayerMeta(FORMAT_VERSION, self.plan.layer, self.plan.dtype, self.plan.source_digest,
                         self.plan.size, experts)

    def abort(self) -> None:
        self._f.close()
        self.partial.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
