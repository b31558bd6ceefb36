"""The policy actor: ordering, never-blocking intake, coalescing, failures, shutdown, stats.

Timing figures come from a fake clock that the fake policy advances; the only real-time
measurements are the shutdown bounds, which are about real time by nature.
"""
from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest

from policies.actor import ActorState, ActorStats, PolicyActor, PolicyActorError, StampedPlan
from policies.bounded_queue import CoalescingQueue, merge_events
from policies.events import Activation, Move, Plan, Tier


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakePolicy:
    """Follows `CachePolicy.on_activation`: promotes every expert of the event.

    Each call costs `costs[i]` fake seconds (cycling), or raises on call `fail_at`.
    """

    def __init__(self, clock: FakeClock, costs=(0.001,), fail_at: int | None = None,
                 real_sleep: float = 0.0):
        self.clock, self.costs, self.fail_at, self.real_sleep = clock, costs, fail_at, real_sleep
        self.seen: list[Activation] = []

    def on_activation(self, event: Activation) -> Plan:
        self.seen.append(event)
        if len(self.seen) == self.fail_at:
            self.explode(event)
        if self.real_sleep:
            time.sleep(self.real_sleep)  # a policy that really hogs the loop
        self.clock.now += self.costs[(len(self.seen) - 1) % len(self.costs)]
        return Plan(promotions=tuple(Move(event.layer, e, Tier.VRAM, 0.0) for e in event.experts))

    def explode(self, event: Activation) -> None:
        raise ValueError(f"boom at layer {event.layer}")


def ev(layer: int, token: int, *experts: int, **kw) -> Activation:
    return Activation(layer=layer, experts=experts or (layer, layer + 1), token_id=token, **kw)


def consistent(actor: PolicyActor) -> None:
    s = actor.stats()
    assert s.received == s.processed + s.coalesced + s.dropped + s.pending, s
    assert s.pending <= s.capacity and s.peak_depth <= s.capacity, s


def actor_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "policy-actor" and not t.done()]


async def until(predicate, what: str, spins: int = 1000) -> None:
    """Let the loop run until `predicate()` holds (no sleeps: one loop pass per spin)."""
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"timed out waiting for {what}")


class Gate:
    """An async on_plan that records plans and holds the actor until opened."""

    def __init__(self) -> None:
        self.plans: list[StampedPlan] = []
        self.open = asyncio.Event()

    async def __call__(self, stamped: StampedPlan) -> None:
        self.plans.append(stamped)
        await self.open.wait()


# ---- ordering and stamps --------------------------------------------------------------------

async def test_events_in_plans_out_in_order_with_fake_clock_stamps():
    clock = FakeClock()
    costs = (0.002, 0.005, 0.001)
    policy = FakePolicy(clock, costs=costs)
    plans: list[StampedPlan] = []
    events = [ev(layer, token) for token in range(3) for layer in range(4)]
    async with PolicyActor(policy, on_plan=plans.append, queue_size=64, clock=clock) as actor:
        assert all(actor.publish(e) for e in events)
    assert policy.seen == events
    assert [p.cause for p in plans] == events
    assert [p.seq for p in plans] == list(range(1, len(events) + 1))
    # each plan is stamped right after its policy call, which advanced the fake clock
    spent = [costs[i % len(costs)] for i in range(len(events))]
    assert [p.time for p in plans] == pytest.approx([100.0 + sum(spent[: i + 1]) for i in range(len(events))])
    for p, e in zip(plans, events):
        assert [(m.layer, m.expert) for m in p.plan.promotions] == [(e.layer, x) for x in e.experts]
    s = actor.stats()
    assert (s.state, s.received, s.processed, s.pending, s.plans_emitted) == ("stopped", 12, 12, 0, 12)
    assert s.mean_process_s == pytest.approx(sum(spent) / len(spent))
    assert s.max_process_s == pytest.approx(max(costs))
    assert s.last_error is None
    consistent(actor)
    # plans and stats are plain messages: they cross a process boundary unchanged
    wire = msgspec.msgpack.encode(plans[-1])
    assert msgspec.msgpack.decode(wire, type=StampedPlan) == plans[-1]
    assert msgspec.json.decode(msgspec.json.encode(s), type=ActorStats) == s


