"""The policy actor: an asyncio task that turns `Activation` events into stamped plans.

    decode loop --publish()--> CoalescingQueue (bound in EVENTS) --> policy.on_activation
                                                                        |
                                      scheduler <--on_plan(StampedPlan)-+

- Intake: `publish(event)` never blocks and never awaits (a plain call from the loop's
  thread); `publish_threadsafe(event)` hops onto the loop with `call_soon_threadsafe`,
  for a synchronous decode loop running in another thread. When the queue is full it
  coalesces or drops older events (see `policies.bounded_queue`) and counts each one.
  A lost event only costs prediction quality: the pipeline serves demand misses itself.
- Work: events reach `policy.on_activation` one at a time, in order, on the loop's thread
  (the policy feeds its own predictor). The policy is plain synchronous code, so each
  call is atomic with respect to the loop: nothing else runs while it thinks.
- Output: a CALLBACK, `on_plan(stamped)`, called once per non-empty plan, in order. It may
  be sync or async; an async one is awaited before the next event is taken, so a slow
  consumer slows the actor and the queue absorbs the difference (coalescing, never
  blocking the producer). Each `StampedPlan` carries the injected clock's time and the
  event that caused it. A consumer that holds plans back asks `actor.is_stale(stamped)`
  before acting: a plan is stale once a newer plan for the same layer was emitted (the
  pipeline cancels stale prefetches; demand moves, priority 0.0, stay worth doing).
- Feedback: the scheduler reports finished transfers with `actor.complete(...)`, which
  calls `policy.complete` directly (two-phase book keeping, see policies/cache/base.py).
- Failure: an exception from the policy or from `on_plan` is a bug. The actor records it
  (with the formatted traceback), closes intake, stops taking events (state FAILED) and
  re-raises it as `PolicyActorError` from `check()` and from `stop()`.

Two clocks: the injected `clock` stamps plans and times policy calls (tests pass a fake);
shutdown timeouts are real time on the event loop, since they bound what the owner waits.
"""
from __future__ import annotations

import asyncio
import enum
import inspect
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from .bounded_queue import CoalescingQueue
from .events import Activation, Plan, Tier


class ActorState(str, enum.Enum):
    NEW = "new"  # built, not started: publish refuses
    RUNNING = "running"  # accepting and processing events
    STOPPING = "stopping"  # intake closed, draining or cancelling
    STOPPED = "stopped"  # task finished, no error
    FAILED = "failed"  # the policy or on_plan raised; check()/stop() re-raise it


class PlanPolicy(Protocol):
    """What the actor needs from a policy: `policies.cache.base.CachePolicy` fits.

    `complete(layer, expert, tier, ok) -> bool` is optional (see `PolicyActor.complete`).
    """

    def on_activation(self, event: Activation) -> Plan | None: ...


class StampedPlan(msgspec.Struct, frozen=True):
    """A plan as published: when (injected clock), why (the event), and its order."""

    plan: Plan
    cause: Activation  # the event handed to the policy (possibly a merge of two visits)
    time: float  # clock() when the plan was published
    seq: int  # 1, 2, ... in publication order; compared by `PolicyActor.is_stale`


class ActorStats(msgspec.Struct, frozen=True):
    """A snapshot. Always `received == processed + coalesced + dropped + pending`."""

    state: str
    received: int  # events accepted by publish (refused ones are not received)
    processed: int  # events handed to the policy (a call that raised counts)
    coalesced: int  # events merged into a queued event of the same layer and token
    dropped: int  # events discarded to make room (stale ones first)
    refused: int  # publishes while not running (before start, after stop or failure)
    pending: int  # events queued now, not yet processed (queue depth)
    peak_depth: int  # the largest queue depth seen; never above `capacity`
    capacity: int  # the queue bound, counted in events
    plans_emitted: int  # non-empty plans handed to on_plan
    mean_process_s: float  # per completed policy call, by the injected clock
    max_process_s: float
    last_error: str | None  # "where: Type: message" of the recorded error, if any


class PolicyActorError(RuntimeError):
    """The policy (or on_plan) raised inside the actor; the message holds its traceback."""


OnPlan = Callable[[StampedPlan], Awaitable[Any] | Any]


