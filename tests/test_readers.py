"""The reader pool: store experts land byte-exact in arena slots, demand overtakes prefetch,
readers that die or hang are replaced and their reads retried, bad files give errors that
name the expert and the file, and nothing (process, /dev/shm file) outlives a test."""
from __future__ import annotations

import asyncio
import errno
import mmap
import os
import random
import shutil
import signal
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters.errors import CheckpointError
from adapters.store import StoreCheckpoint
from pipeline import reader_worker
from pipeline.ram_arena import RamArena
from pipeline.readers import ReaderError, ReaderPool, ReadRequest, read_request
from tests.helpers_pipeline import build_tiny_store, fs_allows_o_direct, no_leaks  # noqa: F401  (fixture)

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(30)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline_stores")
    return {d: build_tiny_store(root, d) for d in ("bfloat16", "mxfp4")}


@pytest.fixture
def store_copy(stores, tmp_path) -> Path:
    """A private copy of the bf16 store that a test may damage."""
    return Path(shutil.copytree(stores["bfloat16"], tmp_path / "store"))


def all_requests(st: StoreCheckpoint, arena: RamArena) -> list[ReadRequest]:
    """Every expert of the store (as many as the arena has slots), one slot each."""
    keys = [(l, e) for l in range(st.spec.num_layers) for e in range(st.spec.num_experts)][:arena.num_slots]
    return [read_request(st, l, e, i, arena.slot_offset(i)) for i, (l, e) in enumerate(keys)]


def slot_bytes_for(st: StoreCheckpoint) -> int:
    return st.index.max_read_length


def arena_for(st: StoreCheckpoint, slots: int | None = None) -> RamArena:
    return RamArena.create(slots or st.spec.num_layers * st.spec.num_experts, slot_bytes_for(st), pin=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "mxfp4"])
async def test_every_expert_lands_in_its_slot_byte_exact(stores, dtype):
    st = StoreCheckpoint(stores[dtype])
    with arena_for(st) as arena:
        reqs = all_requests(st, arena)
        async with ReaderPool(arena.path, arena.size, num_readers=2, timeout_s=20) as pool:
            secs = await asyncio.gather(*(pool.read(r) for r in reqs))
            s = pool.stats()
        assert all(t >= 0 for t in secs)
        for r in reqs:
            got = bytes(arena.tensor.view(-1)[r.arena_offset:r.arena_offset + r.length].numpy())
            assert got == st.read_expert(r.layer, r.expert), f"expert {r.layer}/{r.expert}"
        assert s.reads_ok == len(reqs) and s.bytes_read == sum(r.read_length for r in reqs)
        assert (s.queued, s.in_flight, s.restarts, s.retries, s.readers_alive) == (0, 0, 0, 0, 2)
        assert s.o_direct == fs_allows_o_direct(Path(reqs[0].file))


async def test_demand_overtakes_queued_prefetches(stores):
    st = StoreCheckpoint(stores["bfloat16"])
    with arena_for(st) as arena:
        reqs = all_requests(st, arena)
        async with ReaderPool(arena.path, arena.size, num_readers=1, hooks={"delay_s": 0.03}) as pool:
            order: list[int] = []

            async def one(r, demand=False):
                await pool.read(r, demand=demand)
                order.append(r.id)

            prefetch = [asyncio.create_task(one(r)) for r in reqs[:10]]
            while pool.stats().in_flight == 0:
                await asyncio.sleep(0.005)
            assert pool.stats().queued == 9
            demand = reqs[10]
            await asyncio.gather(one(demand, demand=True), *prefetch)
        # the reader was busy with prefetch 0; the demand came next, before the 9 queued earlier
        assert order[:2] == [0, demand.id] and order[2:] == list(range(1, 10))


