"""What the transformers integration supports, checked before anything is allocated.

    TRANSFORMERS_RANGE                 the versions tested (the `hf` extra in pyproject.toml)
    check_transformers()               installed and in range, else one line with the fix
    supported_arch(config) -> Arch     a model_type whose experts this project can store
    experts_modules(model) -> {model layer index: experts module name}
    router_of(model, experts_name) -> module   the router beside those experts (the lookahead's)
"""
from __future__ import annotations

import re

TRANSFORMERS_RANGE = (">=5.17", "<6")  # tested: 5.17.0 (H100 image), 5.25.0 (CI)
_MIN, _MAX = (5, 17), (6, 0)


def _version_tuple(v: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_transformers() -> None:
    try:
        import transformers
    except ImportError:
        raise ImportError("pipeline.hf needs transformers and accelerate: pip install "
                          "'two-level-moe-cache[hf]'") from None
    v = _version_tuple(transformers.__version__)
    if not _MIN <= v < _MAX:
        raise ImportError(f"transformers {transformers.__version__} is outside the tested range "
                          f"{','.join(TRANSFORMERS_RANGE)} (its experts interface is what the pipeline "
                          f"plugs into); pip install 'transformers{','.join(TRANSFORMERS_RANGE)}'")


def supported_arch(config):
    from adapters.hf_models import ARCHS

    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        moe = any(k in config.to_dict() for k in ("num_experts", "num_local_experts", "n_routed_experts"))
        what = "a supported MoE architecture" if moe else "a Mixture-of-Experts model (no routed experts in config)"
        raise ValueError(f"model_type {model_type!r} is not {what}; supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def experts_modules(model) -> dict[int, str]:
    """Each decoder layer's routed-experts module, by its layer's index: the names of the modules
    transformers' experts interface dispatches (its decorator gives them `is_transposed`)."""
    out = {}
    for name, m in model.named_modules():
        if name.endswith(".experts") and hasattr(m, "is_transposed"):
            match = _LAYER.search(name)
            if match:
                out[int(match.group(1))] = name
    if not out:
        raise ValueError(f"{type(model).__name__} has no experts module dispatched by transformers' experts "
                         "interface; it is not an MoE model this project can offload")
    return out


def router_of(model, experts_name: str):
    """The router beside the experts module `experts_name`: its sibling `gate` or `router` with a
    weight [E, H]; None where there is none."""
    parent = model.get_submodule(experts_name.rpartition(".")[0])
    for attr in ("gate", "router"):
        m = getattr(parent, attr, None)
        if getattr(m, "weight", None) is not None and m.weight.dim() == 2:
            return m
    return None
