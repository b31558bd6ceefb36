"""The cache-policy interface: what the simulator and the policy actor call.

A policy decides where each expert `(layer, expert)` should be: VRAM (tier G), RAM (tier R)
or only on disk. It keeps its own *book* of every expert's state per tier (absent /
loading / resident), changes it by the plans it emits, and learns the outcome of each
transfer through `complete` (two-phase, like vLLM's kv_offload: a failed transfer rolls
back). It never touches files, tensors or CUDA.

Calls, in the order the driver (simulator or actor) makes them:

- `on_activation(event) -> Plan`: the ONE entry point per layer visit. It feeds the
  predictor (if any) and then calls `access(event.layer, event.experts, event.time)`.
- `access(layer, experts, now) -> Plan`: the layer needs `experts` now. The plan holds
  demand promotions (priority 0.0) for those not resident in VRAM (a promotion of an expert
  already *loading* means "upgrade to demand"), stagings NVMe->RAM for those not in RAM,
  the evictions that make room (never an expert of this access: they are pinned for the
  call), and speculative promotions/stagings for later layers whose priority is the
  expected time of use in seconds (smaller = sooner; always > 0).
- `complete(layer, expert, tier, ok)`: the executor finished (ok) or failed (not ok) a
  transfer into `tier`. A failure rolls the book back (a failed staging also rolls back a
  pending promotion of the same expert, which had nothing to copy from). A report for an
  expert that is not loading (e.g. evicted meanwhile, which cancels the transfer) is ignored.

Capacity is counted in bytes through one size table `expert_bytes[L, E]`; loading
experts count as used (their slot is reserved). After every call `used(tier) <=
capacity(tier)`. By default VRAM is contained in RAM (an expert in VRAM keeps its RAM copy).
Each policy differs only in its keep-value (`_keep_value`, the one eviction hook: the
lowest value among evictable experts is the victim) and optional `_speculate`.
"""
from __future__ import annotations

import abc
from typing import ClassVar

import msgspec
import numpy as np

from ..events import Activation, Move, Plan, Tier
from ..predictors.base import Predictor

ABSENT, LOADING, RESIDENT = 0, 1, 2
TIERS = (Tier.VRAM, Tier.RAM)


