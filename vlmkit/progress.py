"""Deprecated path, kept for one release: Training progress lives in `vlmkit.training.progress` now.

This module only re-exports that module's public names; import them from `vlmkit.training.progress`.
"""
from .training.progress import Meter, format_seconds  # noqa: F401
