"""InternVL: InternViT + dynamic tiling + pixel-shuffle projector + LLM, stage 1 (projector) then stage 2.

    accelerate launch recipes/internvl.py                     # the embedded demo (CPU, no network)
    accelerate launch recipes/internvl.py --config recipes/configs/internvl_qwen25_7b.yaml

Dynamic tiling (`model.tiling: {mode: internvl}`): each image is resized to the tile grid (cols x rows,
min_tiles..max_tiles tiles) whose aspect ratio is closest to its own, cut row-major, and followed by a
thumbnail of the whole image. The `pixel_shuffle` projector folds each 2x2 block of patch features
into one token (scale 0.5: 256 tokens per 448 px tile), then LayerNorm -> Linear -> GELU -> Linear.

The demo's task needs the detail (vlmkit/data/demo_highres.py): a square on a canvas of up to 128 px is
plain, striped or checked in 1 px bands, which one 64 px tile averages away (its colour and side
survive). It trains the tiled model and (unless --no-compare-single-tile) the same model with one tile
per image (pad to a square + resize), with the same encoder, data, plan and seed (vlmkit/tiling_demo.py),
and writes both accuracies, per question type, to runs/internvl/metrics.json.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlmkit.experiments import tiling_demo  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    tiling_demo.main(argv, __doc__, HERE / "configs" / "internvl_demo.yaml", "internvl tiling")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlmkit.errors import run_recipe

    run_recipe(main, "recipes/internvl.py")  # one line per error (--debug: traceback); SIGTERM: checkpoint, exit
