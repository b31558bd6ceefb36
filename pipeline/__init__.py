"""The expert pipeline: `from pipeline import ExpertPipeline, PipelineConfig`.

Names are imported on first use, so `import pipeline.config` (or a tool's --help) does not load
torch; pipeline.hf holds the transformers integration.
"""
from __future__ import annotations

_NAMES = {"ExpertPipeline": "api", "PipelineClosed": "api", "PipelineStats": "api", "StagedExperts": "api",
          "PipelineConfig": "config", "load_config": "config"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
