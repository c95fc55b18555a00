"""Deprecated: moved to `vlmkit.models.attention`; this path stays for one release.

The old name is the new module itself (not a copy of its names), so `from vlmkit import attention` keeps working
for reading and for patching attributes in tests.
"""
import sys

from .models import attention as _moved

sys.modules[__name__] = _moved
