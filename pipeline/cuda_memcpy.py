"""Pinned host -> device copies enqueued straight on the CUDA runtime, for the copy engine.

    direct_h2d() -> DirectH2D | None    None without a loaded CUDA runtime library, or with
                                        MOE_CACHE_DIRECT_MEMCPY=0 in the environment (A/B runs)
    DirectH2D()(dst_ptr, src_ptr, nbytes, stream_handle)
                                        cudaMemcpyAsync(host -> device) on that stream; a
                                        RuntimeError naming the CUDA error if it is refused

Why: each expert copy is one `copy_` of a pinned RAM slot into a VRAM slot, and at batch 1
the caller's thread issues one per miss. torch's `copy_` builds a TensorIterator, checks the
host pointer with the driver and looks it up in its pinned-memory allocator before it calls
cudaMemcpyAsync: py-spy of the replay on an H100 put 38 us of the decode thread per copy on
that one line (185 of 380 samples inside the copy engine). The copy itself is the same
cudaMemcpyAsync, so the bytes, the stream and its ordering are the same.

Only for page-locked sources (the RAM arena is registered with CUDA as a whole); the copy
engine keeps torch's `copy_` for anything else, and where this module finds no runtime. The
library is the one torch already loaded into this process (found in /proc/self/maps), so
its streams are torch's streams.
"""
from __future__ import annotations

import ctypes
import os

H2D = 1  # cudaMemcpyHostToDevice


class DirectH2D:
    def __init__(self, lib: ctypes.CDLL):
        fn = lib.cudaMemcpyAsync
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        err = lib.cudaGetErrorString
        err.argtypes, err.restype = [ctypes.c_int], ctypes.c_char_p
        last = lib.cudaGetLastError
        last.argtypes, last.restype = [], ctypes.c_int
        self._memcpy, self._error, self._last = fn, err, last

    def __call__(self, dst_ptr: int, src_ptr: int, nbytes: int, stream_handle: int) -> None:
        rc = self._memcpy(dst_ptr, src_ptr, nbytes, H2D, stream_handle)
        if rc:
            # The runtime also keeps a refused call as the thread's last error, which torch's
            # next kernel-launch check would report as its own: this error is raised here instead.
            self._last()
            raise RuntimeError(f"cudaMemcpyAsync of {nbytes} bytes host -> device failed: "
                               f"{self._error(rc).decode(errors='replace')} (error {rc})")


def loaded_cudart(maps: str = "/proc/self/maps") -> str | None:
    """Path of the CUDA runtime library mapped into this process, if one is."""
    try:
        with open(maps) as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                if "/libcudart.so" in path:
                    return path
    except OSError:
        return None
    return None


def direct_h2d() -> DirectH2D | None:
    if os.environ.get("MOE_CACHE_DIRECT_MEMCPY", "1") == "0":
        return None
    path = loaded_cudart()
    if path is None:
        return None
    try:
        return DirectH2D(ctypes.CDLL(path))
    except (OSError, AttributeError):
        return None


__all__ = ["DirectH2D", "direct_h2d", "loaded_cudart"]
