"""Output files that appear whole or not at all, as ordinary files.

    replaced_atomically(path) -> context manager yielding a temporary path beside `path`;
                                 renamed over `path` on a clean exit, removed on an error
    check_output_path(path, flag)   ValueError (one line) if `path` cannot be written

Every report, trace and weights file the project writes goes through these, so a crash or a
Ctrl-C never leaves half a file under the real name, and the file gets the permissions of
any file the user creates (0666 less the umask; `mkstemp` alone would leave it 0600).
`check_output_path` runs before the long work, so a typo in a folder name costs a second,
not the run (a replay or simulation of many minutes used to fail only when it wrote).

It lives here, the lowest layer, because adapters, policies and pipeline all write files.
The packed store keeps its own writer (`adapters.store_format.write_atomic`): its temporary
names are the `.partial` files that precompute finds and removes when it resumes, and it
fsyncs, because a store is built once and read for a long time.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read
    it would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[str]:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_path(path: str | os.PathLike, flag: str) -> None:
    """Refuse, in one line naming `flag` and the fix, an output path that cannot be written."""
    p = Path(path)
    folder = Path(os.path.abspath(p)).parent  # where the writer puts its temporary: a link's own folder
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name inside it")
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: its folder {folder} does not exist; create it or write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: its folder {folder} is not writable; write elsewhere")


__all__ = ["check_output_path", "replaced_atomically"]
