"""ExpertPipeline end to end, CPU mode (the VRAM tier on the CPU, a copy thread for streams).

Bit-exactness: a tiny model decoded over a synthetic trace through budgets that force
constant eviction hands out exactly the tensors of a direct load, for every store dtype.
Faults: readers killed or hung, a truncated store file, a flipped byte, a closed
pipeline, a second thread, close under heavy prefetch. Every test ends with no child
process and no new /dev/shm file (the `no_leaks` fixture).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.errors import CheckpointError
from adapters.store import StoreCheckpoint
from pipeline.api import ExpertPipeline, PipelineClosed, StagedExperts
from pipeline.assembly import plan_slots
from pipeline.config import PipelineConfig, load_config
from pipeline.readers import ReaderError
from policies.events import Activation
from policies.synthetic import SyntheticConfig, generate
from policies.traces import decode_steps
from tests.helpers_pipeline import (STORE_DTYPES, bit_pattern, budgets, build_tiny_store,  # noqa: F401
                                    fs_allows_o_direct, no_leaks)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipe")
    return {d: build_tiny_store(root, d) for d in STORE_DTYPES}


def trace_visits(store_dir: Path, tokens: int = 12, seed: int = 1):
    spec = StoreCheckpoint(store_dir).spec
    trace = generate(SyntheticConfig(layers=spec.num_layers, experts=spec.num_experts, top_k=spec.top_k,
                                     requests=2, prompt_tokens=3, decode_tokens=tokens // 2, seed=seed))
    for step in decode_steps(trace, include_prefill=False):
        for layer in range(spec.num_layers):
            yield layer, [int(e) for e in step.layer_experts(layer)], int(step.token_ids[0])


def assert_same(got: dict, want: dict, where) -> None:
    assert sorted(got) == sorted(want), where
    for role in want:
        assert got[role].dtype == want[role].dtype and got[role].shape == want[role].shape, (where, role)
        assert torch.equal(bit_pattern(got[role]), bit_pattern(want[role])), (where, role)


@pytest.mark.parametrize("dtype", STORE_DTYPES)
def test_bit_exact_under_constant_eviction(stores, dtype, no_leaks):
    st = StoreCheckpoint(stores[dtype])
    direct = {}
    with ExpertPipeline.open(stores[dtype], **budgets(stores[dtype], st.spec.top_k + 1, st.spec.top_k + 2),
                             device="cpu", readers=2) as pipe:
        checked = 0
        for layer, ids, token in trace_visits(stores[dtype]):
            got = pipe.fetch(layer, ids, token_id=token)
            for e, tensors in zip(ids, got):
                want = direct.setdefault((layer, e), st.load_expert(layer, e))
                assert_same(tensors, want, (layer, e))
                checked += 1
        s = pipe.stats()
    assert checked > 50 and s.vram_form == "dense" and s.vram_views is None
    # The budgets really forced traffic: most fetches missed VRAM and many went to disk.
    assert s.scheduler.evictions_vram > checked // 3 and s.scheduler.bytes_nvme > 0
    assert s.vram_slots == st.spec.top_k + 1 and s.readers.reads_ok > 0


@pytest.mark.parametrize("o_direct", [True, False])
def test_o_direct_setting_reaches_the_readers(stores, o_direct, no_leaks):
    """PipelineConfig.o_direct decides how the readers open the store: with O_DIRECT where the
    file system allows it (default), through the page cache with False; the bytes are the same."""
    store = stores["mxfp4"]
    st = StoreCheckpoint(store)
    if not fs_allows_o_direct(st.root / st.index.experts[0].file):
        pytest.skip("the store's file system refuses O_DIRECT: both settings would read through the page cache")
    with ExpertPipeline.open(store, **budgets(store, st.spec.top_k + 1, st.spec.top_k + 2), device="cpu",
                             readers=1, o_direct=o_direct) as pipe:
        for layer, ids, token in trace_visits(store, tokens=4):
            for e, tensors in zip(ids, pipe.fetch(layer, ids, token_id=token)):
                assert_same(tensors, st.load_expert(layer, e), (layer, e))
        r = pipe.stats().readers
    assert r.reads_ok > 0 and r.reads_o_direct == (r.reads_ok if o_direct else 0)


async def test_async_decode_loop_with_afetch_is_bit_exact(stores, no_leaks):
    store = stores["mxfp4"]
    st = StoreCheckpoint(store)
    async with await ExpertPipeline.aopen(store, **budgets(store, st.spec.top_k + 1, st.spec.top_k + 3),
                                          device="cpu", readers=2) as pipe:
        for layer, ids, token in list(trace_visits(store, tokens=6)):
            got = await pipe.afetch(layer, ids, token_id=token)
            for e, tensors in zip(ids, got):
                assert_same(tensors, st.load_expert(layer, e), (layer, e))
        assert pipe.stats().scheduler.fetches > 0
        # A pipeline on the caller's loop has no thread to run a blocking call on.
        with pytest.raises(RuntimeError, match="afetch"):
            pipe.fetch(0, [0])
        with pytest.raises(RuntimeError, match="aclose"):
            pipe.close()


def test_generous_budgets_hit_after_warm_up_and_prefetch_runs(stores, no_leaks):
    store = stores["bfloat16"]
    spec = StoreCheckpoint(store).spec
    everything = spec.num_layers * spec.num_experts
    with ExpertPipeline.open(store, **budgets(store, everything, everything), device="cpu", readers=2) as pipe:
        visits = list(trace_visits(store, tokens=10))
        for layer, ids, token in visits:
            pipe.fetch(layer, ids, token_id=token)
        s = pipe.stats().scheduler
    # With room for every expert, each is loaded at most once: misses <= distinct experts.
    distinct = {(l, e) for l, ids, _ in visits for e in ids}
    assert s.vram_misses <= len(distinct) and s.vram_hits >= len(visits) * spec.top_k - len(distinct)


def test_misses_from_ram_are_served_on_the_callers_thread_without_the_loop(stores, no_leaks):
    # Every expert in RAM, VRAM for one layer's top-k + 1: after a warm-up every fetch misses
    # VRAM but hits RAM. Those are served by try_serve on the caller's thread; the loop's
    # demand() (two thread hops per fetch) must not run, and the tensors stay exact.
    store = stores["bfloat16"]
    st = StoreCheckpoint(store)
    spec = st.spec
    everything = spec.num_layers * spec.num_experts
    with ExpertPipeline.open(store, **budgets(store, spec.top_k + 1, everything), device="cpu", readers=2,
                             policy="lru") as pipe:
        for layer in range(spec.num_layers):  # warm RAM with every expert
            for e in range(0, spec.num_experts, spec.top_k):
                pipe.fetch(layer, list(range(e, min(e + spec.top_k, spec.num_experts))))
        sched = pipe._p.scheduler
        loop_demands = []
        real_demand = sched.demand

        def counting_demand(*args, **kwargs):
            loop_demands.append(args[:2])
            return real_demand(*args, **kwargs)

        sched.demand = counting_demand
        before = pipe.stats().scheduler
        for layer, ids, token in trace_visits(store):
            for e, tensors in zip(ids, pipe.fetch(layer, ids, token_id=token)):
                assert_same(tensors, st.load_expert(layer, e), (layer, e))
        after = pipe.stats().scheduler
    assert after.vram_misses - before.vram_misses > 20  # the budget really forced copies
    assert after.ram_misses == before.ram_misses
    assert loop_demands == []
    # the warm-up's disk reads went through the loop, and the counter says so; nothing since
    assert before.fetches_via_loop > 0 and after.fetches_via_loop == before.fetches_via_loop
    assert after.fetches > before.fetches


def test_a_plan_evicting_a_just_read_expert_before_its_demand_copies_it_is_survived(stores, no_leaks):
    # The race: a demand read lands (its waiter is woken but not yet run) and, in between, a
    # plan evicts that expert from RAM. The demand must read it again, not copy whatever now
    # occupies the slot, and must not leave its VRAM slot half-taken (a later fetch would hang).
    from policies.actor import StampedPlan
    from policies.events import Move, Plan, Tier

    store = stores["bfloat16"]
    st = StoreCheckpoint(store)
    k = st.spec.top_k
    with ExpertPipeline.open(store, **budgets(store, k, k), device="cpu", readers=1, policy="lru") as pipe:
        sched = pipe._p.scheduler
        real_wake, evicted = sched._wake, []

        def wake_then_plan_eviction(slot, exc):
            real_wake(slot, exc)
            if slot in sched.ram.slots and slot.key == (1, 0) and exc is None and not evicted:
                evicted.append(slot.key)
                plan = Plan(evictions=(Move(layer=1, expert=0, tier=Tier.RAM, priority=0.0),))
                sched.on_plan(StampedPlan(plan=plan, cause=Activation(layer=1, experts=(0,)), time=0.0, seq=10**9))

        sched._wake = wake_then_plan_eviction
        got = pipe.fetch(1, [0, 1])
        for e, tensors in zip([0, 1], got):
            assert_same(tensors, st.load_expert(1, e), (1, e))
        for e, tensors in zip([2, 3], pipe.fetch(0, [2, 3])):  # nothing left half-taken
            assert_same(tensors, st.load_expert(0, e), (0, e))
        reads = pipe.stats().readers.reads_ok
    assert evicted == [(1, 0)] and reads >= 5  # (1, 0) was read twice


def test_a_demand_waits_for_copies_when_every_ram_slot_is_a_copy_source(stores, no_leaks):
    # RAM for one layer's top-k only, and the loop never told that copies landed (as when the
    # caller issues copies faster than the loop settles them): each RAM slot stays the source
    # of an unsettled copy, so a demand read must wait for one to land instead of failing
    # with "all slots busy".
    store = stores["bfloat16"]
    st = StoreCheckpoint(store)
    k = st.spec.top_k
    with ExpertPipeline.open(store, **budgets(store, k, k), device="cpu", readers=1, policy="lru") as pipe:
        pipe._p.scheduler._wake_loop = lambda: None
        for layer, ids, token in trace_visits(store, tokens=6):
            for e, tensors in zip(ids, pipe.fetch(layer, ids, token_id=token)):
                assert_same(tensors, st.load_expert(layer, e), (layer, e))
        s = pipe.stats().scheduler
    assert s.ram_misses > 10


@pytest.mark.parametrize("dtype", ["mxfp4"])
def test_the_policy_in_its_own_process_drives_the_same_exact_pipeline(stores, dtype, no_leaks):
    # policy_process=True: events and plans cross a pipe to a child process; the tensors stay
    # exact, its plans really prefetch, and close() leaves no process behind (no_leaks).
    st = StoreCheckpoint(stores[dtype])
    k = st.spec.top_k
    with ExpertPipeline.open(stores[dtype], **budgets(stores[dtype], 3 * k, 6 * k), device="cpu", readers=2,
                             policy_process=True) as pipe:
        assert pipe._p.actor._proc.is_alive()
        for layer, ids, token in trace_visits(stores[dtype], tokens=16):
            for e, tensors in zip(ids, pipe.fetch(layer, ids, token_id=token)):
                assert_same(tensors, st.load_expert(layer, e), (layer, e))
        deadline = time.monotonic() + 20
        while pipe.stats().actor.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        s = pipe.stats()
    assert s.actor.processed > 20 and s.actor.plans_emitted > 0 and s.actor.last_error is None
    assert s.scheduler.prefetch_reads + s.scheduler.prefetch_copies > 0


def test_a_policy_process_that_cannot_start_fails_open_and_leaks_nothing(stores, monkeypatch, no_leaks):
    from policies.actor import PolicyActorError
    from policies.process_actor import PolicyProcess

    # stop() re-raises the recorded failure: open() must still close the readers and the child.
    async def broken(self, timeout=30.0):  # as if the child reported a failure while starting
        self._fail("ValueError: planted")
        self.check()

    monkeypatch.setattr(PolicyProcess, "wait_ready", broken)
    store = stores["bfloat16"]
    with pytest.raises(PolicyActorError, match="planted.*open with policy_process=False") as got:
        ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1)  # the default: a process
    assert "\n" not in str(got.value)  # one line; the child's own report is the cause

    def no_spawn(self):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(PolicyProcess, "start", no_spawn)
    with pytest.raises(PolicyActorError, match="Resource temporarily unavailable.*policy_process=False"):
        ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1)

    async def slow(self, timeout=30.0):  # a child that never reports ready
        raise TimeoutError()

    monkeypatch.undo()
    monkeypatch.setattr(PolicyProcess, "wait_ready", slow)
    with pytest.raises(PolicyActorError, match="^TimeoutError; .*policy_process=False"):
        ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1)


KILLS = 8  # readers SIGKILLed mid-read in the test below (read_attempts there: 10)


def test_readers_sigkilled_mid_read_repeatedly_still_give_exact_tensors(stores, no_leaks):
    store = stores["bfloat16"]
    st = StoreCheckpoint(store)
    stop = threading.Event()
    with ExpertPipeline.open(store, **budgets(store, st.spec.top_k, st.spec.top_k), device="cpu", readers=2,
                             read_timeout_s=5.0, read_attempts=10, reader_hooks={"delay_s": 0.01}) as pipe:
        readers = pipe._p.readers
        # KILLS kills in all, each of a reader busy with a read: fewer than read_attempts, so
        # even if every one hits the same expert it is still served (an unbounded killer made
        # this test depend on how fast a replacement reader starts on a loaded machine).
        kills = []

        def killer():
            while len(kills) < KILLS and not stop.wait(0.03):
                for pid in readers.reader_pids(busy_only=True)[:1]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                    except ProcessLookupError:
                        pass

        t = threading.Thread(target=killer)
        t.start()
        deadline = time.monotonic() + 60
        try:
            while len(kills) < KILLS and time.monotonic() < deadline:  # fetch until every kill landed
                for layer, ids, token in list(trace_visits(store, tokens=8)):
                    for e, tensors in zip(ids, pipe.fetch(layer, ids, token_id=token)):
                        assert_same(tensors, st.load_expert(layer, e), (layer, e))
        finally:
            stop.set()
            t.join()
        assert len(kills) == KILLS and pipe.stats().readers.restarts >= KILLS


def test_a_hung_reader_is_replaced_and_the_fetch_completes(stores, tmp_path, no_leaks):
    store = stores["float16"]
    st = StoreCheckpoint(store)
    flag = tmp_path / "hang"
    flag.write_text("")
    with ExpertPipeline.open(store, **budgets(store, st.spec.top_k, st.spec.top_k), device="cpu", readers=1,
                             read_timeout_s=0.5, reader_hooks={"hang_once": str(flag), "hang_s": 60}) as pipe:
        t0 = time.monotonic()
        got = pipe.fetch(0, [0, 1])
        assert time.monotonic() - t0 < 20
        assert_same(got[1], st.load_expert(0, 1), (0, 1))
        assert pipe.stats().readers.timeouts >= 1


def _copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_truncated_store_file_is_a_clear_error_naming_it(stores, tmp_path, no_leaks):
    store = _copy_store(stores["bfloat16"], tmp_path / "s")
    st = StoreCheckpoint(store)
    with ExpertPipeline.open(store, **budgets(store, st.spec.top_k, st.spec.top_k), device="cpu", readers=1,
                             read_attempts=2) as pipe:
        entry = st.expert_range(1, 6)
        os.truncate(store / entry.file, entry.offset + 100)  # damaged after the pipeline opened it
        with pytest.raises((CheckpointError, ReaderError)) as info:
            pipe.fetch(1, [6, 0])
        assert entry.file in str(info.value) and "6" in str(info.value)
        pipe.fetch(0, [0, 1])  # other layers still work


def test_a_flipped_byte_is_a_checksum_error_naming_the_expert(stores, tmp_path, no_leaks):
    store = _copy_store(stores["mxfp4"], tmp_path / "s")
    st = StoreCheckpoint(store)
    with ExpertPipeline.open(store, **budgets(store, st.spec.top_k, st.spec.top_k), device="cpu", readers=1) as pipe:
        entry = st.expert_range(2, 3)
        with open(store / entry.file, "r+b") as f:
            f.seek(entry.offset + 17)
            b = f.read(1)
            f.seek(entry.offset + 17)
            f.write(bytes([b[0] ^ 0x40]))
        with pytest.raises(CheckpointError, match=r"(?i)checksum|crc") as info:
            pipe.fetch(2, [3])
        assert entry.file in str(info.value)


def test_closed_pipeline_refuses_and_close_is_idempotent(stores, no_leaks):
    store = stores["bfloat16"]
    pipe = ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1)
    pipe.fetch(0, [1, 2])
    pipe.close()
    pipe.close()
    with pytest.raises(PipelineClosed, match="closed"):
        pipe.fetch(0, [1, 2])


def test_a_second_thread_is_refused_with_a_clear_error(stores, no_leaks):
    store = stores["bfloat16"]
    with ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1) as pipe:
        pipe.fetch(0, [1, 2])
        errors = []

        def other():
            try:
                pipe.fetch(1, [0, 1])
            except RuntimeError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert errors and "second thread" in errors[0]
        pipe.fetch(1, [0, 1])  # the owner carries on


def test_close_during_heavy_prefetch_is_bounded_and_leaks_nothing(stores, no_leaks):
    store = stores["bfloat16"]
    spec = StoreCheckpoint(store).spec
    everything = spec.num_layers * spec.num_experts
    pipe = ExpertPipeline.open(store, **budgets(store, everything, everything), device="cpu", readers=2,
                               reader_hooks={"delay_s": 0.05}, close_timeout_s=3.0)
    for layer, ids, token in list(trace_visits(store, tokens=4))[:6]:
        pipe.fetch(layer, ids, token_id=token)
    t0 = time.monotonic()
    pipe.close()
    assert time.monotonic() - t0 < 8


def test_impossible_budgets_and_unknown_names_fail_before_allocating(stores, no_leaks):
    store = stores["mxfp4"]
    st = StoreCheckpoint(store)
    one = budgets(store, 1, 1)
    with pytest.raises(ValueError, match=r"vram budget \d+ bytes holds 1 experts .* at least \d+ bytes"):
        ExpertPipeline.open(store, vram=one["vram"], ram="1GiB", device="cpu")
    with pytest.raises(ValueError, match=r"ram budget .* top-2"):
        ExpertPipeline.open(store, vram="1GiB", ram=one["ram"], device="cpu")
    with pytest.raises(KeyError, match="unknown policy 'fifo'; valid: .*lru"):
        ExpertPipeline.open(store, vram="1GiB", ram="1GiB", policy="fifo", device="cpu")
    with pytest.raises(ValueError, match="does not parse"):
        ExpertPipeline.open(store, vram="lots", ram="1GiB", device="cpu")
    with pytest.raises(ValueError, match=r"vram '0.5' is less than one byte; .*fractions of all experts are"):
        ExpertPipeline.open(store, vram="0.5", ram="1GiB", device="cpu")  # prefetch-bench's form, not the API's
    with pytest.raises(CheckpointError, match="store.json"):
        ExpertPipeline.open(store.parent, vram="1GiB", ram="1GiB", device="cpu")
    n_vram, _, n_ram, _ = plan_slots(PipelineConfig(store=str(store), vram="1MiB", ram="1MiB"), st)
    assert n_vram >= st.spec.top_k and n_ram >= st.spec.top_k


def test_bad_fetch_arguments_are_clear(stores, no_leaks):
    store = stores["bfloat16"]
    with ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1) as pipe:
        with pytest.raises(IndexError, match="layer 9 out of range"):
            pipe.fetch(9, [0])
        with pytest.raises(IndexError, match=r"expert ids \[99\] out of range"):
            pipe.fetch(0, [99])
        with pytest.raises(ValueError, match="repeat"):
            pipe.fetch(0, [1, 1])
        for rows in (0, 2.5, True):
            with pytest.raises(ValueError, match=r"rows=.*an int >= 1 \(1 when decoding\)"):
                pipe.fetch(0, [1], rows=rows)
        with pytest.raises(ValueError, match=r"router_weights has 1 values for 2 expert ids; give one weight per id"):
            pipe.fetch(0, [1, 2], router_weights=[0.5])
        assert len(pipe.fetch(0, [1, 2], router_weights=[0.6, 0.4])) == 2  # and the right length still serves


def test_a_config_file_with_a_fractional_budget_names_the_fix(tmp_path):
    from pipeline.config import load_config

    path = tmp_path / "edge.toml"
    path.write_text('store = "s"\nvram = 0.1\nram = "1GiB"\n')
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(e.value) == (f'{path}: vram = 0.1 is a fraction; the pipeline\'s budgets are bytes or a size string, '
                            'e.g. vram = "6GiB" (fractions of all experts are prefetch-bench\'s --vram)')


def test_rows_reach_the_policy_and_it_chooses_the_vram_victims(stores, no_leaks):
    """A fetch's `rows` rides on its activation event. With VRAM headroom (two fetches' worth
    here; the pipeline's own rule gives this small VRAM none, see the next test) demand misses
    take slots the policy emptied and the scheduler's own LRU pick stays a fallback; with no
    headroom the policy's book always has room for a demand the scheduler served, and the
    fallback picks the victims of every demand miss."""
    store = stores["bfloat16"]
    k = StoreCheckpoint(store).spec.top_k
    seen = []
    counts = {}
    rslot = StoreCheckpoint(store).index.max_read_length
    for headroom in (2 * k, 0):
        # In-process (policy_process=False): the test wraps the policy object's own method.
        with ExpertPipeline.open(store, **budgets(store, 6 * k, 40), device="cpu", readers=1, policy="nextuse",
                                 policy_options={"vram_headroom": headroom * rslot}, policy_process=False) as pipe:
            policy = pipe._p.policy
            if headroom:
                original = policy.on_activation
                policy.on_activation = lambda ev: (seen.append(ev.rows), original(ev))[1]
            visits = list(trace_visits(store, tokens=12))
            for rnd in range(2):  # the first round reads from disk; the second is counted
                before = pipe.stats().scheduler
                for i, (layer, ids, token) in enumerate(visits):
                    pipe.fetch(layer, ids, token_id=token, rows=5 if i == 0 and rnd == 0 else 1)
                    time.sleep(0.002)  # the actor keeps up, as it does beside real math
            st = pipe.stats().scheduler
            counts[headroom] = (st.evictions_vram - before.evictions_vram,
                                st.evictions_vram_fallback - before.evictions_vram_fallback)
    assert seen[0] == 5 and set(seen[1:]) == {1}
    evictions, fallback = counts[0]
    assert evictions > 0 and fallback >= evictions // 3, counts  # (prefetches evict by plan)
    evictions, fallback = counts[2 * k]
    assert evictions > 0 and fallback <= evictions // 10, counts


def test_config_from_toml_and_json(tmp_path, stores):
    (tmp_path / "p.toml").write_text(f'store = "{stores["bfloat16"]}"\nvram = "6GiB"\nram = "24GiB"\npolicy = "lru"\n')
    cfg = load_config(tmp_path / "p.toml", readers=3)
    assert cfg.vram_bytes == 6 * 2**30 and cfg.policy == "lru" and cfg.readers == 3
    (tmp_path / "p.json").write_text(json.dumps({"store": "s", "vram": 1, "ram": 2, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        load_config(tmp_path / "p.json")
    with pytest.raises(ValueError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_open_from_a_config_file(tmp_path, stores, no_leaks):
    store = stores["bfloat16"]
    b = budgets(store, 4, 4)
    (tmp_path / "p.toml").write_text(f'store = "{store}"\nvram = {b["vram"]}\nram = {b["ram"]}\n'
                                     f'policy = "lfu"\ndevice = "cpu"\n')
    with ExpertPipeline.open_config(tmp_path / "p.toml", readers=1) as pipe:
        assert pipe.config.policy == "lfu" and pipe.config.readers == 1
        assert_same(pipe.fetch(0, [3])[0], StoreCheckpoint(store).load_expert(0, 3), (0, 3))


def test_hint_needs_routers_and_feeds_the_next_event(stores, no_leaks):
    store = stores["bfloat16"]
    spec = StoreCheckpoint(store).spec
    with ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1) as pipe:
        with pytest.raises(ValueError, match="routers"):
            pipe.hint(0, np.zeros(spec.hidden_size))
    routers = {l: np.random.default_rng(l).standard_normal((spec.num_experts, spec.hidden_size))
               for l in range(spec.num_layers)}
    with ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1, routers=routers,
                             policy="nextuse", predictor="lookahead") as pipe:
        pipe.hint(0, torch.ones(spec.hidden_size))
        assert set(pipe._hint) == set(range(1, spec.num_layers))
        pipe.fetch(0, [0, 1])
        assert pipe._hint is None  # consumed by the activation event
        pipe.hint_scores({1: np.arange(spec.num_experts)})
        assert pipe._hint[1][-1] == spec.num_experts - 1
        with pytest.raises(ValueError, match="scores"):
            pipe.hint_scores({1: [0.0]})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", STORE_DTYPES)
def test_staged_fetch_is_bit_exact_expert_by_expert(stores, dtype, device, no_leaks):
    """fetch(wait=False) over a trace; each expert read right after ready(i), in `order`. On
    CUDA only expert i's copy is waited for before it is read (.to("cpu") on the current
    stream), while the fetch's later copies may still be in flight. The trace starts with
    two fetches that share an expert, so at least one fetch mixes a hit with copies whatever
    the timing: VRAM starts empty, has no headroom to keep at this size, and the policy has
    nothing to prefetch yet, so nothing evicts the shared expert in between. (Mixes within
    the trace alone depend on when the policy's plans land: under CPU contention CI once
    saw none.)"""
    st = StoreCheckpoint(stores[dtype])
    checked = mixed = 0
    shared = [(0, [0, 1], 0), (0, [1, 2], 0)]
    with ExpertPipeline.open(stores[dtype], **budgets(stores[dtype], st.spec.top_k + 2, st.spec.top_k + 3),
                             device=device, readers=2) as pipe:
        for layer, ids, token in [*shared, *trace_visits(stores[dtype])]:
            staged = pipe.fetch(layer, ids, token_id=token, wait=False)
            assert isinstance(staged, StagedExperts) and len(staged) == len(ids)
            assert sorted(staged.order) == list(range(len(ids)))
            hits = [i for i in staged.order if staged._transfers[i] is None]
            assert list(staged.order[: len(hits)]) == hits  # experts already in VRAM come first
            mixed += 0 < len(hits) < len(ids)
            for i in staged.order:
                staged.ready(i)
                assert_same({k: v.to("cpu") for k, v in staged[i].items()}, st.load_expert(layer, ids[i]),
                            (layer, ids[i], device))
                checked += 1
        assert pipe.stats().scheduler.evictions_vram > checked // 4
    assert checked > 50 and mixed > 0  # hits and copies in one fetch: the order mattered


def test_staged_ready_raises_the_failed_copy_of_that_expert_only():
    from concurrent.futures import Future

    from pipeline.copy_engine import Transfer

    ok, failed = Future(), Future()
    ok.set_result(None)
    failed.set_exception(ValueError("copy of expert (0, 5) failed"))
    staged = StagedExperts([{}, {}, {}], [None, Transfer(demand=True, nbytes=1, slot=1, future=failed),
                                           Transfer(demand=True, nbytes=1, slot=2, future=ok)])
    assert staged.order == (0, 1, 2)
    staged.ready(0)
    staged.ready(2)
    with pytest.raises(ValueError, match=r"expert \(0, 5\)"):
        staged.ready(1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", STORE_DTYPES)
def test_bit_exact_on_the_gpu_under_constant_eviction(stores, dtype, no_leaks):
    # Tensors come back as views of VRAM slots, ready on the current stream: reading them on
    # that stream (here .cpu(), which syncs it) must see the landed, decoded bytes.
    st = StoreCheckpoint(stores[dtype])
    with ExpertPipeline.open(stores[dtype], **budgets(stores[dtype], st.spec.top_k + 1, st.spec.top_k + 2),
                             device="cuda", readers=2) as pipe:
        for layer, ids, token in trace_visits(stores[dtype]):
            for e, tensors in zip(ids, pipe.fetch(layer, ids, token_id=token)):
                assert all(t.is_cuda for t in tensors.values())
                assert_same({k: v.cpu() for k, v in tensors.items()}, st.load_expert(layer, e), (layer, e))
        assert pipe.stats().pinned  # the shared RAM arena was registered with CUDA


def test_a_demand_overtakes_queued_prefetch_reads(stores, no_leaks):
    # One slow reader and 16 staged prefetches: keys[0] is being read, keys[1..5] wait in the
    # reader pool (prefetch_reads=6 credits), the rest in the scheduler's queue. A demand for
    # either kind is served next, not after the prefetches queued before it.
    from policies.actor import StampedPlan
    from policies.events import Move, Plan, Tier

    store = stores["bfloat16"]
    spec = StoreCheckpoint(store).spec
    everything = spec.num_layers * spec.num_experts
    with ExpertPipeline.open(store, **budgets(store, everything, everything), device="cpu", readers=1,
                             prefetch_reads=6, policy="lru", reader_hooks={"delay_s": 0.1}) as pipe:
        keys = [(l, e) for l in range(spec.num_layers) for e in range(spec.num_experts)][:16]
        plan = Plan(stagings=tuple(Move(l, e, Tier.RAM, float(i + 1)) for i, (l, e) in enumerate(keys)))
        stamped = StampedPlan(plan=plan, cause=Activation(layer=keys[0][0], experts=()), time=0.0, seq=10**6)
        pipe._loop.call_soon_threadsafe(pipe._p.scheduler.on_plan, stamped)
        time.sleep(0.05)
        pipe.fetch(keys[5][0], [keys[5][1]])  # queued inside the reader pool
        assert pipe.stats().readers.reads_ok <= 3, "waited behind the prefetches queued in the pool"
        pipe.fetch(keys[12][0], [keys[12][1]])  # still in the scheduler's prefetch queue
        assert pipe.stats().readers.reads_ok <= 6, "waited behind the prefetches queued in the scheduler"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "mxfp4"])
def test_a_slot_is_not_overwritten_while_the_compute_stream_still_reads_it(stores, dtype, no_leaks):
    # The compute stream is held busy (a GPU sleep) before it reads expert (0, 1); the next fetch
    # needs that slot for another expert. Its copy must wait for the fence recorded by that
    # fetch, so the delayed read still sees (0, 1) and not the newcomer.
    st = StoreCheckpoint(stores[dtype])
    k = st.spec.top_k
    with ExpertPipeline.open(stores[dtype], **budgets(stores[dtype], k, 4 * k), device="cuda", readers=1) as pipe:
        first = pipe.fetch(0, list(range(k)))
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the current stream
        seen = {role: t.clone() for role, t in first[1].items()}  # enqueued behind the sleep
        pipe.fetch(1, list(range(k, 2 * k)))  # evicts both slots of layer 0
        torch.cuda.current_stream().synchronize()
        assert_same({r: t.cpu() for r, t in seen.items()}, st.load_expert(0, 1), (0, 1))


def test_the_gil_switch_interval_is_set_while_open_and_restored(stores, no_leaks):
    import sys

    store = stores["bfloat16"]
    before = sys.getswitchinterval()
    with ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1,
                             gil_switch_interval_s=0.0003):
        assert sys.getswitchinterval() == pytest.approx(0.0003)
    assert sys.getswitchinterval() == pytest.approx(before)
    with ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1, gil_switch_interval_s=None):
        assert sys.getswitchinterval() == pytest.approx(before)
    with pytest.raises(ValueError, match="gil_switch_interval_s"):
        ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", gil_switch_interval_s=5.0)


class _FakeCopy:
    """A Transfer as the copy waiter sees it: landed already or not, and whether it blocked on it."""

    def __init__(self, landed: bool):
        self.landed, self.blocked_on = landed, False

    def synchronize(self) -> None:
        self.blocked_on = True

    def done(self) -> bool:
        return self.landed


def test_copy_waiter_wakes_the_loop_once_per_batch_of_landed_copies():
    import queue
    import types

    from pipeline.scheduler import Scheduler

    copies = [_FakeCopy(True), _FakeCopy(True), _FakeCopy(True), _FakeCopy(False), _FakeCopy(True)]
    wakes = []
    waiter = types.SimpleNamespace(_landed=queue.SimpleQueue())
    waiter._wake_loop = lambda: wakes.append([c.blocked_on for c in copies])
    for c in copies:
        waiter._landed.put(c)
    waiter._landed.put(None)  # close()
    Scheduler._wait_copies(waiter)  # returns at the stop, after the last batch's wake-up
    # Blocked on the first copy, took the next two (landed) with it; blocked on the fourth
    # (still in flight when looked at), took the fifth with it: two wake-ups, not five.
    assert wakes == [[True, False, False, False, False], [True, False, False, True, False]]


@pytest.mark.gpu
def test_a_refill_of_a_slot_freed_fetches_ago_does_not_wait_for_compute_enqueued_since(stores, no_leaks):
    # Fetch 1 hands out layer 0's experts, fetch 2 layer 1's (other slots); the GPU is idle.
    # Then the compute stream is held busy and fetch 3 evicts fetch 1's slots. Their refills
    # follow fetch 2's fence (passed long ago), not the latest one (behind the sleep): they
    # land while the compute stream is still asleep, so copies overlap compute.
    # No VRAM headroom: with 2 * top_k slots the policy's own evictions would free fetch 2's
    # slots (all it may evict after fetch 3's visit), whose refills must wait for fetch 2's
    # uses; this test is about a slot whose last use was fetches ago.
    store = stores["mxfp4"]
    k = StoreCheckpoint(store).spec.top_k
    with ExpertPipeline.open(store, **budgets(store, 2 * k, 6 * k), device="cuda", readers=1,
                             policy="lru", policy_options={"vram_headroom": 0}) as pipe:
        pipe.fetch(0, list(range(k)))
        pipe.fetch(1, list(range(k)))
        torch.cuda.synchronize()
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time on the current stream
        pipe.fetch(2, list(range(k)))
        compute = torch.cuda.current_stream()
        landed_while_busy = False
        while not compute.query():
            if pipe.stats().copies.in_flight == 0:
                landed_while_busy = True
                break
            time.sleep(1e-3)
        assert landed_while_busy, "the refills waited for compute enqueued after the slots' last use"


def test_a_refill_waits_on_the_first_fence_after_the_slots_last_use():
    from pipeline.slots import FenceLog

    log = FenceLog(keep=256)
    last = 3 * log.keep - 1
    for seq in range(1, last + 1):
        log.note(f"fence{seq}", seq)
    log.note(None, 10**6)  # no fence: nothing recorded
    log.note("stale", last - 3)  # not after the latest: ignored
    assert log.latest_seq == last
    assert log.after(last - 5) == f"fence{last - 4}"
    assert log.after(last) == f"fence{last}"  # nothing later yet: the latest
    assert log.keep <= len(log) <= 2 * log.keep
    oldest = last - len(log) + 1
    assert oldest > 1
    assert log.after(0) == f"fence{oldest}"  # trimmed: the oldest kept, still after it


def test_policy_options_reach_the_policy_and_bad_ones_fail_before_allocating(stores, no_leaks):
    store = stores["bfloat16"]
    k = StoreCheckpoint(store).spec.top_k
    options = {"prefetch_min_prob": 0.0, "max_prefetch": 2, "lookahead": 2}
    with ExpertPipeline.open(store, **budgets(store, 4 * k, 8 * k), device="cpu", readers=2, policy="nextuse",
                             predictor="colayer", policy_options=options) as pipe:  # the policy process
        sent = pipe._p.actor.spec.policy_config  # what the child builds its policy from
        assert {n: sent[n] for n in options} == options
    with ExpertPipeline.open(store, **budgets(store, 4 * k, 8 * k), device="cpu", readers=2, policy="nextuse",
                             predictor="colayer", policy_options=options, policy_process=False) as pipe:
        config = pipe._p.policy.config
        assert (config.prefetch_min_prob, config.max_prefetch, config.lookahead) == (0.0, 2, 2)
        assert config.vram_bytes == 4 * k * StoreCheckpoint(store).index.max_read_length
        for layer, ids, token in trace_visits(store, tokens=4):
            pipe.fetch(layer, ids, token_id=token)
    with pytest.raises(ValueError, match="unknown field `prefetch_min_prb`"):
        ExpertPipeline.open(store, vram="1GiB", ram="1GiB", device="cpu", policy_options={"prefetch_min_prb": 0.2})
    with pytest.raises(ValueError, match="policy_options vram_bytes: set by the store and the vram/ram budgets"):
        ExpertPipeline.open(store, vram="1GiB", ram="1GiB", device="cpu", policy_options={"vram_bytes": 5})


@pytest.mark.parametrize("slots,top_k,experts,free", [
    (523, 4, 1440, 8), (144, 4, 1440, 8),  # qwen1.5 at 10%: stored and dense slots
    (16, 4, 64, 1),  # the built-in default: a sixteenth of a small VRAM
    (4, 4, 1440, 0),  # on-demand: one fetch's own slots only
    (1440, 4, 1440, 0), (2000, 4, 1440, 0)])  # every expert fits: nothing to evict for
def test_vram_headroom_is_two_fetches_at_most_a_sixteenth_and_none_when_all_fit(slots, top_k, experts, free):
    from pipeline.assembly import vram_headroom_slots

    assert vram_headroom_slots(slots, top_k, experts) == free


def test_stats_print_as_a_table_a_person_reads(stores, no_leaks):
    store = stores["bfloat16"]
    with ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1) as pipe:
        pipe.fetch(0, [1])
        pipe.fetch(0, [1])
        text = str(pipe.stats())
    lines = text.splitlines()
    assert lines[0].startswith("pipeline on cpu: VRAM 4 slots (dense,")
    assert "fetches 2: VRAM hit rate 0.500" in lines[1]
    for section in ("scheduler:", "readers:", "copies:", "actor:"):
        assert section in lines
    assert "reads_ok=1" in text and "state=running" in text
    assert max(len(line) for line in lines) < 140


def test_the_default_predictor_is_the_registrys_and_a_spec_string_is_accepted(stores, no_leaks):
    from policies.cache.registry import DEFAULT_PREDICTOR

    assert PipelineConfig(store="s", vram=1, ram=1).predictor == DEFAULT_PREDICTOR
    store = stores["bfloat16"]
    with ExpertPipeline.open(store, **budgets(store, 4, 4), device="cpu", readers=1, policy_process=False,
                             predictor="ewma:alpha=0.3", predictor_options={"alpha": 0.4}) as pipe:
        assert pipe._p.actor.policy.predictor.alpha == 0.4  # explicit options win over the spec's
