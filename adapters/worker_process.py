"""Worker processes that run the project's code and nothing of the caller's.

    proc = WorkerProcess("pipeline.reader_worker:reader_main", args, name="tlmc-reader")
    proc.start()       # a fresh interpreter: python -m adapters.worker_process
    proc.conn          # the parent's end of a duplex multiprocessing Connection
    proc.pid, proc.sentinel, proc.is_alive(), proc.join(timeout), proc.exitcode,
    proc.kill(), proc.terminate(), proc.close()      as multiprocessing.Process has them

The child receives (module, function, args) as its first message and calls function(conn, *args).

Why not multiprocessing's "spawn": a spawned child imports the parent's main module again to be
able to unpickle anything of it, so a script that opened a pipeline at its top level opened one
again in every reader (and died without a main guard), and every worker paid the script's
imports (torch: about a second each, most of a pipeline's opening time on a small machine).
Nothing a worker needs lives in the caller's script, so this child imports only the target's
module. `sentinel` is the read end of a pipe whose write end only the child holds: it becomes
readable when the child exits, however it exits, as multiprocessing's sentinel does.
"""
from __future__ import annotations

import importlib
import os
import pickle
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)  # the folder holding adapters/, pipeline/, policies/


class WorkerProcess:
    def __init__(self, target: str, args: tuple = (), *, name: str = "worker"):
        module, _, function = target.partition(":")
        if not module or not function:
            raise ValueError(f"WorkerProcess target {target!r}: write it as 'package.module:function'")
        self.name = name
        self._payload = pickle.dumps((module, function, tuple(args)))
        self._popen: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.sentinel: int = -1

    def start(self) -> None:
        if self._popen is not None:
            raise RuntimeError(f"{self.name}: start() called twice")
        parent_sock, child_sock = socket.socketpair()
        exit_r, exit_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "adapters.worker_process", str(child_sock.fileno()), str(exit_w), self.name],
                # the name is for `ps`
                pass_fds=(child_sock.fileno(), exit_w), stdin=subprocess.DEVNULL, env=env, cwd=_ROOT)
        except BaseException:
            parent_sock.close()
            os.close(exit_r)
            raise
        finally:
            child_sock.close()
            os.close(exit_w)
        self.conn = Connection(parent_sock.detach())
        self.sentinel = exit_r
        self.conn.send_bytes(self._payload)

    @property
    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        if self._popen is None:
            return
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def terminate(self) -> None:
        if self.is_alive():
            self._popen.terminate()

    def close(self) -> None:
        """Release the sentinel (the connection is its owner's to close)."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def _child_main(argv: list[str]) -> None:
    conn_fd = int(argv[0])  # argv[1], the exit pipe's write end, stays open until this process ends
    conn = Connection(conn_fd)
    module, function, args = pickle.loads(conn.recv_bytes())
    target = getattr(importlib.import_module(module), function)
    target(conn, *args)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
