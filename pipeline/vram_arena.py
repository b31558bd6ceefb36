"""The VRAM tier: one device allocation cut into fixed expert slots (CPU tensors without CUDA).

    VramArena(store, num_slots, device, form="dense", num_views=None)
      slot_bytes_for(store, form="dense") -> int   bytes one slot needs (staticmethod)
      raw_view(i)   -> uint8 view    where an H2D copy lands for bf16/fp16 stores (the slot itself)
                                     and for form="stored"
      tensors(i)    -> {role: view}  the expert's dense tensors inside slot i, built once here
                                     (form="dense" only)
      staging(k)    -> uint8 view    mxfp4, form="dense": compressed-bytes landing buffer k
      views                          form="stored": the DecodeAtUse that turns a slot into
                                     dense tensors at use (pipeline/decode_at_use.py); None
                                     with num_views=0
      stored_tensors(i) -> {role: view}  form="stored": the expert's stored tensors (MXFP4
                                     blocks and scales, biases) as views of slot i, built once
      close()                        drop the allocations

Forms, for mxfp4 stores (bf16/fp16 stores are the same in both: their stored bytes are the
dense tensors): "dense" slots hold the decoded bf16 tensors, decoded once per copy; "stored"
slots hold the MXFP4 bytes as stored, 3.8x more experts in the same bytes, decoded at each use
into one of `num_views` dense views (default: top_k, one fetch's worth), or with num_views=0
handed out as they are, to math that reads MXFP4 itself.

Nothing is allocated after construction: every per-slot view is precomputed, so filling a
slot is one copy (bf16/fp16: the stored bytes ARE the tensors) or one copy into a staging
buffer plus one decode into the slot (mxfp4: move 4.25 bits per weight, expand on the GPU).
The arena only holds memory; who may write a slot, and when, is the copy engine's and the
scheduler's business (`pipeline.copy_engine`: fences and events).
"""
from __future__ import annotations

import torch

from adapters.base import TORCH_DTYPES
from adapters.store import StoreCheckpoint

from . import fused_decode
from .config import VRAM_FORMS
from .decode_at_use import DecodeAtUse, view_bytes_for
from .slot_decoder import SlotDecoder, scratch_bytes

