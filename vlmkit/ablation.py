"""Deprecated path, kept for one release: the ablation runner lives in `vlmkit.experiments.ablation` now
(code only the recipes use). This module only re-exports its public names."""
from .experiments.ablation import (COLUMNS, CONFIG_NAME, HEADERS, RESULT_NAME, AblationConfig,  # noqa: F401
                                   PeakMemory, image_tokens_per_sample, load_ablation, markdown, pair_config,
                                   plot, run_ablation, run_pair, write_report)