async def test_readers_killed_mid_read_repeatedly_are_replaced_and_reads_complete(stores):
    st = StoreCheckpoint(stores["mxfp4"])
    with arena_for(st) as arena:
        reqs = all_requests(st, arena)[:12]
        async with ReaderPool(arena.path, arena.size, num_readers=2, timeout_s=20, max_attempts=10,
                              hooks={"delay_s": 0.1}) as pool:
            reads = asyncio.gather(*(pool.read(r) for r in reqs))
            killed = []
            for _ in range(4):  # kill whichever reader is mid-read, four times over
                while not (busy := pool.reader_pids(busy_only=True)):
                    await asyncio.sleep(0.01)
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
                while busy[0] in pool.reader_pids():
                    await asyncio.sleep(0.01)
            await reads
            s = pool.stats()
        assert len(set(killed)) == 4
        assert s.restarts == 4 and s.retries == 4 and s.reads_ok == len(reqs) and s.readers_alive == 2
        for r in reqs:
            got = bytes(arena.tensor.view(-1)[r.arena_offset:r.arena_offset + r.length].numpy())
            assert got == st.read_expert(r.layer, r.expert)


async def test_a_hung_reader_is_killed_replaced_and_its_read_completes(stores, tmp_path):
    st = StoreCheckpoint(stores["bfloat16"])
    token = tmp_path / "hang"
    token.touch()
    with arena_for(st, 2) as arena:
        r = read_request(st, 2, 5, 1, arena.slot_offset(1))
        async with ReaderPool(arena.path, arena.size, num_readers=1, timeout_s=1.0,
                              hooks={"hang_once": str(token)}) as pool:
            t0 = time.monotonic()
            await pool.read(r)
            waited = time.monotonic() - t0
            s = pool.stats()
        assert not token.exists()  # the hook did fire
        assert waited >= 1.0 and (s.timeouts, s.restarts, s.retries, s.reads_ok) == (1, 1, 1, 1)
        assert bytes(arena.slot(1)[:r.length].numpy()) == st.read_expert(2, 5)


async def test_a_request_that_always_fails_raises_reader_error_naming_expert_and_file(stores, tmp_path):
    st = StoreCheckpoint(stores["bfloat16"])
    with arena_for(st, 1) as arena:
        good = read_request(st, 1, 2, 7, 0)
        missing = str(tmp_path / "gone.safetensors")
        bad = ReadRequest(**{**{f: getattr(good, f) for f in good.__struct_fields__}, "file": missing})
        async with ReaderPool(arena.path, arena.size, num_readers=1, max_attempts=3) as pool:
            with pytest.raises(ReaderError, match=rf"expert 1/2 .*{missing} failed 3 time.*FileNotFoundError"):
                await pool.read(bad)
            assert pool.stats().retries == 2
            await pool.read(good)  # the pool is still fine afterwards


