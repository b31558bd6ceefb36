"""The policy actor in a process of its own, so the policy's work leaves the decode loop's GIL.

    PolicySpec(policy, predictor, predictor_options, policy_config)    what the child builds
    PolicyProcess(spec, on_plan=..., queue_size=256)
      start()                          from inside the parent's running event loop
      publish(event) / publish_threadsafe(event)    any thread; never block (written to the socket)
      complete(layer, expert, tier, ok) / forget(layer, expert, tier)   feedback, never dropped
      is_stale(stamped), stats() -> ActorStats, check(), state, await stop(drain=True)

Why: in one process the policy's Python runs under the GIL that the decode loop needs to
launch its kernels. On an H100 replay (GPT-OSS-20B-sized experts) the loop thread's work,
mostly the policy at 250-370 us per activation on a small CPU, added ~20 ms per token. Here
the policy runs in a child process; the parent only ferries msgspec frames.

Protocol (msgpack payloads in length-prefixed frames, policies/frames.py, over one socket pair):
    parent -> child   Event(activation) | Complete(...) | Forget(...) | Stop(drain)
    child -> parent   Ready() once built | Planned(stamped plan, stats) | Stats(stats) while they
                      change | Failed(traceback text, stats) | Stopped(stats)
The child runs an ordinary `PolicyActor` on its own event loop, so queueing, coalescing,
plan stamps and error recording are exactly the in-process actor's. Every parent thread
writes its frame to the non-blocking socket itself, under one lock, so feedback keeps its
order relative to the events, and no thread hand-off sits between an event and the child.
What the socket cannot take waits in a backlog that the parent's loop writes out; a slow
child never blocks a producer (events beyond `queue_size` in that backlog are dropped and
counted; feedback is never dropped).

Shutdown: Stop(drain) -> the child stops its actor, replies Stopped, exits; the parent waits
a bounded time, then terminates and kills. The child dies with the parent (PR_SET_PDEATHSIG,
and EOF on the pipe). A child that dies or fails is recorded: check()/stop() raise
PolicyActorError with its traceback or exit code.
"""
from __future__ import annotations

import asyncio
import collections
import os
import socket
import threading
import traceback

import msgspec

from adapters.child import end_child, freeze_start_up_heap, start_child
from adapters.worker_process import WorkerProcess

from .actor import ActorState, ActorStats, PolicyActor, PolicyActorError, StampedPlan
from .events import Activation, Tier
from .frames import FrameReader, frame, read_frames, write_all


class PolicySpec(msgspec.Struct, frozen=True):
    """Everything the child needs to build the policy (names resolve through the registries)."""

    policy: str
    predictor: str | None
    predictor_options: dict[str, float | int | str]
    policy_config: dict[str, float | int | str | bool]
    num_layers: int
    num_experts: int
    top_k: int
    queue_size: int = 256


class _Event(msgspec.Struct, tag="event"):
    event: Activation


class _Complete(msgspec.Struct, tag="complete"):
    layer: int
    expert: int
    tier: Tier
    ok: bool


class _Forget(msgspec.Struct, tag="forget"):
    layer: int
    expert: int
    tier: Tier


class _Stop(msgspec.Struct, tag="stop"):
    drain: bool


class _Planned(msgspec.Struct, tag="planned"):
    stamped: StampedPlan
    stats: ActorStats


class _Failed(msgspec.Struct, tag="failed"):
    text: str
    stats: ActorStats | None


class _Stopped(msgspec.Struct, tag="stopped"):
    stats: ActorStats


class _Ready(msgspec.Struct, tag="ready"):
    pass


class _Stats(msgspec.Struct, tag="stats"):
    stats: ActorStats


_ENC = msgspec.msgpack.Encoder()
_TO_CHILD = msgspec.msgpack.Decoder(_Event | _Complete | _Forget | _Stop)
_TO_PARENT = msgspec.msgpack.Decoder(_Planned | _Failed | _Stopped | _Ready | _Stats)
STATS_EVERY_S = 0.05  # the child reports its counters this often while they change
# Events in flight to the child beyond its queue: what the socket buffers (Linux doubles it).
SEND_BUFFER_BYTES = 32 << 10
_EMPTY = ActorStats(state="new", received=0, processed=0, coalesced=0, dropped=0, refused=0, pending=0,
                    peak_depth=0, capacity=0, plans_emitted=0, mean_process_s=0.0, max_process_s=0.0,
                    last_error=None)


