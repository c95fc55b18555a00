"""Deprecated path, kept for one release: the high-resolution demos' data lives in
`vlmkit.experiments.demo_highres` now (code only the recipes use). This module only re-exports its public names."""
from ..experiments.demo_highres import (BAND, CANVASES, COLORS, FILL, PATTERNS, QUESTION_TYPES,  # noqa: F401
                                        SIDES, WHITE, draw_scene, make_highres_data, pattern_square, prepare,
                                        questions)
