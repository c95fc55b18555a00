"""Deprecated: moved to `vlmkit.tiling.spec`; this path stays for one release.

The old name is the new module itself (not a copy of its names).
"""
import sys

from .tiling import spec as _moved

sys.modules[__name__] = _moved