class PolicyActor:
    """Runs `policy` as an asyncio task fed by a bounded, coalescing event queue.

    `queue_size` counts events. `drain_timeout` and `cancel_timeout` are real seconds
    that bound `stop()` (see the shutdown protocol there). Use `start()` / `await stop()`
    or `async with PolicyActor(...) as actor:`.
    """

    def __init__(self, policy: PlanPolicy, *, on_plan: OnPlan, queue_size: int = 256,
                 clock: Callable[[], float] = time.monotonic, drain_timeout: float = 1.0,
                 cancel_timeout: float = 1.0):
        if not callable(getattr(policy, "on_activation", None)):
            raise TypeError(f"policy {type(policy).__name__} has no on_activation(event) -> Plan")
        if not callable(on_plan):
            raise TypeError(f"on_plan must be callable; got {type(on_plan).__name__}")
        if drain_timeout < 0 or cancel_timeout < 0:
            raise ValueError(f"timeouts must be >= 0 seconds; got drain_timeout={drain_timeout}, "
                             f"cancel_timeout={cancel_timeout}")
        self.policy = policy
        self._on_plan = on_plan
        self._clock = clock
        self._drain_timeout = drain_timeout
        self._cancel_timeout = cancel_timeout
        self._queue = CoalescingQueue(queue_size)
        self._state = ActorState.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set while the queue is empty and no event is in hand
        self._idle.set()
        self._busy = False
        self._processed = 0
        self._refused = 0
        self._refused_lock = threading.Lock()  # publish_threadsafe may refuse off-loop
        self._plans = 0
        self._timed = 0
        self._total_s = 0.0
        self._max_s = 0.0
        self._latest_seq: dict[int, int] = {}  # layer -> seq of its newest plan
        self._error: PolicyActorError | None = None
        self._last_error: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the task on the running loop (call from inside the loop)."""
        if self._state is not ActorState.NEW:
            raise RuntimeError(f"policy actor already started (state {self._state.value})")
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("PolicyActor.start() needs a running event loop; "
                               "call it from async code (or use `async with`)") from None
        self._state = ActorState.RUNNING
        self._task = self._loop.create_task(self._run(), name="policy-actor")

    async def stop(self, *, drain: bool = True) -> ActorStats:
        """Shut down within a bounded time; re-raise a recorded error; return final stats.

        SHUTDOWN PROTOCOL (the one place it is written down):
          1. Stop intake: publish/publish_threadsafe return False and count `refused`.
          2. Drain: let the task process what is queued, for at most `drain_timeout` real
             seconds (skipped when drain=False or the actor already failed). Events still
             queued afterwards stay counted as `pending`: they are abandoned, which costs
             prediction quality only.
          3. Cancel the task and wait at most `cancel_timeout` for it to finish. A policy
             call is synchronous and cannot be interrupted, so cancellation lands at the
             task's next await: stop() returns within drain_timeout + cancel_timeout + the
             policy call in progress.
          4. Report: state STOPPED (or FAILED) and final stats; raise PolicyActorError if
             the policy or on_plan failed.
        Calling stop() again returns (or raises) the same outcome.
        """
        if self._state in (ActorState.NEW, ActorState.RUNNING):
            self._state = ActorState.STOPPING  # 1
        task = self._task
        if task is not None and not task.done():  # also after a failure: no task left behind
            if drain and self._state is ActorState.STOPPING:  # 2
                idle = asyncio.ensure_future(self._idle.wait())
                try:
                    await asyncio.wait({idle, task}, timeout=self._drain_timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    idle.cancel()
                    await asyncio.wait({idle})  # reap it: no pending task left behind
            task.cancel()  # 3
            await asyncio.wait({task}, timeout=self._cancel_timeout)
        if self._state is ActorState.STOPPING:  # 4
            self._state = ActorState.STOPPED
        self.check()
        return self.stats()

    async def __aenter__(self) -> PolicyActor:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def check(self) -> None:
        """Raise PolicyActorError if the policy or on_plan has failed; otherwise nothing."""
        if self._error is not None:
            raise self._error

    @property
    def state(self) -> ActorState:
        return self._state

    # ---- intake -------------------------------------------------------------------------
    def publish(self, event: Activation) -> bool:
        """Queue `event` now; never blocks or awaits. Call from the loop's thread.

        True: accepted (it may later be merged or make room by dropping older events, each
        counted in stats). False: refused because the actor is not running (counted).
        """
        if not isinstance(event, Activation):
            raise TypeError(f"publish takes an Activation; got {type(event).__name__}")
        if self._state is not ActorState.RUNNING:
            with self._refused_lock:
                self._refused += 1
            return False
        self._queue.put(event)
        self._idle.clear()
        return True

    def publish_threadsafe(self, event: Activation) -> bool:
        """`publish` from any thread: hands the event to the loop and returns at once.

        True: handed to the loop, which publishes it soon (it is refused, and counted, if
        the actor stopped meanwhile). False: not running or the loop is closed (counted).
        """
        if not isinstance(event, Activation):
            raise TypeError(f"publish_threadsafe takes an Activation; got {type(event).__name__}")
        loop = self._loop
        if loop is not None and self._state is ActorState.RUNNING:
            try:
                loop.call_soon_threadsafe(self.publish, event)
                return True
            except RuntimeError:  # the loop was closed under us
                pass
        with self._refused_lock:
            self._refused += 1
        return False

    def complete(self, layer: int, expert: int, tier: Tier, ok: bool) -> bool:
        """Report a finished (ok) or failed transfer to the policy; call from the loop's thread.

        Runs `policy.complete` at once, not through the queue: a completion must never be
        coalesced away, and a policy call never interleaves with another on one thread.
        Accepted in every state but FAILED (plans published while stop() drains still
        complete). False when the actor has failed or the policy did not expect it; an
        exception is recorded like one from `on_activation` (check()/stop() raise it).
        """
        if self._state is ActorState.FAILED:
            return False
        complete = getattr(self.policy, "complete", None)
        if complete is None:
            return False
        try:
            return bool(complete(layer, expert, tier, ok))
        except Exception as exc:
            self._fail("policy.complete", exc)
            return False

    # ---- output -------------------------------------------------------------------------
    def is_stale(self, stamped: StampedPlan) -> bool:
        """True once a newer plan for the same layer as `stamped` has been published."""
        return self._latest_seq.get(stamped.cause.layer, 0) > stamped.seq

    def stats(self) -> ActorStats:
        q = self._queue
        return ActorStats(
            state=self._state.value, received=q.received, processed=self._processed,
            coalesced=q.coalesced, dropped=q.dropped, refused=self._refused, pending=len(q),
            peak_depth=q.peak, capacity=q.maxsize, plans_emitted=self._plans,
            mean_process_s=self._total_s / self._timed if self._timed else 0.0,
            max_process_s=self._max_s, last_error=self._last_error)

    # ---- the task -----------------------------------------------------------------------
    async def _run(self) -> None:
        while self._state is not ActorState.FAILED:  # complete() may fail between events
            event = await self._queue.get()
            self._busy = True
            self._processed += 1
            where = "policy.on_activation"
            try:
                start = self._clock()
                plan = self.policy.on_activation(event)
                took = self._clock() - start
                self._timed += 1
                self._total_s += took
                self._max_s = max(self._max_s, took)
                if plan is not None and (plan.promotions or plan.stagings or plan.evictions):
                    where = "on_plan"
                    result = self._on_plan(self._stamp(plan, event))
                    if inspect.isawaitable(result):
                        await result
            except Exception as exc:  # a bug in the policy or consumer: record, stop, re-raise later
                self._fail(where, exc)
                return
            finally:
                self._busy = False
                if not len(self._queue):
                    self._idle.set()
            # Yield between events, so the producer, the scheduler and stop() get to run
            # even while the queue stays non-empty.
            await asyncio.sleep(0)

    def _stamp(self, plan: Plan, event: Activation) -> StampedPlan:
        self._plans += 1
        self._latest_seq[event.layer] = self._plans
        return StampedPlan(plan=plan, cause=event, time=self._clock(), seq=self._plans)

    def _fail(self, where: str, exc: Exception) -> None:
        text = "".join(traceback.format_exception(exc))
        self._last_error = f"{where}: {type(exc).__name__}: {exc}"
        error = PolicyActorError(f"policy actor stopped: {self._last_error}\n{text}")
        error.__cause__ = exc
        self._error = error
        self._state = ActorState.FAILED
        self._idle.set()  # nothing more will be processed: let a draining stop() go on
