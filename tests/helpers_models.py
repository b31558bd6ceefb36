"""Shared test helpers: tiny checkpoints written by the project's own generator, and an
independent MXFP4 reference decoder (pure Python, one element at a time, math.ldexp)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from adapters.cli.make_model import main as make_model_main

# FP4 E2M1 by code, written out from the OCP MX spec rather than imported from adapters.
_FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def ref_mxfp4_decode(blocks: np.ndarray, scales: np.ndarray) -> torch.Tensor:
    """blocks u8 [..., G, 16], scales u8 [..., G] -> bf16 [..., G*32], element by element."""
    lead = blocks.shape[:-2]
    g = blocks.shape[-2]
    b2 = blocks.reshape(-1, g, 16)
    s2 = scales.reshape(-1, g)
    out = np.empty((b2.shape[0], g * 32), dtype=np.float32)
    for r in range(b2.shape[0]):
        for j in range(g):
            s = int(s2[r, j])
            for i in range(16):
                byte = int(b2[r, j, i])
                out[r, j * 32 + 2 * i] = math.ldexp(_FP4[byte & 15], s - 127)
                out[r, j * 32 + 2 * i + 1] = math.ldexp(_FP4[byte >> 4], s - 127)
    # float32 holds these values exactly (2 significant bits), so the cast to bf16 is exact too.
    return torch.from_numpy(out).to(torch.bfloat16).reshape(*lead, g * 32)


def make_tiny(out: Path, fmt: str, *extra: str, seed: int = 1) -> Path:
    """Write a tiny checkpoint of `fmt` with make-model (in-process) and return its directory."""
    rc = make_model_main(["--format", fmt, "--preset", "tiny", "--seed", str(seed), "--out", str(out), *extra])
    assert rc == 0, f"make-model failed for {fmt} {extra}"
    return out
