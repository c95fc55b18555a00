"""Deprecated path, kept for one release: Process-group teardown at exit lives in `vlmkit.training.distributed` now.

This module only re-exports that module's public names; import them from `vlmkit.training.distributed`.
"""
from .training.distributed import destroy_at_exit, destroy_process_group  # noqa: F401
