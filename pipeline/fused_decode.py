"""A whole MXFP4 expert, staging buffer -> VRAM slot, in one kernel launch (CUDA with Triton).

    available(device) -> bool        CUDA device and Triton importable (and not switched off)
    supports(store, device) -> bool  available, and the store's raw tensors are kept as stored
    FusedDecode(arena)               the arena's decoder where supported (see VramArena)
      decode(k, slot, lane=0)        enqueue on the current stream: staging buffer k -> slot
                                     (`lane` is SlotDecoder's; this decoder needs no scratch)
      nbytes                         0: no scratch

Why: a miss in a host-bound decode loop pays for every kernel launch from Python. The
prepared torch decode (pipeline/slot_decoder.py) needs three launches per MXFP4 tensor and a
copy per raw tensor: eight for a GPT-OSS expert, ~60 us of host time per miss on an H100,
about 40% of what a miss cost the caller (py-spy, replay of qwen1.5; with this kernel the
caller's host time in fetch fell from 15.8 to 13.6 ms per token for on-demand). Here one program grid
covers every tensor of the expert: a small device table describes each tensor (where its
bytes sit in the staging buffer, where its dense form goes in the slot), and each program
looks up which tensor its block belongs to. The arithmetic is the torch decode's: the same
256x256-entry table indexed by (scale << 8 | byte), each entry the two bf16 values of that
byte, so the bytes written are identical (tests compare them).

MOE_CACHE_FUSED_DECODE=0 in the environment switches it off (the torch decode runs instead),
for A/B runs.
"""
from __future__ import annotations

import os

import torch

from adapters.mxfp4 import _table

from .triton_launch import FixedLaunch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch decode
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

GROUPS_PER_PROGRAM = 64  # 32-value groups: 1 KiB of blocks in, 4 KiB of bf16 out per program
MXFP4, RAW = 0, 1
# Each row of the device table: kind, source offset, scales offset, dense offset, units, first
# program (6 int64; the kernel reads them at row * 6 + field).
# No floating-point arithmetic here (integer indexing and gathers), so FP contraction cannot
# change a bit; saying so keeps Triton >= 3.9 from warning that its default will change.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


# Triton's CPU interpreter (TRITON_INTERPRET=1 before import) runs the kernel on CPU tensors:
# how the kernel is tested where there is no GPU but Triton is installed.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str) -> bool:
    if triton is None or os.environ.get("MOE_CACHE_FUSED_DECODE", "1") == "0":
        return False
    return torch.device(device).type == "cuda" or _INTERPRETED


def _raw_tensors_kept_as_stored(store) -> bool:
    """A byte copy is the torch decode's copy_ only where the stored dtype is the dense one."""
    stored = {t.role: t.dtype for t in store.index.experts[0].tensors}
    dense = {t.role: t.dtype for t in store.dense_tensors}
    return all(stored[s] == dense[d] for d, s, scales in store.dense_layout if scales is None)


def supports(store, device: torch.device | str) -> bool:
    return store.dtype == "mxfp4" and available(device) and _raw_tensors_kept_as_stored(store)


BATCH = 8  # experts one batched launch decodes at most (its slot-index arguments)

