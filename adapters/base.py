"""The one interface every checkpoint format implements.

A `Checkpoint` describes the model (`spec`), says where each expert's tensors lie
(`locate`: exact byte ranges, so a reader can fetch them with plain positional reads),
and turns those bytes into torch tensors (`decode`). `load_expert` is the two together.

Decoded ("dense") roles per family, the form every store dtype decodes to:
  gpt-oss : mlp1_weight [2I, H], mlp1_bias [2I], mlp2_weight [H, I], mlp2_bias [H]  (bf16)
  mixtral : w1 [I, H], w2 [H, I], w3 [I, H]
  qwen-moe: gate_proj [I, H], up_proj [I, H], down_proj [H, I]
  fused   : gate_up_proj [H, 2I], gate_up_proj_bias [2I], down_proj [I, H], down_proj_bias [H]
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Mapping

import torch

from .spec import ExpertLocation, ModelSpec

Raw = Mapping[str, "bytes | bytearray | memoryview | torch.Tensor"]


def pread_exact(path: Path, offset: int, length: int, what: str, *, fix: str, tensor: str | None = None) -> bytes:
    """`length` bytes at `offset` of `path` with one positional read; a short read (a
    truncated file) is a CheckpointError naming the file, `what` and `tensor`."""
    from .errors import CheckpointError

    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise CheckpointError(path, f"short read of {what}: {len(data)} of {length} bytes", tensor=tensor, fix=fix)
    return data


class Checkpoint(abc.ABC):
    root: Path
    spec: ModelSpec

    @abc.abstractmethod
    def locate(self, layer: int, expert: int) -> ExpertLocation:
        """Byte ranges of every tensor of one expert; raises IndexError naming valid ranges."""

    @abc.abstractmethod
    def decode(self, raw: Raw, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Turn one expert's raw tensor bytes (by role) into its dense tensors on `device`."""

    def read_raw(self, layer: int, expert: int) -> dict[str, bytes]:
        """Read one expert's tensors with positional reads (no mmap, no pickle)."""
        loc = self.locate(layer, expert)
        out: dict[str, bytes] = {}
        for r in loc.ranges:
            data = pread_exact(self.root / r.file, r.offset, r.length, f"expert {layer}/{expert}",
                               tensor=r.role, fix="the file is truncated; re-create it")
            out[r.role] = data
        return out

    def load_expert(self, layer: int, expert: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return self.decode(self.read_raw(layer, expert), device)

    def check_index(self, layer: int, expert: int) -> None:
        s = self.spec
        if not (0 <= layer < s.num_layers and 0 <= expert < s.num_experts):
            raise IndexError(f"expert {layer}/{expert} out of range: {s.num_layers} MoE layers x "
                             f"{s.num_experts} experts in {self.root}")


# ---------------------------------------------------------------------------------------
# Helpers shared by the file-format adapters (added with the first adapters).


def read_config(path: Path) -> dict:
    """A checkpoint's `config.json` as a dict; a missing or malformed file is one CheckpointError."""
    import json

    from .errors import CheckpointError, read_input

    data = read_input(path, missing_fix="a checkpoint needs its config.json next to the weights")
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})", fix="restore the model's config.json") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(path, "not a JSON object", fix="restore the model's config.json")
    return cfg


def config_int(cfg: dict, path: Path, *keys: str, default: int | None = None) -> int:
    """The first of `keys` present in `cfg` as a positive int (HF families spell one field several ways)."""
    from .errors import CheckpointError

    for k in keys:
        if k in cfg and cfg[k] is not None:
            v = cfg[k]
            if type(v) is not int or v <= 0:
                raise CheckpointError(path, f"{k} = {v!r} is not a positive integer")
            return v
    if default is not None:
        return default
    raise CheckpointError(path, f"no {' / '.join(keys)} field", fix="restore the model's config.json")


