"""`validate`, `stats` and `clean` for an existing store.

Each returns an exit code and raises CheckpointError / MismatchError (one-line messages)
for the CLI to print.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import CheckpointError
from ..store_format import INDEX_NAME
from .build import owned_files, source_identity
from .convert import bit_equal, expected_dense
from .progress import ProgressBar, human_bytes


class MismatchError(ValueError):
    """The store disagrees with its checksums or with its source."""


def sample_experts(num_layers: int, num_experts: int, n: int) -> list[tuple[int, int]]:
    """`n` experts spread evenly over all (layer, expert) pairs, first and last included; 0 = all."""
    total = num_layers * num_experts
    if n <= 0 or n >= total:
        picks = range(total)
    elif n == 1:
        picks = [0]
    else:
        picks = sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})
    return [divmod(i, num_experts) for i in picks]


def validate(store_dir: Path, model: str | None, samples: int, progress: bool = True, log=print) -> int:
    from ..registry import open_checkpoint
    from ..store import StoreCheckpoint

    store = StoreCheckpoint(store_dir)  # index + file sizes
    idx = store.index
    s = store.spec
    for layer in range(s.num_layers):
        store.check_layer_file(layer)
    total = sum(x.length for x in idx.experts)
    bar = ProgressBar(total, len(idx.experts), "validate", enabled=progress)
    t0 = time.perf_counter()

    local = threading.local()

    def check(x) -> int:
        # One reused buffer per thread: no 50 MB allocation (and page faults) per expert.
        if getattr(local, "buf", None) is None or len(local.buf) < x.length:
            local.buf = bytearray(x.length)
        store.verify(x.layer, x.expert, store.read_expert_into(x.layer, x.expert, local.buf))
        return x.length

    # pread and zlib.crc32 release the GIL: a few threads keep the disk and every core busy.
    # map() yields in index order, so the first bad expert reported is the first in the store.
    try:
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            for n in pool.map(check, idx.experts):
                bar.update(n)
    except CheckpointError as e:
        raise MismatchError(str(e)) from None
    finally:
        bar.close()
    secs = time.perf_counter() - t0

    src_path = Path(model) if model else Path(idx.source.path)
    other = model is not None and Path(model).resolve() != Path(idx.source.path)
    try:
        source = open_checkpoint(src_path, idx.source.adapter)
    except CheckpointError as e:
        if not other:
            raise
        raise MismatchError(f"{store_dir} was made from {idx.source.path} ({idx.source.adapter}); {model} does not "
                            f"open as that format ({str(e).splitlines()[0]}); validate against {idx.source.path}, "
                            f"or run `precompute --model {model}` for its own store") from None
    if model is None or Path(model).resolve() == Path(idx.source.path):
        now = source_identity(source)
        if now.files != idx.source.files:
            print(f"validate: warning: the source files in {src_path} changed since the store was written",
                  file=sys.stderr)
    picks = sample_experts(s.num_layers, s.num_experts, samples)
    t1 = time.perf_counter()
    for layer, expert in picks:
        want = expected_dense(source, layer, expert, idx.dtype)
        got = store.load_expert(layer, expert)
        if sorted(want) != sorted(got):
            raise MismatchError(f"{store_dir / idx.layers[layer].file}: expert {layer}/{expert} has roles "
                                f"{sorted(got)}, the source decodes to {sorted(want)}")
        for role in want:
            if not bit_equal(got[role], want[role]):
                fix = (f"the store was made from {idx.source.path}, not from it" if other
                       else "re-run `precompute --force`")
                raise MismatchError(f"{store_dir / idx.layers[layer].file}: expert {layer}/{expert} (layer {layer}, "
                                    f"expert {expert}) tensor {role} differs from the source {src_path} ({fix})")
    secs2 = time.perf_counter() - t1
    log(f"store {store_dir}: OK. {len(idx.experts)} experts ({human_bytes(total)}, {idx.dtype}) checksummed in "
        f"{secs:.2f} s = {human_bytes(total / max(secs, 1e-9))}/s, {len(idx.experts) / max(secs, 1e-9):.0f} experts/s; "
        f"{len(picks)} experts bit-exact against {src_path} in {secs2:.2f} s")
    return 0


def stats(store_dir: Path, detailed: bool, log=print) -> int:
    from ..store import read_index

    idx = read_index(store_dir)
    s = idx.model
    real = sum(x.length for x in idx.experts)
    disk = sum(x.size for x in idx.layers)
    free = shutil.disk_usage(store_dir).free
    log(f"store {store_dir}: {idx.dtype}, source {idx.source.adapter} at {idx.source.path}")
    log(f"  {s.num_layers} MoE layers x {s.num_experts} experts = {len(idx.experts)} experts; "
        f"expert {human_bytes(idx.experts[0].length)} (read {human_bytes(idx.experts[0].read_length)})")
    log(f"  expert bytes {human_bytes(real)}, files {human_bytes(disk)} "
        f"(padding {human_bytes(disk - real)}); disk free {human_bytes(free)}")
    if detailed:
        for lay in idx.layers:
            xs = [x for x in idx.experts if x.layer == lay.layer]
            log(f"  layer {lay.layer:3d}  {lay.file}  {len(xs)} experts  {human_bytes(sum(x.length for x in xs))}"
                f"  file {human_bytes(lay.size)}")
    return 0


def clean(store_dir: Path, force: bool, log=print, ask=input) -> int:
    files = owned_files(store_dir)
    if not files:
        log(f"nothing to clean in {store_dir}")
        return 0
    size = sum(f.stat().st_size for f in files)
    if not force:
        try:
            answer = ask(f"remove {len(files)} store files ({human_bytes(size)}) from {store_dir}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("clean: aborted, nothing removed (pass --force to skip the question)", file=sys.stderr)
            return 1
    # store.json first: a half-removed store must never look complete.
    for f in sorted(files, key=lambda p: p.name != INDEX_NAME):
        f.unlink(missing_ok=True)
    try:
        store_dir.rmdir()
    except OSError:
        pass  # other files remain: not ours to remove
    log(f"removed {len(files)} files ({human_bytes(size)}) from {store_dir}")
    return 0
