"""LLaVA-NeXT: CLIP + AnyRes tiling + 2-layer MLP + LLM, stage 1 (connector) then stage 2 (all).

    accelerate launch recipes/llava_next.py                   # the embedded demo (CPU, no network)
    accelerate launch recipes/llava_next.py --config recipes/configs/llava_next_7b.yaml

AnyRes (`model.tiling`): each image is fitted onto the best of the grid pinpoints, cut into
encoder-sized tiles (plus a base tile of the whole image), and the tiles' features are laid out as
one grid, the padding cropped away and a learned `image_newline` appended after each row.

The demo's task needs the detail (vlmkit/data/demo_highres.py): a square on a canvas of up to 128 px is
plain, striped or checked in 1 px bands, which one 64 px tile averages away (its colour and side
survive). It trains the AnyRes model and (unless --no-compare-single-tile) the same model with one tile
per image (LLaVA-1.5's pad + resize), with the same encoder, data, plan and seed (vlmkit/tiling_demo.py),
and writes both accuracies, per question type, to runs/llava_next/metrics.json.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlmkit.experiments import tiling_demo  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    tiling_demo.main(argv, __doc__, HERE / "configs" / "llava_next_demo.yaml", "anyres")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlmkit.errors import run_recipe

    run_recipe(main, "recipes/llava_next.py")  # one line per error (--debug: traceback); SIGTERM: checkpoint, exit
