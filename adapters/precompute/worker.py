"""The precompute worker process: converts whole layers, one at a time, into layer files.

`worker_main(conn)` is the process target (module level, so spawn/forkserver can find it).
It receives `LayerJob`s as msgspec bytes, writes `layer_{l:03d}.safetensors.{pid}.partial`,
then fsyncs and renames it to its final name, and answers `Progress`/`LayerDone`, or
`LayerFailed` carrying the formatted traceback (errors cross the boundary as values).
A worker never outlives its parent: PR_SET_PDEATHSIG where Linux offers it, and a
parent-pid check between experts everywhere.
"""
from __future__ import annotations

import errno
import os
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from ..child import start_child
from . import messages as m
from .convert import expert_parts


def convert_layer(source, job: m.LayerJob, report=lambda n, b: None, should_stop=lambda: False):
    """Write one layer file for `job` from the open `source`; returns its `LayerMeta`, or
    None when `should_stop()` asked to abandon it (the .partial file is then removed)."""
    from ..store_format import LayerWriter, plan_layer

    plan = plan_layer(job.layer, job.num_experts, job.tensors, job.dtype, job.source_digest)
    out = Path(job.out)
    # The pid in the name keeps a late orphan from ever renaming a fresh run's file.
    writer = LayerWriter(plan, out / plan.file, out / f"{plan.file}.{os.getpid()}.partial")
    try:
        order = plan.experts[0].tensors
        for e in range(job.num_experts):
            nbytes = writer.write_expert(expert_parts(source, job.layer, e, job.dtype, order))
            report(1, nbytes)
            if should_stop():
                writer.abort()
                return None
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def worker_main(conn: Connection) -> None:
    parent = os.getppid()
    start_child(parent)  # Ctrl-C reaches the whole process group; only the parent acts on it
    import torch

    torch.set_num_threads(1)  # N workers on N cores: no oversubscription
    from ..registry import open_checkpoint

    orphaned = lambda: os.getppid() != parent  # noqa: E731
    sources: dict[tuple[str, str], object] = {}
    while True:
        if not conn.poll(1.0):
            if orphaned():
                return
            continue
        try:
            job = m.to_worker.decode(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the parent is gone
        match job:
            case m.Stop():
                return
            case m.LayerJob():
                try:
                    key = (job.model, job.format)
                    if key not in sources:
                        sources[key] = open_checkpoint(job.model, format=job.format)
                    report = lambda n, b, l=job.layer: conn.send_bytes(m.encoder.encode(m.Progress(l, n, b)))  # noqa: E731
                    meta = convert_layer(sources[key], job, report, orphaned)
                    if meta is None:
                        return
                    conn.send_bytes(m.encoder.encode(m.LayerDone(job.layer, meta)))
                except (BrokenPipeError, EOFError):
                    return
                except Exception as e:
                    from ..errors import CheckpointError

                    text = str(e).splitlines()[0] if str(e) else type(e).__name__
                    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                        text = (f"no space left on the disk of {job.out}; free some and rerun (finished "
                                f"layers are kept)")
                    msg = m.LayerFailed(job.layer, isinstance(e, (CheckpointError, OSError)), text,
                                        traceback.format_exc())
                    try:
                        conn.send_bytes(m.encoder.encode(msg))
                    except (BrokenPipeError, OSError):
                        return
