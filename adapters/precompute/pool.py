"""A small pool of precompute worker processes driven over pipes with msgspec messages.

A worker that dies mid-layer is replaced by a fresh process and its layer retried
(MAX_RETRIES times); a layer that fails with an error comes back as a `LayerFailed` value.

Shutdown protocol (the one place it is written down; `WorkerPool.close` follows it):
  1. stop intake: no new `LayerJob` is sent once the run ends or fails or a signal arrives;
  2. normal end: every worker gets `Stop` and is joined with a timeout;
  3. error or signal: every live worker is terminated (SIGTERM), joined with a timeout,
     and killed if it survives; a worker dies mid-layer leaving only its own `*.partial`;
  4. the `.partial` files of the layers that were in flight are removed, so no half file
     ever remains, and none ever had a final name (workers rename only finished files).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

from . import messages as m
from .worker import worker_main

JOIN_TIMEOUT_S = 5.0
MAX_RETRIES = 1  # fresh processes per layer after a worker died on it


class WorkerError(RuntimeError):
    """A layer failed in a worker; `bad_input` says whether the files (not the code) are at fault."""

    def __init__(self, layer: int, message: str, bad_input: bool, tb: str = ""):
        super().__init__(f"layer {layer}: {message}" + ("" if bad_input or not tb else f"\n--- worker traceback ---\n{tb}"))
        self.layer, self.bad_input = layer, bad_input


def _context() -> mp.context.BaseContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # torch is imported once in the fork server instead of once per worker.
        ctx.set_forkserver_preload(["adapters.precompute.worker"])
        return ctx
    return mp.get_context("spawn")


class WorkerPool:
    def __init__(self, n: int, partial_dir: Path):
        self.partial_dir = partial_dir
        self.procs: list[mp.process.BaseProcess] = []
        self.conns = []
        self.busy: dict[object, int] = {}  # connection -> layer in flight
        self.restarts = 0
        self._ctx = _context()
        try:
            for _ in range(n):
                p, c = self._start()
                self.procs.append(p)
                self.conns.append(c)
        except BaseException:
            self.close(ok=False)
            raise

    def _start(self):
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(target=worker_main, args=(child_end,), daemon=True, name="precompute-worker")
        p.start()
        child_end.close()  # so a dead worker reads as EOF here
        return p, parent_end

    def run(self, jobs: list[m.LayerJob], on_progress: Callable[[m.Progress], None],
            on_done: Callable[[m.LayerDone], None]) -> None:
        """Run every job; raises WorkerError on the first failed layer, or on a layer whose
        worker died more than MAX_RETRIES times (a dead worker is replaced, its layer requeued)."""
        todo = deque(jobs)
        by_layer = {j.layer: j for j in jobs}
        tries = dict.fromkeys(by_layer, 0)
        idle = list(self.conns)
        while todo or self.busy:
            while todo and idle:
                c = idle.pop()
                job = todo.popleft()
                self.busy[c] = job.layer
                c.send_bytes(m.encoder.encode(job))
            for c in wait(list(self.busy), timeout=0.5):
                try:
                    msg = m.to_parent.decode(c.recv_bytes())
                except (EOFError, OSError):
                    # A worker may die at any moment (OOM killer, a stray signal): its layer is
                    # retried once on a fresh process; its own .partial file goes first.
                    i = self.conns.index(c)
                    dead, layer = self.procs[i], self.busy.pop(c)
                    dead.join(JOIN_TIMEOUT_S)
                    for f in self.partial_dir.glob(f"layer_{layer:03d}.safetensors.{dead.pid}.partial"):
                        f.unlink(missing_ok=True)
                    c.close()
                    tries[layer] += 1
                    if tries[layer] > MAX_RETRIES:
                        raise WorkerError(layer, f"worker process died {tries[layer]} times (last exit code "
                                          f"{dead.exitcode})", False) from None
                    self.procs[i], self.conns[i] = self._start()
                    self.restarts += 1
                    todo.appendleft(by_layer[layer])
                    idle.append(self.conns[i])
                    continue
                match msg:
                    case m.Progress():
                        on_progress(msg)
                    case m.LayerDone():
                        del self.busy[c]
                        idle.append(c)
                        on_done(msg)
                    case m.LayerFailed():
                        raise WorkerError(msg.layer, msg.message, msg.bad_input, msg.traceback)

    def close(self, ok: bool) -> None:
        """Steps 2-4 of the shutdown protocol above."""
        if ok:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.send_bytes(m.encoder.encode(m.Stop()))
        else:
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
        for p in self.procs:
            p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join(JOIN_TIMEOUT_S)
        for c in self.conns:
            c.close()
        for p in self.procs:
            with contextlib.suppress(ValueError):
                p.close()
        in_flight = set(self.busy.values())
        self.busy.clear()
        for layer in in_flight:
            for f in self.partial_dir.glob(f"layer_{layer:03d}.safetensors.*.partial"):
                f.unlink(missing_ok=True)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
