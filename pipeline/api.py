"""`ExpertPipeline`: what a decode loop embeds, synchronous or async.

    with ExpertPipeline.open(store_dir, vram="6GiB", ram="24GiB") as pipe:
        weights = pipe.fetch(layer, expert_ids, router_weights=w, token_id=t)
        # one dict of tensors per expert, views of VRAM slots, ready on the current stream

    async with await ExpertPipeline.aopen(store_dir, vram=..., ram=...) as pipe:
        weights = await pipe.afetch(layer, expert_ids)

    staged = pipe.fetch(layer, expert_ids, wait=False)   # StagedExperts: overlap math and copies
    for i in staged.order:
        staged.ready(i)                                   # expert i's copy, on the current stream
        ... expert i's math on staged[i] ...

`open` runs the pipeline's event loop (uvloop) on a dedicated thread; `aopen` runs it on
the caller's loop. Tensors handed out by a fetch stay valid until a later fetch: the slot
is overwritten only by a copy that waits on a fence recorded by that later fetch on the
caller's stream (docs/architecture.md: no use-after-free). One pipeline serves one decode loop: a sync
`fetch` from a second thread is refused with a clear error.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import warnings
from pathlib import Path

import msgspec
import numpy as np
import torch

from policies.events import Activation

from .config import PipelineConfig, load_config
from .copy_engine import CopyStats
from .readers import ReaderStats
from .scheduler import SchedulerStats


class PipelineClosed(RuntimeError):
    """The pipeline was closed; open a new one."""


class PolicyStoppedWarning(RuntimeWarning):
    """The policy actor stopped; the pipeline serves on without it (see stats().actor)."""


class PipelineStats(msgspec.Struct, frozen=True):
    device: str
    vram_form: str  # what the VRAM slots hold: "dense" or "stored" (PipelineConfig.vram_form resolved)
    vram_slots: int
    # The most experts one fetch may ask for beyond the slots: the dense views a stored-form VRAM
    # decodes into (PipelineConfig.vram_views resolved); None where there are none to fit.
    vram_views: int | None
    vram_free: int
    ram_slots: int
    ram_free: int
    pinned: bool
    scheduler: SchedulerStats
    readers: ReaderStats
    copies: CopyStats
    actor: object  # policies.actor.ActorStats

    def __str__(self) -> str:
        from .stats_table import format_stats

        return format_stats(self)


class StagedExperts(list):
    """What `fetch(..., wait=False)` returns: the experts' tensors (one dict per id, in the order
    asked) before the caller's stream waits on any copy. `ready(i)` makes the current stream wait
    for expert i's copy (nothing for an expert already in VRAM; on the CPU it blocks until the
    copy is done) and re-raises that copy's error; call it before expert i's tensors are used.
    `order` lists the experts already in VRAM first, then the rest in the order asked: computing
    in that order lets the first experts' math run while later experts are still being copied,
    instead of every expert waiting for the last copy (what `wait=True` implies).
    With vram_form="stored", `ready(i)` also enqueues expert i's decode into its dense view
    (`prepare`); experts already in VRAM are decoded before the fetch returns."""

    def __init__(self, tensors: list[dict[str, torch.Tensor]], transfers: list, prepare=None):
        super().__init__(tensors)
        self._transfers = transfers
        self._prepare = prepare
        self.order = tuple([i for i, t in enumerate(transfers) if t is None]
                           + [i for i, t in enumerate(transfers) if t is not None])

    def ready(self, i: int) -> None:
        transfer = self._transfers[i]
        if transfer is not None:
            transfer.make_stream_wait()
        if self._prepare is not None:
            self._prepare(i)


class ExpertPipeline:
    def __init__(self, cfg: PipelineConfig, parts, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread | None, routers: dict[int, np.ndarray] | None):
        self.config = cfg
        self._p = parts  # pipeline.assembly.Parts
        self._loop, self._thread = loop, thread
        self._routers = routers or {}
        self._hint: dict[int, tuple[float, ...]] | None = None
        self._seq = 0
        self._owner: int | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._policy_failure_told = False
        self.spec = parts.store.spec
        self._old_switch = None
        if cfg.gil_switch_interval_s is not None:  # see PipelineConfig.gil_switch_interval_s
            self._old_switch = sys.getswitchinterval()
            sys.setswitchinterval(cfg.gil_switch_interval_s)

    # ---- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, store: str | Path, *, vram: int | str, ram: int | str, routers=None,
             reader_hooks: dict | None = None, **options) -> "ExpertPipeline":
        """Open on a dedicated uvloop thread (for a synchronous decode loop). `options` are
        PipelineConfig fields; `reader_hooks` are fault-injection hooks for tests
        (pipeline.reader_worker)."""
        cfg = PipelineConfig(store=str(store), vram=vram, ram=ram, **options)
        return cls.open_config(cfg, routers=routers, reader_hooks=reader_hooks)

    @classmethod
    def open_config(cls, cfg: PipelineConfig | str | Path, *, routers=None, reader_hooks: dict | None = None,
                    **overrides) -> "ExpertPipeline":
        """Open from a PipelineConfig or a .toml/.json file of one (keyword overrides win)."""
        import uvloop

        if not isinstance(cfg, PipelineConfig):
            cfg = load_config(cfg, **overrides)
        elif overrides:
            cfg = msgspec.structs.replace(cfg, **overrides)
        loop = uvloop.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="expert-pipeline", daemon=True)
        thread.start()
        try:
            parts = asyncio.run_coroutine_threadsafe(_assemble(cfg, reader_hooks), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=cfg.close_timeout_s)
            loop.close()
            raise
        return cls(cfg, parts, loop, thread, routers)

    @classmethod
    async def aopen(cls, store: str | Path, *, vram: int | str, ram: int | str, routers=None,
                    reader_hooks: dict | None = None, **options) -> "ExpertPipeline":
        """Open on the running event loop (for an async decode loop)."""
        cfg = PipelineConfig(store=str(store), vram=vram, ram=ram, **options)
        parts = await _assemble(cfg, reader_hooks)
        return cls(cfg, parts, asyncio.get_running_loop(), None, routers)

    # ---- the decode loop's calls ---------------------------------------------------------------
    def fetch(self, layer: int, expert_ids, *, router_weights=None, token_id: int | None = None,
              wait: bool = True, rows: int = 1):
        """The experts' dense tensors (one dict per id, in order), ready on the current stream.
        wait=False: a StagedExperts instead, whose expert i is ready only after `ready(i)`.
        rows: token rows in this forward pass (a prefill's prompt length; 1 when decoding):
        the policy then expects a prefill's later layers to need most of their experts."""
        if self._thread is None:
            raise RuntimeError("this pipeline was opened with aopen(): use `await pipe.afetch(...)`")
        with self._lock:
            seq, fence, ids, event = self._begin(layer, expert_ids, router_weights, token_id, rows)
            pairs = self._p.scheduler.try_serve(layer, ids, seq, fence)
            if pairs is not None:  # served on this thread (VRAM hits, copies from RAM): no hop to the loop
                if not self._p.actor.publish_threadsafe(event):
                    self._tell_policy_failure()
                return self._finish(pairs, wait)
            fut = asyncio.run_coroutine_threadsafe(self._p.scheduler.demand(layer, ids, seq, fence), self._loop)
            # Published after the demand was queued: the loop serves the demand before the policy
            # thinks about this event (the caller never waits for the policy).
            if not self._p.actor.publish_threadsafe(event):
                self._tell_policy_failure()
            return self._finish(fut.result(timeout=self._demand_timeout()), wait)

    async def afetch(self, layer: int, expert_ids, *, router_weights=None, token_id: int | None = None,
                     wait: bool = True, rows: int = 1):
        seq, fence, ids, event = self._begin(layer, expert_ids, router_weights, token_id, rows, thread_check=False)
        coro = self._p.scheduler.demand(layer, ids, seq, fence)
        if self._thread is not None:  # the pipeline's loop runs elsewhere: bridge to it
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
            if not self._p.actor.publish_threadsafe(event):
                self._tell_policy_failure()
            res = await asyncio.wrap_future(fut)
        else:
            task = asyncio.ensure_future(coro)
            if not self._p.actor.publish(event):
                self._tell_policy_failure()
            res = await asyncio.wait_for(task, self._demand_timeout())
        return self._finish(res, wait)

    def hint(self, layer: int, hidden_state) -> None:
        """Score later layers' experts from `hidden_state` with their routers (router lookahead);
        the scores ride on the next activation event."""
        if not self._routers:
            raise ValueError("hint() needs router weights: pass routers={layer: weight [E, hidden]} to open()")
        from policies.predictors.lookahead import router_scores

        h = np.asarray(hidden_state.float().cpu() if isinstance(hidden_state, torch.Tensor) else hidden_state,
                       dtype=np.float64).reshape(-1)
        self._hint = {l: tuple(float(x) for x in router_scores(h, w)) for l, w in self._routers.items() if l > layer}

    def hint_scores(self, scores: dict[int, "np.ndarray | list[float]"]) -> None:
        """Router-lookahead scores computed elsewhere, {later layer: per-expert scores}; they
        ride on the next activation event (what `hint` computes from a hidden state)."""
        E = self.spec.num_experts
        hint = {}
        for l, v in scores.items():
            v = [float(x) for x in v]
            if not 0 <= int(l) < self.spec.num_layers or len(v) != E:
                raise ValueError(f"hint for layer {l}: need a layer in 0..{self.spec.num_layers - 1} "
                                 f"and {E} scores, got {len(v)}")
            hint[int(l)] = tuple(v)
        self._hint = hint

    def warm(self, experts=None, *, width: int | None = None) -> int:
        """Fetch `experts` ((layer, expert) pairs, e.g. `policies.trace_stats.most_used(trace, n)`) once,
        before decoding and with no math, several of a layer per fetch, so the first tokens do not
        wait on the disk for them. Default: ram_slots experts, each layer's first ones. At most
        stats().ram_slots experts; `width` caps the experts per fetch (VRAM caps it too).
        Returns how many experts it fetched. Call it from the thread that will decode: its
        fetches make that thread the pipeline's one caller, as `fetch` does."""
        if self._thread is None:
            raise RuntimeError("this pipeline was opened with aopen(): use `await pipe.awarm(...)`")
        groups = self._warm_groups(experts, width)
        for layer, ids in groups:
            self.fetch(layer, ids)
        return sum(len(ids) for _, ids in groups)

    async def awarm(self, experts=None, *, width: int | None = None) -> int:
        """`warm` for a pipeline driven by `afetch`."""
        groups = self._warm_groups(experts, width)
        for layer, ids in groups:
            await self.afetch(layer, ids)
        return sum(len(ids) for _, ids in groups)

    def _warm_groups(self, experts, width: int | None) -> list[tuple[int, list[int]]]:
        from .warm import fill_width, first_of_each_layer, warm_groups

        L, E, K = self.spec.num_layers, self.spec.num_experts, self.spec.top_k
        if width is not None and width < 1:
            raise ValueError(f"warm: width must be >= 1, got {width}")
        st = self.stats()
        most = fill_width(K, E, L, st.vram_slots, st.vram_views)
        if experts is None:
            experts = first_of_each_layer(L, E, st.ram_slots)
        groups = warm_groups(experts, L, E, most if width is None else min(width, most))
        n = sum(len(ids) for _, ids in groups)
        if n > st.ram_slots:  # the first ones would be evicted by the last before decoding starts
            raise ValueError(f"warm: {n} experts given but RAM holds {st.ram_slots}; give the ones to keep, "
                             f"e.g. most_used(trace, pipe.stats().ram_slots)")
        return groups

    def stats(self) -> PipelineStats:
        p = self._p
        views = p.vram_arena.views
        return PipelineStats(device=str(p.device), vram_form=p.vram_arena.form, vram_slots=len(p.scheduler.vram),
                             vram_views=None if views is None else views.num_views,
                             vram_free=p.scheduler.vram.free_count(), ram_slots=len(p.scheduler.ram),
                             ram_free=p.scheduler.ram.free_count(), pinned=p.ram_arena.pinned,
                             scheduler=p.scheduler.stats(), readers=p.readers.stats(),
                             copies=p.engine.stats(), actor=p.actor.stats())

    # ---- closing -----------------------------------------------------------------------------
    def _restore_switch_interval(self) -> None:
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None

    def close(self) -> None:
        """Ordered shutdown (pipeline.assembly.shutdown), within about config.close_timeout_s."""
        if self._thread is None:  # checked first: a refused close must leave it open for aclose
            raise RuntimeError("this pipeline was opened with aopen(): use `await pipe.aclose()`")
        if self._closed:
            return
        self._closed = True
        self._restore_switch_interval()
        self._tell_policy_failure()
        from .assembly import shutdown

        try:
            asyncio.run_coroutine_threadsafe(shutdown(self._p, self.config.close_timeout_s),
                                             self._loop).result(timeout=self.config.close_timeout_s * 2)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=self.config.close_timeout_s)
            if not self._thread.is_alive():
                self._loop.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._restore_switch_interval()
        self._tell_policy_failure()
        from .assembly import shutdown

        await shutdown(self._p, self.config.close_timeout_s)

    def __enter__(self) -> "ExpertPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "ExpertPipeline":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ---- internals -----------------------------------------------------------------------------
    def _begin(self, layer, expert_ids, router_weights, token_id, rows=1, thread_check=True):
        if self._closed:
            raise PipelineClosed("the ExpertPipeline is closed; open a new one")
        if thread_check:
            me = threading.get_ident()
            if self._owner is None:
                self._owner = me
            elif self._owner != me:
                raise RuntimeError("ExpertPipeline.fetch from a second thread: one pipeline serves one decode "
                                   "loop (its tensors are valid until that loop's next fetch); open one per thread")
        s = self.spec
        ids = [int(e) for e in expert_ids]
        if not 0 <= int(layer) < s.num_layers:
            raise IndexError(f"layer {layer} out of range: the store has {s.num_layers} MoE layers")
        bad = [e for e in ids if not 0 <= e < s.num_experts]
        if bad:
            raise IndexError(f"expert ids {bad} out of range: the store has {s.num_experts} experts per layer")
        if len(set(ids)) != len(ids):
            raise ValueError(f"expert ids {ids} repeat an expert")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows={rows!r}: the token rows of this forward pass, an int >= 1 (1 when decoding)")
        if len(ids) > len(self._p.scheduler.vram):
            raise ValueError(f"{len(ids)} experts at once but the VRAM budget holds {len(self._p.scheduler.vram)}")
        views = self._p.vram_arena.views
        if views is not None and len(ids) > views.num_views:
            raise ValueError(f"{len(ids)} experts at once but vram_form='stored' decodes into {views.num_views} "
                             f"dense views; fetch at most {views.num_views} at a time or open with "
                             f"vram_views={len(ids)} (or vram_form='dense')")
        weights = None if router_weights is None else tuple(float(w) for w in
                                                           (router_weights.tolist() if hasattr(router_weights, "tolist")
                                                            else router_weights))
        if weights is not None and len(weights) != len(ids):
            raise ValueError(f"router_weights has {len(weights)} values for {len(ids)} expert ids; give one "
                             f"weight per id, in the same order (or none)")
        self._seq += 1
        fence = self._p.engine.fence()  # on the caller's current stream, before this fetch's uses
        event = Activation(layer=int(layer), experts=tuple(ids), weights=weights, token_id=token_id,
                           hint=self._hint, time=self._loop.time(), rows=rows)
        self._hint = None
        return self._seq, fence, ids, event

    def _finish(self, results, wait: bool = True) -> list[dict[str, torch.Tensor]]:
        transfers = [transfer for _, transfer in results]
        arena = self._p.vram_arena
        if arena.views is not None:
            return self._finish_decoding(arena.views, [slot.index for slot, _ in results], transfers, wait)
        # vram_views=0 with the stored form: the stored tensors, as they sit in the slots
        get = arena.stored_tensors if arena.form == "stored" else arena.tensors
        tensors = [get(slot.index) for slot, _ in results]
        if not wait:
            return StagedExperts(tensors, transfers)
        for transfer in transfers:
            if transfer is not None:
                transfer.make_stream_wait()  # the caller's stream waits on the copy's event
        return tensors

    @staticmethod
    def _finish_decoding(views, slots: list[int], transfers: list, wait: bool):
        """vram_form='stored': each expert is decoded from its slot into a dense view on the
        caller's stream, after the caller's stream waits for its copy. wait=True: expert i into
        view i, one batched decode. wait=False: the experts already in VRAM take the first views
        (one batched decode now), the others the next ones, each decoded at its ready(i)."""
        if wait:
            for transfer in transfers:
                if transfer is not None:
                    transfer.make_stream_wait()
            return views.decode_many(slots)
        hits = [i for i, t in enumerate(transfers) if t is None]
        misses = [i for i, t in enumerate(transfers) if t is not None]
        view_of = {i: p for p, i in enumerate(hits + misses)}
        views.decode_many([slots[i] for i in hits])
        pending = set(misses)

        def prepare(i: int) -> None:
            if i in pending:
                pending.discard(i)
                views.decode(slots[i], view_of[i])

        return StagedExperts([views.tensors(view_of[i]) for i in range(len(slots))], transfers, prepare)

    def _tell_policy_failure(self) -> None:
        """Once, when a refused event shows the policy stopped: the pipeline serves on, each demand
        miss evicting the scheduler's own LRU choice, without prefetch; say so and why."""
        actor = self._p.actor
        if self._policy_failure_told or actor.state.value != "failed":
            return
        self._policy_failure_told = True
        cause = actor.stats().last_error or "unknown cause"
        warnings.warn(f"{cause}; the pipeline goes on serving every fetch without the policy: no prefetch, "
                      f"each miss evicts the least recently used slot (stats().actor keeps the cause)",
                      PolicyStoppedWarning, stacklevel=3)

    def _demand_timeout(self) -> float:
        c = self.config
        return c.read_timeout_s * c.read_attempts + c.close_timeout_s


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


async def _assemble(cfg: PipelineConfig, reader_hooks: dict | None):
    from .assembly import assemble

    return await assemble(cfg, reader_hooks=reader_hooks)


__all__ = ["ExpertPipeline", "PipelineClosed", "PipelineStats", "PolicyStoppedWarning", "StagedExperts"]
