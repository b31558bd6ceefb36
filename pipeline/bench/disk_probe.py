"""Disk probe: the raw read bandwidth of a disk, to compare the reader pool against.

    raw_read_bandwidth(paths, block_bytes, threads, o_direct=True) -> bytes/s
        every file read once, in `block_bytes` positional reads by `threads` threads (each
        with its own page-aligned buffer), after dropping the files' cached pages
    pool_read_bandwidth(store, num_readers, o_direct=True) -> (bytes/s, ReaderStats)
        every expert of a packed store read by a ReaderPool into a RAM arena

    python -m pipeline.bench.disk_probe --store DIR [--readers 4]

measures both on the same files with the same block size (the store's largest expert
read_length) and parallelism. The page cache would turn either into a memory benchmark:
both drop the files' cached pages first (posix_fadvise DONTNEED, which works for clean
pages without root) and read with O_DIRECT unless told otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import sys
import threading
import time

ALIGN = 4096


def drop_cache(paths) -> None:
    """Ask the kernel to forget the files' clean cached pages (no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a store just written) cannot be dropped before writeback
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _open(path, o_direct: bool) -> tuple[int, bool]:
    if o_direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass  # the file system refuses O_DIRECT (old tmpfs): fall back like the readers do
    return os.open(path, os.O_RDONLY), False


def raw_read_bandwidth(paths, block_bytes: int, threads: int, o_direct: bool = True) -> float:
    """Bytes per second reading every file in `paths` once, in blocks of `block_bytes`
    (rounded up to 4096) by `threads` threads, after dropping the files' cached pages."""
    if threads < 1 or block_bytes < 1:
        raise ValueError(f"raw_read_bandwidth needs threads >= 1 and block_bytes >= 1, got {threads}, {block_bytes}")
    block = -(-block_bytes // ALIGN) * ALIGN
    paths = [os.fspath(p) for p in paths]
    drop_cache(paths)
    fds = [_open(p, o_direct) for p in paths]
    work = [(fd, off) for (fd, _), p in zip(fds, paths) for off in range(0, os.path.getsize(p), block)]
    nxt = iter(range(len(work)))
    lock = threading.Lock()
    total = [0] * threads
    errors: list[BaseException] = []

    def run(t: int) -> None:
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
        try:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                fd, off = work[i]
                total[t] += os.preadv(fd, [buf], off)
        except BaseException as e:  # reported by the caller's thread
            errors.append(e)
        finally:
            buf.close()

    try:
        pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        t0 = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        dt = time.perf_counter() - t0
    finally:
        for fd, _ in fds:
            os.close(fd)
    if errors:
        raise errors[0]
    return sum(total) / dt


async def pool_read_bandwidth(store_dir, num_readers: int, o_direct: bool = True, verify: bool = False):
    """(bytes/s, ReaderStats): every expert of the store read once by a ReaderPool into an
    arena of up to 64 slots (slots reused round-robin, as a cache would), cache dropped first."""
    from adapters.store import StoreCheckpoint
    from pipeline.ram_arena import RamArena
    from pipeline.readers import ReaderPool, read_request

    st = StoreCheckpoint(store_dir)
    keys = [(x.layer, x.expert) for x in st.index.experts]
    slot_bytes = st.index.max_read_length
    drop_cache(sorted({st.root / x.file for x in st.index.experts}))
    with RamArena.create(min(64, len(keys)), slot_bytes) as arena:
        async with ReaderPool(arena.path, arena.size, num_readers=num_readers, o_direct=o_direct,
                              timeout_s=120) as pool:
            sem = asyncio.Semaphore(arena.num_slots)  # one read per slot at a time

            async def one(i: int, key: tuple[int, int]) -> None:
                async with sem:
                    await pool.read(read_request(st, *key, i, arena.slot_offset(i % arena.num_slots), verify=verify))

            t0 = time.perf_counter()
            await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
            dt = time.perf_counter() - t0
            stats = pool.stats()
    return stats.bytes_read / dt, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="disk_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="a packed store directory (from `precompute`)")
    ap.add_argument("--readers", type=int, default=4, help="reader processes = raw threads (default 4)")
    ap.add_argument("--no-direct", action="store_true", help="buffered reads instead of O_DIRECT")
    args = ap.parse_args(argv)
    try:
        from adapters.store import StoreCheckpoint

        st = StoreCheckpoint(args.store)
    except (ValueError, OSError) as e:
        print(f"disk_probe: {e}", file=sys.stderr)
        return 2
    files = sorted({str(st.root / x.file) for x in st.index.experts})
    block = st.index.max_read_length
    size = sum(os.path.getsize(f) for f in files)
    raw = raw_read_bandwidth(files, block, args.readers, o_direct=not args.no_direct)
    bw, stats = asyncio.run(pool_read_bandwidth(args.store, args.readers, o_direct=not args.no_direct))
    print(f"{len(files)} files, {size / 1e6:.1f} MB, block {block} B, {args.readers} readers/threads")
    print(f"raw {'O_DIRECT' if not args.no_direct else 'buffered'} read: {raw / 1e9:.3f} GB/s")
    print(f"reader pool:  {bw / 1e9:.3f} GB/s ({stats.reads_ok} experts, O_DIRECT used: {stats.o_direct}); "
          f"{bw / raw:.0%} of raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
