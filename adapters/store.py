"""The packed expert store as a checkpoint (format `store`): what the pipeline reads at run time.

`StoreCheckpoint(path)` validates `store.json` and the layer files' sizes up front. Then:
  expert_range(l, e) -> StoreExpert      file, aligned offset, length, read_length, checksum
  locate(l, e)       -> ExpertLocation   absolute ranges of its tensors (all inside that range)
  read_expert(l, e)  -> bytes            ONE positional read of the whole expert
  read_expert_into(l, e, buf)            the same read into a caller's buffer (an arena slot)
  verify(l, e, data)                     checksum, CheckpointError naming file/layer/expert
  decode(raw, device)                    by-role bytes -> dense tensors
  decode_from_buffer(buf, device, out=None)  one contiguous uint8 expert buffer (any device)
                                         -> dense tensors; bf16/fp16 come out as views, no
                                         copy; with `out`, written into preallocated tensors
  dense_tensors                          role/dtype/shape of what decode returns
  check_layer_file(l)                    the layer file's safetensors header agrees with the index
The layout is described in `adapters.store_format`.
"""
from __future__ import annotations

import os
from pathlib import Path

import msgspec
import torch

from .base import TORCH_DTYPES, Checkpoint, Raw, pread_exact, raw_to_u8
from .errors import CheckpointError, read_input
from .registry import register
from .spec import ExpertLocation, TensorRange, TensorSpec
from .store_format import (ALIGN, CHECKSUM_ALGORITHM, FORMAT_VERSION, INDEX_NAME, STORE_DTYPES, StoreExpert,
                           StoreIndex, checksum)

_index_decoder = msgspec.json.Decoder(StoreIndex)


