"""Deprecated: moved to `vlmkit.export.internvl` (import from there, or `export_model` / `import_model` from
`vlmkit.export`). This module re-exports its public names for one release."""
from .export.internvl import (END, START, VIDEO, check_internvl_exportable, export_internvl,  # noqa: F401
                              grow_vocab, import_internvl, internvl_config, internvl_image_processor,
                              internvl_tokenizer, missing_frame_tokens, save_internvl_processor, tile_bounds,
                              vision_feature_layer)
