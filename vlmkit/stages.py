"""Deprecated path, kept for one release: Which parts train in a stage lives in `vlmkit.training.stages` now.

This module only re-exports that module's public names; import them from `vlmkit.training.stages`.
"""
from .models.lora import lora_targets  # noqa: F401
from .training.stages import (apply_stage, blocks_of, components, format_table, param_groups,
                              partial_blocks, validate_plan)  # noqa: F401
