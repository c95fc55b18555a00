"""Deprecated path, kept for one release: Model FLOPs of training steps lives in `vlmkit.training.flops` now.

This module only re-exports that module's public names; import them from `vlmkit.training.flops`.
"""
from .training.flops import PEAK_TFLOPS, FlopCounter, peak_flops  # noqa: F401
