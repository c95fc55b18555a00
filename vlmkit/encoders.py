"""Deprecated: moved to `vlmkit.models.encoders`; this path stays for one release.

The old name is the new module itself (not a copy of its names), so `from vlmkit import encoders` keeps working
for reading and for patching attributes in tests.
"""
import sys

from .models import encoders as _moved

sys.modules[__name__] = _moved