class DoesNotFit(ValueError):
    """The budgets cannot hold what this policy needs (one layer's working set, a per-layer
    share): the policy cannot run at this size, though the same call may be right at another."""


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Shape and budgets shared by every policy (bytes; seconds)."""

    num_layers: int
    num_experts: int
    top_k: int
    vram_bytes: int
    ram_bytes: int
    # One size for every expert, or a [num_layers][num_experts] table (sizes may differ).
    expert_bytes: int | list[list[int]] = 1
    containment: bool = True  # an expert in VRAM keeps its RAM copy
    seconds_per_layer: float = 1e-3  # compute time of one layer, to turn layer steps into time
    h2d_bytes_per_s: float = 50e9
    disk_bytes_per_s: float = 1.6e9
    seed: int = 0
    # VRAM bytes kept free after each access by evicting this policy's own lowest-value
    # experts. An executor that serves a demand miss before the policy hears of it (the
    # pipeline: the decode loop never waits for the actor) takes a free slot, so the victim
    # was this policy's choice, made one visit earlier, instead of the executor's own
    # fallback. 0 where the policy plans each demand itself (the simulator).
    vram_headroom: int = 0


class _Call:
    """Scratch state of one `access` call: the plan being built and the pinned experts."""

    __slots__ = ("layer", "now", "promotions", "stagings", "evictions", "pinned")

    def __init__(self, layer: int, now: float) -> None:
        self.layer, self.now = layer, now
        self.promotions: list[Move] = []
        self.stagings: list[Move] = []
        self.evictions: list[Move] = []
        self.pinned: set[tuple[int, int]] = set()

    def plan(self) -> Plan:
        return Plan(tuple(self.promotions), tuple(self.stagings), tuple(self.evictions))


class CachePolicy(abc.ABC):
    """Base of every cache policy; subclasses give `_keep_value` (and maybe `_speculate`)."""

    name: ClassVar[str] = "base"
    uses_predictor: ClassVar[bool] = False
    config_type: ClassVar[type[CacheConfig]] = CacheConfig

    def __init__(self, config: CacheConfig, predictor: Predictor | None = None):
        c = config
        if c.num_layers < 1 or c.num_experts < 1 or not (1 <= c.top_k <= c.num_experts):
            raise ValueError(f"{self.name}: need layers >= 1, experts >= 1, 1 <= top_k <= experts; "
                             f"got {c.num_layers}, {c.num_experts}, {c.top_k}")
        shape = (c.num_layers, c.num_experts)
        sizes = np.array(c.expert_bytes, dtype=np.int64)
        if sizes.ndim == 0:
            sizes = np.full(shape, int(sizes), dtype=np.int64)
        if sizes.shape != shape:
            raise ValueError(f"{self.name}: expert_bytes table has shape {sizes.shape}, expected {shape}")
        if sizes.min() < 1:
            raise ValueError(f"{self.name}: expert sizes must be >= 1 byte; smallest is {sizes.min()}")
        # The worst layer's top-k largest experts must fit at once: they are pinned together.
        top = np.sort(sizes, axis=1)[:, -c.top_k:].sum(axis=1)
        need = int(top.max())
        if c.vram_bytes < need:
            raise DoesNotFit(f"{self.name}: vram_bytes={c.vram_bytes} is smaller than one layer's "
                             f"top-{c.top_k} working set ({need} bytes; largest expert "
                             f"{int(sizes.max())} bytes); give VRAM at least {need} bytes")
        if c.ram_bytes < need:
            raise DoesNotFit(f"{self.name}: ram_bytes={c.ram_bytes} is smaller than one layer's "
                             f"top-{c.top_k} working set ({need} bytes); give RAM at least {need} bytes")
        if not 0 <= c.vram_headroom <= c.vram_bytes - need:
            raise ValueError(f"{self.name}: vram_headroom={c.vram_headroom} must be in 0..{c.vram_bytes - need} "
                             f"(VRAM {c.vram_bytes} bytes less one layer's top-{c.top_k} working set, {need}); "
                             f"lower it or raise VRAM")
        if c.containment and c.ram_bytes < c.vram_bytes:
            raise ValueError(f"{self.name}: with containment RAM must hold all of VRAM; ram_bytes="
                             f"{c.ram_bytes} < vram_bytes={c.vram_bytes} (raise RAM or set containment=False)")
        if c.seconds_per_layer <= 0 or c.h2d_bytes_per_s <= 0 or c.disk_bytes_per_s <= 0:
            raise ValueError(f"{self.name}: seconds_per_layer, h2d_bytes_per_s and disk_bytes_per_s "
                             f"must be > 0")
        if self.uses_predictor and predictor is None:
            raise ValueError(f"policy {self.name!r} needs a predictor")
        self.config = c
        self.predictor = predictor
        self.L, self.E, self.K = c.num_layers, c.num_experts, c.top_k
        self.sizes = sizes
        self.state = {t: np.zeros(shape, dtype=np.int8) for t in TIERS}
        self.used = {Tier.VRAM: 0, Tier.RAM: 0}
        self.capacity = {Tier.VRAM: int(c.vram_bytes), Tier.RAM: int(c.ram_bytes)}
        self.step = 0  # layer visits seen so far (the policy's own clock)

    # ---- the driver's calls -------------------------------------------------------------
    def on_activation(self, event: Activation) -> Plan:
        """One layer visit: learn from it, then plan. The actor calls only this."""
        if self.predictor is not None:
            self.predictor.observe(event)
        return self.access(event.layer, event.experts, event.time)

    def access(self, layer: int, experts, now: float = 0.0) -> Plan:
        """`layer` needs `experts` now; returns the plan that brings them (and maybe more)."""
        if not 0 <= layer < self.L:
            raise ValueError(f"{self.name}: layer {layer} out of range 0..{self.L - 1}")
        ids = sorted({int(e) for e in experts if int(e) >= 0})
        if ids and ids[-1] >= self.E:
            raise ValueError(f"{self.name}: expert {ids[-1]} out of range 0..{self.E - 1}")
        # Up to top_k experts always fit (checked at construction); more may not.
        need = int(self.sizes[layer, ids].sum()) if len(ids) > self.K else 0
        if need > min(self.capacity[Tier.VRAM], self.capacity[Tier.RAM]):
            raise ValueError(f"{self.name}: layer {layer} needs {len(ids)} experts ({need} bytes) at once; "
                             f"VRAM holds {self.capacity[Tier.VRAM]}, RAM {self.capacity[Tier.RAM]} bytes "
                             f"(split the access into groups of top_k={self.K})")
        call = _Call(layer, now)
        call.pinned = {(layer, e) for e in ids}
        self.step += 1
        self._touch(layer, ids, now)
        vram, ram = self.state[Tier.VRAM], self.state[Tier.RAM]
        for e in ids:
            if vram[layer, e] == RESIDENT:
                continue
            if vram[layer, e] == LOADING:  # a prefetch in flight becomes a demand load
                call.promotions.append(Move(layer, e, Tier.VRAM, 0.0))
                continue
            # VRAM first: with containment its victims' RAM copies become evictable.
            ok = self._make_room(Tier.VRAM, int(self.sizes[layer, e]), call, for_layer=layer)
            assert ok, "VRAM budget was validated to hold one layer's working set"
            if ram[layer, e] == ABSENT:
                ok = self._make_room(Tier.RAM, int(self.sizes[layer, e]), call, for_layer=layer)
                assert ok, "RAM budget was validated to hold one layer's working set"
                self._load(Tier.RAM, layer, e, 0.0, call)
            self._load(Tier.VRAM, layer, e, 0.0, call)
        self._speculate(layer, now, call)
        if headroom := self.config.vram_headroom:
            # After the prefetches, which may use free space: the next visit's misses find it.
            # `for_layer` is that next visit's layer (per-layer policies evict inside it).
            self._make_room(Tier.VRAM, headroom, call, for_layer=(layer + 1) % self.L)
        return call.plan()

    def complete(self, layer: int, expert: int, tier: Tier, ok: bool) -> bool:
        """Commit (ok) or roll back a transfer into `tier`; False if it was not pending."""
        st = self.state[tier]
        if st[layer, expert] != LOADING:
            return False
        if ok:
            st[layer, expert] = RESIDENT
            return True
        self._drop(tier, layer, expert)
        if tier == Tier.RAM and self.state[Tier.VRAM][layer, expert] == LOADING:
            self._drop(Tier.VRAM, layer, expert)  # nothing left to copy from
        return True

    def forget(self, layer: int, expert: int, tier: Tier) -> bool:
        """The executor dropped (layer, expert) from `tier` on its own (e.g. to serve a demand
        before this policy planned it); the book follows. With containment, leaving RAM also
        leaves VRAM. False if the book had it absent already."""
        if self.state[tier][layer, expert] == ABSENT:
            return False
        self._drop(tier, layer, expert)
        if tier == Tier.RAM and self.config.containment and self.state[Tier.VRAM][layer, expert] != ABSENT:
            self._drop(Tier.VRAM, layer, expert)
        return True

    # ---- queries --------------------------------------------------------------------------
    def where(self, layer: int, expert: int, tier: Tier) -> int:
        """ABSENT, LOADING or RESIDENT."""
        return int(self.state[tier][layer, expert])

    def used_bytes(self, tier: Tier) -> int:
        return self.used[tier]

    def check(self) -> None:
        """Assert the book's invariants (used by tests and the simulator's debug mode)."""
        for t in TIERS:
            present = self.state[t] != ABSENT
            assert int(self.sizes[present].sum()) == self.used[t], (t, self.used[t])
            assert self.used[t] <= self.capacity[t], (t, self.used[t], self.capacity[t])
        if self.config.containment:
            v = self.state[Tier.VRAM] != ABSENT
            assert not (v & (self.state[Tier.RAM] == ABSENT)).any(), "VRAM expert without RAM copy"

    # ---- hooks for subclasses -------------------------------------------------------------
    def _touch(self, layer: int, experts: list[int], now: float) -> None:
        """Bookkeeping on each access (recency, frequency); default none."""

    @abc.abstractmethod
    def _keep_value(self, tier: Tier, layer: int) -> np.ndarray:
        """float [L, E]: how much each expert is worth keeping in `tier` (lowest is evicted)."""

    def _speculate(self, layer: int, now: float, call: _Call) -> None:
        """Add prefetches after the demand part of the plan; default none (demand only)."""

    # ---- helpers for the plan -------------------------------------------------------------
    def _evictable(self, tier: Tier, call: _Call, *, cascade: bool = False) -> np.ndarray:
        """Experts `tier` may drop now. RAM copies that back VRAM (with containment all of
        VRAM, else pending H2D copies) only with `cascade`: dropping one drops its VRAM copy."""
        ok = self.state[tier] != ABSENT
        for (l, e) in call.pinned:
            ok[l, e] = False
        if tier == Tier.RAM and not cascade:
            vram = self.state[Tier.VRAM]
            ok &= (vram == ABSENT) if self.config.containment else (vram != LOADING)
        return ok

    def _make_room(self, tier: Tier, nbytes: int, call: _Call, *, below: float | None = None,
                   keep: np.ndarray | None = None, for_layer: int | None = None) -> bool:
        """Evict lowest-keep-value experts until `nbytes` (an expert of `for_layer`) fit in `tier`.

        With `below`, evict only experts whose keep value is < `below`; if that cannot free
        enough, evict nothing and return False (admission control). `keep` reuses a
        keep-value array the caller already computed. A demand (no `below`) that RAM cannot
        serve otherwise evicts RAM copies backing VRAM, with their VRAM copies.
        """
        free = self.capacity[tier] - self.used[tier]
        if free >= nbytes:
            return True
        value = self._keep_value(tier, call.layer) if keep is None else keep
        victims = self._victims(tier, nbytes - free, self._evictable(tier, call), value, below)
        if victims is None and tier == Tier.RAM and below is None:
            victims = self._victims(tier, nbytes - free, self._evictable(tier, call, cascade=True),
                                    value, below)
        return self._evict_all(tier, victims, call)

    def _evict_all(self, tier: Tier, victims: list[tuple[int, int]] | None, call: _Call) -> bool:
        """Evict `victims` from `tier`; False if None. A RAM victim takes its VRAM copy along
        where VRAM must stay inside RAM (containment) or is still being copied from it."""
        if victims is None:
            return False
        vram = self.state[Tier.VRAM]
        for l, e in victims:
            if tier == Tier.RAM and vram[l, e] != ABSENT and (self.config.containment or vram[l, e] == LOADING):
                self._evict(Tier.VRAM, l, e, call)
            self._evict(tier, l, e, call)
        return True

    def _victims(self, tier: Tier, need: int, ok: np.ndarray, value: np.ndarray,
                 below: float | None) -> list[tuple[int, int]] | None:
        """The lowest-`value` experts `ok` allows, enough to free `need` bytes (None if `ok`,
        or `below`, cannot). Where RAM does not contain VRAM (no containment) it caches
        exclusively: RAM copies of experts VRAM holds go first. Ranked like VRAM, RAM would
        otherwise keep the same best experts VRAM already has, and a VRAM miss would almost
        never find its expert in RAM (the replay measured a RAM hit rate of 0.000 with
        stored-form VRAM larger than RAM)."""
        if tier == Tier.RAM and not self.config.containment:
            redundant = ok & (self.state[Tier.VRAM] == RESIDENT)
            if redundant.any():
                found = self._lowest(need, redundant, value, below)
                if found is not None:
                    return found
        return self._lowest(need, ok, value, below)

    def _lowest(self, need: int, ok: np.ndarray, value: np.ndarray,
                below: float | None) -> list[tuple[int, int]] | None:
        masked = np.where(ok, value, np.inf)
        victims = []
        freed = 0
        while freed < need:  # usually one victim: repeated argmin beats a full sort
            flat = int(masked.argmin())
            v = masked.flat[flat]
            if v == np.inf or (below is not None and v >= below):
                return None
            masked.flat[flat] = np.inf
            l, e = divmod(flat, self.E)
            victims.append((l, e))
            freed += int(self.sizes[l, e])
        return victims

    def _prefetch(self, layer: int, expert: int, priority: float, call: _Call, *,
                  below: float | None = None, keep: dict | None = None,
                  below_by_tier: dict | None = None) -> bool:
        """Speculatively bring (layer, expert) into VRAM (staging it first if needed).

        Makes room only by evicting experts whose keep value is < `below` (or per tier
        `below_by_tier[tier]`; `keep[tier]` is the keep-value array to use); False (nothing
        changed in that tier) when that is not possible.
        """
        keep = keep or {}
        below_by_tier = below_by_tier or {Tier.VRAM: below, Tier.RAM: below}
        size = int(self.sizes[layer, expert])
        if self.state[Tier.RAM][layer, expert] == ABSENT:
            if not self._make_room(Tier.RAM, size, call, below=below_by_tier[Tier.RAM], keep=keep.get(Tier.RAM),
                                   for_layer=layer):
                return False
            self._load(Tier.RAM, layer, expert, priority, call)
        if self.state[Tier.VRAM][layer, expert] != ABSENT:
            return True
        if not self._make_room(Tier.VRAM, size, call, below=below_by_tier[Tier.VRAM], keep=keep.get(Tier.VRAM),
                               for_layer=layer):
            return False
        self._load(Tier.VRAM, layer, expert, priority, call)
        return True

    def _stage(self, layer: int, expert: int, priority: float, call: _Call, *,
               below: float | None = None, keep: np.ndarray | None = None) -> bool:
        """Speculatively bring (layer, expert) into RAM only."""
        if self.state[Tier.RAM][layer, expert] != ABSENT:
            return True
        if not self._make_room(Tier.RAM, int(self.sizes[layer, expert]), call, below=below,
                               keep=keep, for_layer=layer):
            return False
        self._load(Tier.RAM, layer, expert, priority, call)
        return True

    def _evict(self, tier: Tier, layer: int, expert: int, call: _Call) -> None:
        call.evictions.append(Move(layer, expert, tier, 0.0))
        self._drop(tier, layer, expert)

    def _drop(self, tier: Tier, layer: int, expert: int) -> None:
        self.state[tier][layer, expert] = ABSENT
        self.used[tier] -= int(self.sizes[layer, expert])

    def _load(self, tier: Tier, layer: int, expert: int, priority: float, call: _Call) -> None:
        assert self.state[tier][layer, expert] == ABSENT
        self.state[tier][layer, expert] = LOADING
        self.used[tier] += int(self.sizes[layer, expert])
        assert self.used[tier] <= self.capacity[tier]
        move = Move(layer, expert, tier, priority)
        (call.promotions if tier == Tier.VRAM else call.stagings).append(move)
        call.pinned.add((layer, expert))  # never evict in the same call what it just planned

