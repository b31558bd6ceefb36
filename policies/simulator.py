"""Trace simulator: replays a routing trace through a cache policy, modelling time.

The model (one decode loop, batch 1):
- each layer visit computes for `compute_seconds_per_layer` once its experts are in VRAM;
- two links, NVMe->RAM (`disk_bytes_per_s`) and RAM->VRAM (`h2d_bytes_per_s`), each a
  single non-preemptive server that starts its queued transfer of smallest priority
  (demand loads have priority 0, so they overtake queued prefetches but never interrupt
  the transfer on the wire); a promotion waits for its staging to finish first;
- a prefetch counts as a VRAM hit only if it has arrived when its layer runs; the time spent
  waiting for a layer's experts is stall;
- the policy sees each transfer's completion through `complete(...)` as the clock passes
  it; an eviction cancels that expert's queued or in-flight transfer into that tier (an
  in-flight one still occupies its link until it ends).

`loads_vram` / `loads_ram` count transfers that started (prefetches included), so they
compare with Belady's loads; hit rates count layer-expert accesses.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable

import msgspec
import numpy as np

from .cache.base import RESIDENT, CachePolicy
from .events import Activation, Tier
from .traces import Trace, decode_steps

_QUEUED, _WIRE, _HELD = 1, 2, 3  # a transfer's state in the simulator


class SimResult(msgspec.Struct, frozen=True):
    """One policy x predictor run; rates are per layer-expert access."""

    policy: str
    predictor: str
    tokens: int
    accesses: int
    vram_hit_rate: float
    ram_hit_rate: float  # of the VRAM misses, the share whose RAM copy was resident
    loads_vram: int
    loads_ram: int
    bytes_h2d: int
    bytes_nvme: int
    stall_seconds_per_token: float
    tokens_per_second: float


class _Link:
    """One transfer link: a priority queue and the transfer on the wire."""

    __slots__ = ("tier", "bw", "queue", "wire", "free_at", "loads", "bytes")

    def __init__(self, tier: Tier, bytes_per_s: float):
        self.tier, self.bw = tier, bytes_per_s
        self.queue: list[tuple[float, int, int, int, int]] = []  # (priority, seq, l, e, gen)
        self.wire: tuple[float, int, int, int] | None = None  # (finish, l, e, gen)
        self.free_at = 0.0
        self.loads = self.bytes = 0


class Simulator:
    """Drives one policy over layer visits; see the module docstring for the time model."""

    def __init__(self, policy: CachePolicy, *, compute_seconds_per_layer: float,
                 h2d_bytes_per_s: float, disk_bytes_per_s: float):
        if compute_seconds_per_layer < 0 or h2d_bytes_per_s <= 0 or disk_bytes_per_s <= 0:
            raise ValueError("simulator: compute time must be >= 0 and bandwidths > 0; got "
                             f"{compute_seconds_per_layer}, {h2d_bytes_per_s}, {disk_bytes_per_s}")
        self.policy = policy
        self.compute = compute_seconds_per_layer
        shape = policy.sizes.shape
        self.links = {Tier.VRAM: _Link(Tier.VRAM, h2d_bytes_per_s), Tier.RAM: _Link(Tier.RAM, disk_bytes_per_s)}
        self.gen = {t: np.zeros(shape, dtype=np.int64) for t in self.links}
        self.job = {t: np.zeros(shape, dtype=np.int8) for t in self.links}
        self.held: dict[tuple[int, int], float] = {}  # promotions waiting for their staging
        self.now = 0.0
        self._seq = 0
        self.accesses = self.vram_hits = self.ram_hits = 0
        self.stall = 0.0

    # ---- links ----------------------------------------------------------------------------
    def _enqueue(self, tier: Tier, l: int, e: int, priority: float) -> None:
        self._seq += 1
        self.job[tier][l, e] = _QUEUED
        heapq.heappush(self.links[tier].queue, (priority, self._seq, l, e, int(self.gen[tier][l, e])))

    def _start(self, link: _Link, at: float) -> None:
        """Put the most urgent live queued transfer on the idle `link` at time `at`."""
        job = self.job[link.tier]
        while link.queue:
            _, _, l, e, g = heapq.heappop(link.queue)
            if g != self.gen[link.tier][l, e] or job[l, e] != _QUEUED:
                continue  # cancelled, or a duplicate entry left by a priority upgrade
            size = int(self.policy.sizes[l, e])
            start = max(at, link.free_at)
            link.wire = (start + size / link.bw, l, e, g)
            link.free_at = link.wire[0]
            link.loads += 1
            link.bytes += size
            job[l, e] = _WIRE
            return

    def _finish_next(self, until: float) -> float | None:
        """Complete the earliest transfer ending at or before `until`; its end time, or None."""
        best = None
        for link in self.links.values():
            if link.wire is not None and link.wire[0] <= until and (best is None or link.wire[0] < best.wire[0]):
                best = link
        if best is None:
            return None
        finish, l, e, g = best.wire
        best.wire = None
        tier = best.tier
        if g == self.gen[tier][l, e]:
            self.job[tier][l, e] = 0
            self.policy.complete(l, e, tier, True)
            if tier == Tier.RAM and (l, e) in self.held:
                self._enqueue(Tier.VRAM, l, e, self.held.pop((l, e)))
                if self.links[Tier.VRAM].wire is None:
                    self._start(self.links[Tier.VRAM], finish)
        self._start(best, finish)
        return finish

    def advance(self, t: float) -> None:
        while self._finish_next(t) is not None:
            pass
        self.now = max(self.now, t)

    def _apply(self, plan) -> None:
        for mv in plan.evictions:  # cancels that tier's transfer, queued or on the wire
            key = (mv.layer, mv.expert)
            self.gen[mv.tier][key] += 1
            self.job[mv.tier][key] = 0
            if mv.tier == Tier.VRAM:
                self.held.pop(key, None)
        ram_state = self.policy.state[Tier.RAM]
        for mv in plan.stagings:
            self._enqueue(Tier.RAM, mv.layer, mv.expert, mv.priority)
        for mv in plan.promotions:
            key = (mv.layer, mv.expert)
            state = self.job[Tier.VRAM][key]
            if state == _WIRE:
                continue
            if state == _HELD or (state == 0 and ram_state[key] != RESIDENT):
                self.job[Tier.VRAM][key] = _HELD
                self.held[key] = min(mv.priority, self.held.get(key, np.inf))
                if self.job[Tier.RAM][key] == _QUEUED:  # the staging inherits the urgency
                    self._enqueue(Tier.RAM, mv.layer, mv.expert, mv.priority)
            else:  # new, or an upgrade of a queued one (the stale entry is skipped later)
                self._enqueue(Tier.VRAM, mv.layer, mv.expert, mv.priority)
        for link in self.links.values():
            if link.wire is None:
                self._start(link, self.now)

    # ---- one layer visit ------------------------------------------------------------------
    def visit(self, layer: int, experts: tuple[int, ...], weights=None, rows: int = 1) -> None:
        """Layer `layer` runs now and needs `experts` (distinct ids, at most what VRAM holds),
        for a forward pass of `rows` token rows (a prefill's length; 1 when decoding)."""
        self.advance(self.now)
        vram = self.policy.state[Tier.VRAM]
        ram = self.policy.state[Tier.RAM]
        for e in experts:
            self.accesses += 1
            if vram[layer, e] == RESIDENT:
                self.vram_hits += 1
            elif ram[layer, e] == RESIDENT:
                self.ram_hits += 1
        plan = self.policy.on_activation(Activation(layer=layer, experts=experts, weights=weights,
                                                     time=self.now, rows=rows))
        self._apply(plan)
        ready = self.now
        while any(vram[layer, e] != RESIDENT for e in experts):
            finish = self._finish_next(np.inf)
            if finish is None:
                raise AssertionError(f"simulator: layer {layer} waits for experts no transfer brings: {experts}")
            ready = max(ready, finish)
        self.stall += ready - self.now
        self.now = ready + self.compute

    def result(self, policy: str, predictor: str, tokens: int) -> SimResult:
        misses = self.accesses - self.vram_hits
        v, r = self.links[Tier.VRAM], self.links[Tier.RAM]
        return SimResult(
            policy=policy, predictor=predictor, tokens=tokens, accesses=self.accesses,
            vram_hit_rate=self.vram_hits / max(1, self.accesses),
            ram_hit_rate=self.ram_hits / max(1, misses),
            loads_vram=v.loads, loads_ram=r.loads, bytes_h2d=v.bytes, bytes_nvme=r.bytes,
            stall_seconds_per_token=self.stall / max(1, tokens),
            tokens_per_second=tokens / self.now if self.now > 0 else float("inf"))


def simulate(trace: Trace, policy: CachePolicy, *, policy_name: str, predictor_name: str = "-",
             include_prefill: bool = False, compute_seconds_per_layer: float = 5e-4,
             h2d_bytes_per_s: float = 50e9, disk_bytes_per_s: float = 1.6e9,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Replay `trace` (decode rows; prefill passes too with `include_prefill`) through `policy`.

    A prefill pass needs the union of its rows' experts per layer; it is fed to the policy in
    chunks of top_k (one layer processes its experts group by group), so VRAM never has to
    hold more than one layer's top-k working set at once. `progress(n)` is called with the
    number of forward passes done since the last call.
    """
    sim = Simulator(policy, compute_seconds_per_layer=compute_seconds_per_layer,
                    h2d_bytes_per_s=h2d_bytes_per_s, disk_bytes_per_s=disk_bytes_per_s)
    tokens = 0
    pending = 0
    for step in decode_steps(trace, include_prefill=include_prefill):
        rows = step.rows[1] - step.rows[0]
        tokens += rows
        for layer, ids in layer_visits(step, trace.top_k):
            sim.visit(layer, ids, rows=rows)
        pending += 1
        if progress is not None and pending >= 256:
            progress(pending)
            pending = 0
    if progress is not None and pending:
        progress(pending)
    return sim.result(policy_name, predictor_name, tokens)


def count_passes(trace: Trace, include_prefill: bool = False) -> int:
    """Number of forward passes `decode_steps` yields (for progress bars)."""
    n = int((trace.phase == 1).sum())
    if include_prefill and trace.tokens:
        pre = trace.phase == 0
        starts = pre & np.concatenate(([True], (np.diff(trace.request) != 0) | (np.diff(trace.phase) != 0)))
        n += int(starts.sum())
    return n


def access_sequence(trace: Trace, include_prefill: bool = False) -> np.ndarray:
    """int64 keys layer * E + expert in the order `simulate` feeds them (for Belady)."""
    E = trace.num_experts
    if not include_prefill:
        ex = trace.experts[trace.phase == 1].astype(np.int64)
        keys = np.arange(trace.num_layers)[None, :, None] * E + ex
        return keys.reshape(-1)[ex.reshape(-1) >= 0]
    out = []
    for step in decode_steps(trace, include_prefill=True):
        ex = step.experts.astype(np.int64)
        keys = np.arange(trace.num_layers)[:, None] * E + ex
        out.append(keys.reshape(-1)[ex.reshape(-1) >= 0])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def layer_visits(step, top_k: int) -> list[tuple[int, tuple[int, ...]]]:
    """(layer, expert ids) per layer visit of one forward pass, in order: a prefill pass's
    union in chunks of top_k (one layer processes its experts group by group)."""
    out = []
    for layer, row in enumerate(step.experts.tolist()):
        ids = [e for e in row if e >= 0]
        out.extend((layer, tuple(ids[i:i + top_k])) for i in range(0, max(1, len(ids)), top_k))
    return out


def visit_sequence(trace: Trace, include_prefill: bool = False) -> list[tuple[int, ...]]:
    """The layer visits `simulate` makes, each as keys layer * E + expert, for schedules
    computed outside a policy."""
    E = trace.num_experts
    return [tuple(layer * E + e for e in ids) for step in decode_steps(trace, include_prefill=include_prefill)
            for layer, ids in layer_visits(step, trace.top_k)]


def truncate(trace: Trace, rows: int) -> Trace:
    """The first `rows` rows of `trace` (a view), for quick runs and tests."""
    import dataclasses

    cut = slice(0, min(rows, trace.tokens))
    return dataclasses.replace(trace, experts=trace.experts[cut], weights=trace.weights[cut],
                               token_ids=trace.token_ids[cut], phase=trace.phase[cut],
                               request=trace.request[cut])
