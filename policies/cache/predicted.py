"""Shared machinery of the policies that follow a predictor: a cached probability matrix.

`predict_all` can cost L predictor calls, too much for every layer visit; so the matrix is
refreshed fully once per token (at layer 0) and, after each visit, for the visited layer
and the `predictor.horizon` layers after it (the rows that a visit changes for
history-based predictors, and the rows that prefetching looks at next).
"""
from __future__ import annotations

import numpy as np

from ..events import Activation, Plan
from .base import CachePolicy


class PredictedPolicy(CachePolicy):
    uses_predictor = True

    def __init__(self, config, predictor=None):
        super().__init__(config, predictor)
        self.p = np.full((self.L, self.E), self.K / self.E)
        # Layer steps until layer l runs next, seen from just after layer `now` ran: row `now`.
        idx = np.arange(self.L)
        self._steps_ahead = ((idx[None, :] - idx[:, None] - 1) % self.L + 1).astype(np.float64)

    def on_activation(self, event: Activation) -> Plan:
        assert self.predictor is not None
        self.predictor.observe(event)
        layer = event.layer
        if layer == 0:
            self.p[:] = self.predictor.predict_all()
            self._rows_changed(range(self.L))
        else:
            self.p[layer] = self.predictor.predict(layer)
            changed = []
            for ahead in range(1, min(self.predictor.horizon, self.L - 1) + 1):
                nxt = (layer + ahead) % self.L
                row = self.predictor.predict(nxt)
                # History-only predictors (EWMA) leave other layers alone: skip the refresh then.
                if not np.array_equal(row, self.p[nxt]):
                    self.p[nxt] = row
                    changed.append(nxt)
            if changed:
                self._rows_changed(changed)  # the visited row: `_touch` in `access` refreshes it
        return self.access(layer, event.experts, event.time)

    def _rows_changed(self, layers) -> None:
        """Hook: rows `layers` of `self.p` were refreshed (the visited layer's row is left to
        `_touch`, which `access` calls right after with the visit's own bookkeeping)."""
