"""Hawkeye (Jain & Lin, ISCA 2016) for the expert cache: learn from reconstructed Belady decisions.

`OptGen` replays the access stream online and says, for each reuse, whether Belady's MIN
with the VRAM budget would have kept the expert from its previous access until now (an
occupancy vector over a sliding window of recent accesses). Each such outcome trains a
small predictor of "would OPT keep what it loads now?" (cache-friendly / cache-averse),
indexed by features of the access made back then: the expert itself, its layer, how
long ago it was used before (the current request's recent use), its router rank.

Eviction (the keep value): cache-averse experts go first, then the friendly ones that
have waited longest (Hawkeye's RRIP ages, which in one big fully associative set reduce
to "oldest first"). A friendly expert evicted anyway trains its features negatively, as
in Hawkeye. RAM keeps plain LRU: the target is VRAM loads, and OPTgen models one tier.
Demand loads only.

Measured (prefetch-bench simulate, decode rows, VRAM 10% / 25%, RAM 50%): OPTgen is exact,
but on the real traces (data/traces) whether OPT keeps an expert is barely predictable from these
features (per-expert OPT-keep rates sit mostly between 0.3 and 0.7 on qwen1.5), so Hawkeye
lands at LRU's level (1.48-2.24x Belady's VRAM loads), behind `nextuse`.
"""
from __future__ import annotations

import numpy as np

from adapters.errors import UnknownNameError

from ..events import Activation, Plan, Tier
from .base import ABSENT, CacheConfig, CachePolicy

FEATURES = ("expert", "layer", "gap", "rank", "expert-gap")
_GAP_BUCKETS = 8  # 0 = never used before; b = layer visits since last use in [2^(b-1), 2^b)


class OptGen:
    """Online reconstruction of Belady MIN's hits over a window of recent accesses.

    Time advances by one per expert access (the order the simulator's Belady uses). Each
    access holds its own expert for its own time step (demand caching: the accessed expert
    is in the cache); a reuse at `t` of the expert last accessed at `a` is an OPT hit iff
    the expert fits in every step strictly between: occupancy[a+1:t] + size <= capacity,
    and then occupies those steps. Deciding reuses in order of their end time is optimal
    (interval packing), so with unit sizes and a window longer than the trace the hits
    equal `belady_min`'s. Sizes in bytes make it an approximation (a knapsack per step).
    """

    def __init__(self, capacity: int, window: int, num_keys: int):
        if capacity < 1 or window < 1 or num_keys < 1:
            raise ValueError(f"OptGen: capacity, window and num_keys must be >= 1; got "
                             f"{capacity}, {window}, {num_keys}")
        self.capacity, self.window = int(capacity), int(window)
        self._occ = np.zeros(2 * self.window + 64, dtype=np.int64)
        self._base = 0  # the time of _occ[0]
        self.t = 0  # the time the next access gets
        self.last = np.full(num_keys, -1, dtype=np.int64)  # last access time per key; -1 never

    def access(self, key: int, size: int = 1) -> int:
        """Record an access; 1 = OPT would have hit, 0 = OPT would have missed although the
        previous use lies in the window, -1 = no previous use in the window (unknown)."""
        t = self.t
        i = t - self._base
        if i >= self._occ.size:  # slide: keep the last `window` steps
            keep = self._occ[i - self.window:i].copy()
            self._occ[:] = 0
            self._occ[:self.window] = keep
            self._base = t - self.window
            i = self.window
        self._occ[i] = size
        a = int(self.last[key])
        self.last[key] = t
        self.t = t + 1
        if a < 0 or t - a > self.window:
            return -1
        span = self._occ[a + 1 - self._base:i]
        if span.size == 0:
            return 1
        if int(span.max()) + size > self.capacity:
            return 0
        span += size
        return 1


