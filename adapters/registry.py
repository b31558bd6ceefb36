"""Checkpoint formats by name, and `open_checkpoint`, which detects a directory's format.

Adapter modules register their classes with `@register("name")`. They are imported on
first use from `_ADAPTER_MODULES`, in detection order (most specific layout first), so
that a module registering itself (e.g. the packed store) needs no import from here.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable, TypeVar

from .base import Checkpoint
from .errors import CheckpointError, UnknownNameError

# Detection tries adapters in this order: GPT-OSS `original/` first, because a GPT-OSS
# Hugging Face download also holds top-level HF weights next to it.
_ADAPTER_MODULES = ["adapters.gpt_oss", "adapters.gpt_oss_hf", "adapters.hf_experts", "adapters.hf_fused",
                    "adapters.store"]

_ADAPTERS: dict[str, type[Checkpoint]] = {}
_loaded = False

C = TypeVar("C", bound=type)


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make a Checkpoint subclass available as format `name`.

    The class needs `__init__(self, path)` that opens and validates a checkpoint, and a
    classmethod `detect(path) -> bool` that is cheap and never raises on foreign input.
    An optional class attribute `looks_for` describes what `detect` looks for.
    """

    def deco(cls: C) -> C:
        if name in _ADAPTERS and _ADAPTERS[name] is not cls:
            raise ValueError(f"checkpoint format {name!r} registered twice: "
                             f"{_ADAPTERS[name].__qualname__} and {cls.__qualname__}")
        _ADAPTERS[name] = cls
        cls.format_name = name
        return cls

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _ADAPTER_MODULES:
        # No module is skipped: a broken or missing adapter must fail loudly, not make
        # detection quietly pick another format.
        importlib.import_module(mod)
    _loaded = True


def names() -> list[str]:
    """Registered format names, in detection order: the order of `_ADAPTER_MODULES`, whatever
    order the modules happened to be imported in (an adapter registered from elsewhere last)."""
    _load_all()
    rank = {mod: i for i, mod in enumerate(_ADAPTER_MODULES)}
    return sorted(_ADAPTERS, key=lambda n: rank.get(_ADAPTERS[n].__module__, len(rank)))


def get_adapter(name: str) -> type[Checkpoint]:
    _load_all()
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise UnknownNameError("checkpoint format", name, list(_ADAPTERS)) from None


def detect_format(path: str | os.PathLike) -> str | None:
    """The first registered format whose `detect` accepts `path`, or None."""
    _load_all()
    for name in names():
        if _ADAPTERS[name].detect(Path(path)):
            return name
    return None


def open_checkpoint(path: str | os.PathLike, format: str | None = None) -> Checkpoint:
    """Open the checkpoint at `path` as `format`, or as the format detected there."""
    path = Path(path)
    if format is not None:
        return get_adapter(format)(path)
    if not path.exists():
        raise CheckpointError(path, "does not exist", fix="give the directory of a model checkpoint")
    name = detect_format(path)
    if name is None:
        looked = "; ".join(f"{n} ({getattr(c, 'looks_for', 'its own layout')})" for n in names()
                          for c in [_ADAPTERS[n]])
        raise CheckpointError(path, "no known checkpoint format found", fix=f"looked for: {looked}")
    return _ADAPTERS[name](path)
