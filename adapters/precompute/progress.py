"""Progress bar for precompute/validate: bytes with rate and ETA on stderr, experts as postfix."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class ProgressBar:
    def __init__(self, total_bytes: int, total_experts: int, desc: str, *, enabled: bool = True):
        self.total_experts = total_experts
        self.experts = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                        file=sys.stderr, disable=not enabled, dynamic_ncols=True, mininterval=0.5)

    def update(self, nbytes: int, experts: int = 1) -> None:
        self.experts += experts
        self.bar.update(nbytes)
        self.bar.set_postfix_str(f"{self.experts}/{self.total_experts} experts", refresh=False)

    def close(self) -> float:
        """Closes the bar; returns elapsed seconds."""
        self.bar.close()
        return time.perf_counter() - self.start


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError
