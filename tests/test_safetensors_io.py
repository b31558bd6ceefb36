"""The checked header reader: every malformed file is a CheckpointError naming the file (and tensor)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.errors import CheckpointError
from adapters.safetensors_io import read_header


def _raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_reads_a_reference_file_with_absolute_offsets(tmp_path):
    f = tmp_path / "ok.safetensors"
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([1, 2, 3], dtype=torch.uint8)
    save_file({"a": a, "b": b}, str(f), metadata={"format": "pt"})
    hdr = read_header(f)
    assert hdr.metadata == {"format": "pt"} and set(hdr.tensors) == {"a", "b"}
    data = f.read_bytes()
    ta = hdr.tensors["a"]
    assert (ta.dtype, ta.shape, ta.length) == ("F32", (2, 3), 24)
    assert data[ta.offset:ta.offset + ta.length] == a.numpy().tobytes()
    tb = hdr.tensors["b"]
    assert data[tb.offset:tb.offset + tb.length] == bytes([1, 2, 3])


def test_truncated_file(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match=r"t.safetensors: file is 3 bytes, too short"):
        read_header(f)


def test_header_length_past_eof(tmp_path):
    f = _raw(tmp_path / "h.safetensors", b'{"a": 1}')
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1000) + data[8:])
    with pytest.raises(CheckpointError, match=r"h.safetensors: header length 1000 does not fit a file of 16 bytes"):
        read_header(f)


def test_corrupted_header_json(tmp_path):
    f = _raw(tmp_path / "j.safetensors", b'{"a": {"dtype": "F32",')
    with pytest.raises(CheckpointError, match=r"j.safetensors: header is not valid UTF-8 JSON"):
        read_header(f)
    _raw(f, b"[1, 2]")
    with pytest.raises(CheckpointError, match=r"j.safetensors: header is not a JSON object"):
        read_header(f)


def test_data_offsets_past_data_section(tmp_path):
    f = _raw(tmp_path / "o.safetensors", {"w": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}, b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"o.safetensors \[w\]: data_offsets end 12 is past the data section \(10 bytes\)"):
        read_header(f)


def test_bad_data_offsets(tmp_path):
    f = _raw(tmp_path / "b.safetensors", {"w": {"dtype": "U8", "shape": [2], "data_offsets": [4, 2]}}, b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"b.safetensors \[w\]: bad data_offsets"):
        read_header(f)


def test_span_shape_mismatch(tmp_path):
    f = _raw(tmp_path / "s.safetensors", {"w": {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 10]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"s.safetensors \[w\]: data_offsets span 10 bytes but BF16\[3, 2\] needs 12"):
        read_header(f)


def test_overlapping_tensors(tmp_path):
    f = _raw(tmp_path / "v.safetensors", {
        "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
        "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]},
    }, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"v.safetensors \[b\]: bytes overlap those of a"):
        read_header(f)


def test_unknown_dtype(tmp_path):
    f = _raw(tmp_path / "d.safetensors", {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0\0")
    with pytest.raises(CheckpointError, match=r"d.safetensors \[w\]: unknown dtype 'Q4'"):
        read_header(f)


def test_bad_shape_and_metadata(tmp_path):
    f = _raw(tmp_path / "m.safetensors", {"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(CheckpointError, match=r"m.safetensors \[w\]: bad shape"):
        read_header(f)
    _raw(f, {"__metadata__": {"k": 1}})
    with pytest.raises(CheckpointError, match=r"m.safetensors: __metadata__ must map strings to strings"):
        read_header(f)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.safetensors: cannot read"):
        read_header(tmp_path / "nope.safetensors")
