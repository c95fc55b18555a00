"""Deprecated path, kept for one release: Preemption (SIGTERM / SIGINT) lives in `vlmkit.training.preempt` now.

This module only re-exports that module's public names; import them from `vlmkit.training.preempt`.
"""
from .training.preempt import SIGNALS, Preempted, handlers, request, requested, worker_init  # noqa: F401
