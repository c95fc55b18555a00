"""Vision encoders over transformers: pixels [N, 3, H, W] -> patch features [N, P, C].

Every kind in the ENCODERS registry answers two questions from an EncoderConfig: `geometry(cfg)`
(input size, normalisation, patch grid and width, from the config alone, for the data side) and
`build(cfg)` (the module). Kinds:

- clip / siglip2 / dinov2 / internvit: an EncoderSpec naming the transformers model types it accepts,
  its leading special tokens (CLS, registers; SigLIP has none) and its normalisation.
- hf: any vision backbone `AutoModel` loads (ViT, DeiT, BEiT, Swin, ConvNeXt, SAM's vision encoder, ...).
  Where its patch tokens sit (a token sequence after k special tokens, a channel-first or a channel-last
  feature map, one per stage for hierarchical models) is read from one forward on the meta device.
- fused: several encoders side by side on one image, features concatenated per patch (prismatic's
  DINOv2 + SigLIP); the data side normalises once, for the first member.

Models are built with `AutoModel` from a config, so no encoder needs a subclass. An input size other
than the native one interpolates the position embeddings (`interpolate_pos_encoding=True` for every
model whose forward accepts it; DINOv2 and InternViT always interpolate; ConvNeXt has no position
table); a model that cannot run at the size asked for is refused when its geometry is read.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from ..config import EncoderConfig, FusedEncoderConfig
from ..registry import ENCODERS

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def _image_size(cfg) -> int:
    return _pair(cfg.image_size)[0]


# ---- where the patch tokens are -----------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """Where one model's patch tokens sit in its output and how they become [N, P, C]."""

    source: str
    """Output field holding the per-layer / per-stage states: hidden_states | reshaped_hidden_states."""
    layer: int
    """Index into that field (the resolved feature_layer)."""
    form: str
    """seq: [N, prefix + P, C]; nchw: [N, C, H, W]; nhwc: [N, H, W, C] (both flattened row-major)."""
    prefix: int
    """Leading non-patch tokens of a seq (CLS, distillation, registers); 0 for feature maps."""
    grid: tuple[int, int]
    width: int

    def select(self, out) -> torch.Tensor:
        """The model's output -> patch tokens [N, P, C]."""
        states = getattr(out, self.source, None)
        if states is None:
            raise RuntimeError(f"the vision model returned no {self.source} (output_hidden_states=True)")
        t = states[self.layer]
        if self.form == "seq":
            return t[:, self.prefix:]  # [N, P, C]
        if self.form == "nchw":
            return t.flatten(2).transpose(1, 2)  # [N, C, H, W] -> [N, H*W, C]
        return t.flatten(1, 2)  # [N, H, W, C] -> [N, H*W, C]


def _check_layer(kind: str, layer: int, n_states: int, what: str = "layers") -> None:
    """hidden_states has n_states entries: the embeddings, then one per layer (stage)."""
    if not -n_states <= layer < n_states:
        raise ValueError(f"{kind}: feature_layer {layer} out of range for {n_states - 1} {what} "
                         f"(hidden_states has {n_states} entries: valid {-n_states}..{n_states - 1})")


def _accepts_interpolate(model_or_cls) -> bool:
    """Whether the model's forward takes `interpolate_pos_encoding` (ViT, DeiT, BEiT, CLIP, SigLIP, Swin)."""
    return "interpolate_pos_encoding" in inspect.signature(model_or_cls.forward).parameters