class HawkeyeConfig(CacheConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    window_factor: float = 8.0  # OPTgen window = this x VRAM capacity in experts (accesses)
    features: tuple[str, ...] = ("expert",)  # predictor inputs; see FEATURES
    weight_max: int = 7  # each weight saturates at +-weight_max (Hawkeye: 3-bit counters)
    threshold: int = 0  # friendly iff the summed weights >= threshold
    train_margin: int = 100  # keep training while |sum| < margin even when right
    detrain_on_evict: bool = True  # a friendly expert evicted from VRAM trains negatively
    # "class": averse before friendly, oldest first in each (Hawkeye); "score": lowest summed
    # weight first (the predictor's confidence as a ranking), oldest first among equals.
    order: str = "class"


class HawkeyePolicy(CachePolicy):
    name = "hawkeye"
    config_type = HawkeyeConfig

    def __init__(self, config: HawkeyeConfig, predictor=None):
        super().__init__(config, predictor)
        c = config
        for f in c.features:
            if f not in FEATURES:
                raise UnknownNameError("hawkeye feature", f, list(FEATURES))
        if c.order not in ("class", "score"):
            raise UnknownNameError("hawkeye order", c.order, ["class", "score"])
        if not c.features:
            raise ValueError(f"{self.name}: features is empty; give at least one of {', '.join(FEATURES)}")
        if not c.window_factor > 0:
            raise ValueError(f"{self.name}: window_factor must be > 0, got {c.window_factor}")
        if c.weight_max < 1 or c.train_margin < 0:
            raise ValueError(f"{self.name}: weight_max must be >= 1 and train_margin >= 0; got "
                             f"{c.weight_max}, {c.train_margin}")
        unit = int(self.sizes.min())
        cap_experts = max(1, self.capacity[Tier.VRAM] // unit)
        self.optgen = OptGen(self.capacity[Tier.VRAM], max(1, int(c.window_factor * cap_experts)),
                             self.L * self.E)
        LE = self.L * self.E
        sizes_of = {"expert": LE, "layer": self.L, "gap": self.L * _GAP_BUCKETS,
                    "rank": self.L * self.K + self.L, "expert-gap": LE * _GAP_BUCKETS}
        self.features = tuple(c.features)
        self.weights = [np.zeros(sizes_of[f], dtype=np.int64) for f in self.features]
        self.trained = np.full((LE, len(self.features)), -1, dtype=np.int64)  # features of the last access
        self.friendly = np.zeros((self.L, self.E), dtype=bool)
        self.visits = np.zeros(self.L, dtype=np.int64)
        self.last_visit = np.full((self.L, self.E), -1, dtype=np.int64)  # layer visit number of last use
        self.last = np.full((self.L, self.E), -1.0)  # step of last use (LRU within a class)
        # Keep value for VRAM, kept up to date per access: friendly above averse, older lower.
        self._keep = np.full((self.L, self.E), -1.0)
        self._big = 1e15
        self._rank: dict[int, int] = {}

    # ---- features and the predictor ----------------------------------------------------
    def _indices(self, layer: int, e: int) -> list[int]:
        gap = self.visits[layer] - self.last_visit[layer, e] if self.last_visit[layer, e] >= 0 else 0
        bucket = min(_GAP_BUCKETS - 1, int(gap).bit_length())
        out = []
        for f in self.features:
            if f == "expert":
                out.append(layer * self.E + e)
            elif f == "layer":
                out.append(layer)
            elif f == "gap":
                out.append(layer * _GAP_BUCKETS + bucket)
            elif f == "rank":
                out.append(layer * (self.K + 1) + self._rank.get(e, self.K))
            else:  # expert-gap
                out.append((layer * self.E + e) * _GAP_BUCKETS + bucket)
        return out

    def _score(self, idx) -> int:
        return sum(int(w[i]) for w, i in zip(self.weights, idx))

    def _train(self, idx, target: int) -> None:
        """Perceptron step toward `target` (+1 friendly / -1 averse) on stored indices."""
        c = self.config
        y = self._score(idx)
        if (y >= c.threshold) == (target > 0) and abs(y - c.threshold) >= c.train_margin:
            return
        for w, i in zip(self.weights, idx):
            w[i] = min(c.weight_max, max(-c.weight_max, int(w[i]) + target))

    # ---- the policy's hooks ------------------------------------------------------------
    def on_activation(self, event: Activation) -> Plan:
        # The router's order (highest weight first) is a feature; `access` sorts ids.
        self._rank = {int(e): r for r, e in enumerate(event.experts)}
        try:
            return super().on_activation(event)
        finally:
            self._rank = {}

    def _touch(self, layer, experts, now):
        c = self.config
        self.visits[layer] += 1
        for e in experts:
            key = layer * self.E + e
            outcome = self.optgen.access(key, int(self.sizes[layer, e]))
            prev = self.trained[key]
            if prev[0] >= 0:
                # Unknown (beyond the window) counts as averse, as in Hawkeye.
                self._train(prev, 1 if outcome == 1 else -1)
            idx = self._indices(layer, e)
            self.trained[key] = idx
            y = self._score(idx)
            friendly = y >= c.threshold
            self.friendly[layer, e] = friendly
            rank = (y - c.threshold) if c.order == "score" else float(friendly)
            self._keep[layer, e] = self.step + self._big * rank
            self.last_visit[layer, e] = self.visits[layer]
        self.last[layer, experts] = self.step

    def _keep_value(self, tier, layer):
        return self._keep if tier == Tier.VRAM else self.last

    def _evict(self, tier, layer, expert, call):
        if (tier == Tier.VRAM and self.config.detrain_on_evict and self.friendly[layer, expert]
                and self.state[Tier.VRAM][layer, expert] != ABSENT):
            idx = self.trained[layer * self.E + expert]
            if idx[0] >= 0:
                self._train(idx, -1)
        super()._evict(tier, layer, expert, call)