def build_policy(spec: PolicySpec):
    """The policy (with its predictor) that `spec` names; raises what the registries raise."""
    from .cache.registry import make_policy
    from .predictors.registry import make_predictor

    predictor = None
    if spec.predictor is not None:
        predictor = make_predictor(spec.predictor, spec.num_layers, spec.num_experts, spec.top_k,
                                   **spec.predictor_options)
    return make_policy(spec.policy, predictor, **spec.policy_config)


# ---- the child ------------------------------------------------------------------------------
def policy_main(conn, spec_bytes: bytes, parent_pid: int) -> None:
    """Entry point of the policy process."""
    if start_child(parent_pid):
        try:
            asyncio.run(_child(conn, msgspec.msgpack.decode(spec_bytes, type=PolicySpec)))
        except (EOFError, BrokenPipeError, ConnectionResetError):
            pass  # the parent is gone
    end_child()  # no interpreter teardown: see adapters.child.end_child


async def _child(conn, spec: PolicySpec) -> None:
    loop = asyncio.get_running_loop()

    fd = conn.fileno()
    os.set_blocking(fd, False)  # reads take what has arrived; writes wait in write_all
    reader = FrameReader()

    def send(msg) -> None:
        write_all(fd, frame(_ENC.encode(msg)))

    try:
        policy = build_policy(spec)
    except Exception as exc:  # bad names or config: reported, not hidden in a dead process
        send(_Failed("".join(traceback.format_exception(exc)), None))
        return
    box: list[PolicyActor] = []
    actor = PolicyActor(policy, on_plan=lambda st: send(_Planned(st, box[0].stats())), queue_size=spec.queue_size)
    box.append(actor)
    actor.start()
    freeze_start_up_heap()
    send(_Ready())
    done: asyncio.Future = loop.create_future()

    async def finish(drain: bool) -> None:
        try:
            stats = await actor.stop(drain=drain)
            send(_Stopped(stats))
        except PolicyActorError as exc:
            send(_Failed(str(exc), actor.stats()))
        if not done.done():
            done.set_result(None)

    def on_readable() -> None:
        try:
            payloads, eof = read_frames(fd, reader)
            for payload in payloads:
                msg = _TO_CHILD.decode(payload)
                if isinstance(msg, _Event):
                    actor.publish(msg.event)
                elif isinstance(msg, _Complete):
                    actor.complete(msg.layer, msg.expert, msg.tier, msg.ok)
                elif isinstance(msg, _Forget):
                    forget = getattr(policy, "forget", None)
                    if forget is not None and actor.state is ActorState.RUNNING:
                        forget(msg.layer, msg.expert, msg.tier)
                else:
                    loop.remove_reader(fd)
                    loop.create_task(finish(msg.drain))
                    return
            if eof:
                raise EOFError
        except (EOFError, OSError):  # the parent is gone: nothing to report to
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None)

    loop.add_reader(fd, on_readable)

    async def watch() -> None:
        # A failed policy is reported at once, not at stop; counters go out while they change.
        last = None
        while not done.done():
            if actor.state is ActorState.FAILED:
                try:
                    actor.check()
                except PolicyActorError as exc:
                    send(_Failed(str(exc), actor.stats()))
                return
            stats = actor.stats()
            if stats != last and actor.state is ActorState.RUNNING:
                send(_Stats(stats))
                last = stats
            await asyncio.sleep(STATS_EVERY_S)

    watcher = loop.create_task(watch())
    await done
    watcher.cancel()