if triton is not None:

    @triton.jit
    def _decode_block(staging, slot8, slot32, table, desc, pid, NSEG: tl.constexpr, GROUPS: tl.constexpr):
        """Program `pid`'s block of one expert: `staging` its stored bytes, slot8/slot32 its dense slot."""
        seg = pid * 0
        for i in tl.static_range(1, NSEG):  # which tensor this program's block belongs to
            seg += (pid >= tl.load(desc + i * 6 + 5)).to(tl.int32)
        row = desc + seg * 6
        kind = tl.load(row)
        src = tl.load(row + 1)
        scales = tl.load(row + 2)
        dense = tl.load(row + 3)
        units = tl.load(row + 4)
        local = pid - tl.load(row + 5)
        if kind == 0:  # MXFP4: `units` groups of 16 bytes + 1 scale -> 16 int32 (= 32 bf16)
            g = local * GROUPS + tl.arange(0, GROUPS)
            live = g < units
            s = tl.load(staging + scales + g, mask=live, other=0).to(tl.int32)
            at = g[:, None] * 16 + tl.arange(0, 16)[None, :]
            b = tl.load(staging + src + at, mask=live[:, None], other=0).to(tl.int32)
            v = tl.load(table + (s[:, None] * 256 + b), mask=live[:, None], other=0)
            tl.store(slot32 + dense // 4 + at, v, mask=live[:, None])
        else:  # stored as is (e.g. bf16 biases): `units` bytes
            # (names differ from the branch above: Triton types a name once across both branches)
            u = local * (GROUPS * 16) + tl.arange(0, GROUPS * 16)
            u_live = u < units
            tl.store(slot8 + dense + u, tl.load(staging + src + u, mask=u_live, other=0), mask=u_live)

    @triton.jit
    def _decode_expert(staging, slot8, slot32, table, desc, NSEG: tl.constexpr, GROUPS: tl.constexpr):
        _decode_block(staging, slot8, slot32, table, desc, tl.program_id(0), NSEG, GROUPS)

    # Slot indices change every call: unspecialised, or each new value of "== 1" / "% 16 == 0"
    # would compile another variant.
    @triton.jit(do_not_specialize=["first", "i0", "i1", "i2", "i3", "i4", "i5", "i6", "i7"])
    def _decode_batch(slots, views8, views32, table, desc, first, i0, i1, i2, i3, i4, i5, i6, i7,
                      SLOT_BYTES: tl.constexpr, VIEW_BYTES: tl.constexpr, NSEG: tl.constexpr,
                      GROUPS: tl.constexpr):
        """Grid (programs, n): expert e < n <= BATCH, slot i<e> -> view first + e."""
        e = tl.program_id(1)
        idx = tl.where(e == 0, i0, tl.where(e == 1, i1, tl.where(e == 2, i2, tl.where(
            e == 3, i3, tl.where(e == 4, i4, tl.where(e == 5, i5, tl.where(e == 6, i6, i7)))))))
        view = (first + e).to(tl.int64)
        _decode_block(slots + idx.to(tl.int64) * SLOT_BYTES, views8 + view * VIEW_BYTES,
                      views32 + view * (VIEW_BYTES // 4), table, desc, tl.program_id(0), NSEG, GROUPS)


class _Program:
    """What both kernels read besides the bytes: the decode table and one row per dense tensor of
    an expert (kind, source offset, scales offset, offset in a dense slot, units, first program),
    all from the store's layout."""

    def __init__(self, store, device: torch.device):
        from .vram_arena import dense_offsets

        self.table = _table(device).view(torch.int32).view(-1)  # the pair of bf16 per index
        layout = {t.role: t for t in store.index.experts[0].tensors}  # offsets inside an expert
        at = {role: off for role, _, _, off, _ in dense_offsets(store)}  # offsets inside a dense slot
        rows, start = [], 0
        for dense, stored, scales in store.dense_layout:
            t = layout[stored]
            if scales is None:
                units, programs = t.nbytes, -(-t.nbytes // (GROUPS_PER_PROGRAM * 16))
                rows.append((RAW, t.offset, 0, at[dense], units, start))
            else:  # at[dense] is a multiple of TENSOR_ALIGN (256), so the int32 view is exact
                units = t.nbytes // 16
                programs = -(-units // GROUPS_PER_PROGRAM)
                rows.append((MXFP4, t.offset, layout[scales].offset, at[dense], units, start))
            start += programs
        self.desc = torch.tensor(rows, dtype=torch.int64).to(device)
        self.programs, self.nseg = start, len(rows)


def _check_supported(store, device, who: str) -> None:
    if not supports(store, device):
        raise ValueError(f"{who} needs an mxfp4 store on a CUDA device with Triton, raw tensors kept "
                         f"as stored; got {store.dtype} on {device} (Triton "
                         f"{'present' if triton is not None else 'missing'})")


class FusedDecode:
    def __init__(self, arena):
        _check_supported(arena.store, arena.device, "FusedDecode")
        self._arena = arena
        self._prog = _Program(arena.store, arena.device)
        self._slot32 = [None] * arena.num_slots  # int32 views of the slots, made on first use
        self.nbytes = 0
        # Compile now, not inside the first miss: one launch from every staging buffer (their
        # alignments may differ, and Triton specialises on them) into slot 0, which holds
        # nothing yet.
        for k in range(arena.num_staging):
            self.decode(k, 0)
        if arena.device.type == "cuda":
            torch.cuda.synchronize(arena.device)

    def decode(self, k: int, slot: int, lane: int = 0) -> None:
        raw = self._arena.raw_view(slot)
        s32 = self._slot32[slot]
        if s32 is None:
            s32 = self._slot32[slot] = raw[: raw.numel() // 4 * 4].view(torch.int32)
        prog = self._prog
        _decode_expert[(prog.programs,)](self._arena.staging(k), raw, s32, prog.table, prog.desc,
                                         NSEG=prog.nseg, GROUPS=GROUPS_PER_PROGRAM, **COMPILE_OPTIONS)


class BatchDecode:
    """Up to BATCH experts in one launch, slot i -> view j, where every source is a slot of one
    buffer (`slot_bytes` apart) and every destination a view of another (`view_bytes` apart):
    the decode at use (pipeline/decode_at_use.py), one launch per fetch instead of per expert.
    Why: a Triton launch costs tens of microseconds of the decode thread's time, in the
    launcher's Python, not on the GPU (py-spy of the replay on an H100: 3.0 ms per token for 96
    launches; 1.4 ms for the 24 batched ones that replaced them)."""

    def __init__(self, store, slots: torch.Tensor, slot_bytes: int, views: torch.Tensor, view_bytes: int):
        _check_supported(store, slots.device, "BatchDecode")
        if slot_bytes % 16 or view_bytes % 256 or views.numel() % view_bytes:
            raise ValueError(f"BatchDecode needs 16-byte aligned slots and 256-byte aligned views, got "
                             f"{slot_bytes} and {view_bytes} bytes")
        self._prog = _Program(store, slots.device)
        self._slots, self._views8 = slots, views
        self._views32 = views.view(torch.int32)
        # Every call passes these same buffers and unspecialised slot ints: the kernel Triton
        # picks on the first call is the one for all, so later calls skip its per-call Python.
        self._launch = FixedLaunch(_decode_batch, dict(SLOT_BYTES=slot_bytes, VIEW_BYTES=view_bytes,
                                                       NSEG=self._prog.nseg, GROUPS=GROUPS_PER_PROGRAM),
                                   COMPILE_OPTIONS, slots.device)

    def __call__(self, slots, first: int = 0) -> None:
        """Enqueue slot slots[e] -> view first + e for each e (1..BATCH of them, views in range:
        the caller's to check), on the current stream."""
        prog = self._prog
        self._launch.launch((prog.programs, len(slots)), self._slots, self._views8, self._views32, prog.table,
                            prog.desc, first, *slots, *_PAD[len(slots):])

    @property
    def fast(self) -> bool:
        """Whether launches now skip Triton's per-call Python (pipeline/triton_launch.py)."""
        return self._launch.fast


_PAD = (0,) * BATCH  # the slot arguments of the experts a launch does not decode


__all__ = ["BATCH", "BatchDecode", "FusedDecode", "available", "supports"]
