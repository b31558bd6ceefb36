"""FixedLaunch (pipeline/triton_launch.py) against a fake kernel: the first call goes through
Triton's own path, later ones to the compiled launcher with the argument form it accepts,
and anything unexpected goes back to Triton's path. The real kernel is checked on the GPU
(tests/test_decode_at_use.py: bit-exact batches, and `fast` once they went direct)."""
from __future__ import annotations

import pytest

from pipeline import triton_launch
from pipeline.triton_launch import FixedLaunch

REAL_LAUNCH_HOOK = triton_launch._launch_hook  # the autouse fixture below replaces the module's


class _Compiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, takes_constexprs: bool | None):
        self.takes_constexprs, self.launches = takes_constexprs, []

    def run(self, g0, g1, g2, stream, function, meta, launch_meta, enter, exit_, *args):
        want = 4 if self.takes_constexprs else 2  # two arguments + two constexprs
        if self.takes_constexprs is None or len(args) != want:
            raise TypeError(f"function takes exactly {9 + want} arguments")
        self.launches.append(((g0, g1, g2), stream, args))


class _Kernel:
    arg_names = ["a", "N", "b", "M"]  # constexprs interleaved: passed in this order after the rest

    def __init__(self, compiled):
        self.compiled, self.calls = compiled, []

    def run(self, *args, grid, warmup, **kw):
        self.calls.append((grid, args, kw))
        return self.compiled


@pytest.fixture(autouse=True)
def _no_hook(monkeypatch):
    monkeypatch.setattr(triton_launch, "_launch_hook", lambda: None)


def _launcher(takes):
    k = _Kernel(_Compiled(takes))
    return k, FixedLaunch(k, {"M": 7, "N": 5}, {"opt": 1}, raw_stream=lambda dev: 42)


@pytest.mark.parametrize("takes", [True, False])
def test_first_call_through_triton_then_straight_to_the_launcher(takes, monkeypatch):
    monkeypatch.setattr(triton_launch.torch.cuda, "current_device", lambda: 0)
    k, fl = _launcher(takes)
    fl.launch((3, 2), "x", 1)
    assert k.calls == [((3, 2), ("x", 1), {"M": 7, "N": 5, "opt": 1})] and not fl.fast
    fl.launch((3, 1), "x", 2)
    fl.launch((3, 4), "x", 3)
    assert len(k.calls) == 1 and fl.fast
    tail = (5, 7) if takes else ()
    assert k.compiled.launches == [((3, 1, 1), 42, ("x", 2, *tail)), ((3, 4, 1), 42, ("x", 3, *tail))]


def test_a_launcher_that_takes_neither_form_leaves_it_to_triton(monkeypatch):
    monkeypatch.setattr(triton_launch.torch.cuda, "current_device", lambda: 0)
    k, fl = _launcher(None)
    for i in range(3):
        fl.launch((1,), "x", i)
    assert [c[1] for c in k.calls] == [("x", 0), ("x", 1), ("x", 2)] and not fl.fast


def test_a_launch_hook_takes_tritons_path(monkeypatch):
    monkeypatch.setattr(triton_launch.torch.cuda, "current_device", lambda: 0)
    k, fl = _launcher(True)
    fl.launch((1,), "x", 0)
    monkeypatch.setattr(triton_launch, "_launch_hook", lambda: print)
    fl.launch((1,), "x", 1)
    assert len(k.calls) == 2 and not k.compiled.launches


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_CACHE_FAST_LAUNCH", "0")
    k, fl = _launcher(True)
    for i in range(3):
        fl.launch((1,), "x", i)
    assert len(k.calls) == 3 and not k.compiled.launches and not fl.fast


def test_an_empty_hook_chain_is_no_hook():
    from types import SimpleNamespace

    class Chain:
        def __init__(self, calls):
            self.calls = calls

    hook = REAL_LAUNCH_HOOK
    assert hook(SimpleNamespace(launch_enter_hook=Chain([]), launch_exit_hook=Chain([]))) is None
    assert hook(SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)) is None
    assert hook(SimpleNamespace(launch_enter_hook=Chain([]), launch_exit_hook=Chain([print]))) is not None
    assert hook(SimpleNamespace(launch_enter_hook=print, launch_exit_hook=None)) is print
    assert hook(SimpleNamespace()) is True  # a Triton whose knobs lack them: its own path


def test_once_direct_a_refused_launch_is_the_callers_error(monkeypatch):
    """After the launcher accepted a form, a TypeError is a bad call, not a form to retry."""
    monkeypatch.setattr(triton_launch.torch.cuda, "current_device", lambda: 0)
    k, fl = _launcher(True)
    fl.launch((1,), "x", 0)
    fl.launch((1,), "x", 1)
    assert fl.fast
    with pytest.raises(TypeError, match="exactly"):
        fl.launch((1,), "x", 2, "one too many")
    assert len(k.calls) == 1 and fl.fast  # still direct: nothing fell back to Triton's path
