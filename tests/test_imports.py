"""The names a user imports first, from the package itself, without loading more than they need."""
from __future__ import annotations

import subprocess
import sys


def test_the_pipeline_and_its_config_import_from_the_package(bin_env):
    code = ("import sys\nfrom pipeline import PipelineConfig, load_config\n"
            "print('torch' in sys.modules)\n"
            "from pipeline import ExpertPipeline, PipelineStats, StagedExperts\n"
            "print(ExpertPipeline.__module__, PipelineConfig.__module__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bin_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "pipeline.api", "pipeline.config"]  # the config needs no torch


def test_an_unknown_name_is_an_attribute_error():
    import pytest

    import pipeline

    with pytest.raises(AttributeError, match="module 'pipeline' has no attribute 'Pipeline'"):
        pipeline.Pipeline  # noqa: B018
