"""Deprecated: moved to `vlmkit.export.internvl` (this module re-exports it for one release)."""
from .export.internvl import *  # noqa: F401,F403
