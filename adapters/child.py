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