async def test_a_truncated_store_file_raises_checkpoint_error_naming_file_and_expert(store_copy):
    st = StoreCheckpoint(store_copy)
    last = st.spec.num_experts - 1
    r = read_request(st, 1, last, 3, 0)
    with open(r.file, "r+b") as f:
        f.truncate(r.offset + r.length // 2)
    with arena_for(st, 1) as arena:
        async with ReaderPool(arena.path, arena.size, num_readers=1) as pool:
            with pytest.raises(CheckpointError, match=rf"{r.file}.*expert 1/{last}.*short read.*truncated"):
                await pool.read(r)
            assert pool.stats().retries == 0


async def test_a_flipped_byte_raises_checkpoint_error_after_one_retry(store_copy):
    st = StoreCheckpoint(store_copy)
    r = read_request(st, 1, 3, 9, 0)
    with open(r.file, "r+b") as f:
        f.seek(r.offset + r.length - 1)
        b = f.read(1)
        f.seek(r.offset + r.length - 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with arena_for(st, 1) as arena:
        async with ReaderPool(arena.path, arena.size, num_readers=1) as pool:
            with pytest.raises(CheckpointError, match=rf"{r.file}.*expert 1/3 \(layer 1, expert 3\).*checksum"):
                await pool.read(r)
            s = pool.stats()
    assert (s.checksum_failures, s.retries, s.reads_ok) == (2, 1, 0)


async def test_cancel_drops_a_queued_request_only(stores):
    st = StoreCheckpoint(stores["bfloat16"])
    with arena_for(st, 3) as arena:
        reqs = all_requests(st, arena)[:3]
        async with ReaderPool(arena.path, arena.size, num_readers=1, hooks={"delay_s": 0.2}) as pool:
            tasks = [asyncio.create_task(pool.read(r)) for r in reqs]
            while pool.stats().in_flight == 0:
                await asyncio.sleep(0.005)
            assert pool.cancel(reqs[0].id) is False  # already with the reader
            assert pool.cancel(reqs[1].id) is True
            assert pool.cancel(reqs[1].id) is False and pool.cancel(12345) is False
            done = await asyncio.gather(*tasks, return_exceptions=True)
            s = pool.stats()
        assert isinstance(done[1], asyncio.CancelledError)
        assert isinstance(done[0], float) and isinstance(done[2], float) and s.reads_ok == 2
        assert not arena.slot(1).any()  # the cancelled read never touched its slot


async def test_close_during_heavy_reads_is_bounded_and_leaves_no_process(stores):
    st = StoreCheckpoint(stores["bfloat16"])
    with arena_for(st) as arena:
        reqs = all_requests(st, arena)
        pool = ReaderPool(arena.path, arena.size, num_readers=2, hooks={"delay_s": 5.0})
        await pool.start()
        pids = pool.reader_pids()
        tasks = [asyncio.create_task(pool.read(r)) for r in reqs]
        while pool.stats().in_flight < 2:
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        await pool.close()
        took = time.monotonic() - t0
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert took < 4.0, f"close() took {took:.1f} s"
        assert all(isinstance(x, asyncio.CancelledError) for x in results)
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}")
        with pytest.raises(RuntimeError, match="not running"):
            await pool.read(reqs[0])


async def test_on_tmpfs_the_reader_uses_o_direct_exactly_when_tmpfs_allows_it(stores):
    # tmpfs refuses O_DIRECT before Linux 6.6 and accepts it since: either way the reads succeed
    # and stats report what the file system did (the refusal itself is forced in the tests below).
    src = Path(stores["bfloat16"])
    shm_dir = Path(f"/dev/shm/tlmc-test-{os.getpid()}-store")
    shutil.copytree(src, shm_dir)
    try:
        allowed = fs_allows_o_direct(shm_dir / "layer_000.safetensors")
        st = StoreCheckpoint(shm_dir)
        with arena_for(st) as arena:
            reqs = all_requests(st, arena)[:8]
            async with ReaderPool(arena.path, arena.size, num_readers=1) as pool:
                await asyncio.gather(*(pool.read(r) for r in reqs))
                s = pool.stats()
            for r in reqs:
                assert bytes(arena.tensor.view(-1)[r.arena_offset:r.arena_offset + r.length].numpy()) == \
                    st.read_expert(r.layer, r.expert)
        assert s.reads_ok == 8 and s.reads_o_direct == (8 if allowed else 0) and s.o_direct is allowed
    finally:
        shutil.rmtree(shm_dir)


@pytest.mark.parametrize("refused_at", ["open", "read", "second piece"])
def test_o_direct_refused_at_open_or_first_read_falls_back_to_a_normal_fd(stores, monkeypatch, refused_at):
    """The reader's own code, in-process, on a file system that refuses O_DIRECT: at the open,
    at the first read, or at the second piece of a checksummed read, whose first piece's crc32
    was already handed to the helper thread (the fallback reads and folds the expert afresh)."""
    st = StoreCheckpoint(stores["bfloat16"])
    monkeypatch.setattr(reader_worker, "CHUNK_BYTES", 8192)  # several pieces per expert
    assert st.expert_range(0, 1).read_length > 2 * reader_worker.CHUNK_BYTES
    real_open, real_preadv = os.open, os.preadv
    direct_fds: set[int] = set()  # open O_DIRECT descriptors
    direct_opens = []
    direct_reads: dict[int, int] = {}

    def fake_open(path, flags, *a):
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
            direct_opens.append(path)
        else:
            direct_fds.discard(fd)  # a closed direct fd's number reused by the fallback
        return fd

    def fake_preadv(fd, bufs, offset):
        if fd in direct_fds:
            direct_reads[fd] = direct_reads.get(fd, 0) + 1
            if refused_at != "second piece" or direct_reads[fd] == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(reader_worker.os, "open", fake_open)
    monkeypatch.setattr(reader_worker.os, "preadv", fake_preadv)
    arena = mmap.mmap(-1, 2 * slot_bytes_for(st))  # page-aligned, as O_DIRECT needs: no EINVAL of its own
    files = reader_worker._Files(want_direct=True)
    try:
        with ThreadPoolExecutor(1) as crc_thread:
            for i, (l, e) in enumerate([(0, 1), (2, 7)]):
                r = read_request(st, l, e, i, i * slot_bytes_for(st))
                done = reader_worker._serve(r, memoryview(arena), files, {}, crc_thread)
                assert done.ok and done.o_direct is False and done.nbytes == r.read_length, done
                assert bytes(arena[r.arena_offset:r.arena_offset + r.length]) == st.read_expert(l, e)
        assert all(not d for _, d in files.fds.values())
    finally:
        monkeypatch.undo()
        files.close()
    # one O_DIRECT attempt per file (two layers): refused, never tried again for that file
    assert len(direct_opens) == (0 if refused_at == "open" else 2)
    if refused_at == "second piece":  # each file's first piece read direct, its second refused
        assert sorted(direct_reads.values()) == [2, 2]


async def test_o_direct_off_is_honoured_and_a_request_outside_the_arena_is_refused(stores):
    st = StoreCheckpoint(stores["bfloat16"])
    with arena_for(st, 1) as arena:
        async with ReaderPool(arena.path, arena.size, num_readers=1, o_direct=False) as pool:
            await pool.read(read_request(st, 0, 0, 1, 0))
            assert pool.stats().reads_o_direct == 0
            with pytest.raises(ValueError, match=r"expert 0/1 .*do not fit the \d+-byte arena"):
                await pool.read(read_request(st, 0, 1, 2, arena.slot_offset(0) + 4096))


def test_bad_pool_settings_raise_with_the_numbers():
    with pytest.raises(ValueError, match="num_readers >= 1.*got 0, 3, 10"):
        ReaderPool("/dev/shm/x", 4096, num_readers=0)


_ORPHANING_PARENT = """
import asyncio, os
from pipeline.ram_arena import RamArena
from pipeline.readers import ReaderPool

async def main():
    arena = RamArena.create(1, 4096, pin=False)
    pool = ReaderPool(arena.path, arena.size, num_readers=2)
    await pool.start()
    arena.close()  # the readers keep their own mapping; no file may outlive the test
    print(*pool.reader_pids(), flush=True)
    os._exit(0)  # die without any shutdown

asyncio.run(main())
"""


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # exited; waiting for init to reap it


def test_readers_exit_when_their_parent_dies(bin_env):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ORPHANING_PARENT], env=bin_env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids if not _gone(p)]


