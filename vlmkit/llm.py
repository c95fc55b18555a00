"""Deprecated: moved to `vlmkit.models.llm`; this path stays for one release.

The old name is the new module itself (not a copy of its names), so `from vlmkit import llm` keeps working
for reading and for patching attributes in tests.
"""
import sys

from .models import llm as _moved

sys.modules[__name__] = _moved