async def test_empty_plans_are_not_published():
    class Quiet(FakePolicy):
        def on_activation(self, event):
            super().on_activation(event)
            return Plan() if event.layer % 2 else None

    plans: list[StampedPlan] = []
    policy = Quiet(FakeClock())
    async with PolicyActor(policy, on_plan=plans.append) as actor:
        for layer in range(4):
            actor.publish(ev(layer, 0))
    assert len(policy.seen) == 4 and plans == []
    assert actor.stats().processed == 4 and actor.stats().plans_emitted == 0


async def test_superseded_plan_is_stale():
    plans: list[StampedPlan] = []
    async with PolicyActor(FakePolicy(FakeClock()), on_plan=plans.append) as actor:
        for e in (ev(0, 0), ev(1, 0), ev(0, 1)):
            actor.publish(e)
    first0, first1, second0 = plans
    # layer 0 was planned again -> its first plan is stale; layer 1's plan is still current
    assert actor.is_stale(first0)
    assert not actor.is_stale(first1)
    assert not actor.is_stale(second0)


# ---- never blocking, coalescing, dropping ---------------------------------------------------

async def test_publish_never_blocks_when_full_and_counts_losses():
    gate = Gate()
    policy = FakePolicy(FakeClock())
    actor = PolicyActor(policy, on_plan=gate, queue_size=8)
    actor.start()
    actor.publish(ev(0, 0))
    await until(lambda: len(gate.plans) == 1, "the consumer to hold the first plan")
    events = [ev(i % 4, 1 + i // 4) for i in range(100)]  # 4 layers, 25 tokens
    for i, e in enumerate(events):
        t0 = time.perf_counter()
        assert actor.publish(e) is True
        assert time.perf_counter() - t0 < 0.05  # a plain call: no waiting on the paused actor
        assert actor.stats().pending <= 8
        consistent(actor)
    s = actor.stats()
    assert (s.received, s.processed, s.pending, s.peak_depth) == (101, 1, 8, 8)
    # consecutive events never share (layer, token): nothing merges, everything lost is a drop
    assert (s.coalesced, s.dropped) == (0, 92)
    gate.open.set()
    final = await actor.stop()
    assert final.processed == 9 and final.pending == 0
    # with every layer queued twice, the oldest stale event is always the oldest one:
    # the survivors are the newest 8 events, in order
    assert policy.seen == [ev(0, 0)] + events[-8:]
    consistent(actor)


async def test_coalescing_keeps_the_newest_information():
    gate = Gate()
    policy = FakePolicy(FakeClock())
    actor = PolicyActor(policy, on_plan=gate, queue_size=2)
    actor.start()
    actor.publish(ev(9, 0))
    await until(lambda: len(gate.plans) == 1, "the consumer to hold the first plan")
    actor.publish(ev(1, 7, 1, 2))
    actor.publish(Activation(layer=2, experts=(3, 4), weights=(0.6, 0.4), token_id=7,
                             hint={5: (0.1, 0.9)}, time=1.0))
    # queue full; same layer and token as the tail -> merged into it
    actor.publish(Activation(layer=2, experts=(5,), weights=(1.0,), token_id=7,
                             hint={5: (0.7, 0.3), 6: (0.5, 0.5)}, time=2.0))
    s = actor.stats()
    assert (s.coalesced, s.dropped, s.pending) == (1, 0, 2)
    gate.open.set()
    await actor.stop()
    merged = policy.seen[-1]
    # newest expert first; the older visit fills the slot the newer one left free
    assert merged.experts == (5, 3) and merged.weights == (1.0, 0.6)
    assert merged.hint == {5: (0.7, 0.3), 6: (0.5, 0.5)}  # newest hint wins per layer
    assert merged.time == 2.0 and merged.token_id == 7
    assert policy.seen[:-1] == [ev(9, 0), ev(1, 7, 1, 2)]
    consistent(actor)


def test_merge_never_widens_a_visit_and_drops_weights_it_cannot_pair():
    old = Activation(layer=3, experts=(1, 2), weights=(0.5, 0.5), token_id=4)
    new = Activation(layer=3, experts=(2, 6), token_id=4)
    merged = merge_events(old, Activation(layer=3, experts=(2, 6), token_id=4, rows=7))
    assert merged.rows == 7  # a prefill's visit stays one
    merged = merge_events(old, new)
    assert merged.experts == (2, 6)  # as wide as a router's top-k, newest choice kept
    assert merged.weights is None  # new carried no weights: old ones would not line up
    with pytest.raises(AssertionError):
        merge_events(old, Activation(layer=4, experts=(1,)))


async def test_full_queue_drops_the_oldest_stale_event_first():
    q = CoalescingQueue(3)
    for e in (ev(5, 0), ev(0, 1), ev(0, 2)):
        q.put(e)
    q.put(ev(1, 2))  # full: layer 0 was passed again by token 2 -> token 1's visit is stale
    assert [q.get_nowait() for _ in range(3)] == [ev(5, 0), ev(0, 2), ev(1, 2)]
    assert q.get_nowait() is None
    assert (q.received, q.dropped, q.coalesced) == (4, 1, 0)
    q2 = CoalescingQueue(2)
    for e in (ev(0, 0), ev(1, 0), ev(2, 0)):  # no stale event: the oldest goes
        q2.put(e)
    assert [q2.get_nowait(), q2.get_nowait()] == [ev(1, 0), ev(2, 0)]


# ---- failures and shutdown ------------------------------------------------------------------

async def test_failing_policy_surfaces_at_stop_with_traceback():
    policy = FakePolicy(FakeClock(), fail_at=3)
    actor = PolicyActor(policy, on_plan=lambda p: None)
    actor.start()
    for layer in range(5):
        assert actor.publish(ev(layer, 0))
    await until(lambda: actor.state is ActorState.FAILED, "the actor to record the failure")
    with pytest.raises(PolicyActorError) as checked:
        actor.check()
    assert actor.publish(ev(0, 1)) is False  # intake closed: refused, and counted
    with pytest.raises(PolicyActorError) as stopped:
        await actor.stop()
    text = str(stopped.value)
    assert "boom at layer 2" in text and "Traceback" in text and "in explode" in text
    assert isinstance(stopped.value.__cause__, ValueError)
    assert str(checked.value) == text
    s = actor.stats()
    assert s.state == "failed" and s.last_error == "policy.on_activation: ValueError: boom at layer 2"
    assert (s.processed, s.pending, s.refused) == (3, 2, 1)
    consistent(actor)
    with pytest.raises(PolicyActorError):  # stays failed: a second stop says the same
        await actor.stop()
    assert actor_tasks() == []


async def test_failing_consumer_is_recorded_too():
    def bad_consumer(stamped):
        raise KeyError("scheduler lost it")

    actor = PolicyActor(FakePolicy(FakeClock()), on_plan=bad_consumer)
    actor.start()
    actor.publish(ev(0, 0))
    with pytest.raises(PolicyActorError, match="on_plan: KeyError"):
        await actor.stop()


async def test_failing_complete_fails_the_actor():
    class BadBook(FakePolicy):
        def complete(self, layer, expert, tier, ok):
            if expert == 13:
                raise IndexError("no such expert 13")
            return True

    policy = BadBook(FakeClock())
    actor = PolicyActor(policy, on_plan=lambda p: None)
    actor.start()
    assert actor.complete(0, 1, Tier.VRAM, True) is True
    assert actor.complete(0, 13, Tier.RAM, False) is False
    assert actor.state is ActorState.FAILED and actor.publish(ev(0, 0)) is False
    assert actor.complete(0, 1, Tier.VRAM, True) is False  # a failed policy is not called
    with pytest.raises(PolicyActorError, match="policy.complete: IndexError: no such expert 13"):
        await actor.stop()
    assert actor_tasks() == []  # the task, idle in get() when complete failed, is gone
    assert policy.seen == []


async def test_stop_with_a_slow_policy_returns_within_the_bound():
    # 20 ms of real CPU hogging per event, 100 events queued: draining would take 2 s
    policy = FakePolicy(FakeClock(), real_sleep=0.02)
    actor = PolicyActor(policy, on_plan=lambda p: None, queue_size=128,
                        drain_timeout=0.1, cancel_timeout=0.1)
    actor.start()
    for i in range(100):
        actor.publish(ev(i % 8, i // 8))
    t0 = time.monotonic()
    s = await actor.stop()
    took = time.monotonic() - t0
    # bound = drain_timeout + cancel_timeout + one policy call (plus scheduling slack)
    assert took < 0.1 + 0.1 + 0.02 + 0.5, took  # draining all would take 2 s
    assert s.state == "stopped" and s.pending > 0 and s.processed < 100
    assert actor_tasks() == []
    consistent(actor)


async def test_stop_with_a_stuck_consumer_cancels_it():
    gate = Gate()  # never opened
    actor = PolicyActor(FakePolicy(FakeClock()), on_plan=gate, drain_timeout=0.05, cancel_timeout=0.5)
    actor.start()
    for layer in range(3):
        actor.publish(ev(layer, 0))
    t0 = time.monotonic()
    s = await actor.stop()
    assert time.monotonic() - t0 < 0.5
    assert (s.state, s.processed, s.pending) == ("stopped", 1, 2)
    assert actor_tasks() == []
    assert actor.publish(ev(0, 1)) is False


# ---- threads, lifecycle, bad input ----------------------------------------------------------

async def test_publish_threadsafe_from_another_thread():
    policy = FakePolicy(FakeClock())
    actor = PolicyActor(policy, on_plan=lambda p: None, queue_size=256)
    actor.start()
    events = [ev(i % 6, i // 6) for i in range(120)]
    results: list[bool] = []

    def decode_loop() -> None:  # a synchronous decode loop in its own thread
        assert threading.current_thread() is not threading.main_thread()
        results.extend(actor.publish_threadsafe(e) for e in events)

    await asyncio.to_thread(decode_loop)
    s = await actor.stop()
    assert results == [True] * 120
    assert policy.seen == events and s.received == s.processed == 120
    assert actor.publish_threadsafe(ev(0, 99)) is False
    assert actor.stats().refused == 1


async def test_lifecycle_errors_are_clear():
    actor = PolicyActor(FakePolicy(FakeClock()), on_plan=lambda p: None)
    assert actor.publish(ev(0, 0)) is False  # not started yet: refused, counted
    assert actor.stats().refused == 1
    actor.start()
    with pytest.raises(RuntimeError, match="already started"):
        actor.start()
    with pytest.raises(TypeError, match="Activation"):
        actor.publish((0, (1, 2)))
    await actor.stop()
    await actor.stop()  # idempotent
    assert actor.state is ActorState.STOPPED


def test_start_without_a_loop_and_bad_config_are_rejected():
    policy = FakePolicy(FakeClock())
    with pytest.raises(RuntimeError, match="running event loop"):
        PolicyActor(policy, on_plan=print).start()
    with pytest.raises(ValueError, match="counted in events"):
        PolicyActor(policy, on_plan=print, queue_size=0)
    with pytest.raises(TypeError, match="on_activation"):
        PolicyActor(object(), on_plan=print)
    with pytest.raises(ValueError, match="timeouts"):
        PolicyActor(policy, on_plan=print, drain_timeout=-1)


# ---- integration: the real LRU policy from the registry --------------------------------------

def _completing(report, plans: list[StampedPlan]):
    """An on_plan that acts as an instant executor: every transfer succeeds at once and is
    reported through `report(layer, expert, tier, ok)`."""

    def on_plan(stamped: StampedPlan) -> None:
        plans.append(stamped)
        for m in stamped.plan.stagings:  # stagings first: a promotion copies from RAM
            assert report(m.layer, m.expert, Tier.RAM, True)
        for m in stamped.plan.promotions:
            assert report(m.layer, m.expert, Tier.VRAM, True)

    return on_plan


def _trace_events(trace, steps: int) -> list[Activation]:
    from policies.traces import decode_steps

    events = []
    for n, step in enumerate(decode_steps(trace)):
        if n == steps:
            break
        for layer in range(trace.num_layers):
            events.append(Activation(
                layer=layer, experts=tuple(int(e) for e in step.layer_experts(layer)),
                weights=tuple(float(w) for w in step.layer_weights(layer)),
                token_id=int(step.token_ids[0]), time=float(n)))
    return events


def _lru_for(trace, predictor: str | None = None):
    from policies.cache.registry import make_policy
    from policies.predictors.registry import make_predictor

    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    pred = make_predictor(predictor, L, E, K) if predictor else None
    return make_policy("lru", predictor=pred, num_layers=L, num_experts=E, top_k=K,
                       vram_bytes=L * E // 10, ram_bytes=L * E // 4)


async def test_real_lru_through_the_actor_matches_direct_calls(real_traces):
    from policies.traces import load_trace

    trace = load_trace(real_traces / "qwen1.5-moe-a2.7b-chat.npz")
    events = _trace_events(trace, steps=20)  # 20 decode tokens x 24 layers
    reference, ref_plans = _lru_for(trace, "ewma"), []
    on_ref = _completing(reference.complete, ref_plans)
    for e in events:
        plan = reference.on_activation(e)
        if plan.promotions or plan.stagings or plan.evictions:
            on_ref(StampedPlan(plan=plan, cause=e, time=0.0, seq=0))

    policy, plans = _lru_for(trace, "ewma"), []
    actor = PolicyActor(policy, on_plan=_completing(lambda *a: actor.complete(*a), plans),
                        queue_size=len(events), clock=FakeClock())
    async with actor:
        for e in events:
            assert actor.publish(e)
    assert len(plans) == len(ref_plans) > 0
    assert [p.plan for p in plans] == [p.plan for p in ref_plans]
    assert [p.cause for p in plans] == [p.cause for p in ref_plans]
    for tier in (Tier.VRAM, Tier.RAM):
        assert (policy.state[tier] == reference.state[tier]).all()
    # the policy fed its predictor every visit, as a direct caller would
    assert (policy.predictor.predict_all() == reference.predictor.predict_all()).all()
    assert (policy.predictor.predict_all() != trace.top_k / trace.num_experts).any()
    s = actor.stats()
    assert (s.received, s.processed, s.dropped, s.coalesced) == (len(events), len(events), 0, 0)
    policy.check()


async def test_real_lru_survives_an_overflowing_queue(real_traces):
    from policies.traces import load_trace

    trace = load_trace(real_traces / "qwen1.5-moe-a2.7b-chat.npz")
    events = _trace_events(trace, steps=20)
    policy, plans, seen = _lru_for(trace), [], []
    real_call = policy.on_activation
    policy.on_activation = lambda e: (seen.append(e), real_call(e))[1]
    actor = PolicyActor(policy, on_plan=_completing(lambda *a: actor.complete(*a), plans), queue_size=8)
    actor.start()
    L = trace.num_layers
    for t in range(0, len(events), L):  # a whole token's layers arrive before the actor runs
        for e in events[t:t + L]:
            assert actor.publish(e)
        consistent(actor)
        await until(lambda: actor.stats().pending == 0, "the actor to catch up")
    s = await actor.stop()
    assert s.dropped == len(events) - s.processed - s.coalesced > 0
    assert s.peak_depth == 8 and s.last_error is None
    # no layer repeats within a token, so nothing is stale: the oldest visits make room and
    # the policy sees each token's last 8 layers, in order; its book stays sound
    assert seen == [e for e in events if e.layer >= L - 8]
    assert [p.cause for p in plans] == [e for e in seen if any(p.cause is e for p in plans)]
    policy.check()