async def test_a_pending_id_cannot_be_reused(stores):
    st = StoreCheckpoint(stores["bfloat16"])
    with arena_for(st, 2) as arena:
        async with ReaderPool(arena.path, arena.size, num_readers=1, hooks={"delay_s": 0.2}) as pool:
            first = asyncio.create_task(pool.read(read_request(st, 0, 0, 5, 0)))
            await asyncio.sleep(0)
            with pytest.raises(ValueError, match="request id 5 is already pending"):
                await pool.read(read_request(st, 0, 1, 5, arena.slot_offset(1)))
            await first
            await pool.read(read_request(st, 0, 1, 5, arena.slot_offset(1)))  # free again once done


def test_raw_read_bandwidth_runs_buffered_or_direct_and_checks_its_arguments(stores):
    from pipeline.bench.disk_probe import raw_read_bandwidth

    files = sorted(Path(stores["mxfp4"]).glob("layer_*.safetensors"))
    assert raw_read_bandwidth(files, 8192, 2) > 0
    assert raw_read_bandwidth(files, 5000, 1, o_direct=False) > 0
    with pytest.raises(ValueError, match="threads >= 1.*got 0"):
        raw_read_bandwidth(files, 8192, 0)


async def test_a_wrong_arena_or_readers_that_cannot_start_fail_start_clearly(stores):
    with pytest.raises(ValueError, match=r"/dev/shm/tlmc-missing cannot be opened .*arena\.path"):
        await ReaderPool("/dev/shm/tlmc-missing", 4096).start()
    with RamArena.create(1, 4096, pin=False) as arena:
        with pytest.raises(ValueError, match=r"holds 4096 bytes, the pool was told 8192"):
            await ReaderPool(arena.path, 8192).start()
        pool = ReaderPool(arena.path, arena.size, num_readers=1, hooks={"die_at_start": True})
        with pytest.raises(RuntimeError, match=r"3 reader processes in a row died before starting .*exit code 3"):
            await pool.start()
        assert pool.reader_pids() == []


