"""Predictors by name: `make_predictor(name, num_layers, num_experts, top_k, **options)`.

Modules are imported only when their predictor is made, so a missing torch (ScoutGate)
never breaks EWMA, lookahead, oracle or fusion. An unknown name lists the valid ones; an
unknown option lists the options that predictor takes.
"""
from __future__ import annotations

import importlib
import inspect

from adapters.errors import UnknownNameError

from .base import Predictor

# name -> (module, class name)
PREDICTORS: dict[str, tuple[str, str]] = {
    "ewma": ("policies.predictors.ewma", "EwmaPredictor"),
    "colayer": ("policies.predictors.colayer", "CoLayerPredictor"),
    "lookahead": ("policies.predictors.lookahead", "LookaheadPredictor"),
    "oracle": ("policies.predictors.oracle", "OraclePredictor"),
    "fusion": ("policies.predictors.fusion", "FusionPredictor"),
    "scoutgate": ("policies.predictors.scoutgate", "ScoutGatePredictor"),
}


def predictor_names() -> list[str]:
    return sorted(PREDICTORS)


def predictor_class(name: str) -> type[Predictor]:
    """The class registered as `name` (imports its module now)."""
    if name not in PREDICTORS:
        raise UnknownNameError("predictor", name, list(PREDICTORS))
    module_name, attr = PREDICTORS[name]
    module = importlib.import_module(module_name)
    cls = getattr(module, attr, None)
    if cls is None:  # tolerate a different class name: the Predictor subclass named `name`
        found = [c for c in vars(module).values()
                 if isinstance(c, type) and issubclass(c, Predictor) and getattr(c, "name", None) == name]
        if not found:
            raise ImportError(f"{module_name} defines no Predictor subclass named {name!r}")
        cls = found[0]
    return cls


def make_predictor(name: str, num_layers: int, num_experts: int, top_k: int, **options) -> Predictor:
    """A fresh predictor `name` for a model of this shape; `options` go to its constructor."""
    cls = predictor_class(name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    fixed = {"self", "num_layers", "num_experts", "top_k"}
    allowed = [n for n, p in params.items() if n not in fixed and p.kind in
               (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(allowed))
    if unknown and not takes_any:
        raise ValueError(f"predictor {name!r}: unknown option(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(allowed) or 'none'}")
    return cls(num_layers, num_experts, top_k, **options)
