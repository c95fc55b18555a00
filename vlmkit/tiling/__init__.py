"""Image tiling: high-resolution images as several encoder tiles.

    functions.py  the pure functions (AnyRes, InternVL, NaFlex): sizes, grids, tiles, token counts
    spec.py       TileSpec: one class per mode binding a tiling config to the encoder's tile size
                  (split / num_tiles / num_tokens / pack)
    counter.py    ImageTokenCounter: the one place that counts an image's tokens

`from vlmkit import tiling as T; T.anyres_grid(...)` reads the pure functions, as before the package.
"""
from .functions import *  # noqa: F401,F403
from .functions import __all__  # noqa: F401