@pytest.mark.parametrize("case", ["whole", "corrupt in the third piece", "truncated"])
def test_a_checked_read_goes_in_pieces_whose_crc32_is_folded_in_order(tmp_path, monkeypatch, case):
    """The reader's own code, in-process: pieces of CHUNK_BYTES, each crc32 folded on the helper
    thread while the next is read; the result equals one crc32 of the whole expert."""
    chunk = 8192
    monkeypatch.setattr(reader_worker, "CHUNK_BYTES", chunk)
    length, read_length = 3 * chunk + 1000, 4 * chunk  # the padded read is longer than the expert
    data = bytes(random.Random(7).getrandbits(8) for _ in range(read_length))
    path = tmp_path / "layer.bin"
    on_disk = bytearray(data)
    if case == "corrupt in the third piece":
        on_disk[2 * chunk + 5] ^= 0xFF
    if case == "truncated":
        on_disk = on_disk[: 2 * chunk + 100]
    path.write_bytes(bytes(on_disk))
    calls = []
    real_preadv = os.preadv
    monkeypatch.setattr(reader_worker.os, "preadv", lambda fd, bufs, off: (calls.append(off), real_preadv(fd, bufs, off))[1])
    req = reader_worker.ReadRequest(id=1, layer=0, expert=0, file=str(path), offset=0, read_length=read_length,
                                    length=length, arena_offset=chunk, checksum=zlib.crc32(data[:length]))
    arena = bytearray(chunk + read_length)
    files = reader_worker._Files(want_direct=False)
    with ThreadPoolExecutor(1) as crc_thread:
        try:
            done = reader_worker._serve(req, memoryview(arena), files, {}, crc_thread)
        finally:
            files.close()
    if case == "whole":
        assert done.ok and done.nbytes == read_length and calls == [0, chunk, 2 * chunk, 3 * chunk]
        assert bytes(arena[chunk:chunk + length]) == data[:length]
    elif case == "truncated":
        assert not done.ok and done.kind == "short" and done.nbytes == 2 * chunk + 100
    else:
        assert not done.ok and done.kind == "checksum" and "crc32" in done.error


@pytest.mark.parametrize("how", ["file", "-c", "stdin", "server thread"])
def test_a_pipeline_opens_at_a_scripts_top_level_without_a_main_guard(stores, tmp_path, bin_env, how):
    """Workers import only the project's modules, never the caller's script: a pipeline opened at
    the top level of a file, of `python -c` or of standard input works, fetches, and closes, and
    the script's top level runs once (a re-run in a worker would print its line again)."""
    import subprocess
    import sys

    code = ("print('top level ran')\nfrom pipeline import ExpertPipeline\n"
            f"pipe = ExpertPipeline.open({str(stores['bfloat16'])!r}, vram='200KiB', ram='1MiB', device='cpu')\n"
            "print(sorted(pipe.fetch(0, [1])[0]))\npipe.close()\n")
    if how == "file":
        script = tmp_path / "decode.py"
        script.write_text(code)
        argv, stdin = [sys.executable, str(script)], None
    elif how == "-c":
        argv, stdin = [sys.executable, "-c", code], None
    elif how == "stdin":  # as a notebook runs it: a __main__ with no file
        argv, stdin = [sys.executable, "-"], code
    else:  # as a web server's request handler does: in a thread that is not the main one
        script = tmp_path / "server.py"
        script.write_text("import threading\n" + "def handle():\n" + "".join(f"    {ln}\n" for ln in
                          code.splitlines() if not ln.startswith("print('top")) +
                          "print('top level ran')\nt = threading.Thread(target=handle)\nt.start()\nt.join()\n")
        argv, stdin = [sys.executable, str(script)], None
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=bin_env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("top level ran") == 1, res.stdout
    assert "w1" in res.stdout or "gate_proj" in res.stdout or "mlp1_weight" in res.stdout, res.stdout
    # Workers leave without interpreter teardown, so no library's exit-time warnings reach the user.
    assert "nanobind" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
