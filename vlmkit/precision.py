"""Deprecated path, kept for one release: Training precision lives in `vlmkit.training.precision` now.

This module only re-exports that module's public names; import them from `vlmkit.training.precision`.
"""
from .training.precision import REGIMES, DESCRIPTION, MasterAdamW, MasterWeights, resolve, weight_dtype, with_masters  # noqa: F401,E501
