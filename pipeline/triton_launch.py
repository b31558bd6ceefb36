"""Launch a Triton kernel whose arguments never change specialisation through its compiled
handle, skipping Triton's per-call Python.

    FixedLaunch(kernel, constexprs, options, device, raw_stream=None)
                            `raw_stream(device_index)`: the current stream's handle (default:
                            torch's, the same call Triton makes)
      launch(grid, *args)   on the current CUDA stream; the first call goes through Triton
                            (compiles or loads the kernel), later ones straight to its launcher
      fast                  True once a launch went through the handle

Why: `kernel[grid](...)` binds the arguments, computes their specialisation key and looks the
kernel up on every call: about a hundred microseconds of the decode thread's time per launch
in a py-spy of the replay on an H100, for a decode at use that runs once per fetch. The
compiled kernel's launcher is one C call.

When it is safe: only for a kernel whose every call has the same pointer arguments (or
pointers of the same alignment) and integer arguments Triton does not specialise on
(`do_not_specialize`), so that the kernel Triton chose for the first call is the one it would
choose for every later call. The caller promises that; BatchDecode's arguments are fixed
buffers and slot indices.

Triton's launcher is internal API. It has taken the constexpr values after the other
arguments in recent versions and not in older ones: the first direct launch tries both (a
wrong count is refused by the launcher before anything runs) and anything else unexpected
falls back to Triton's own path for good. A launch hook (a profiler's) also takes Triton's path,
and so does every launch with MOE_CACHE_FAST_LAUNCH=0 in the environment (for A/B runs).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - CPU builds without Triton never launch a kernel
    triton = None


class FixedLaunch:
    def __init__(self, kernel, constexprs: dict, options: dict | None = None,
                 device: torch.device | None = None, raw_stream=None):
        self._kernel, self._options = kernel, dict(options or {})
        self._raw_stream = raw_stream
        self._device = device.index if device is not None and device.index is not None else None
        self._consts = dict(constexprs)
        # In the kernel's own order: what a launcher that takes constexprs expects after the rest.
        self._const_values = tuple(constexprs[n] for n in kernel.arg_names if n in constexprs)
        self._compiled = None
        self._tails: list[tuple] = [self._const_values, ()]  # to try, in order, on the first direct launch
        # MOE_CACHE_FAST_LAUNCH=0: always Triton's own path (A/B runs)
        self._broken = os.environ.get("MOE_CACHE_FAST_LAUNCH", "1") == "0"
        self.fast = False

    def launch(self, grid: tuple[int, ...], *args) -> None:
        c = self._compiled
        if c is None or self._broken or _launch_hook() is not None:
            compiled = self._kernel.run(*args, grid=grid, warmup=False, **self._consts, **self._options)
            if self._compiled is None:
                self._compiled = compiled
            return
        g = tuple(grid) + (1,) * (3 - len(grid))
        dev = self._device if self._device is not None else torch.cuda.current_device()
        stream = (self._raw_stream or torch._C._cuda_getCurrentRawStream)(dev)
        while self._tails:
            tail = self._tails[0]
            try:
                c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, None, None, None, *args, *tail)
            except TypeError:  # the launcher's argument count: refused before launching
                if self.fast:
                    raise
                self._tails.pop(0)
                continue
            self._tails = [tail]
            self.fast = True
            return
        self._broken = True  # neither form fits this Triton: its own path from now on
        self.launch(grid, *args)


def _launch_hook(runtime=None):
    """A launch hook someone installed (a profiler's), None if there is none, or True where
    this Triton cannot say. Recent Triton keeps its hooks as chains that are empty, not None,
    when nobody installed one."""
    try:
        runtime = runtime or triton.knobs.runtime
        hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    except AttributeError:  # no Triton, or one without knobs: take its own path
        return True
    for hook in hooks:
        if hook is not None and getattr(hook, "calls", True):
            return hook
    return None


__all__ = ["FixedLaunch"]
