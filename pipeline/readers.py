"""Parent side of the NVMe -> RAM hop: an asyncio pool of reader processes.

    pool = ReaderPool(arena.path, arena.size)        # num_readers defaults to 4
    await pool.start()
    seconds = await pool.read(ReadRequest(...), demand=True)
    pool.cancel(req_id); pool.stats(); await pool.close()

`read_request(store, layer, expert, id, arena_offset)` builds a request from a StoreCheckpoint.

Request ids are the caller's (e.g. a slot number or a counter) and must be unique among
pending reads. Readers keep each store file open once opened: a store rewritten in place
(`precompute --force`) needs a new pool.

Readers (pipeline.reader_worker) are fresh interpreters that import only the reader's module
(adapters.worker_process): never a fork (the parent holds CUDA and asyncio state), and never a
re-run of the caller's script, so a pipeline opens the same from a script's top level, `python
-c`, standard input or a notebook. Everything is event-driven: `loop.add_reader` on each reader's
pipe for replies and on its process sentinel for its death; timeouts are `call_later` timers.
Pending requests wait in one priority queue (demand before prefetch, then FIFO); a reader
takes one request at a time and only once it has reported Ready, so a timeout measures the
read, not a process start-up.

Failures (docs/architecture.md: a reader may die at any moment):
- a reader that dies, or whose request exceeds `timeout_s` (it is SIGKILLed), is replaced by
  a fresh process and the request is queued again (at the front of its class);
- an OSError in the reader (e.g. a missing file) is retried likewise;
- after `max_attempts` failed attempts of one request, read() raises ReaderError naming the
  expert, the file and the last cause;
- a crc32 mismatch is retried once (a torn read), then raises CheckpointError naming the file,
  layer and expert; a short read (truncated store file) raises CheckpointError at once.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import os
from dataclasses import dataclass, field

import msgspec

from adapters.errors import CheckpointError

from adapters.worker_process import WorkerProcess

from .reader_worker import FromReader, Ready, ReadDone, ReadRequest, Stop

__all__ = ["ReadRequest", "ReadDone", "ReaderError", "ReaderPool", "ReaderStats", "read_request",
           "DEFAULT_NUM_READERS"]

# The H100 host's disk (a virtual NVMe, docs/architecture.md) read fastest with 4 threads of
# O_DIRECT 16 MiB reads (1.95 GB/s vs 1.57 with 1 and 1.62 with 8); more readers only add
# seeks and processes. Measure with pipeline/bench/disk_probe.py and pass num_readers.
DEFAULT_NUM_READERS = 4
CLOSE_GRACE_S = 2.0  # how long close() lets readers finish their read and exit before SIGKILL
START_TIMEOUT_S = 30.0  # a fresh interpreter on a loaded 2-core box can take seconds


class ReaderError(RuntimeError):
    """A read that failed `max_attempts` times; names layer/expert, the file and the cause."""

    def __init__(self, req: ReadRequest, attempts: int, cause: str):
        super().__init__(f"reading expert {req.layer}/{req.expert} (layer {req.layer}, expert {req.expert}) from "
                         f"{req.file} failed {attempts} time(s); last cause: {cause}")
        self.request = req
        self.cause = cause


class ReaderStats(msgspec.Struct, frozen=True):
    """Counters since start(). Units: reads and requests count experts; bytes_read counts bytes."""

    readers_alive: int
    restarts: int  # readers replaced after a death or a timeout
    reads_ok: int
    bytes_read: int
    retries: int  # attempts queued again (death, timeout, OSError, torn read)
    timeouts: int
    checksum_failures: int
    queued: int  # requests waiting for a reader
    in_flight: int  # requests a reader is working on
    o_direct: bool  # True when every successful read so far used O_DIRECT (False before any read)
    reads_o_direct: int = 0


def read_request(store, layer: int, expert: int, id: int, arena_offset: int, *, verify: bool = True) -> ReadRequest:
    """The ReadRequest for expert (layer, expert) of a StoreCheckpoint into arena_offset."""
    x = store.expert_range(layer, expert)
    return ReadRequest(id=id, layer=layer, expert=expert, file=os.path.abspath(store.root / x.file),
                       offset=x.offset, read_length=x.read_length, length=x.length, arena_offset=arena_offset,
                       checksum=int(x.checksum, 16) if verify else None)


@dataclass(eq=False)
class _Job:
    req: ReadRequest
    demand: bool
    future: asyncio.Future
    seq: int
    attempts: int = 0  # failed attempts (death, timeout, OSError)
    torn: int = 0  # checksum mismatches seen
    reader: "_Reader | None" = None

    def key(self) -> tuple[int, int]:
        return (0 if self.demand else 1, self.seq)


@dataclass(eq=False)
class _Reader:
    proc: WorkerProcess
    conn: object
    ready: bool = False
    job: _Job | None = None
    timer: asyncio.TimerHandle | None = None
    doomed: str | None = None  # why we killed it; its death is then expected
    served: int = 0
    watched: list[int] = field(default_factory=list)  # fds registered with the loop


class ReaderPool:
    """Reader processes that read store experts into the shared RAM arena (see module doc)."""

    def __init__(self, arena_path: str, arena_size: int, *, num_readers: int | None = None,
                 timeout_s: float = 10.0, max_attempts: int = 3, o_direct: bool = True,
                 close_grace_s: float = CLOSE_GRACE_S, hooks: dict | None = None):
        num_readers = DEFAULT_NUM_READERS if num_readers is None else num_readers
        if num_readers < 1 or max_attempts < 1 or timeout_s <= 0:
            raise ValueError(f"ReaderPool needs num_readers >= 1, max_attempts >= 1, timeout_s > 0; got "
                             f"{num_readers}, {max_attempts}, {timeout_s}")
        self.arena_path, self.arena_size = arena_path, arena_size
        self.num_readers, self.timeout_s, self.max_attempts, self.o_direct = (num_readers, timeout_s, max_attempts,
                                                                            o_direct)
        self.close_grace_s = close_grace_s
        self._hooks = dict(hooks or {})  # test hooks (slow or hung reads), see reader_worker
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(FromReader).decode
        self._readers: list[_Reader] = []
        self._heap: list[tuple[tuple[int, int], _Job]] = []
        self._jobs: dict[int, _Job] = {}  # id -> job, queued or in flight
        self._seq = itertools.count()
        self._front = itertools.count(-1, -1)  # retried jobs go ahead of their class
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._broken: str | None = None  # readers cannot even start: every read fails with this
        self._early_deaths = 0
        self._c = dict(restarts=0, reads_ok=0, bytes_read=0, retries=0, timeouts=0, checksum_failures=0,
                       reads_o_direct=0)

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the readers and wait until each has mapped the arena (bounded)."""
        if self._loop is not None:
            raise RuntimeError("ReaderPool.start() called twice")
        try:
            have = os.path.getsize(self.arena_path)
        except OSError as e:
            raise ValueError(f"RAM arena file {self.arena_path} cannot be opened ({e.strerror}); pass the path of a "
                             f"live RamArena (arena.path)") from None
        if have < self.arena_size:
            raise ValueError(f"RAM arena file {self.arena_path} holds {have} bytes, the pool was told "
                             f"{self.arena_size}; pass arena.size")
        self._loop = asyncio.get_running_loop()
        self._ready_waiter = self._loop.create_future()
        for _ in range(self.num_readers):
            self._spawn()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready_waiter), START_TIMEOUT_S)
        except TimeoutError:
            await self.close()
            raise RuntimeError(f"reader processes did not start within {START_TIMEOUT_S} s") from None
        if self._broken:
            cause = self._broken
            await self.close()
            raise RuntimeError(f"reader processes cannot start: {cause}")

    def _spawn(self) -> None:
        proc = WorkerProcess("pipeline.reader_worker:reader_main", name="tlmc-reader",
                             args=(self.arena_path, self.arena_size, os.getpid(), self.o_direct, self._hooks))
        proc.start()
        parent = proc.conn  # only the reader holds the other end: a dead reader reads as EOF here
        r = _Reader(proc, parent)
        self._readers.append(r)
        self._loop.add_reader(parent.fileno(), self._on_message, r)
        self._loop.add_reader(proc.sentinel, self._on_exit, r)
        r.watched = [parent.fileno(), proc.sentinel]

    def _unwatch(self, r: _Reader) -> None:
        for fd in r.watched:
            self._loop.remove_reader(fd)
        r.watched = []
        if r.timer:
            r.timer.cancel()
            r.timer = None

    # -- requests --------------------------------------------------------------------------
    async def read(self, req: ReadRequest, *, demand: bool = False) -> float:
        """Read one expert into the arena; returns the seconds the read itself took. Raises
        ReaderError (after max_attempts), CheckpointError (checksum, truncated file),
        asyncio.CancelledError (cancel() or close() before it was served)."""
        if self._loop is None or self._closing:
            raise RuntimeError("ReaderPool is not running: call start() first, and read() before close()")
        if self._broken:
            raise ReaderError(req, 0, self._broken)
        if req.id in self._jobs:
            raise ValueError(f"request id {req.id} is already pending; ids must be unique among pending reads")
        job = _Job(req, demand, self._loop.create_future(), next(self._seq))
        self._jobs[req.id] = job
        self._push(job)
        self._pump()
        return await job.future

    def cancel(self, req_id: int) -> bool:
        """Drop a queued request (its read() raises CancelledError). False if it is already
        with a reader (its bytes may be landing in the slot) or unknown."""
        job = self._jobs.get(req_id)
        if job is None or job.reader is not None:
            return False
        del self._jobs[req_id]  # its heap entry is skipped when popped
        job.future.cancel()
        return True

    def _push(self, job: _Job, retry: bool = False) -> None:
        key = (job.key()[0], next(self._front)) if retry else job.key()
        heapq.heappush(self._heap, (key, job))

    def _pump(self) -> None:
        """Hand queued requests to idle ready readers."""
        idle = [r for r in self._readers if r.ready and r.job is None and r.doomed is None]
        while idle and self._heap:
            _, job = heapq.heappop(self._heap)
            if self._jobs.get(job.req.id) is not job:
                continue  # cancelled
            if job.future.done():  # its caller went away (task cancelled)
                del self._jobs[job.req.id]
                continue
            r = idle.pop()
            try:
                r.conn.send_bytes(self._encode(job.req))
            except OSError:  # it died a moment ago; the sentinel will tell us
                r.doomed = "its pipe broke"
                self._push(job, retry=True)
                continue
            r.job, job.reader = job, r
            r.timer = self._loop.call_later(self.timeout_s, self._on_timeout, r, job)

    # -- events from readers ---------------------------------------------------------------
    def _on_message(self, r: _Reader) -> None:
        try:
            while r.conn.poll(0):
                msg = self._decode(r.conn.recv_bytes())
                match msg:
                    case Ready():
                        r.ready = True
                        self._early_deaths = 0
                        self._check_all_ready()
                    case ReadDone() as done:
                        self._on_done(r, done)
        except (EOFError, OSError):
            self._loop.remove_reader(r.conn.fileno())  # EOF stays readable: stop listening
            r.watched = [fd for fd in r.watched if fd != r.conn.fileno()]
        self._pump()

    def _check_all_ready(self) -> None:
        w = getattr(self, "_ready_waiter", None)
        if w is not None and not w.done() and all(r.ready for r in self._readers):
            w.set_result(None)

    def _on_done(self, r: _Reader, done: ReadDone) -> None:
        job = r.job
        if r.doomed or job is None or job.req.id != done.id:
            return  # a reply from a reader we already gave up on
        if r.timer:
            r.timer.cancel()
            r.timer = None
        r.job, job.reader = None, None
        r.served += 1
        req = job.req
        if done.ok:
            self._c["reads_ok"] += 1
            self._c["bytes_read"] += done.nbytes
            self._c["reads_o_direct"] += done.o_direct
            self._finish(job, result=done.seconds)
        elif done.kind == "checksum":
            self._c["checksum_failures"] += 1
            job.torn += 1
            if job.torn < 2:  # once more, in case the bytes were torn in flight
                self._retry(job)
            else:
                self._finish(job, error=CheckpointError(req.file, f"expert {req.layer}/{req.expert} (layer "
                                                        f"{req.layer}, expert {req.expert}) fails its checksum "
                                                        f"twice: {done.error}", fix="the file is corrupted; re-run "
                                                        "`precompute --force`"))
        elif done.kind in ("short", "bad"):
            self._finish(job, error=CheckpointError(req.file, done.error or done.kind)
                         if done.kind == "short" else ValueError(done.error))
        else:  # "os" / "bug": maybe transient; bounded retries
            self._fail_attempt(job, _last_line(done.error))

    def _on_timeout(self, r: _Reader, job: _Job) -> None:
        r.timer = None
        if r.job is not job or r.doomed:
            return
        self._c["timeouts"] += 1
        r.doomed = f"timed out after {self.timeout_s} s"
        r.proc.kill()  # SIGKILL: a reader stuck in the kernel or a hook; its death follows via the sentinel

    def _on_exit(self, r: _Reader) -> None:
        """A reader's process ended: reap it, replace it, retry its request."""
        self._unwatch(r)
        # The sentinel closes as the process exits, a moment before it can be reaped: wait
        # for that moment (microseconds; bounded all the same).
        r.proc.join(1.0)
        if r.proc.exitcode is None:
            r.proc.kill()
            r.proc.join(1.0)
        cause = r.doomed or f"reader process {r.proc.pid} died (exit code {r.proc.exitcode})"
        r.conn.close()
        r.proc.close()
        self._readers.remove(r)
        job, r.job = r.job, None
        if self._closing:
            return
        if not r.ready:
            self._early_deaths += 1
            if self._early_deaths >= 3:  # start-up itself fails (e.g. the arena file is gone)
                self._broken = f"{self._early_deaths} reader processes in a row died before starting ({cause})"
                for j in list(self._jobs.values()):
                    self._finish(j, error=ReaderError(j.req, j.attempts, self._broken))
                w = getattr(self, "_ready_waiter", None)
                if w is not None and not w.done():
                    w.set_result(None)
                return
        self._c["restarts"] += 1
        self._spawn()
        if job is not None:
            job.reader = None
            self._fail_attempt(job, cause)
        self._pump()

    def _fail_attempt(self, job: _Job, cause: str) -> None:
        job.attempts += 1
        if job.attempts >= self.max_attempts:
            self._finish(job, error=ReaderError(job.req, job.attempts, cause))
        else:
            self._retry(job)

    def _retry(self, job: _Job) -> None:
        self._c["retries"] += 1
        self._push(job, retry=True)

    def _finish(self, job: _Job, *, result: float | None = None, error: BaseException | None = None) -> None:
        self._jobs.pop(job.req.id, None)
        if job.future.done():
            return
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    # -- observation -----------------------------------------------------------------------
    def stats(self) -> ReaderStats:
        c = self._c
        in_flight = sum(1 for r in self._readers if r.job is not None)
        return ReaderStats(
            readers_alive=sum(1 for r in self._readers if r.proc.is_alive()), restarts=c["restarts"],
            reads_ok=c["reads_ok"], bytes_read=c["bytes_read"], retries=c["retries"], timeouts=c["timeouts"],
            checksum_failures=c["checksum_failures"], queued=len(self._jobs) - in_flight, in_flight=in_flight,
            o_direct=c["reads_ok"] > 0 and c["reads_o_direct"] == c["reads_ok"], reads_o_direct=c["reads_o_direct"])

    def reader_pids(self, *, busy_only: bool = False) -> list[int]:
        """Process ids of the live readers (busy_only: those with a request in flight)."""
        return [r.proc.pid for r in self._readers if r.doomed is None and (r.job is not None or not busy_only)]

    # -- shutdown --------------------------------------------------------------------------
    # The shutdown protocol, in order (close() follows it; nothing else stops readers):
    #  1. stop intake: read() refuses new requests;
    #  2. cancel every pending read, queued or in flight (their read() raises CancelledError;
    #     a reader may still be writing an in-flight slot until step 5, so the caller must
    #     not reuse those slots, nor close the arena, before close() returns);
    #  3. stop listening to the readers' pipes and sentinels;
    #  4. send Stop to every reader and wait up to close_grace_s for all of them to exit
    #     (a reader finishes the read it is in, then exits);
    #  5. SIGKILL the survivors and reap them (bounded: a killed process exits at once);
    #  6. close the pipes. The arena belongs to the caller, who closes it after this.
    async def close(self) -> None:
        """Ordered shutdown (see the protocol above); returns within ~close_grace_s + 1 s."""
        if self._closing:
            return
        self._closing = True  # 1
        for job in list(self._jobs.values()):  # 2
            job.future.cancel()
        self._jobs.clear()
        self._heap.clear()
        if self._loop is None:
            return
        readers, self._readers = self._readers, []
        for r in readers:  # 3, 4
            self._unwatch(r)
            try:
                r.conn.send_bytes(self._encode(Stop()))
            except OSError:
                pass
        exited = []
        for r in readers:
            f = self._loop.create_future()
            self._loop.add_reader(r.proc.sentinel, lambda f=f: f.done() or f.set_result(None))
            exited.append(f)
        if exited:
            await asyncio.wait(exited, timeout=self.close_grace_s)
        for r in readers:
            self._loop.remove_reader(r.proc.sentinel)
            if r.proc.is_alive():
                r.proc.kill()  # 5
            r.proc.join(1.0)
            r.conn.close()  # 6
            if r.proc.exitcode is not None:
                r.proc.close()

    async def __aenter__(self) -> "ReaderPool":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _last_line(tb: str | None) -> str:
    lines = [ln for ln in (tb or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"
