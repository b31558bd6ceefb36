"""Tier R: one shared, pinned host-RAM arena of fixed slots, allocated once.

`RamArena.create(num_slots, slot_bytes)` makes ONE file under /dev/shm, maps it shared and
views it as a uint8 tensor `[num_slots, slot_bytes]`. Reader processes (pipeline.readers)
open the same file by `path` and write expert bytes straight into a slot, so the bytes that
arrive from the disk are the bytes the H2D copy reads: no extra copy. The parent registers
the mapping with CUDA once (cudaHostRegister) so those copies run at pinned speed; where
that fails it carries on unpinned with one RuntimeWarning.

`close()` unregisters, drops the views, unmaps and unlinks; a `weakref.finalize` unlinks a
forgotten arena at interpreter exit. Slot bookkeeping (which expert is where, free lists)
belongs to the scheduler, not here.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import shutil
import warnings
import weakref

import torch

ALIGN = 4096  # O_DIRECT reads need 4 KiB-aligned buffers, offsets and lengths
SHM_DIR = "/dev/shm"
NAME_PREFIX = "tlmc-arena"  # two-level-moe-cache; pid and random suffix follow


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _close_map(mm: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a view still held elsewhere: unmapped when it goes
        mm.close()


def _cuda_register(ptr: int, size: int) -> str | None:
    """Register [ptr, ptr+size) with CUDA; None on success, else the error as text."""
    try:
        rc = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
    except Exception as e:  # a CUDA runtime that cannot even be asked
        return f"{type(e).__name__}: {e}"
    code = int(getattr(rc, "value", rc))
    return None if code == 0 else f"cudaHostRegister returned {rc} (code {code})"


def _cuda_unregister(ptr: int) -> None:
    with contextlib.suppress(Exception):  # at exit CUDA may be gone already; nothing left to undo then
        torch.cuda.cudart().cudaHostUnregister(ptr)


class RamArena:
    """One shared mapping (a file under /dev/shm, name with a project prefix + pid + random),
    divided into `num_slots` fixed slots of `slot_bytes` (a multiple of 4096). Allocated
    once; never grows. Attributes: path, size, num_slots, slot_bytes, pinned, tensor."""

    path: str
    size: int
    num_slots: int
    slot_bytes: int
    pinned: bool
    tensor: torch.Tensor

    def __init__(self) -> None:  # use create()
        raise TypeError("use RamArena.create(num_slots, slot_bytes)")

    @classmethod
    def create(cls, num_slots: int, slot_bytes: int, *, pin: bool = True, directory: str = SHM_DIR) -> "RamArena":
        """Allocate the arena: the file is fully backed (posix_fallocate) so a full /dev/shm
        fails here with an error, never later with SIGBUS in a reader."""
        if num_slots < 1:
            raise ValueError(f"RAM arena needs at least 1 slot, got num_slots={num_slots}")
        if slot_bytes < ALIGN or slot_bytes % ALIGN:
            raise ValueError(f"RAM arena slot_bytes={slot_bytes} is not a positive multiple of {ALIGN}; "
                             f"round it up to {max(ALIGN, -(-slot_bytes // ALIGN) * ALIGN)} (a store expert's "
                             f"read_length is already one)")
        size = num_slots * slot_bytes
        free = shutil.disk_usage(directory).free
        if size > free:
            raise ValueError(f"RAM arena of {num_slots} slots x {slot_bytes} bytes = {size} bytes does not fit the "
                             f"{free} bytes free in {directory}; use at most {free // slot_bytes} slots or "
                             f"enlarge {directory}")
        self = object.__new__(cls)
        self.path = os.path.join(directory, f"{NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(6)}")
        self.size, self.num_slots, self.slot_bytes = size, num_slots, slot_bytes
        self.pinned = False
        self._mmap = None
        self._ptr = 0
        with contextlib.ExitStack() as undo:  # creation that fails half-way gives everything back
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            undo.callback(_unlink_quietly, self.path)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    raise ValueError(f"RAM arena of {size} bytes cannot be allocated in {directory}: "
                                     f"{e.strerror or e}; use fewer slots") from None
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)  # the mapping keeps the file's pages; readers open it by path
            undo.callback(_close_map, mm)
            # No local alias of the view: a traceback keeping this frame alive must not keep
            # the mapping exported (mmap.close would refuse with BufferError).
            self.tensor = torch.frombuffer(mm, dtype=torch.uint8).view(num_slots, slot_bytes)
            undo.callback(self.__dict__.pop, "tensor", None)
            self._ptr = self.tensor.data_ptr()
            if pin and torch.cuda.is_available():
                err = _cuda_register(self._ptr, size)
                if err is None:
                    self.pinned = True
                    undo.callback(_cuda_unregister, self._ptr)
                else:
                    warnings.warn(f"RAM arena of {size} bytes could not be pinned ({err}); carrying on "
                                  f"unpinned, H2D copies will be slower", RuntimeWarning, stacklevel=2)
            self._mmap = mm
            # Safety net for a forgotten arena: unlink (and unregister) at exit at the latest.
            self._finalizer = weakref.finalize(self, RamArena._release, self.path, self._ptr if self.pinned else 0)
            undo.pop_all()
        return self

    @staticmethod
    def _release(path: str, pinned_ptr: int) -> None:
        if pinned_ptr:
            _cuda_unregister(pinned_ptr)
        _unlink_quietly(path)

    def slot(self, i: int) -> torch.Tensor:
        """uint8 [slot_bytes] view of slot i (shares memory with the mapping)."""
        self._check(i)
        return self.tensor[i]

    def slot_offset(self, i: int) -> int:
        """Byte offset of slot i in the mapping (what a ReadRequest's arena_offset names)."""
        self._check(i)
        return i * self.slot_bytes

    def _check(self, i: int) -> None:
        if self._mmap is None:
            raise ValueError(f"RAM arena {self.path} is closed")
        if not 0 <= i < self.num_slots:
            raise IndexError(f"slot {i} out of range: the arena has {self.num_slots} slots (0..{self.num_slots - 1})")

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Idempotent: unregister from CUDA, drop our views, unmap, unlink the file. Views
        the caller still holds keep the pages alive (the kernel frees them with the last
        view); the file is gone either way."""
        mm, self._mmap = self._mmap, None
        if mm is None:
            return
        if self.pinned:
            _cuda_unregister(self._ptr)
            self.pinned = False
        self._finalizer.detach()
        del self.tensor
        _close_map(mm)
        _unlink_quietly(self.path)

    def __enter__(self) -> "RamArena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("pinned" if self.pinned else "unpinned")
        return f"RamArena({self.num_slots} x {self.slot_bytes} B, {state}, {self.path})"
