"""What every worker process of the project does first: live no longer than its parent.

Used by the precompute workers, the reader processes and the policy process.
"""
from __future__ import annotations

import os
import signal
import sys


def start_child(parent_pid: int) -> bool:
    """Ignore Ctrl-C (the parent owns shutdown) and ask Linux to SIGKILL this process when
    the parent dies (PR_SET_PDEATHSIG, best effort). False if the parent `parent_pid` is
    already gone (it died before the request was armed): the caller should exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # callers that poll their parent's pid still notice an orphaning
    return os.getppid() == parent_pid


def end_child(code: int = 0) -> None:
    """Leave a worker that has finished its work, skipping interpreter teardown.

    A worker may have imported torch and Triton (a precompute worker started by multiprocessing
    re-imports the user's script with its imports). Tearing those down at exit printed ~20 lines
    of nanobind "leaked" warnings from Triton per worker into the user's terminal, and every
    worker has already released what it holds (its files, mappings and threads) by the time it
    calls this."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


def freeze_start_up_heap() -> None:
    """Once a worker is set up and before it serves: collect, then put every object alive now
    (the imported modules, the policy's arrays) beyond the collector's reach for the process's
    life. A full collection then walks only what serving allocates, instead of the whole
    start-up heap: a read or a plan held up by a full collection stalls the decode loop that
    waits on it (one of the replay's main process, ~200k objects, took up to 80 ms on this
    project's CPU)."""
    import gc

    gc.collect()
    gc.freeze()
