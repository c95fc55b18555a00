"""Building a VLM from its config or a saved folder, and the Processor that goes with it.

Builders are functions; the module (`VLM`, in vlm.py) takes parts. `cls` is the class to assemble (VLM).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import init_empty_weights

from ..config import ModelConfig
from ..data.images import ImageTransform
from ..data.processor import Processor
from ..errors import load_file
from ..registry import CONNECTORS
from ..security import read_model_folder
from ..tiling.counter import ImageTokenCounter
from .encoders import build_encoder, encoder_geometry
from .llm import add_image_token, build_llm, load_tokenizer, prepare_quantized
from .lora import load_adapters
from .serialization import CONFIG_NAME, WEIGHTS_NAME, assign_weights


def resolve_model_dir(path) -> Path:
    """A model folder, or a run folder holding its final model under model/."""
    path = Path(path)
    return path / "model" if (path / "model" / CONFIG_NAME).exists() else path


def _tokenizer(config: ModelConfig, source: str):
    """The tokenizer with the image (and, with model.video, the video) placeholder added before the LLM is sized."""
    tok = load_tokenizer(source, config.llm.image_token, trust_remote_code=config.llm.trust_remote_code)
    if config.video is not None:
        add_image_token(tok, config.video.token)
    return tok


def _connector(config: ModelConfig, encoder, llm):
    return CONNECTORS.get(config.connector.name)(encoder.out_dim, llm.config.hidden_size, **config.connector.options)


def build(cls, config: ModelConfig, dtype: torch.dtype | None = None):
    """Pretrained parts from hub ids / local dirs, random ones from their configs."""
    encoder = build_encoder(config.encoder)
    tokenizer = _tokenizer(config, config.llm.tokenizer or config.llm.path)
    llm = build_llm(config.llm, tokenizer, dtype)
    model = cls(config, encoder, _connector(config, encoder, llm), llm, tokenizer)
    if dtype is not None:
        model.to(dtype)
    if config.llm.quantization is not None:  # after the cast: its norms stay fp32
        prepare_quantized(model.llm)
    return model


def load(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Load a folder written by `save_pretrained`: parts rebuilt from config.json, weights from safetensors.
    Code shipped in the folder runs only with `trust_remote_code` (the folder's own flags are ignored)."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{path} is not a vlmkit model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    saved, config = read_model_folder(path, trust_remote_code)
    config.llm.tokenizer = str(path)
    tokenizer = _tokenizer(config, str(path))
    with init_empty_weights(include_buffers=False):
        encoder = build_encoder(config.encoder)
        llm = build_llm(config.llm, tokenizer)
        model = cls(config, encoder, _connector(config, encoder, llm), llm, tokenizer)
    assign_weights(model, load_file(str(path / WEIGHTS_NAME)), f"{path / WEIGHTS_NAME}: weights do not match the config")
    load_adapters(model, path, saved.get("adapters", {}))
    if dtype is not None:
        model.to(dtype)
    return model


# ---- the processor ----------------------------------------------------------------------------
def make_processor(config: ModelConfig, tokenizer, geometry, count_image_tokens: ImageTokenCounter,
                   template: str | None = None) -> Processor:
    """The one way a Processor is built. `geometry`: the encoder (a VisionEncoder, or an EncoderGeometry
    read from its config): image_size, mean, std."""
    transform = ImageTransform(geometry.image_size, geometry.mean, geometry.std, config.encoder.image_aspect)
    image_token_id = add_image_token(tokenizer, config.llm.image_token)
    video = config.video
    return Processor(tokenizer, transform, config.llm.image_token, image_token_id, count_image_tokens,
                     template or config.template, getattr(count_image_tokens, "tiling", None),
                     None if video is None else video.token,
                     None if video is None else add_image_token(tokenizer, video.token))


def processor_for(model, template: str | None = None) -> Processor:
    """The Processor of a built model."""
    return make_processor(model.config, model.tokenizer, model.encoder, model.count_image_tokens, template)


def build_processor(config: ModelConfig, template: str | None = None, tokenizer=None) -> Processor:
    """The Processor `build_vlm(config).processor()` would give, without building the model: only
    the tokenizer, the encoder's transformers config (AutoConfig, no weights) and the connector's
    token count are read. Seconds instead of minutes for a 7B model (`vlmkit check-data`)."""
    if tokenizer is None:
        tokenizer = _tokenizer(config, config.llm.tokenizer or config.llm.path)
    geo = encoder_geometry(config.encoder)
    counter = ImageTokenCounter.for_config(geo.grid, config.connector, config.tiling, geo.image_size, geo,
                                           config.video)
    return make_processor(config, tokenizer, geo, counter, template)


def load_processor(path: str | os.PathLike, template: str | None = None, trust_remote_code: bool = False) -> Processor:
    """The Processor of a folder written by `save_pretrained` (config.json + tokenizer; weights unread).
    The folder's own code runs only with `trust_remote_code` (vlmkit.security)."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} is not a vlmkit model folder (no {CONFIG_NAME})")
    _, config = read_model_folder(path, trust_remote_code)
    config.llm.tokenizer = str(path)
    return build_processor(config, template)