# ---- kinds --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """What vlmkit needs to know about one family of transformers vision models."""

    model_types: tuple[str, ...]
    """transformers model_type of the vision model (the first is the default for random configs);
    empty: any model AutoModel builds that no named kind claims (kind `hf`)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    prefix_tokens: Callable[[PretrainedConfig], int] | None = None
    """Leading non-patch tokens in the hidden states (CLS, registers); None: read from a meta-device
    forward (the model's output says where its patch tokens are)."""
    default_feature_layer: int | None = -2
    """feature_layer when the config gives none; None (hf): -2 for a plain ViT-like model, -1 (the last
    stage) for a hierarchical one (Swin, ConvNeXt)."""
    default_image_size: Callable[[PretrainedConfig], int] | None = None

    def check_model_type(self, kind: str, model_type: str) -> None:
        if self.model_types and model_type not in self.model_types:
            raise ValueError(f"encoder {kind!r} expects a model of type {self.model_types}, got {model_type!r}")
        if not self.model_types:
            owner = next((k for k in ENCODERS.names() if isinstance(ENCODERS.get(k), EncoderSpec)
                          and model_type in ENCODERS.get(k).model_types), None)
            if owner is not None:
                raise ValueError(f"encoder {kind!r}: model type {model_type!r} has its own encoder kind {owner!r}; "
                                 f"use name: {owner}")

    def native_size(self, cfg: PretrainedConfig) -> int | None:
        if self.default_image_size is not None:
            return self.default_image_size(cfg)
        return _image_size(cfg) if getattr(cfg, "image_size", None) else None

    def geometry(self, cfg: EncoderConfig) -> EncoderGeometry:
        return geometry(cfg.name, encoder_hf_config(cfg), cfg.image_size, *_stats(cfg),
                        feature_layer=cfg.feature_layer, trust_remote_code=cfg.trust_remote_code)

    def build(self, cfg: EncoderConfig) -> VisionEncoder:
        hf_cfg = encoder_hf_config(cfg)
        model = (load_vision_model(cfg.path, hf_cfg, cfg.trust_remote_code) if cfg.path
                 else AutoModel.from_config(hf_cfg, trust_remote_code=cfg.trust_remote_code))
        if cfg.position_init_std is not None:
            redraw_position_table(cfg.name, model, cfg.position_init_std)
        return VisionEncoder(cfg.name, model, cfg.feature_layer, cfg.image_size, *_stats(cfg),
                             trust_remote_code=cfg.trust_remote_code)


ENCODERS.register("clip")(EncoderSpec(("clip_vision_model",), CLIP_MEAN, CLIP_STD, lambda c: 1))
ENCODERS.register("siglip2")(EncoderSpec(
    ("siglip2_vision_model", "siglip_vision_model"), HALF, HALF, lambda c: 0,
    # NaFlex SigLIP 2 has no image_size: a square of sqrt(num_patches) patches is its native size
    default_image_size=lambda c: getattr(c, "image_size", None) or int(math.isqrt(c.num_patches)) * c.patch_size))
ENCODERS.register("dinov2")(EncoderSpec(
    ("dinov2", "dinov2_with_registers"), IMAGENET_MEAN, IMAGENET_STD,
    lambda c: 1 + int(getattr(c, "num_register_tokens", 0) or 0),
    # DINOv2 checkpoints say 518 (their position table); their processor crops to 224
    default_image_size=lambda c: min(_image_size(c), 224)))
ENCODERS.register("internvit")(EncoderSpec(("internvl_vision",), IMAGENET_MEAN, IMAGENET_STD, lambda c: 1,
                                           default_feature_layer=-1))
# any other vision backbone: normalisation from its preprocessor_config.json, else ImageNet's
ENCODERS.register("hf")(EncoderSpec((), IMAGENET_MEAN, IMAGENET_STD, None, default_feature_layer=None))


def position_table(model: nn.Module) -> torch.Tensor | None:
    """The learned absolute position table of a transformers vision model (`embeddings.position_embedding`
    as an nn.Embedding in CLIP / SigLIP, `embeddings.position_embeddings` as a parameter in ViT / DINOv2 /
    InternViT); None for a model without one (Swin, ConvNeXt)."""
    emb = getattr(getattr(model, "vision_model", model), "embeddings", None)  # CLIP / SigLIP wrap a vision_model
    table = getattr(emb, "position_embeddings", None)
    if table is None and isinstance(getattr(emb, "position_embedding", None), nn.Embedding):
        table = emb.position_embedding.weight
    return table if isinstance(table, torch.Tensor) else None


def redraw_position_table(kind: str, model: nn.Module, std: float) -> None:
    """Random weights: the position table drawn from N(0, std) (encoder.position_init_std)."""
    table = position_table(model)
    if table is None:
        raise ValueError(f"encoder {kind!r}: position_init_std is set, but {type(model).__name__} has no learned "
                         f"absolute position table (embeddings.position_embedding(s))")
    with torch.no_grad():
        nn.init.normal_(table, mean=0.0, std=float(std))


def _vision_config(cfg: PretrainedConfig) -> PretrainedConfig:
    """A full CLIP / SigLIP / InternVL / SAM config holds the vision part as `vision_config`."""
    return getattr(cfg, "vision_config", None) or cfg


def _read_processor_stats(path: str):
    """image_mean / image_std from a checkpoint's preprocessor_config.json, if it has one."""
    try:
        from transformers.utils import cached_file

        f = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None
    if not f:
        return None
    with open(f) as fh:
        d = json.load(fh)
    if "image_mean" in d and "image_std" in d:
        return tuple(d["image_mean"]), tuple(d["image_std"])
    return None


@dataclass(frozen=True)
class EncoderGeometry:
    """What the data side needs from an encoder; known from its config alone, without weights."""

    image_size: int
    patch_size: int
    """Pixels per token side (for hierarchical models: the total stride of the chosen stage)."""
    native_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: tuple[int, int]
    """Patch grid (rows, cols) of one image."""
    width: int
    """Channels of each patch token (sum of the members' for a fused encoder)."""
    layout: TokenLayout | None = None
    """Where a single model's tokens are (None for a fused encoder)."""
    naflex_patches: int | None = None
    """A NaFlex SigLIP 2 model (siglip2_vision_model): its num_patches (a sqrt x sqrt position table, resized to
    each image's grid; the default max_num_patches of tiling mode naflex). None for fixed-size models."""


# ---- meta-device probe (kind hf) ----------------------------------------------------------------
_PROBES: dict[tuple, dict] = {}


def _probe(cfg: PretrainedConfig, size: tuple[int, int], interpolate: bool,
           trust_remote_code: bool = False) -> dict[str, list[tuple[int, ...]] | None]:
    """Output shapes of the model built from `cfg` on the meta device, for one [1, 3, H, W] input (cached)."""
    key = (cfg.to_json_string(use_diff=False), size, interpolate)
    if key not in _PROBES:
        with torch.device("meta"):
            model = AutoModel.from_config(cfg, trust_remote_code=trust_remote_code)
        kw = {"interpolate_pos_encoding": True} if interpolate else {}
        with torch.no_grad():
            out = model.eval()(pixel_values=torch.empty(1, 3, *size, device="meta"), output_hidden_states=True, **kw)
        shapes = {}
        for field in ("hidden_states", "reshaped_hidden_states"):
            states = getattr(out, field, None)
            shapes[field] = [tuple(t.shape) for t in states] if states else None
        _PROBES[key] = shapes
    return _PROBES[key]


def _hf_layout(cfg: PretrainedConfig, size: int, native: int, feature_layer: int | None,
               trust_remote_code: bool = False) -> TokenLayout:
    """Where any AutoModel vision backbone puts its patch tokens at input `size`, from meta-device forwards.

    Hierarchical models' `reshaped_hidden_states` (Swin: [N, C, H, W] per stage) are preferred to their
    flattened hidden_states. A token sequence [N, L, C] holds P = (size / patch_size)^2 patches after
    L - P special tokens (ViT: CLS; DeiT: CLS + distillation; registers); a 4-D map is channel-first or
    channel-last, told apart by a second forward at twice the width (or by its shape when that fails).
    """
    mt = cfg.model_type
    model_cls = _model_class(cfg, trust_remote_code)
    interpolate = size != native and _accepts_interpolate(model_cls)
    try:
        probe = _probe(cfg, (size, size), interpolate, trust_remote_code)
    except Exception as e:
        if size != native:
            raise ValueError(f"encoder hf ({mt}) cannot run at image_size {size} (native {native}): "
                             f"{'its forward has no interpolate_pos_encoding and ' if not interpolate else ''}"
                             f"it fails there: {e}") from e
        raise ValueError(f"encoder hf ({mt}): a forward on pixel_values [1, 3, {size}, {size}] fails, so its "
                         f"patch grid cannot be read: {e}") from e
    source = "reshaped_hidden_states" if probe["reshaped_hidden_states"] else "hidden_states"
    shapes = probe[source]
    if not shapes:
        raise ValueError(f"encoder hf ({mt}): the model returns no hidden_states; vlmkit needs them to pick a layer")
    staged = len({s[1:] for s in shapes}) > 1  # per-stage states change shape (Swin, ConvNeXt)
    layer = (-1 if staged else -2) if feature_layer is None else feature_layer
    _check_layer(f"encoder hf ({mt})", layer, len(shapes), "stages" if staged else "layers")
    s = shapes[layer]
    if len(s) == 3:
        if staged:
            raise ValueError(f"encoder hf ({mt}): hidden_states[{layer}] is a token sequence {s} of a hierarchical "
                             "model without reshaped_hidden_states; its patch grid cannot be told")
        if getattr(cfg, "patch_size", None) is None:
            raise ValueError(f"encoder hf ({mt}): token sequence {s} but the config has no patch_size")
        p = _pair(cfg.patch_size)[0]
        grid = (size // p, size // p)
        prefix = s[1] - grid[0] * grid[1]
        if prefix < 0:
            raise ValueError(f"encoder hf ({mt}): hidden_states[{layer}] has {s[1]} tokens, fewer than the "
                             f"{grid[0]}x{grid[1]} patches of a {size}px input at patch size {p}")
        return TokenLayout(source, layer, "seq", prefix, grid, s[2])
    if len(s) != 4:
        raise ValueError(f"encoder hf ({mt}): {source}[{layer}] has shape {s}; expected [N, L, C] or a 4-D map")
    form = None
    try:  # twice the width: the axis that doubles is the map's width
        wide = _probe(cfg, (size, 2 * size), _accepts_interpolate(model_cls), trust_remote_code)[source][layer]
        form = "nchw" if wide[3] != s[3] and wide[2] == s[2] else "nhwc" if wide[2] != s[2] and wide[3] == s[3] else None
    except Exception:
        pass
    if form is None:  # a fixed-size model (SAM): the square map's two equal axes are its rows and columns
        form = ("nhwc" if s[1] == s[2] != s[3] else "nchw" if s[2] == s[3] != s[1] else None)
    if form is None:
        raise ValueError(f"encoder hf ({mt}): cannot tell whether {source}[{layer}] {s} is channel-first or "
                         "channel-last; choose another feature_layer or image_size")
    grid, width = ((s[2], s[3]), s[1]) if form == "nchw" else ((s[1], s[2]), s[3])
    return TokenLayout(source, layer, form, 0, grid, width)


def _model_class(cfg: PretrainedConfig, trust_remote_code: bool = False) -> type:
    """The class AutoModel builds for `cfg` (without building it)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(cfg)]
    except KeyError:
        with torch.device("meta"):
            return type(AutoModel.from_config(cfg, trust_remote_code=trust_remote_code))


def geometry(kind: str, cfg: PretrainedConfig, image_size: int | None = None, mean=None, std=None,
             feature_layer: int | None = None, trust_remote_code: bool = False) -> EncoderGeometry:
    """Input size, normalisation, patch grid and width of a `kind` encoder with transformers config `cfg`
    (no weights read). `feature_layer` None: the kind's default."""
    spec = ENCODERS.get(kind)
    if not isinstance(spec, EncoderSpec):
        raise ValueError(f"encoder {kind!r} is not a single transformers model; use encoder_geometry(config)")
    spec.check_model_type(kind, cfg.model_type)
    native = spec.native_size(cfg)
    size = int(image_size or native or 0)
    if not size:
        raise ValueError(f"encoder {kind} ({cfg.model_type}): its config has no image_size; set encoder.image_size")
    native = native or size
    if spec.prefix_tokens is None:
        layout = _hf_layout(cfg, size, native, feature_layer, trust_remote_code)
        patch = max(1, size // layout.grid[1])
    else:
        patch = _pair(cfg.patch_size)[0]
        if size % patch:
            raise ValueError(f"image_size {size} is not a multiple of patch size {patch}")
        layer = spec.default_feature_layer if feature_layer is None else feature_layer
        _check_layer(kind, layer, cfg.num_hidden_layers + 1)
        layout = TokenLayout("hidden_states", layer, "seq", spec.prefix_tokens(cfg), (size // patch, size // patch),
                             cfg.hidden_size)
    naflex = int(cfg.num_patches) if cfg.model_type == "siglip2_vision_model" else None
    return EncoderGeometry(size, patch, native, tuple(mean or spec.mean), tuple(std or spec.std), layout.grid,
                           layout.width, layout, naflex)


class _Encoder(nn.Module):
    """What every encoder answers from its geometry: feature width, patch grid, tokens per image."""

    geometry: EncoderGeometry

    @property
    def out_dim(self) -> int:
        return self.geometry.width

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of one image."""
        return self.geometry.grid

    @property
    def num_tokens(self) -> int:
        """Patch tokens per image after dropping the prefix tokens."""
        return self.grid[0] * self.grid[1]


class VisionEncoder(_Encoder):
    """A transformers vision model plus the facts vlmkit needs: feature layer, token layout, grid."""

    def __init__(self, kind: str, model: nn.Module, feature_layer: int | None = None, image_size: int | None = None,
                 mean=None, std=None, trust_remote_code: bool = False):
        super().__init__()
        cfg = model.config
        geo = geometry(kind, cfg, image_size, mean, std, feature_layer, trust_remote_code)
        self.kind, self.model, self.geometry = kind, model, geo
        self.layout = geo.layout
        self.feature_layer = geo.layout.layer
        self.patch_size, self.native_size, self.image_size = geo.patch_size, geo.native_size, geo.image_size
        self.num_prefix_tokens = geo.layout.prefix
        self.mean, self.std = geo.mean, geo.std
        self.interpolate = self.image_size != self.native_size and _accepts_interpolate(model)
        staged = geo.layout.source == "reshaped_hidden_states" or geo.layout.form == "nchw"
        # why stage mode `partial` cannot pick this encoder's last blocks (None: it can)
        self.no_partial = (f"a hierarchical {cfg.model_type} backbone (its hidden states are stages, not blocks)"
                           if staged else None)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    def saved_config(self, cfg: EncoderConfig) -> EncoderConfig:
        """`cfg` made self-contained for a saved model: the transformers config inline, sizes and stats fixed."""
        return replace(cfg, path=None, config=self.model.config.to_dict(), feature_layer=self.feature_layer,
                       image_size=self.image_size, image_mean=list(self.mean), image_std=list(self.std))

    def forward(self, pixel_values: torch.Tensor, spatial_shapes=None) -> torch.Tensor:
        """[N, 3, H, W] -> [N, P, C] from the chosen hidden layer (stage), prefix tokens dropped.

        NaFlex SigLIP 2 also takes patch sequences: `pixel_values` [N, L, p*p*3] (each image's rows * cols
        patches first, then zero padding) with `spatial_shapes` [N, 2] (rows, cols per image) -> [N, L, C],
        whose positions past rows * cols are padding (masked out of attention; the caller drops them)."""
        x = pixel_values.to(self.model.dtype)
        if x.dim() == 3:
            return self._forward_patches(x, spatial_shapes)
        if self.model_type == "siglip2_vision_model":  # a square image: its patches, one full grid per image
            n, c, h, w = x.shape
            p = self.patch_size
            gh, gw = h // p, w // p
            patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)
            shapes = torch.tensor([[gh, gw]] * n, device=x.device)
            mask = torch.ones(n, gh * gw, dtype=torch.long, device=x.device)
            out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes,
                             output_hidden_states=True)
        else:
            kw = {"interpolate_pos_encoding": True} if self.interpolate else {}
            out = self.model(pixel_values=x, output_hidden_states=True, **kw)
        feats = self.layout.select(out)  # [N, P, C]
        if feats.shape[1] != self.num_tokens:
            raise RuntimeError(f"{self.kind}: expected {self.num_tokens} patch tokens, got {feats.shape[1]}")
        return feats

    def _forward_patches(self, x: torch.Tensor, spatial_shapes) -> torch.Tensor:
        """NaFlex: padded patch sequences [N, L, p*p*3] + (rows, cols) per image -> [N, L, C]."""
        if self.model_type != "siglip2_vision_model":
            raise ValueError(f"encoder {self.kind} ({self.model_type}): patch sequences {tuple(x.shape)} are NaFlex "
                             "input, which only a siglip2_vision_model takes; give images [N, 3, H, W]")
        n, length, dim = x.shape
        p = self.patch_size
        if spatial_shapes is None:
            raise ValueError("NaFlex patch sequences need spatial_shapes: (rows, cols) of each image")
        shapes = torch.as_tensor(spatial_shapes, dtype=torch.long).reshape(-1, 2).to(x.device)  # [N, 2]
        counts = shapes[:, 0] * shapes[:, 1]  # [N]
        if dim != p * p * 3 or shapes.shape[0] != n or bool((shapes < 1).any()) or (n and int(counts.max()) > length):
            raise ValueError(f"NaFlex input: patches {tuple(x.shape)} need [N, L, {p * p * 3}] (patch {p}) with one "
                             f"(rows, cols) per image and rows * cols <= L; spatial_shapes {shapes.tolist()}")
        mask = (torch.arange(length, device=x.device)[None] < counts[:, None]).long()  # [N, L], 1 = real patch
        out = self.model(pixel_values=x, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=True)
        return self.layout.select(out)  # [N, L, C]


# ---- fused --------------------------------------------------------------------------------------
def fuse_geometry(members: list[tuple[str, EncoderGeometry]]) -> EncoderGeometry:
    """(kind, geometry) of each member -> the fused encoder's: the first member's input size and
    normalisation, the common patch grid, the summed width. Grids that differ are an error."""
    if len(members) < 2:
        raise ValueError(f"a fused encoder needs at least 2 members, got {len(members)}")
    first = members[0][1]
    if any(g.grid != first.grid for _, g in members):
        rows = "; ".join(f"{k} at image_size {g.image_size} / patch {g.patch_size} -> {g.grid[0]}x{g.grid[1]}"
                         for k, g in members)
        hint = ", ".join(f"{k} image_size {first.grid[0] * g.patch_size}" for k, g in members[1:]
                         if g.grid != first.grid)
        raise ValueError(f"fused encoder: the members' patch grids differ ({rows}); each member's features must "
                         f"cover the same {first.grid[0]}x{first.grid[1]} grid (e.g. {hint})")
    return EncoderGeometry(first.image_size, first.patch_size, first.native_size, first.mean, first.std, first.grid,
                           sum(g.width for _, g in members))


class FusedEncoder(_Encoder):
    """Several encoders side by side on one image: features concatenated per patch along channels.

    Input: pixels normalised for the first member, at its size. Each other member gets its own
    normalisation by an exact affine map (x * std_0 + mean_0 - mean_k) / std_k and, when its input size
    differs, a bicubic (antialiased) resize to it; so DINOv2/14 at 224 and SigLIP/16 at 256 fuse (16x16).
    """

    kind = "fused"
    no_partial = "a fused encoder (each member has its own blocks and feature layer)"

    def __init__(self, members: list[VisionEncoder]):
        super().__init__()
        self.geometry = fuse_geometry([(m.kind, m.geometry) for m in members])
        self.members = nn.ModuleList(members)
        g = self.geometry
        self.patch_size, self.native_size, self.image_size, self.mean, self.std = (
            g.patch_size, g.native_size, g.image_size, g.mean, g.std)

    @property
    def model_type(self) -> str:
        return "+".join(m.model_type for m in self.members)

    def saved_config(self, cfg: FusedEncoderConfig) -> FusedEncoderConfig:
        return replace(cfg, members=[m.saved_config(c) for m, c in zip(self.members, cfg.members)])

    def member_input(self, k: int, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels normalised for member 0 -> member k's input [N, 3, S_k, S_k] (its stats, its size)."""
        m = self.members[k]
        x = pixel_values
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32 for the re-normalisation and resize
        if (m.mean, m.std) != (self.mean, self.std):

            def col(v):
                return torch.tensor(v, dtype=dtype, device=x.device).view(1, 3, 1, 1)

            x = (x.to(dtype) * col(self.std) + col(self.mean) - col(m.mean)) / col(m.std)
        if x.shape[-2:] != (m.image_size, m.image_size):
            x = F.interpolate(x.to(dtype), size=(m.image_size, m.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, P, sum C_k]."""
        feats = [m(self.member_input(k, pixel_values)) for k, m in enumerate(self.members)]  # [N, P, C_k] each
        return torch.cat([f.to(feats[0].dtype) for f in feats], dim=-1)


@dataclass(frozen=True)
class FusedSpec:
    """The `fused` kind: a FusedEncoderConfig, whose `members` are EncoderConfigs of other kinds."""

    def geometry(self, cfg: FusedEncoderConfig) -> EncoderGeometry:
        return fuse_geometry([(m.name, encoder_geometry(m)) for m in cfg.members])

    def build(self, cfg: FusedEncoderConfig) -> FusedEncoder:
        return FusedEncoder([build_encoder(m) for m in cfg.members])


ENCODERS.register("fused")(FusedSpec())


# ---- from an EncoderConfig ----------------------------------------------------------------------
def _checkpoint_keys(path: str) -> dict[str, str]:
    """Weight name -> the safetensors file holding it, for a local dir or hub id (single file or sharded)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        with open(index) as f:
            folder = os.path.dirname(index)
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    if not single:
        return {}
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def load_vision_model(path: str, hf_cfg: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """The vision model's pretrained weights from `path`: its own checkpoint, or the vision tower inside a
    composite one (e.g. a transformers-native `-hf` InternVL / Llava checkpoint, whose tower sits under
    `model.vision_tower.`), found as the one prefix under which every weight the tower needs is stored.
    Weights that are nowhere in the checkpoint are an error, never a silently random encoder."""
    from safetensors import safe_open

    model, info = AutoModel.from_pretrained(path, config=hf_cfg, trust_remote_code=trust_remote_code,
                                            output_loading_info=True)
    missing = list(info.get("missing_keys") or [])
    if not missing:
        return model
    keys = _checkpoint_keys(path)
    want = missing  # what transformers found under the model's own names stays as loaded
    probe = missing[0]
    prefixes = sorted({k[: len(k) - len(probe)] for k in keys if k.endswith("." + probe)})
    found = [p for p in prefixes if all(p + w in keys for w in want)]
    if len(found) != 1:
        raise ValueError(
            f"encoder weights from {path}: {len(missing)} weight(s) of the {hf_cfg.model_type} model are not in "
            f"the checkpoint (first: {missing[:3]}); no single prefix holds the whole vision tower "
            f"(candidates: {prefixes[:5] or 'none'}). Point encoder.path at the vision model itself, or at a "
            "checkpoint that contains it")
    prefix, state = found[0], {}
    for w in want:
        with safe_open(keys[prefix + w], "pt") as f:
            state[w] = f.get_tensor(prefix + w)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return model


def _config_from_dict(d: dict, default_type: str | None, kind: str) -> PretrainedConfig:
    d = dict(d)
    model_type = d.pop("model_type", default_type)
    if not model_type:
        raise ValueError(f"encoder {kind}: `config` needs model_type (the transformers model type, e.g. vit)")
    return AutoConfig.for_model(model_type, **d)


def encoder_hf_config(cfg: EncoderConfig) -> PretrainedConfig:
    """The vision model's transformers config (hub id / local dir, or the inline dict); reads no weights."""
    spec = ENCODERS.get(cfg.name)
    if not isinstance(spec, EncoderSpec):
        raise ValueError(f"encoder {cfg.name!r} is not a single transformers model (see its members)")
    if cfg.path:
        hf_cfg = _vision_config(AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code))
        for k, v in (cfg.config or {}).items():
            setattr(hf_cfg, k, v)
        return hf_cfg
    if cfg.name == "siglip2" and "model_type" not in (cfg.config or {}):
        _note_naflex_default(cfg.config)
    return _vision_config(_config_from_dict(cfg.config, (spec.model_types or (None,))[0], cfg.name))


_NOTED: set[str] = set()


def _note_naflex_default(config: dict | None) -> None:
    """`name: siglip2` with an inline `config:` and no model_type builds the NaFlex model (siglip2_vision_model),
    which `vlmkit export` refuses: said once per process and config, at info level."""
    key = json.dumps(config, sort_keys=True, default=str)
    if key in _NOTED:
        return
    _NOTED.add(key)
    logger.info("encoder siglip2 with an inline config and no model_type: building the NaFlex SigLIP 2 "
                "(siglip2_vision_model), which vlmkit export refuses; add model_type: siglip_vision_model to the "
                "config for the fixed-resolution SigLIP that exports to Llava")


def _stats(cfg: EncoderConfig):
    """image_mean / image_std: the config's, else the checkpoint's preprocessor_config.json (else None)."""
    mean, std = (_read_processor_stats(cfg.path) if cfg.path else None) or (None, None)
    return cfg.image_mean or mean, cfg.image_std or std


def encoder_geometry(cfg: EncoderConfig | FusedEncoderConfig) -> EncoderGeometry:
    """The encoder's input geometry and normalisation from its config alone (no weights loaded)."""
    return ENCODERS.get(cfg.name).geometry(cfg)


def build_encoder(cfg: EncoderConfig | FusedEncoderConfig) -> VisionEncoder | FusedEncoder:
    """From a hub id / local dir (`cfg.path`) or from a config with random weights (fused: each member so)."""
    return ENCODERS.get(cfg.name).build(cfg)
