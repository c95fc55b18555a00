"""Deprecated path, kept for one release: the high-resolution demos' comparison lives in
`vlmkit.experiments.tiling_demo` now (code only the recipes use). This module only re-exports its public names."""
from .experiments.tiling_demo import main, report, run_demo, single_tile  # noqa: F401