# ---- the parent -----------------------------------------------------------------------------
class PolicyProcess:
    """The parent's side: the same calls as `PolicyActor`, served by a child process."""

    def __init__(self, spec: PolicySpec, *, on_plan, queue_size: int | None = None,
                 stop_timeout: float = 5.0):
        if not callable(on_plan):
            raise TypeError(f"on_plan must be callable; got {type(on_plan).__name__}")
        if queue_size is not None:
            spec = msgspec.structs.replace(spec, queue_size=queue_size)
        if spec.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1 event; got {spec.queue_size}")
        self.spec = spec
        self._on_plan = on_plan
        self._stop_timeout = stop_timeout
        self._state = ActorState.NEW
        self._lock = threading.Lock()  # one frame at a time onto the socket, in order
        # Frames the socket had no room for, oldest first, as [bytes, is_event]; the first may
        # be partly written already. The loop writes them out when the socket drains.
        self._backlog: collections.deque = collections.deque()
        self._backlog_events = 0
        self._flushing = False
        self._fd = -1
        self._reader = FrameReader()
        self._accepted = self._dropped = self._refused = 0
        self._child_stats = _EMPTY
        self._latest_seq: dict[int, int] = {}
        self._error: PolicyActorError | None = None
        self._stopped: asyncio.Future | None = None
        self._ready: asyncio.Future | None = None
        self._loop = self._conn = self._proc = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._state is not ActorState.NEW:
            raise RuntimeError(f"policy process already started (state {self._state.value})")
        self._loop = asyncio.get_running_loop()
        self._proc = WorkerProcess("policies.process_actor:policy_main", name="tlmc-policy",
                                   args=(_ENC.encode(self.spec), os.getpid()))
        self._proc.start()
        self._conn = self._proc.conn  # only the child holds the other end: its death reads as EOF here
        self._fd = self._conn.fileno()
        os.set_blocking(self._fd, False)
        with socket.socket(fileno=os.dup(self._fd)) as sock:  # same socket: bounds what is in flight
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._stopped = self._loop.create_future()
        self._ready = self._loop.create_future()
        self._loop.add_reader(self._fd, self._on_readable)
        self._state = ActorState.RUNNING

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the child has built the policy and takes events (events published before are
        queued, not lost); raises PolicyActorError if it failed, TimeoutError if it is slow."""
        if self._ready is None:
            raise RuntimeError("policy process not started")
        await asyncio.wait({self._ready, self._stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        self.check()
        if not self._ready.done():
            raise TimeoutError(f"policy process not ready after {timeout} s")

    async def stop(self, *, drain: bool = True) -> ActorStats:
        """Stop the child within about `stop_timeout` seconds; re-raise a recorded failure."""
        if self._state in (ActorState.NEW, ActorState.RUNNING):
            self._state = ActorState.STOPPING
        if self._proc is not None:
            # Also after a failure: the child still waits for Stop (or EOF) before it exits.
            self._send(_Stop(drain and self._state is ActorState.STOPPING))
            if self._stopped is not None and not self._stopped.done():
                await asyncio.wait({self._stopped}, timeout=self._stop_timeout)
            self._close_child()
        if self._state is ActorState.STOPPING:
            self._state = ActorState.STOPPED
        self.check()
        return self.stats()

    def _close_child(self) -> None:
        if self._conn is not None:
            with self._lock:
                if self._flushing:
                    self._loop.remove_writer(self._fd)
                self._backlog.clear()
                self._backlog_events = 0
                self._flushing = False
                self._loop.remove_reader(self._fd)
                self._conn.close()
                self._fd = -1
        proc = self._proc
        proc.join(timeout=1.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=1.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=1.0)
        proc.close()
        self._conn = self._proc = None

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def state(self) -> ActorState:
        return self._state

    # ---- intake (any thread) ------------------------------------------------------------
    def publish(self, event: Activation) -> bool:
        """Write the event to the child's socket now; never blocks. Beyond what the socket
        holds (SEND_BUFFER_BYTES), up to `queue_size` events wait for the loop to send them;
        more are dropped and counted."""
        if not isinstance(event, Activation):
            raise TypeError(f"publish takes an Activation; got {type(event).__name__}")
        if self._state is not ActorState.RUNNING:
            with self._lock:
                self._refused += 1
            return False
        self._send(_Event(event), event=True)
        return True

    publish_threadsafe = publish

    def complete(self, layer: int, expert: int, tier: Tier, ok: bool) -> bool:
        if self._state is ActorState.FAILED or self._proc is None:
            return False
        self._send(_Complete(layer, expert, tier, ok))
        return True

    def forget(self, layer: int, expert: int, tier: Tier) -> None:
        if self._proc is not None and self._state is not ActorState.FAILED:
            self._send(_Forget(layer, expert, tier))

    def _send(self, msg, *, event: bool = False) -> None:
        """One frame, in order with every other: straight onto the socket when nothing waits
        before it and it fits; else into the backlog (feedback and Stop always, events while
        fewer than queue_size wait), which the loop writes out as the socket drains."""
        data = frame(_ENC.encode(msg))
        with self._lock:
            if event:
                self._accepted += 1
            if self._fd < 0:
                return  # closed: the child is gone, and so is anything it would have read
            if not self._backlog:
                try:
                    n = os.write(self._fd, data)
                except BlockingIOError:
                    n = 0
                except OSError:  # the child is gone; _on_readable records why
                    return
                if n == len(data):
                    return
                data = data[n:]
            elif event and self._backlog_events >= self.spec.queue_size:
                self._dropped += 1  # the child is behind: this event only cost prediction
                return
            self._backlog.append([data, event])
            self._backlog_events += event
            if not self._flushing:
                self._flushing = True
                try:
                    self._loop.call_soon_threadsafe(self._arm_flush)
                except RuntimeError:  # the loop is closed: nothing will read these any more
                    self._flushing = False

    def _arm_flush(self) -> None:
        with self._lock:
            if self._flushing and self._fd >= 0:
                self._loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        """The loop's writer callback: the backlog onto the socket, as far as it takes it."""
        with self._lock:
            while self._backlog:
                item = self._backlog[0]
                try:
                    n = os.write(self._fd, item[0])
                except BlockingIOError:
                    return
                except OSError:  # the child is gone; _on_readable records why
                    self._backlog.clear()
                    self._backlog_events = 0
                    break
                if n < len(item[0]):
                    item[0] = item[0][n:]
                    return
                self._backlog.popleft()
                self._backlog_events -= item[1]
            self._loop.remove_writer(self._fd)
            self._flushing = False

    # ---- output (loop thread) -----------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            payloads, eof = read_frames(self._fd, self._reader) if self._fd >= 0 else ([], False)
            for payload in payloads:
                msg = _TO_PARENT.decode(payload)
                if isinstance(msg, _Planned):
                    self._child_stats = msg.stats
                    st = msg.stamped
                    self._latest_seq[st.cause.layer] = st.seq
                    if self._state is not ActorState.FAILED:
                        self._on_plan(st)
                elif isinstance(msg, _Stats):
                    self._child_stats = msg.stats
                elif isinstance(msg, _Ready):
                    if not self._ready.done():
                        self._ready.set_result(None)
                elif isinstance(msg, _Failed):
                    self._child_stats = msg.stats or self._child_stats
                    self._fail(msg.text)
                else:
                    self._child_stats = msg.stats
                    self._resolve_stopped()
            if eof:
                raise EOFError
        except (EOFError, OSError):
            self._loop.remove_reader(self._fd)
            if self._state is not ActorState.STOPPED and not (self._stopped and self._stopped.done()):
                if self._proc is not None:
                    self._proc.join(0.5)  # its socket closes a moment before it can be reaped
                code = self._proc.exitcode if self._proc is not None else None
                if self._state is not ActorState.FAILED:
                    self._fail(f"policy process exited unexpectedly (exit code {code})")
            self._resolve_stopped()
        except Exception as exc:  # a bug in on_plan (the scheduler): record it like the actor does
            self._fail("on_plan: " + "".join(traceback.format_exception(exc)))

    def _resolve_stopped(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _fail(self, text: str) -> None:
        first = text.strip().splitlines()[-1] if text.strip() else "unknown failure"
        self._error = PolicyActorError(f"policy process stopped: {first}\n{text}")
        self._state = ActorState.FAILED

    def is_stale(self, stamped: StampedPlan) -> bool:
        return self._latest_seq.get(stamped.cause.layer, 0) > stamped.seq

    def stats(self) -> ActorStats:
        c = self._child_stats
        with self._lock:
            received, dropped, refused = self._accepted, c.dropped + self._dropped, self._refused
        pending = max(0, received - c.processed - c.coalesced - dropped)
        last = None
        if self._error is not None:
            last = str(self._error).splitlines()[0]
        return msgspec.structs.replace(c, state=self._state.value, received=received, dropped=dropped,
                                       refused=refused + c.refused, pending=pending,
                                       capacity=self.spec.queue_size, last_error=last or c.last_error)


__all__ = ["PolicyProcess", "PolicySpec", "build_policy", "policy_main"]
