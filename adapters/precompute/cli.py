"""`precompute`: build, check, size or remove the packed expert store.

  precompute [precompute] --model DIR [--out DIR] [--dtype bfloat16|float16|mxfp4] [--force] [--workers N] [--format NAME]
  precompute validate --store DIR [--model DIR] [--samples N]
  precompute stats --store DIR [--detailed]
  precompute clean --store DIR [--force]

Bad input is one line on stderr and exit 2; a failed validation exits 1; SIGINT/SIGTERM
stop cleanly with 130/143 (finished layers are kept: rerun to resume).
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path

from ..errors import CheckpointError, UnknownNameError
from ..store_format import STORE_DTYPES

SUBCOMMANDS = ("validate", "stats", "clean")


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _Usage(message)


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM; BaseException so nothing swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="precompute", description="Convert a checkpoint into the packed expert store.",
                epilog="Other commands: precompute validate|stats|clean --store DIR (see `precompute CMD --help`).")
    p.add_argument("--model", required=True, help="source checkpoint directory")
    p.add_argument("--out", help="store directory (default MODEL/expert_store)")
    p.add_argument("--dtype", default="bfloat16", help=f"one of {', '.join(STORE_DTYPES)} (default bfloat16)")
    p.add_argument("--force", action="store_true", help="overwrite an existing store")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes (0: convert in this process)")
    p.add_argument("--format", help="source format name (default: detected)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _sub_parser(cmd: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"precompute {cmd}")
    p.add_argument("--store", help="store directory (default: MODEL/expert_store, where `precompute --model "
                   "MODEL` puts it)")
    if cmd == "validate":
        p.add_argument("--model", help="source checkpoint (default: the path recorded in store.json); without "
                       "--store, its default store is validated")
        p.add_argument("--samples", type=int, default=8, help="experts compared with the source (0 = all)")
        p.add_argument("--no-progress", action="store_true")
    else:
        p.add_argument("--model", help="the checkpoint whose default store (MODEL/expert_store) is meant")
        if cmd == "stats":
            p.add_argument("--detailed", action="store_true", help="one line per layer")
        else:
            p.add_argument("--force", action="store_true", help="do not ask for confirmation")
    return p


def _store_of(a: argparse.Namespace) -> Path:
    if a.store:
        return Path(a.store)
    if a.model:
        return Path(a.model) / "expert_store"
    raise _Usage("give --store DIR, or --model DIR for the store precompute made there (DIR/expert_store)")


def _precompute(a: argparse.Namespace) -> int:
    from ..registry import open_checkpoint
    from .build import PrecomputeConfig, precompute
    from .convert import check_dtype

    check_dtype(a.dtype)
    if a.workers < 0:
        raise ValueError(f"--workers must be 0 (convert in this process) or more, got {a.workers}")
    model = Path(a.model)
    if not model.is_dir():
        raise CheckpointError(model, "is not a directory", fix="give --model the directory of a checkpoint")
    source = open_checkpoint(model, a.format)
    out = Path(a.out) if a.out else model / "expert_store"
    cfg = PrecomputeConfig(str(model), str(out), a.dtype, a.force, a.workers, a.format, not a.no_progress)
    return precompute(cfg, source)


class _NotRaised(Exception):
    """Stands for the work's own exception types until they are imported (after parsing, so
    that --help and usage errors never load torch)."""


def _run(argv: list[str]) -> int:
    MismatchError = RefusedError = WorkerError = _NotRaised
    if argv and argv[0] == "precompute":  # the explicit form of the default subcommand
        argv = argv[1:]
    cmd = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    try:
        a = _build_parser().parse_args(argv) if cmd is None else _sub_parser(cmd).parse_args(argv[1:])
        from .build import RefusedError
        from .manage import MismatchError, clean, stats, validate
        from .pool import WorkerError

        if cmd is None:
            return _precompute(a)
        store = _store_of(a)
        if cmd == "validate":
            if a.samples < 0:
                raise ValueError(f"--samples must be 0 (all) or more, got {a.samples}")
            return validate(store, a.model, a.samples, not a.no_progress)
        if cmd == "stats":
            return stats(store, a.detailed)
        return clean(store, a.force)
    except MismatchError as e:
        print(f"precompute {cmd}: FAILED: {e}", file=sys.stderr)
        return 1
    except WorkerError as e:
        if not e.bad_input:
            raise  # a bug: keep the worker's traceback
        print(f"precompute: error: {e}", file=sys.stderr)
        return 2
    except (_Usage, UnknownNameError, CheckpointError, RefusedError, ValueError, OSError) as e:
        text = str(e).splitlines()[0]
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            text = f"no space left on the disk of {e.filename or 'the store'}; free some and rerun (finished layers are kept)"
        elif isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename:
            text = f"{e.filename}: cannot write there ({e.strerror.lower()}); choose another --out"
        print(f"precompute{' ' + cmd if cmd else ''}: error: {text}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
    first: list[int] = []

    def on_signal(signum, frame):
        if not first:  # a second signal must not interrupt the clean-up of the first
            first.append(signum)
            raise Interrupted(signum)

    old = {s: signal.signal(s, on_signal) for s in names}
    try:
        return _run(argv)
    except Interrupted as e:
        print(f"precompute: stopped by {names[e.signum]}; finished layers are kept, rerun to resume",
              file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, h in old.items():
            signal.signal(s, h)
