"""Paths named by a sample: joined to their folder and checked to stay inside it (images, videos, frame folders).

`escape(folder, rel)` says why `rel` leads outside `folder` (an absolute path, `..` climbing out, a symlink to
elsewhere), or None when it stays inside; the callers raise their own error kind with it.
"""
from __future__ import annotations

import os


def escape(folder: str, rel: str) -> tuple[str, str, str | None]:
    """(the joined path, the folder's real path, why it leads outside or None)."""
    path = os.path.join(folder, rel)
    base = os.path.realpath(folder or ".")
    if os.path.isabs(rel):
        return path, base, "an absolute path"
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) == base:
        return path, base, None
    lexical = os.path.normpath(os.path.join(base, rel))
    return path, base, ("'..' climbs out of it" if os.path.commonpath([base, lexical]) != base
                        else f"a symlink to {real}")
