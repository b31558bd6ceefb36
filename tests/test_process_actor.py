"""The policy actor in its own process: same plans as in-process, failures surfaced, never blocks, no leaks."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

from policies.actor import PolicyActor, PolicyActorError
from policies.process_actor import PolicyProcess, PolicySpec, build_policy
from policies.events import Activation

L, E, K = 4, 8, 2


def spec(**over) -> PolicySpec:
    config = dict(num_layers=L, num_experts=E, top_k=K, vram_bytes=6, ram_bytes=16, expert_bytes=1, containment=True)
    config.update(over.pop("policy_config", {}))
    base = dict(policy="nextuse", predictor="ewma", predictor_options={}, policy_config=config,
                num_layers=L, num_experts=E, top_k=K)
    base.update(over)
    return PolicySpec(**base)


def events(n_tokens: int = 12):
    # The first token stands for a 4-row prefill pass (rows reach the policy, which uses them)
    return [Activation(layer=l, experts=((t + l) % E, (3 * t + 2 * l + 1) % E), token_id=t, time=float(t),
                       rows=4 if t == 0 else 1)
            for t in range(n_tokens) for l in range(L)]


async def _until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _no_child(proc) -> bool:
    return proc is None or not proc.is_alive()


async def test_the_process_emits_the_plans_the_in_process_actor_emits():
    got_here, got_there = [], []
    here = PolicyActor(build_policy(spec()), on_plan=got_here.append)
    there = PolicyProcess(spec(), on_plan=got_there.append)
    here.start()
    there.start()
    proc = there._proc
    try:
        for i, ev in enumerate(events()):  # one at a time: neither side coalesces
            before = len(got_here)
            here.publish(ev)
            there.publish(ev)
            await _until(lambda: here.stats().processed == i + 1 and there.stats().processed == i + 1)
            await _until(lambda: len(got_there) == len(got_here))
            for plans, actor in ((got_here, here), (got_there, there)):  # every move of a new plan lands
                for stamped in plans[before:]:
                    for mv in stamped.plan.promotions + stamped.plan.stagings:
                        actor.complete(mv.layer, mv.expert, mv.tier, True)
    finally:
        await here.stop()
        stats = await there.stop()
    assert len(got_here) > 5
    assert [p.plan for p in got_there] == [p.plan for p in got_here]
    assert [p.cause.rows for p in got_there] == [p.cause.rows for p in got_here] and got_there[0].cause.rows == 4
    assert [p.seq for p in got_there] == [p.seq for p in got_here]
    assert stats.state == "stopped" and stats.processed == len(events()) and _no_child(proc)
    layer = next(p.cause.layer for p in got_there if sum(q.cause.layer == p.cause.layer for q in got_there) > 1)
    of_layer = [p for p in got_there if p.cause.layer == layer]
    assert there.is_stale(of_layer[0]) and not there.is_stale(of_layer[-1])


async def test_a_bad_policy_config_fails_with_the_childs_message():
    pp = PolicyProcess(spec(policy_config={"vram_bytes": 0}), on_plan=lambda st: None)
    pp.start()
    proc = pp._proc
    await _until(lambda: pp.state.value == "failed")
    with pytest.raises(PolicyActorError, match="vram"):
        await pp.stop()
    assert _no_child(proc)


async def test_a_policy_that_raises_is_reported_with_its_traceback():
    pp = PolicyProcess(spec(), on_plan=lambda st: None)
    pp.start()
    pp.publish(Activation(layer=L + 3, experts=(0, 1)))  # a layer the policy does not have
    await _until(lambda: pp.state.value == "failed")
    with pytest.raises(PolicyActorError) as info:
        pp.check()
    assert "Traceback" in str(info.value) and "on_activation" in str(info.value)
    assert pp.publish(events()[0]) is False  # no intake once failed
    proc, t0 = pp._proc, time.monotonic()
    with pytest.raises(PolicyActorError):
        await pp.stop()
    assert time.monotonic() - t0 < 2.0 and _no_child(proc)  # a failed child is told to stop, not waited out


async def test_a_killed_child_is_noticed_and_stop_is_bounded():
    pp = PolicyProcess(spec(), on_plan=lambda st: None, stop_timeout=1.0)
    pp.start()
    proc = pp._proc
    for ev in events(3):
        pp.publish(ev)
    await _until(lambda: pp.stats().processed > 0)
    os.kill(proc.pid, signal.SIGKILL)
    await _until(lambda: pp.state.value == "failed")
    t0 = time.monotonic()
    with pytest.raises(PolicyActorError, match="exited unexpectedly"):
        await pp.stop()
    assert time.monotonic() - t0 < 5 and _no_child(proc)


@contextlib.asynccontextmanager
async def _stalled_child(queue_size: int):
    """A running policy process whose child is stopped (SIGSTOP) inside the block, resumed after."""
    pp = PolicyProcess(spec(), on_plan=lambda st: None, queue_size=queue_size)
    pp.start()
    await _until(lambda: pp.publish(events(1)[0]) and pp.stats().processed >= 1)
    pid = pp._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pp
    finally:
        os.kill(pid, signal.SIGCONT)


def _fill_backlog(pp, feedback: int) -> None:
    """400 events, then `feedback` forget frames, at a stalled child: more than its socket takes."""
    for ev in events(400):
        pp.publish(ev)
    for _ in range(feedback):
        pp.forget(0, 0, 2)  # feedback: never dropped, whatever the backlog holds
    assert pp._backlog


async def test_publish_never_blocks_on_a_stalled_child_and_counts_what_it_drops():
    async with _stalled_child(queue_size=32) as pp:
        proc = pp._proc
        flood = events(1000)
        t0 = time.monotonic()
        for ev in flood:
            assert pp.publish(ev)
        took = time.monotonic() - t0
        s = pp.stats()
    assert took < 2.0  # 4000 publishes against a stopped child: no waiting on it
    assert s.dropped > 1000 and s.received == s.processed + s.coalesced + s.dropped + s.pending
    stats = await pp.stop(drain=False)
    assert stats.state == "stopped" and _no_child(proc)


async def test_a_child_that_dies_with_frames_waiting_fails_the_actor_and_lets_them_go():
    # The backlog's writer finds the socket closed (EPIPE): what waited is dropped, nothing
    # retries against a dead child, and the death is the actor's failure.
    async with _stalled_child(queue_size=16) as pp:
        proc = pp._proc
        _fill_backlog(pp, feedback=10)
        os.kill(proc.pid, signal.SIGKILL)
    await _until(lambda: not pp._backlog and not pp._flushing and pp.state.value == "failed")
    with pytest.raises(PolicyActorError, match="exit code|died|exited"):
        await pp.stop()
    assert _no_child(proc)


async def test_a_consumer_that_raises_on_a_plan_fails_the_actor_with_where():
    def broken(stamped):
        raise RuntimeError("scheduler bug")

    pp = PolicyProcess(spec(), on_plan=broken)
    pp.start()
    for ev in events(2):
        pp.publish(ev)
    await _until(lambda: pp.state.value == "failed")
    with pytest.raises(PolicyActorError, match="on_plan"):
        await pp.stop()


async def test_what_waited_for_a_stalled_child_reaches_it_once_it_resumes():
    # The socket fills while the child is stopped; the backlog (events up to queue_size, every
    # feedback frame) is written out by the loop once the child reads again, in order.
    async with _stalled_child(queue_size=16) as pp:
        proc = pp._proc
        _fill_backlog(pp, feedback=50)
        assert pp._backlog_events <= 16
        assert sum(not is_event for _, is_event in pp._backlog) == 50  # every feedback frame kept
    await _until(lambda: not pp._backlog)
    s = pp.stats()
    await _until(lambda: pp.stats().processed == s.received - s.dropped - pp.stats().coalesced)
    stats = await pp.stop()
    assert stats.state == "stopped" and stats.dropped > 0 and _no_child(proc)
