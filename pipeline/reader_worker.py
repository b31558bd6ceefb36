"""Child side of the reader pool: one process reads experts from the store into the RAM arena.

Kept to os, mmap, zlib, msgspec, signal, a thread pool (no torch, no adapters) so a fresh reader starts in
a fraction of a second when one has to be replaced. It also defines the wire messages, which
the parent (pipeline.readers) re-exports.

Protocol over one duplex `multiprocessing.Pipe` per reader, msgpack-encoded tagged Structs:
    reader -> parent  Ready(pid)                 once the arena is mapped
    parent -> reader  ReadRequest                one expert: positional reads into the arena
    reader -> parent  ReadDone(id, ok, ...)      per request; errors travel as values
    parent -> reader  Stop()                     finish and exit
Each expert is read with `os.preadv` (one call, or 4 MiB pieces when its crc32 is checked) of
`read_length` bytes at the store's 4 KiB-aligned
offset, into the arena slice at `arena_offset`, with O_DIRECT where the file system allows
(tmpfs refuses it at open; some file systems only at the first read: both fall back to a
normal descriptor for that file, and every reply says which was used). The crc32 of the
first `length` bytes is checked here, so verification runs in parallel over the readers; a
read larger than CHUNK_BYTES goes in pieces whose crc32 runs beside the next piece's read.
A reader exits when the parent dies (PR_SET_PDEATHSIG, plus a ppid check on every poll
timeout) and ignores SIGINT: the parent owns shutdown.
"""
from __future__ import annotations

import errno
import mmap
import os
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor

import msgspec

from adapters.child import end_child, freeze_start_up_heap, start_child

POLL_S = 0.5  # how often an idle reader checks that its parent is still there


class ReadRequest(msgspec.Struct, frozen=True, tag=True):
    """Read expert (layer, expert): `read_length` bytes at `offset` of `file` into the arena
    at `arena_offset`; the first `length` bytes are the expert, crc32 `checksum` (None = do
    not verify)."""

    id: int
    layer: int
    expert: int
    file: str
    offset: int
    read_length: int
    length: int
    arena_offset: int
    checksum: int | None


class ReadDone(msgspec.Struct, frozen=True, tag=True):
    """Reply to ReadRequest `id`. `kind`: "ok", "checksum" (bytes read but crc32 differs),
    "short" (the file ends early: truncated), "os" (an OSError, e.g. missing file), "bad"
    (a request that cannot be served, e.g. outside the arena), "bug" (anything else).
    `error` carries the formatted traceback (or the problem) when not ok."""

    id: int
    ok: bool
    error: str | None
    seconds: float
    o_direct: bool
    kind: str = "ok"
    nbytes: int = 0


class Ready(msgspec.Struct, frozen=True, tag=True):
    pid: int


class Stop(msgspec.Struct, frozen=True, tag=True):
    pass


ToReader = ReadRequest | Stop
FromReader = ReadDone | Ready

# Test hooks (keys of reader_main's `hooks`), so tests can make reads slow or hang:
#   "delay_s":   sleep this long before every read (to kill readers mid-read)
#   "hang_once": a path; the first reader to unlink it sleeps for "hang_s" (default 3600)
#                before its read (exactly one hang across restarts)
#   "die_at_start": exit (code 3) before mapping the arena, as a broken install would