def raw_to_u8(raw: "bytes | bytearray | memoryview | torch.Tensor", device: str | torch.device) -> torch.Tensor:
    """One tensor's raw bytes as a flat uint8 tensor on `device`.

    Read-only buffers (`bytes`) are copied once, because torch cannot wrap them without
    handing out a tensor that would alias immutable memory; writable buffers and tensors
    are used in place when they already live on `device`.
    """
    if isinstance(raw, torch.Tensor):
        t = raw.reshape(-1)
        if t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        return t.to(device)
    mv = memoryview(raw)
    if mv.readonly:
        raw = bytearray(mv)
    if not mv.nbytes:  # torch.frombuffer refuses empty buffers
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.frombuffer(raw, dtype=torch.uint8).to(device)


# Safetensors dtype names -> torch dtypes, for every dtype the project reads or writes.
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}


def bytes_as(raw: "bytes | bytearray | memoryview | torch.Tensor", dtype: str, shape: tuple[int, ...],
             device: str | torch.device, role: str = "?") -> torch.Tensor:
    """Reinterpret one tensor's raw bytes as `dtype`/`shape` on `device` (no conversion)."""
    u8 = raw_to_u8(raw, device)
    tdt = TORCH_DTYPES[dtype]
    want = tdt.itemsize
    for d in shape:
        want *= d
    if u8.numel() != want:
        raise ValueError(f"role {role}: got {u8.numel()} bytes, {dtype}{list(shape)} needs {want}")
    if tdt is torch.uint8:
        return u8.reshape(shape)
    if u8.storage_offset() % tdt.itemsize:  # a view needs aligned storage; copy when it is not
        u8 = u8.clone()
    return u8.view(tdt).reshape(shape)


class TensorIndex:
    """Every tensor of a (possibly sharded) checkpoint: name -> (file relative to root, header entry).

    `get` checks presence, dtype and shape, so adapters validate a file against its config
    with one call per tensor and every error names the shard and the tensor.
    """

    def __init__(self, root: Path, files: list[str]):
        from .errors import CheckpointError
        from .safetensors_io import read_header

        self.root = root
        self.files = files
        self.entries: dict[str, tuple[str, object]] = {}
        for rel in files:
            hdr = read_header(root / rel)
            for name, entry in hdr.tensors.items():
                if name in self.entries:
                    raise CheckpointError(root / rel, f"also stored in {self.entries[name][0]}", tensor=name,
                                          fix="a tensor must be in one shard only; re-create the checkpoint")
                self.entries[name] = (rel, entry)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self):
        return self.entries.keys()

    def get(self, name: str, *, dtypes: tuple[str, ...] | None = None, shape: tuple[int, ...] | None = None):
        """(file, entry) of `name`, checked against the expected dtype(s) and shape."""
        from .errors import CheckpointError

        if name not in self.entries:
            shown = ", ".join(self.files[:4]) + (f" and {len(self.files) - 4} more" if len(self.files) > 4 else "")
            where = self.root / self.files[0] if len(self.files) == 1 else self.root
            raise CheckpointError(where, "tensor missing", tensor=name,
                                  fix=f"looked in {shown}; the checkpoint is incomplete or not this format")
        rel, e = self.entries[name]
        if dtypes is not None and e.dtype not in dtypes:
            raise CheckpointError(self.root / rel, f"dtype {e.dtype}, expected {'/'.join(dtypes)}", tensor=name)
        if shape is not None and tuple(e.shape) != tuple(shape):
            raise CheckpointError(self.root / rel, f"shape {list(e.shape)} does not match the config's {list(shape)}",
                                  tensor=name, fix="config.json and weights disagree; re-create the checkpoint")
        return rel, e

    def expert_slice(self, role: str, name: str, expert: int, num_experts: int):
        """The byte range of slice `expert` along dim 0 of a stacked [E, ...] tensor."""
        from .spec import TensorRange

        rel, e = self.entries[name]
        per = e.length // num_experts
        return TensorRange(role, rel, e.offset + expert * per, per, e.dtype, tuple(e.shape[1:]))

    def whole(self, role: str, name: str):
        from .spec import TensorRange

        rel, e = self.entries[name]
        return TensorRange(role, rel, e.offset, e.length, e.dtype, tuple(e.shape))
