"""Deprecated path, kept for one release: the embedded demo's data lives in `vlmkit.experiments.demo` now
(code only the recipes use). This module only re-exports its public names."""
from ..experiments.demo import (BACKGROUND, COLORS, NUMBERS, QUADRANTS, QUESTION_TYPES, SHAPES,  # noqa: F401
                                caption, corpus, draw_scene, make_demo_data, prepare, questions, record, relocate,
                                train_tokenizer, write_splits)
