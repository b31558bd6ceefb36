"""`print(pipe.stats())` as a table a person reads: the tiers and hit rates first, then each part's
counters (scheduler, readers, copies, policy actor), three to a line."""
from __future__ import annotations

import msgspec


def _value(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _rate(hit: int, miss: int) -> str:
    return f"{hit / (hit + miss):.3f}" if hit + miss else "-"


def _counters(title: str, part) -> list[str]:
    if not isinstance(part, msgspec.Struct):
        return [f"{title}: {part}"]
    fields = [(f, getattr(part, f)) for f in part.__struct_fields__]
    cells = [f"{f}={_bytes(v) if f.startswith('bytes') and isinstance(v, int) else _value(v)}" for f, v in fields]
    width = max(len(c) for c in cells) + 2
    lines = [f"{title}:"]
    for i in range(0, len(cells), 3):
        lines.append("  " + "".join(c.ljust(width) for c in cells[i:i + 3]).rstrip())
    return lines


def format_stats(st) -> str:
    s = st.scheduler
    head = [f"pipeline on {st.device}: VRAM {st.vram_slots} slots ({st.vram_form}, {st.vram_free} free"
            f"{'' if st.vram_views is None else f', {st.vram_views} dense views'}), RAM {st.ram_slots} slots "
            f"({st.ram_free} free, {'pinned' if st.pinned else 'not pinned'})",
            f"fetches {s.fetches}: VRAM hit rate {_rate(s.vram_hits, s.vram_misses)}, RAM hit rate of the misses "
            f"{_rate(s.ram_hits, s.ram_misses)}; moved {_bytes(s.bytes_h2d)} to VRAM, {_bytes(s.bytes_nvme)} from "
            f"disk; waited {s.stall_seconds:.3f} s for experts"]
    body = []
    for title in ("scheduler", "readers", "copies", "actor"):
        body += _counters(title, getattr(st, title))
    return "\n".join(head + body)
