"""Errors for bad input files: each names the file (and tensor or expert) and the fix."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or store file is malformed, truncated, or does not match its description."""

    def __init__(self, path: object, problem: str, *, tensor: str | None = None, fix: str | None = None):
        where = f"{path}" + (f" [{tensor}]" if tensor else "")
        msg = f"{where}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)
        self.path = str(path)
        self.tensor = tensor


class UnknownNameError(KeyError):
    """An adapter, preset, dtype or policy name that is not registered; lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def read_input(path, *, missing_fix: str) -> bytes:
    """The bytes of an input file; missing or unreadable is one CheckpointError naming it."""
    from pathlib import Path

    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(path, "missing", fix=missing_fix) from None
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
