"""LRU (one cache shared by all layers) and LRU per layer (each layer gets 1/L of each tier)."""
from __future__ import annotations

import numpy as np

from ..events import Tier
from .base import ABSENT, CachePolicy, DoesNotFit, _Call


class LRUPolicy(CachePolicy):
    """Evict the expert whose last use is oldest; demand loads only."""

    name = "lru"

    def __init__(self, config, predictor=None):
        super().__init__(config, predictor)
        # Last access step; never-used experts sort first (-1). Float so it is a keep value.
        self.last = np.full((self.L, self.E), -1.0)

    def _touch(self, layer, experts, now):
        self.last[layer, experts] = self.step

    def _keep_value(self, tier, layer):
        return self.last


class LRUPerLayerPolicy(LRUPolicy):
    """LRU inside fixed per-layer partitions: each layer owns capacity // L bytes per tier."""

    name = "lru-per-layer"

    def __init__(self, config, predictor=None):
        super().__init__(config, predictor)
        worst = int(np.sort(self.sizes, axis=1)[:, -self.K:].sum(axis=1).max())
        for tier, cap in self.capacity.items():
            share = cap // self.L
            if share < worst:
                raise DoesNotFit(f"{self.name}: {tier.name} share per layer is {cap} // {self.L} = "
                                 f"{share} bytes, smaller than one layer's top-{self.K} working set "
                                 f"({worst} bytes); give {tier.name} at least {worst * self.L} bytes")
        self.share = {t: c // self.L for t, c in self.capacity.items()}

    def _make_room(self, tier: Tier, nbytes: int, call: _Call, *, below=None, keep=None,
                   for_layer=None) -> bool:
        assert for_layer is not None
        st = self.state[tier]
        used = int(self.sizes[for_layer][st[for_layer] != ABSENT].sum())
        need = used + nbytes - self.share[tier]
        if need <= 0:
            return True
        # Only this layer's experts may make room: the other partitions are not ours.
        others = np.ones((self.L, self.E), dtype=bool)
        others[for_layer] = False
        victims = None
        for cascade in (False, True) if (tier == Tier.RAM and below is None) else (False,):
            ok = self._evictable(tier, call, cascade=cascade) & ~others
            victims = self._victims(tier, need, ok, self.last, below)
            if victims is not None:
                break
        return self._evict_all(tier, victims, call)
