"""The parent side of `prefetch-bench generate`: every method of one VRAM budget loaded at once, each
in its own process (pipeline.bench.generate_method), timed in interleaved rounds.

    run_budget(runs, rounds, say) -> [MethodResult]    one result per run, in order

Why interleaved: on a shared GPU host the same code's speed drifts by tens of percent from one
minute to the next. Rounds taken in turn (resident, ours, ... , resident, ours, ...) put each drift
on every method alike, and the ratio of two methods in one round is steadier than either rate.
The processes load in parallel; a method that fails or is skipped drops out with its reason.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile

import msgspec

from .generate_method import MethodResult, MethodRun, Round


class _Process:
    def __init__(self, run: MethodRun):
        self.method = run.method
        self.log = tempfile.TemporaryFile(mode="w+")  # the child's stderr: progress bars, warnings
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.bench.generate_method",
                                      msgspec.json.encode(run).decode()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.result: MethodResult | None = None  # set once it has ended, one way or another

    def _expect(self, *tags: str) -> tuple[str, str]:
        """The child's next line starting with one of `tags`, as (tag, rest); EOFError if it exited."""
        for line in self.proc.stdout:
            tag, _, rest = line.rstrip("\n").partition(" ")
            if tag in tags:
                return tag, rest
        raise EOFError

    def _failed(self) -> MethodResult:
        self.proc.wait()
        self.log.seek(0)
        tail = (self.log.read().strip().splitlines() or ["no output"])[-1]
        return MethodResult(self.method, f"failed (exit {self.proc.returncode}): {tail[:200]}")

    def ready(self) -> bool:
        try:
            tag, rest = self._expect("READY", "RESULT")
        except EOFError:
            self.result = self._failed()
            return False
        if tag == "RESULT":  # skipped before loading
            self.result = msgspec.json.decode(rest.encode(), type=MethodResult)
            self.proc.wait()
            return False
        return True

    def round(self) -> Round | None:
        try:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
            return msgspec.json.decode(self._expect("ROUND")[1].encode(), type=Round)
        except (EOFError, BrokenPipeError):
            self.result = self._failed()
            return None

    def end(self) -> MethodResult:
        try:
            self.proc.stdin.write("end\n")
            self.proc.stdin.flush()
            self.result = msgspec.json.decode(self._expect("RESULT")[1].encode(), type=MethodResult)
            self.proc.wait()
        except (EOFError, BrokenPipeError):
            self.result = self._failed()
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            try:
                f.close()
            except BrokenPipeError:  # stdin of a child that exited with input unread
                pass


def run_budget(runs: list[MethodRun], rounds: int, say=lambda text: None) -> list[MethodResult]:
    procs = [_Process(r) for r in runs]
    try:
        live = [p for p in procs if p.ready()]
        say(f"loaded {', '.join(p.method for p in live) or 'nothing'}")
        for i in range(rounds):
            timed = []
            for p in list(live):
                r = p.round()
                if r is None:
                    live.remove(p)
                    continue
                timed.append(f"{p.method} {r.decode_tok_s or 0:.2f}")
            say(f"round {i + 1}/{rounds}: decode tok/s " + ", ".join(timed))
        for p in live:
            p.end()
        return [p.result for p in procs]
    finally:
        for p in procs:
            p.kill()


__all__ = ["run_budget"]
