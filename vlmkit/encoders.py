"""Vision encoders over transformers: pixels [N, 3, H, W] -> patch features [N, P, C].

Each registered kind says which transformers models it accepts, how many leading special
tokens its sequence carries (CLS, registers; SigLIP has none), and its normalisation.
Models are built with `AutoModel` from a config, so no encoder needs a subclass.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from .config import EncoderConfig
from .registry import ENCODERS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


@dataclass(frozen=True)
class EncoderSpec:
    """What vlmkit needs to know about one family of vision models."""

    model_types: tuple[str, ...]
    """transformers model_type of the vision model (the first is the default for random configs)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    prefix_tokens: Callable[[PretrainedConfig], int]
    """Leading non-patch tokens in the hidden states (CLS, registers)."""
    default_feature_layer: int = -2
    default_image_size: Callable[[PretrainedConfig], int] | None = None


def _image_size(cfg) -> int:
    return _pair(cfg.image_size)[0]


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


def _vision_config(cfg: PretrainedConfig) -> PretrainedConfig:
    """A full CLIP / SigLIP / InternVL config holds the vision part as `vision_config`."""
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
    native_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of one image."""
        g = self.image_size // self.patch_size
        return g, g


def geometry(kind: str, cfg: PretrainedConfig, image_size: int | None = None, mean=None, std=None) -> EncoderGeometry:
    """Input size, patch size and normalisation of a `kind` encoder with transformers config `cfg`."""
    spec: EncoderSpec = ENCODERS.get(kind)
    patch_size = _pair(cfg.patch_size)[0]
    native_size = (spec.default_image_size or _image_size)(cfg)
    size = int(image_size or native_size)
    if size % patch_size:
        raise ValueError(f"image_size {size} is not a multiple of patch size {patch_size}")
    return EncoderGeometry(size, patch_size, native_size, tuple(mean or spec.mean), tuple(std or spec.std))


class VisionEncoder(nn.Module):
    """A transformers vision model plus the facts vlmkit needs: feature layer, prefix tokens, grid."""

    def __init__(self, kind: str, model: nn.Module, feature_layer: int, image_size: int | None = None,
                 mean=None, std=None):
        super().__init__()
        spec: EncoderSpec = ENCODERS.get(kind)
        cfg = model.config
        if cfg.model_type not in spec.model_types:
            raise ValueError(f"encoder {kind!r} expects a model of type {spec.model_types}, got {cfg.model_type!r}")
        self.kind, self.model, self.feature_layer = kind, model, feature_layer
        n_layers = cfg.num_hidden_layers
        if not -(n_layers + 1) <= feature_layer <= n_layers:
            raise ValueError(f"feature_layer {feature_layer} out of range for {n_layers} layers")
        geo = geometry(kind, cfg, image_size, mean, std)
        self.patch_size, self.native_size, self.image_size = geo.patch_size, geo.native_size, geo.image_size
        self.num_prefix_tokens = spec.prefix_tokens(cfg)
        self.mean, self.std = geo.mean, geo.std

    @property
    def out_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of one image."""
        g = self.image_size // self.patch_size
        return g, g

    @property
    def num_tokens(self) -> int:
        """Patch tokens per image after dropping the prefix tokens."""
        return self.grid[0] * self.grid[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, P, C] from the chosen hidden layer, prefix tokens dropped."""
        x = pixel_values.to(self.model.dtype)
        mt = self.model.config.model_type
        if mt == "siglip2_vision_model":  # NaFlex input: patches flattened channel-last, one grid per image
            n, c, h, w = x.shape
            p = self.patch_size
            gh, gw = h // p, w // p
            patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)
            shapes = torch.tensor([[gh, gw]] * n, device=x.device)
            mask = torch.ones(n, gh * gw, dtype=torch.long, device=x.device)
            out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes,
                             output_hidden_states=True)
        else:
            kw = {}
            if mt in ("clip_vision_model", "siglip_vision_model") and self.image_size != self.native_size:
                kw["interpolate_pos_encoding"] = True
            out = self.model(pixel_values=x, output_hidden_states=True, **kw)
        feats = out.hidden_states[self.feature_layer]  # [N, prefix + P, C]
        feats = feats[:, self.num_prefix_tokens:]  # [N, P, C]
        if feats.shape[1] != self.num_tokens:
            raise RuntimeError(f"{self.kind}: expected {self.num_tokens} patch tokens, got {feats.shape[1]}")
        return feats


def _config_from_dict(d: dict, default_type: str) -> PretrainedConfig:
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type", default_type), **d)


def encoder_hf_config(cfg: EncoderConfig) -> PretrainedConfig:
    """The vision model's transformers config (hub id / local dir, or the inline dict); reads no weights."""
    if cfg.path:
        hf_cfg = _vision_config(AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code))
        for k, v in (cfg.config or {}).items():
            setattr(hf_cfg, k, v)
        return hf_cfg
    return _vision_config(_config_from_dict(cfg.config, ENCODERS.get(cfg.name).model_types[0]))


def _stats(cfg: EncoderConfig):
    """image_mean / image_std: the config's, else the checkpoint's preprocessor_config.json (else None)."""
    mean, std = (_read_processor_stats(cfg.path) if cfg.path else None) or (None, None)
    return cfg.image_mean or mean, cfg.image_std or std


def encoder_geometry(cfg: EncoderConfig) -> EncoderGeometry:
    """The encoder's input geometry and normalisation from its config alone (no weights loaded)."""
    return geometry(cfg.name, encoder_hf_config(cfg), cfg.image_size, *_stats(cfg))


def build_encoder(cfg: EncoderConfig) -> VisionEncoder:
    """From a hub id / local dir (`cfg.path`) or from a config with random weights."""
    hf_cfg = encoder_hf_config(cfg)
    model = (AutoModel.from_pretrained(cfg.path, config=hf_cfg, trust_remote_code=cfg.trust_remote_code) if cfg.path
             else AutoModel.from_config(hf_cfg, trust_remote_code=cfg.trust_remote_code))
    return VisionEncoder(cfg.name, model, cfg.feature_layer, cfg.image_size, *_stats(cfg))
