"""Connectors: map encoder patch features [N, P, C] to LLM-width tokens [N, P', D].

Each module in this package registers its connector class in `vlmkit.registry.CONNECTORS`
when imported; every module here is imported, so a new connector is one new file.

The contract of a connector class:
    __init__(self, in_dim: int, out_dim: int, **options)
    forward(self, feats: Tensor[N, P, C], grid: tuple[int, int]) -> Tensor[N, P', D]
    num_tokens(cls_or_self, grid: tuple[int, int], **options) -> int  # P' for a (rows, cols) patch grid
    grid_multiple(**options) -> int  # optional: both grid sides must be multiples of it (default 1);
                                     # NaFlex tiling sizes each image's grid to it
"""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