class _Files:
    """Opened store files, by path: (fd, uses O_DIRECT). Opened once per reader."""

    def __init__(self, want_direct: bool):
        self.want_direct = want_direct and hasattr(os, "O_DIRECT")
        self.fds: dict[str, tuple[int, bool]] = {}

    def get(self, path: str) -> tuple[int, bool]:
        got = self.fds.get(path)
        if got is None:
            got = None
            if self.want_direct:
                try:
                    got = (os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: the file system refuses O_DIRECT
                        raise
            if got is None:
                got = (os.open(path, os.O_RDONLY | os.O_CLOEXEC), False)
            self.fds[path] = got
        return got

    def fall_back(self, path: str) -> tuple[int, bool]:
        """O_DIRECT was accepted at open but refused at the read: reopen normally."""
        fd, _ = self.fds.pop(path)
        os.close(fd)
        got = (os.open(path, os.O_RDONLY | os.O_CLOEXEC), False)
        self.fds[path] = got
        return got

    def close(self) -> None:
        for fd, _ in self.fds.values():
            os.close(fd)
        self.fds.clear()


# A checksummed read goes in pieces of this size, each piece's crc32 computed on a helper thread
# while the next piece is read (both release the GIL). In one piece, the crc32 (~2 GB/s) waited
# for the whole read and the read for the crc32. On this repository's CPU machine (a noisy
# virtual disk): 16 MiB O_DIRECT reads with their crc32 made 0.76 GB/s, in 4 MiB pieces 0.99
# (1.01 unchecked); 13.2 MB experts (GPT-OSS-20B's, MXFP4) through _serve took 17.7-21.3 ms
# each in pieces against 18.4-24.1 in one, four runs each. A multiple of 4 KiB, so every piece
# stays aligned for O_DIRECT.
CHUNK_BYTES = 4 << 20


def _read(fd: int, arena: memoryview, req: ReadRequest, crc_thread) -> tuple[int, int | None]:
    """Read `req.read_length` bytes at `req.offset` into the arena; (bytes read, crc32 of the
    first `req.length` of them, or None when the request has no checksum). Stops at the end of
    the file (a short count). With a checksum, in CHUNK_BYTES pieces, each but the last folded
    on `crc_thread` (one thread) while the next is read; without one, in one read."""
    base, want = req.arena_offset, req.read_length
    checked = req.checksum is not None
    step = CHUNK_BYTES if checked else want
    crc, pending, n = [0], [], 0

    def fold(lo: int, hi: int) -> None:  # pieces in order: the helper is one thread
        crc[0] = zlib.crc32(arena[base + lo:base + hi], crc[0])

    try:
        while n < want:
            size = min(step, want - n)
            got = os.preadv(fd, [arena[base + n:base + n + size]], req.offset + n)
            last = got < size or n + got == want  # the end of the file, or of the expert
            hi = min(n + got, req.length)  # checksummed bytes end at the expert's length
            if checked and hi > n:
                if last:  # nothing left to read beside it: fold here, after the pieces before it
                    for f in pending:
                        f.result()
                    fold(n, hi)
                else:
                    pending.append(crc_thread.submit(fold, n, hi))
            n += got
            if last:
                break
    finally:
        for f in pending:
            f.result()
    return n, (crc[0] & 0xFFFFFFFF if checked else None)


def _serve(req: ReadRequest, arena: memoryview, files: _Files, hooks: dict, crc_thread) -> ReadDone:
    t0 = time.perf_counter()
    where = f"expert {req.layer}/{req.expert} (layer {req.layer}, expert {req.expert}) in {req.file}"
    end = req.arena_offset + req.read_length
    if req.arena_offset < 0 or end > len(arena) or not 0 < req.length <= req.read_length:
        return ReadDone(req.id, False, f"{where}: {req.read_length} bytes at arena offset {req.arena_offset} do not "
                        f"fit the {len(arena)}-byte arena (or length {req.length} exceeds read_length)",
                        0.0, False, "bad")
    if hooks.get("delay_s"):
        time.sleep(float(hooks["delay_s"]))
    if hooks.get("hang_once"):
        try:
            os.unlink(hooks["hang_once"])
            time.sleep(float(hooks.get("hang_s", 3600)))
        except FileNotFoundError:
            pass
    fd, direct = files.get(req.file)
    try:
        n, got = _read(fd, arena, req, crc_thread)
    except OSError as e:
        if not (direct and e.errno == errno.EINVAL):
            raise
        fd, direct = files.fall_back(req.file)
        n, got = _read(fd, arena, req, crc_thread)
    if n < req.length:
        return ReadDone(req.id, False, f"{where}: short read, {n} of {req.length} bytes at offset {req.offset}: the "
                        f"file is truncated (re-run `precompute --force`)", time.perf_counter() - t0, direct,
                        "short", n)
    if req.checksum is not None:
        if got != req.checksum:
            return ReadDone(req.id, False, f"{where}: crc32 {got:08x}, the index says {req.checksum:08x}",
                            time.perf_counter() - t0, direct, "checksum", n)
    return ReadDone(req.id, True, None, time.perf_counter() - t0, direct, "ok", n)


def reader_main(conn, arena_path: str, arena_size: int, parent_pid: int, o_direct: bool = True,
                hooks: dict | None = None) -> None:
    """One reader process (module level so that "spawn" can start it): serve, then leave
    without interpreter teardown (adapters.child.end_child)."""
    if start_child(parent_pid):  # else the parent died before PDEATHSIG was armed
        _serve_until_stopped(conn, arena_path, arena_size, parent_pid, o_direct, hooks)
    end_child()


def _serve_until_stopped(conn, arena_path: str, arena_size: int, parent_pid: int, o_direct: bool,
                         hooks: dict | None) -> None:
    hooks = dict(hooks or {})
    if hooks.get("die_at_start"):
        os._exit(3)
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(ToReader).decode
    fd = os.open(arena_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        mm = mmap.mmap(fd, arena_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    arena = memoryview(mm)
    files = _Files(o_direct)
    crc_thread = ThreadPoolExecutor(1, thread_name_prefix="crc32")
    freeze_start_up_heap()
    conn.send_bytes(encode(Ready(os.getpid())))
    try:
        while True:
            if not conn.poll(POLL_S):
                if os.getppid() != parent_pid:
                    return
                continue
            try:
                msg = decode(conn.recv_bytes())
            except EOFError:  # the parent closed its end
                return
            match msg:
                case Stop():
                    return
                case ReadRequest() as req:
                    try:
                        done = _serve(req, arena, files, hooks, crc_thread)
                    except OSError:
                        done = ReadDone(req.id, False, traceback.format_exc(), 0.0, False, "os")
                    except Exception:
                        done = ReadDone(req.id, False, traceback.format_exc(), 0.0, False, "bug")
                    try:
                        conn.send_bytes(encode(done))
                    except (BrokenPipeError, ConnectionResetError):
                        return
    finally:
        crc_thread.shutdown(wait=True)
        files.close()
        arena.release()
        mm.close()