# Streams that decode into slots at once (the copy engine's demand and prefetch decode
# streams), each with its own decoder scratch.
DECODE_LANES = 2
# Each decoded tensor starts on this boundary inside a slot: aligned vector loads in kernels.
TENSOR_ALIGN = 256


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _normalise(device: torch.device | str) -> torch.device:
    """`cuda` -> `cuda:<current>`, so that device comparisons and per-device caches agree."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


FORMS = tuple(f for f in VRAM_FORMS if f != "auto")  # what a slot can hold


def effective_form(store: StoreCheckpoint, form: str) -> str:
    """The form a slot really holds: only mxfp4 stores differ between the two (a bf16/fp16
    store's stored bytes are its dense tensors). "auto" must be resolved first, with the
    device and the budget (pipeline.assembly.resolve_vram_form)."""
    if form == "auto":
        raise ValueError("VRAM form 'auto' depends on the device and the budget: resolve it with "
                         "pipeline.assembly.resolve_vram_form first")
    if form not in FORMS:
        raise ValueError(f"VRAM form {form!r} unknown; valid: {', '.join(FORMS)}")
    return form if store.dtype == "mxfp4" else "dense"


def dense_offsets(store: StoreCheckpoint) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """(role, dtype, shape, offset, nbytes) of each decoded tensor inside an mxfp4 slot."""
    out, pos = [], 0
    for t in store.dense_tensors:
        out.append((t.role, TORCH_DTYPES[t.dtype], tuple(t.shape), pos, t.nbytes))
        pos = _round_up(pos + t.nbytes, TENSOR_ALIGN)
    return out


def dense_slot_tensors(store: StoreCheckpoint, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """An mxfp4 expert's dense tensors as views of `raw` (a dense slot's bytes)."""
    return {role: raw[off:off + nbytes].view(dtype).view(shape)
            for role, dtype, shape, off, nbytes in dense_offsets(store)}


class VramArena:
    """One device allocation (`num_slots * slot_bytes` uint8) divided into fixed slots.

    Allocated once; expert tensors are views into slots; nothing is allocated on the hot
    path. For mxfp4 stores a small pool of staging buffers (`num_staging`, each the
    expert's `read_length`, one separate allocation) receives the compressed bytes; the copy
    engine decodes from there into the slot on the same stream.
    """

    def __init__(self, store: StoreCheckpoint, num_slots: int, device: torch.device | str, *,
                 num_staging: int = 4, form: str = "dense", num_views: int | None = None):
        self.store = store
        self.device = _normalise(device)
        self.dtype = store.dtype
        self.num_slots = int(num_slots)
        self.form = effective_form(store, form)
        self.slot_bytes = self.slot_bytes_for(store, self.form)
        self.read_length = store.index.max_read_length
        self.expert_length = max(x.length for x in store.index.experts)  # a copy needs at least this
        # The copy engine decodes into the slot (mxfp4 held dense), or copies the bytes as they are.
        self.decodes = store.dtype == "mxfp4" and self.form == "dense"
        top_k = store.spec.top_k
        if self.num_slots < top_k:
            raise ValueError(f"VRAM arena of {self.num_slots} slots cannot hold one layer's top-{top_k} experts; "
                             f"give it at least {top_k} slots")
        self.num_staging = int(num_staging) if self.decodes else 0
        if self.decodes and self.num_staging < 1:
            raise ValueError(f"an mxfp4 store needs at least 1 staging buffer, got num_staging={num_staging}")
        # On CUDA with Triton the decode is one kernel per expert and needs no scratch.
        self.fused_decode = self.decodes and fused_decode.supports(store, self.device)
        # Staging buffers and the decoder's scratch come on top of the slots (mxfp4 only).
        staging_bytes = self.num_staging * self.read_length + (
            scratch_bytes(store, DECODE_LANES) if self.decodes and not self.fused_decode else 0)
        num_views = store.spec.top_k if num_views is None else int(num_views)
        if num_views < 0:
            raise ValueError(f"num_views={num_views}: dense views per fetch, >= 0 (0: hand out the stored tensors)")
        if self.form == "stored":  # the dense views count with the staging buffers
            staging_bytes += view_bytes_for(store, num_views)
        need = self.num_slots * self.slot_bytes + staging_bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            if need > free:
                fit = max(0, (free - staging_bytes) // self.slot_bytes)
                raise ValueError(f"VRAM arena of {self.num_slots} slots x {self.slot_bytes} bytes "
                                 f"(+{staging_bytes} staging and decode scratch) = {need} bytes, but {self.device} has {free} of "
                                 f"{total} bytes free; use at most {fit} slots")
        self._buf: torch.Tensor | None = torch.empty(self.num_slots * self.slot_bytes, dtype=torch.uint8,
                                                     device=self.device)
        self._staging_buf: torch.Tensor | None = (
            torch.empty(self.num_staging * self.read_length, dtype=torch.uint8, device=self.device)
            if self.decodes else None)
        self._raw = [self._buf[i * self.slot_bytes:(i + 1) * self.slot_bytes] for i in range(self.num_slots)]
        self._staging = [self._staging_buf[k * self.read_length:(k + 1) * self.read_length]
                         for k in range(self.num_staging)] if self._staging_buf is not None else []
        self._tensors = [self._slot_tensors(raw) for raw in self._raw] if self.form == "dense" else []
        self._stored = [store.stored_views(raw) for raw in self._raw] if self.form == "stored" else []
        # mxfp4: the decoder's views and index scratch (one lane per decoding stream) are made
        # now rather than inside the first copy on the hot path.
        self.decoder = None
        if self.decodes:
            self.decoder = (fused_decode.FusedDecode(self) if self.fused_decode
                            else SlotDecoder(self, lanes=DECODE_LANES))
        self.views = DecodeAtUse(self, num_views) if self.form == "stored" and num_views > 0 else None
        if self.device.type == "cuda":
            # The table and the slots were made on this stream; copy streams use them next.
            torch.cuda.current_stream(self.device).synchronize()

    @staticmethod
    def slot_bytes_for(store: StoreCheckpoint, form: str = "dense") -> int:
        """Bytes one VRAM slot needs: a bf16/fp16 expert's `read_length` (the raw bytes are the
        tensors; the whole padded read is copied); for mxfp4 the decoded dense tensors, each
        starting on a 256-byte boundary, or in the stored form the `read_length` rounded up to
        that boundary (the decode kernel's loads stay aligned)."""
        read = store.index.max_read_length
        form = effective_form(store, form)
        if store.dtype != "mxfp4":
            return read
        if form == "stored":
            return _round_up(read, TENSOR_ALIGN)
        *_, (_, _, _, off, nbytes) = dense_offsets(store)
        return _round_up(off + nbytes, TENSOR_ALIGN)

    def _slot_tensors(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.decodes:
            # The store's own slicing, once: dtype views into the slot, no copy.
            return self.store.decode_from_buffer(raw, self.device)
        return dense_slot_tensors(self.store, raw)

    def _check_slot(self, i: int) -> None:
        if self._buf is None:
            raise RuntimeError("VramArena is closed")
        if not 0 <= i < self.num_slots:
            raise IndexError(f"VRAM slot {i} out of range 0..{self.num_slots - 1}")

    @property
    def buffer(self) -> torch.Tensor:
        """The one uint8 allocation every slot is a view of (slot i at i * slot_bytes)."""
        if self._buf is None:
            raise RuntimeError("VramArena is closed")
        return self._buf

    def raw_view(self, i: int) -> torch.Tensor:
        """uint8 view of slot i (`slot_bytes`): where a bf16/fp16 copy lands; for mxfp4 the
        decoded tensors' bytes (copies land in `staging(k)` instead)."""
        self._check_slot(i)
        return self._raw[i]

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        """The expert's dense tensors (roles and dtypes of `store.dense_tensors`) as views of
        slot i. Valid only once a transfer into the slot has completed."""
        self._check_slot(i)
        if self.form == "stored":
            raise ValueError(f"VRAM slot {i} holds the stored {self.dtype} bytes (form='stored'); "
                             f"decode it with arena.views.decode({i}, view) or use arena.stored_tensors({i})")
        return self._tensors[i]

    def stored_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """form="stored": the expert's tensors as stored (roles of `store.index.expert_tensors`)
        as views of slot i. Valid only once a transfer into the slot has completed."""
        self._check_slot(i)
        if self.form != "stored":
            raise ValueError(f"VRAM slot {i} holds dense tensors (form={self.form!r}); use arena.tensors({i})")
        return self._stored[i]

    def staging(self, k: int) -> torch.Tensor:
        """mxfp4 stores: staging buffer k (`read_length` bytes) for compressed bytes."""
        if not 0 <= k < self.num_staging:
            raise IndexError(f"staging buffer {k} out of range 0..{self.num_staging - 1} "
                             f"(this {self.dtype} arena has {self.num_staging})")
        return self._staging[k]

    @property
    def nbytes(self) -> int:
        """Device bytes held: slots, staging buffers, the decoder's scratch and the dense views."""
        scratch = self.decoder.nbytes if self.decoder is not None else 0
        views = self.views.nbytes if self.views is not None else 0
        return self.num_slots * self.slot_bytes + self.num_staging * self.read_length + scratch + views

    def close(self) -> None:
        """Drop the allocations and return them to the device; idempotent.
        Close the copy engine first; on CUDA this also waits for the device, so that memory
        a copy stream may still write is never handed to another allocation."""
        cuda = self._buf is not None and self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        self._buf = self._staging_buf = None
        self._raw, self._staging, self._tensors, self._stored = [], [], [], []
        self.decoder = None
        if self.views is not None:
            self.views.close()
            self.views = None
        if cuda:  # hand the (often tens of GB) arena back to the device, not to torch's cache
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return (f"VramArena({self.num_slots} slots x {self.slot_bytes} B on {self.device}, {self.dtype}, "
                f"{self.num_staging} staging{', decoded at use' if self.form == 'stored' else ''})")


__all__ = ["VramArena", "FORMS", "TENSOR_ALIGN", "dense_offsets", "dense_slot_tensors", "effective_form"]
