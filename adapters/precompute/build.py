"""`precompute`: plan every layer file, keep finished ones, convert the rest, write store.json last.

Resumable by construction: a layer file only ever gets its final name complete and fsynced,
and it describes itself (`LayerMeta` in its header), so a rerun after SIGKILL keeps every
finished layer that matches this source and dtype, removes stale `.partial` files, and
produces files byte-identical to an uninterrupted run (nothing time- or run-dependent is
written).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import msgspec

from ..base import Checkpoint
from ..errors import CheckpointError
from ..store_format import (ALIGN, CHECKSUM_ALGORITHM, FORMAT_VERSION, INDEX_NAME, LayerMeta, LayerPlan,
                            SourceFile, SourceIdentity, StoreIndex, StoreLayer, checksum, header_sha256,
                            layer_file_name, plan_layer, read_layer_meta, source_digest, write_atomic)
from . import messages as m
from .convert import check_dtype, store_tensors
from .pool import WorkerPool
from .progress import ProgressBar, human_bytes

INDEX_MARGIN = 1 << 20  # room for store.json in the disk-space check


class PrecomputeConfig(msgspec.Struct, frozen=True):
    model: str
    out: str
    dtype: str = "bfloat16"
    force: bool = False
    workers: int = 1  # worker processes; 0 converts in this process
    format: str | None = None
    progress: bool = True


class RefusedError(ValueError):
    """precompute will not run as asked; the message says why and what to do instead."""


def source_identity(source: Checkpoint) -> SourceIdentity:
    """Adapter, path, and size/mtime/header hash of every file that holds expert bytes."""
    s = source.spec
    names = sorted({r.file for l in range(s.num_layers) for e in range(s.num_experts)
                    for r in source.locate(l, e).ranges})
    files = []
    for name in names:
        st = (source.root / name).stat()
        files.append(SourceFile(name, st.st_size, st.st_mtime_ns, header_sha256(source.root / name)))
    return SourceIdentity(s.format, str(Path(source.root).resolve()), tuple(files))


def owned_files(out: Path) -> list[Path]:
    """Every file in `out` that a store owns: layer files, store.json, and .partial leftovers."""
    if not out.is_dir():
        return []
    pats = ("layer_[0-9][0-9][0-9].safetensors", "layer_[0-9][0-9][0-9].safetensors.*.partial",
            INDEX_NAME, INDEX_NAME + ".partial")
    return sorted({p for pat in pats for p in out.glob(pat) if p.is_file()})


def _read_existing_index(out: Path, force: bool) -> StoreIndex | None:
    path = out / INDEX_NAME
    if not path.exists():
        return None
    try:
        return msgspec.json.decode(path.read_bytes(), type=StoreIndex)
    except (msgspec.DecodeError, OSError) as e:
        if force:
            return None
        raise RefusedError(f"{path}: existing store index is unreadable ({e}); pass --force to rebuild "
                           f"it or choose another --out") from None


def _keep_layer(path: Path, plan: LayerPlan, force: bool) -> LayerMeta | None:
    """The finished layer file's meta when it is exactly what we would write, else None (force)
    or a RefusedError."""
    try:
        meta = read_layer_meta(path)
        same = (meta.source_digest == plan.source_digest and meta.dtype == plan.dtype
                and meta.size == plan.size == path.stat().st_size
                and tuple(msgspec.structs.replace(x, checksum=p.checksum) for x, p in zip(meta.experts, plan.experts))
                == plan.experts)
        why = "it was written from another source, dtype or layout"
        if same:
            with open(path, "rb") as f:
                for x in meta.experts:
                    f.seek(x.offset)
                    if checksum(f.read(x.length)) != x.checksum:
                        same, why = False, f"expert {x.layer}/{x.expert} fails its {CHECKSUM_ALGORITHM} checksum"
                        break
    except CheckpointError as e:
        same, why = False, str(e)
    if same:
        return meta
    if force:
        return None
    raise RefusedError(f"{path}: cannot resume: {why}; pass --force to overwrite or choose another --out")


def _check_disk(out: Path, need: int, freed: int = 0) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free + freed
    if need > free:
        raise RefusedError(f"not enough disk space for the store in {out}: need {human_bytes(need)}, "
                           f"{human_bytes(free)} free (free some space or choose another --out)")


def precompute(cfg: PrecomputeConfig, source: Checkpoint, log=print) -> int:
    """Build (or finish) the store of `source` in `cfg.out`; returns 0. Raises RefusedError,
    CheckpointError or WorkerError with a one-line message for the CLI."""
    check_dtype(cfg.dtype)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RefusedError(f"--out {out} is a file, not a store folder; choose a new --out (a folder is made)")
    spec = source.spec
    tensors = store_tensors(source, cfg.dtype)
    identity = source_identity(source)
    digest = source_digest(identity, cfg.dtype, tensors)
    plans = [plan_layer(l, spec.num_experts, tensors, cfg.dtype, digest) for l in range(spec.num_layers)]

    existing = _read_existing_index(out, cfg.force)
    if existing is not None and existing.source_digest != digest and not cfg.force:
        raise RefusedError(f"{out / INDEX_NAME}: a store of another source or dtype ({existing.source.path}, "
                           f"{existing.dtype}) is already there; pass --force to overwrite or choose another --out")
    if cfg.force:
        # Check the space before removing the old store: a refused run must leave it intact.
        old = owned_files(out)
        _check_disk(out, sum(p.size for p in plans) + INDEX_MARGIN, sum(p.stat().st_size for p in old))
        for p in old:
            p.unlink()
    for p in owned_files(out):
        if p.name.endswith(".partial"):
            p.unlink()  # stale: left by a killed run

    planned = {p.file for p in plans}
    extra = sorted(p.name for p in owned_files(out) if p.name.startswith("layer_") and p.name not in planned)
    if extra:  # only --force (which removed them above) may drop files of another model
        raise RefusedError(f"{out / extra[0]}: not a layer of this model ({spec.num_layers} MoE layers); "
                           f"pass --force to overwrite or choose another --out")

    kept: dict[int, LayerMeta] = {}
    todo: list[LayerPlan] = []
    trusted = existing is not None and existing.source_digest == digest
    for plan in plans:
        path = out / plan.file
        if not path.exists():
            todo.append(plan)
        elif trusted and path.stat().st_size == plan.size:
            # store.json of this very source+dtype vouches for it (validate re-checks bytes).
            kept[plan.layer] = LayerMeta(FORMAT_VERSION, plan.layer, cfg.dtype, digest, plan.size,
                                         tuple(x for x in existing.experts if x.layer == plan.layer))
        else:
            meta = _keep_layer(path, plan, cfg.force)
            if meta is None:
                path.unlink()
                todo.append(plan)
            else:
                kept[plan.layer] = meta
    if trusted and not todo:
        log(f"store in {out} is up to date ({spec.num_layers} layers, {cfg.dtype}); pass --force to rebuild it")
        return 0

    _check_disk(out, sum(p.size for p in todo) + INDEX_MARGIN)
    out.mkdir(parents=True, exist_ok=True)
    metas = dict(kept)
    if todo:
        if kept:
            log(f"resuming: {len(kept)} finished layers kept, {len(todo)} to convert")
        _run(cfg, source, out, spec.format, spec.num_experts, tensors, digest, todo, metas)
    index = StoreIndex(FORMAT_VERSION, CHECKSUM_ALGORITHM, ALIGN, cfg.dtype, spec, tensors, identity, digest,
                       tuple(StoreLayer(l, layer_file_name(l), metas[l].size) for l in range(spec.num_layers)),
                       tuple(x for l in range(spec.num_layers) for x in metas[l].experts))
    write_atomic(out / INDEX_NAME, msgspec.json.format(msgspec.json.encode(index), indent=1))
    total = sum(x.size for x in index.layers)
    log(f"wrote {out} ({spec.num_layers} layers x {spec.num_experts} experts, {cfg.dtype}, {human_bytes(total)})")
    return 0


def _run(cfg: PrecomputeConfig, source: Checkpoint, out: Path, fmt: str, num_experts: int, tensors, digest: str,
         todo: list[LayerPlan], metas: dict[int, LayerMeta]) -> None:
    jobs = [m.LayerJob(str(Path(cfg.model).resolve()), fmt, str(out.resolve()), p.layer, num_experts,
                       cfg.dtype, tensors, digest) for p in todo]
    bar = ProgressBar(sum(x.length for p in todo for x in p.experts), len(todo) * num_experts, "precompute",
                      enabled=cfg.progress)
    try:
        if cfg.workers == 0:  # in this process: for debugging, and for sources no worker can open
            from .worker import convert_layer

            for job in jobs:
                metas[job.layer] = convert_layer(source, job, lambda n, b: bar.update(b, n))
        else:
            with WorkerPool(min(cfg.workers, len(todo)), out) as pool:
                pool.run(jobs, lambda p: bar.update(p.nbytes, p.experts),
                         lambda d: metas.__setitem__(d.layer, d.meta))
    finally:
        secs = bar.close()
    nbytes = sum(p.size for p in todo)
    print(f"converted {len(todo)} layers, {human_bytes(nbytes)} in {secs:.2f} s "
          f"({human_bytes(nbytes / max(secs, 1e-9))}/s, {len(todo) * num_experts / max(secs, 1e-9):.1f} experts/s)",
          file=sys.stderr)