def _bad_index(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(path, problem, fix="re-create the store with `precompute --force`")


def read_index(root: Path) -> StoreIndex:
    """`store.json` decoded and checked for internal consistency (not against the files)."""
    path = root / INDEX_NAME
    data = read_input(path, missing_fix="run `precompute` to create the store")
    try:
        idx = _index_decoder.decode(data)
    except msgspec.ValidationError as e:
        raise _bad_index(path, f"invalid field: {e}") from None
    except msgspec.DecodeError as e:
        raise _bad_index(path, f"not valid JSON ({e})") from None
    if idx.version != FORMAT_VERSION:
        raise _bad_index(path, f"format version {idx.version}, this reader knows {FORMAT_VERSION}")
    if idx.checksum_algorithm != CHECKSUM_ALGORITHM or idx.alignment != ALIGN or idx.dtype not in STORE_DTYPES:
        raise _bad_index(path, f"unsupported checksum {idx.checksum_algorithm!r} / alignment {idx.alignment} / "
                         f"dtype {idx.dtype!r}")
    s = idx.model
    if len(idx.experts) != s.num_layers * s.num_experts or len(idx.layers) != s.num_layers:
        raise _bad_index(path, f"{len(idx.experts)} experts in {len(idx.layers)} layers, the model has "
                         f"{s.num_layers} x {s.num_experts}")
    for i, x in enumerate(idx.experts):
        where = f"expert {x.layer}/{x.expert}"
        if (x.layer, x.expert) != divmod(i, s.num_experts):
            raise _bad_index(path, f"entry {i} is {where}, expected {'%d/%d' % divmod(i, s.num_experts)}")
        if x.offset % ALIGN or x.read_length % ALIGN or not 0 < x.length <= x.read_length:
            raise _bad_index(path, f"{where}: offset {x.offset}, length {x.length}, read_length {x.read_length} "
                             f"are not {ALIGN}-aligned and consistent")
        prev = idx.experts[i - 1] if x.expert else None
        if prev is not None and x.offset < prev.offset + prev.read_length:
            raise _bad_index(path, f"{where}: offset {x.offset} overlaps expert {prev.layer}/{prev.expert}")
        if x.file != idx.layers[x.layer].file:
            raise _bad_index(path, f"{where}: file {x.file!r} is not its layer's {idx.layers[x.layer].file!r}")
        want = [(t.role, t.dtype, t.shape) for t in idx.expert_tensors]
        if sorted(want) != sorted((t.role, t.dtype, t.shape) for t in x.tensors):
            raise _bad_index(path, f"{where}: tensors do not match expert_tensors")
        for t in x.tensors:
            if t.offset < 0 or t.offset + t.nbytes > x.length or t.offset % TORCH_DTYPES[t.dtype].itemsize:
                raise _bad_index(path, f"{where}: tensor {t.role} at {t.offset}+{t.nbytes} lies outside its "
                                 f"{x.length} bytes or is misaligned")
    return idx


def _typed(u8: torch.Tensor, t) -> torch.Tensor:
    """A tensor's bytes (aligned for its dtype) as the tensor `t` (a TensorSpec) describes."""
    dtype = TORCH_DTYPES[t.dtype]
    return u8.view(t.shape) if dtype is torch.uint8 else u8.view(dtype).view(t.shape)


@register("store")
class StoreCheckpoint(Checkpoint):
    looks_for = "store.json (written by `precompute`)"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (Path(path) / INDEX_NAME).is_file()

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.index = idx = read_index(self.root)
        self.dtype = idx.dtype
        self.spec = msgspec.structs.replace(idx.model, format="store", expert_tensors=idx.expert_tensors)
        for layer in idx.layers:
            f = self.root / layer.file
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f, f"layer file of MoE layer {layer.layer} is missing",
                                      fix="re-run `precompute` on the store's source to finish it") from None
            if size != layer.size:
                raise CheckpointError(f, f"{size} bytes, store.json says {layer.size}",
                                      fix="the file is truncated or replaced; re-run `precompute --force`")
            for x in idx.experts[layer.layer * idx.model.num_experts:(layer.layer + 1) * idx.model.num_experts]:
                if x.offset + x.read_length > size:
                    raise CheckpointError(f, f"expert {x.layer}/{x.expert} at {x.offset}+{x.read_length} lies past "
                                          f"the end of the file ({size} bytes)",
                                          fix="store.json is corrupted; re-run `precompute --force`")
        self._layout = self._dense_layout()

    # -- where ---------------------------------------------------------------------------
    def expert_range(self, layer: int, expert: int) -> StoreExpert:
        self.check_index(layer, expert)
        return self.index.experts[layer * self.spec.num_experts + expert]

    def locate(self, layer: int, expert: int) -> ExpertLocation:
        x = self.expert_range(layer, expert)
        return ExpertLocation(layer, expert, tuple(TensorRange(t.role, x.file, x.offset + t.offset, t.nbytes,
                                                               t.dtype, t.shape) for t in x.tensors))

    # -- read and check ------------------------------------------------------------------
    def read_expert(self, layer: int, expert: int) -> bytes:
        """The expert's `length` bytes, with one positional read."""
        x = self.expert_range(layer, expert)
        return pread_exact(self.root / x.file, x.offset, x.length, f"expert {layer}/{expert}",
                           fix="the file is truncated; re-run `precompute --force`")

    def verify(self, layer: int, expert: int, data: bytes | bytearray | memoryview) -> None:
        x = self.expert_range(layer, expert)
        got = checksum(memoryview(data)[: x.length])
        if got != x.checksum:
            raise CheckpointError(self.root / x.file, f"expert {layer}/{expert} (layer {layer}, expert {expert}) "
                                  f"fails its {CHECKSUM_ALGORITHM} checksum: {got}, store.json says {x.checksum}",
                                  fix="the file is corrupted; re-run `precompute --force`")

    def read_expert_into(self, layer: int, expert: int, buf) -> memoryview:
        """Read the expert's `length` bytes into the writable buffer `buf` (e.g. an arena slot,
        at least `length` bytes) with one positional read; returns the filled view."""
        x = self.expert_range(layer, expert)
        mv = memoryview(buf).cast("B")
        if mv.nbytes < x.length:
            raise ValueError(f"buffer of {mv.nbytes} bytes is too small for expert {layer}/{expert} ({x.length})")
        fd = os.open(self.root / x.file, os.O_RDONLY)
        try:
            n = os.preadv(fd, [mv[: x.length]], x.offset)
        finally:
            os.close(fd)
        if n != x.length:
            raise CheckpointError(self.root / x.file, f"short read of expert {layer}/{expert}: {n} of "
                                  f"{x.length} bytes", fix="the file is truncated; re-run `precompute --force`")
        return mv[: x.length]

    def read_expert_tensor(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's `length` bytes as a new uint8 tensor, read straight into it (one pread)."""
        buf = torch.empty(self.expert_range(layer, expert).length, dtype=torch.uint8)
        self.read_expert_into(layer, expert, buf.numpy())
        return buf

    def load_expert(self, layer: int, expert: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return self.decode_from_buffer(self.read_expert_tensor(layer, expert), device)

    def read_raw(self, layer: int, expert: int) -> dict[str, memoryview]:
        data = memoryview(self.read_expert(layer, expert))
        return {t.role: data[t.offset: t.offset + t.nbytes] for t in self.expert_range(layer, expert).tensors}

    def check_layer_file(self, layer: int) -> None:
        """The layer file's own safetensors header must place every tensor where the index does."""
        from .safetensors_io import read_header

        lay = self.index.layers[layer]
        path = self.root / lay.file
        hdr = read_header(path)
        for x in self.index.experts[layer * self.spec.num_experts:(layer + 1) * self.spec.num_experts]:
            for t in x.tensors:
                name = f"expert.{x.expert}.{t.role}"
                e = hdr.tensors.get(name)
                if e is None or (e.offset, e.length, e.dtype, e.shape) != (x.offset + t.offset, t.nbytes, t.dtype,
                                                                             t.shape):
                    raise CheckpointError(path, f"header disagrees with store.json about expert {layer}/{x.expert}",
                                          tensor=name, fix="re-run `precompute --force`")

    # -- decode --------------------------------------------------------------------------
    @property
    def dense_layout(self) -> list[tuple[str, str, str | None]]:
        """(dense role, stored role or blocks role, scales role or None), in role order."""
        return list(self._layout)

    def _dense_layout(self) -> list[tuple[str, str | None, str | None]]:
        """(dense role, stored role or blocks role, scales role) in the family's role order."""
        roles = [t.role for t in self.index.expert_tensors]
        out = []
        for r in roles:
            if self.dtype == "mxfp4" and r.endswith(".blocks"):
                out.append((r[: -len(".blocks")], r, r[: -len(".blocks")] + ".scales"))
            elif not (self.dtype == "mxfp4" and r.endswith(".scales")):
                out.append((r, r, None))
        return out

    def decode(self, raw: Raw, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        device = torch.device(device)
        specs = {t.role: t for t in self.index.expert_tensors}
        parts = {}
        for role, t in specs.items():
            u8 = raw_to_u8(raw[role], device)
            if u8.numel() != t.nbytes:
                raise ValueError(f"role {role}: got {u8.numel()} bytes, {t.dtype}{list(t.shape)} needs {t.nbytes}")
            parts[role] = u8
        return self._assemble(parts, device)

    @property
    def dense_tensors(self) -> tuple[TensorSpec, ...]:
        """The dense tensors `decode*` returns (role, dtype, shape), e.g. to preallocate `out`."""
        specs = {t.role: t for t in self.index.expert_tensors}
        res = []
        for dense, stored, scales in self._layout:
            t = specs[stored]
            res.append(TensorSpec(dense, "BF16", (*t.shape[:-2], t.shape[-2] * 32)) if scales else
                       TensorSpec(dense, t.dtype, t.shape))
        return tuple(res)

    def decode_from_buffer(self, buf: torch.Tensor, device: str | torch.device | None = None,
                           out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of one expert from ONE contiguous uint8 buffer holding its bytes (at least
        `length`, e.g. a `read_length` slot). Moved to `device` once if it is elsewhere; bf16/
        fp16 tensors are then views into it (they alias `buf`: keep it alive, don't reuse it).
        With `out` (preallocated tensors as in `dense_tensors`, on `device`), everything is
        written into `out` instead (MXFP4 decodes straight into it) and `out` is returned."""
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ValueError(f"expert buffer must be a 1-D uint8 tensor, got {buf.dtype} {list(buf.shape)}")
        x = self.index.experts[0]
        if buf.numel() < x.length:
            raise ValueError(f"expert buffer holds {buf.numel()} bytes, an expert needs {x.length}")
        device = buf.device if device is None else torch.device(device)
        if buf.device != device:
            buf = buf.to(device)
        parts = {t.role: buf[t.offset: t.offset + t.nbytes] for t in x.tensors}
        return self._assemble(parts, device, out)

    def stored_views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """One expert's tensors as stored (MXFP4: `.blocks` and `.scales` uint8, biases as they
        are) as views of ONE contiguous uint8 buffer holding its bytes, e.g. a VRAM slot of the
        stored form: no copy, no decode, on the buffer's device."""
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ValueError(f"expert buffer must be a 1-D uint8 tensor, got {buf.dtype} {list(buf.shape)}")
        x = self.index.experts[0]
        if buf.numel() < x.length:
            raise ValueError(f"expert buffer holds {buf.numel()} bytes, an expert needs {x.length}")
        out = {}
        for t in x.tensors:
            u8 = buf[t.offset: t.offset + t.nbytes]
            if u8.data_ptr() % TORCH_DTYPES[t.dtype].itemsize:
                raise ValueError(f"expert buffer at {buf.data_ptr():#x} misaligns {t.role} ({t.dtype}); "
                                 f"start the buffer on a {TORCH_DTYPES[t.dtype].itemsize}-byte boundary")
            out[t.role] = _typed(u8, t)
        return out

    def _assemble(self, parts: dict[str, torch.Tensor], device: torch.device,
                  out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        specs = {t.role: t for t in self.index.expert_tensors}

        def view(role: str) -> torch.Tensor:
            t = specs[role]
            u8 = parts[role]
            if u8.storage_offset() % TORCH_DTYPES[t.dtype].itemsize:  # not for store files; raw from elsewhere
                u8 = u8.clone()
            return _typed(u8, t)

        from .mxfp4 import mxfp4_decode, mxfp4_decode_into

        res: dict[str, torch.Tensor] = {}
        for dense, stored, scales in self._layout:
            if out is not None and scales is None:
                res[dense] = out[dense].copy_(view(stored))
            elif out is not None:
                res[dense] = mxfp4_decode_into(out[dense], view(stored), view(scales))
            elif scales is None:
                res[dense] = view(stored)
            else:
                res[dense] = mxfp4_decode(view(stored), view(scales))
        return res
