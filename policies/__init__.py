"""What should be where: predictors, cache policies, the policy actor, the trace simulator.

Runs on plain numbers: it never touches expert files, device tensors, or CUDA, and it
imports without a GPU (see docs/architecture.md).
"""
