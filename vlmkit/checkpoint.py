"""Deprecated path, kept for one release: Resumable training state lives in `vlmkit.training.checkpoint` now.

This module only re-exports that module's public names; import them from `vlmkit.training.checkpoint`.
"""
from .training.checkpoint import (ENGINE_DIR, FORMAT, METRICS_NAME, MODEL_FILES, OPTIMIZER_NAME, RNG_NAME, STATE_NAME,
                                  ResumePoint, checkpoints, clean_temporaries, damage, find_resume, forget,
                                  json_writer, load_optimizer_state, load_rng_state, merge_skipped, move_writer,
                                  prune, read_state, rng_state, save_checkpoint, save_model, set_rng_state,
                                  torch_writer, truncate_log, writing)  # noqa: F401
