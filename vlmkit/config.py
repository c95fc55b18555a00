"""Typed configs: model parts, data, stages and training. Loaded from YAML or dicts, validated.

A config file has four sections, each a dataclass below:

    model:   {encoder: ..., connector: ..., llm: ..., template: ...}
    stages:  [{name, train: {component: mode}, data: {...}, lr, ...}, ...]
    train:   {output_dir, mixed_precision, ...}
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

MODES = ("frozen", "full", "lora", "partial")
COMPONENTS = ("encoder", "connector", "llm")
"""The parts every model has; a model may add more (e.g. `image_newline`), checked against the model."""


class ConfigError(ValueError):
    pass


@dataclass
class EncoderConfig:
    """A vision encoder: a registered kind plus a hub id / local dir, or a config for random weights.
    `EncoderConfig(name="fused", members=[...])` (and from_dict with name fused) gives a FusedEncoderConfig."""

    name: str = "clip"
    """Registry key: clip | siglip2 | dinov2 | internvit | hf (any AutoModel vision backbone) | fused
    (FusedEncoderConfig)."""
    path: str | None = None
    """Hub id or local directory (save_pretrained layout). None: random weights from `config`."""
    config: dict[str, Any] | None = None
    """transformers config kwargs used when `path` is None (or to override a loaded config). Its `model_type`
    picks the transformers model; without one the kind's first: for `siglip2` that is the NaFlex model
    (siglip2_vision_model, which export refuses; an info line says so): write `model_type: siglip_vision_model`
    for the fixed-resolution SigLIP."""
    position_init_std: float | None = None
    """Random weights only (`path` None): draw the position table from N(0, std) instead of the model's own
    init. A frozen random encoder (the stand-ins of the demos and ablations) tells the LLM where a patch is
    only through that table; transformers initialises InternViT's to zeros (OpenGVLab's code draws it at
    random; CLIP's init uses std 0.02)."""
    feature_layer: int | None = None
    """Index into hidden_states; None: the kind's default (-2, LLaVA-1.5's second-to-last layer; internvit -1;
    hf: -2 for a ViT-like model, -1 = the last stage for a hierarchical one such as Swin or ConvNeXt)."""
    image_aspect: str = "pad"
    """pad: pad to a square with the mean colour (LLaVA-1.5); resize: stretch to the square."""
    image_size: int | None = None
    """Input resolution; None: the encoder's own (position embeddings are interpolated otherwise)."""
    image_mean: list[float] | None = None
    """Normalisation; None: the checkpoint's preprocessor_config.json, else the family's default."""
    image_std: list[float] | None = None
    trust_remote_code: bool = False
    """Let transformers run Python code shipped with a hub checkpoint (never on unless asked)."""

    def __new__(cls, *args, **kwargs):
        name = args[0] if args else kwargs.get("name", "clip")
        if "members" in kwargs and name != "fused":
            raise ConfigError(f"encoder.members is only for name: fused (got name {name!r})")
        if cls is EncoderConfig and name == "fused":
            if len(args) > 1:
                raise ConfigError("encoder fused: give `members` (and image_aspect, trust_remote_code) by name")
            return FusedEncoderConfig(**FusedEncoderConfig._own_keys(dict(kwargs, name=name)))
        return super().__new__(cls)

    def __post_init__(self):
        _check_shared_encoder_fields(self)
        if self.path is None and self.config is None:
            raise ConfigError("encoder: give `path` (hub id or local dir) or `config` (random weights)")
        if self.position_init_std is not None:
            if self.path is not None:
                raise ConfigError(f"encoder.position_init_std re-draws a random encoder's position table; with "
                                  f"path {self.path!r} it would overwrite trained weights (drop one of them)")
            if not isinstance(self.position_init_std, (int, float)) or not self.position_init_std > 0:
                raise ConfigError(f"encoder.position_init_std must be a number > 0, got {self.position_init_std!r}")

    @classmethod
    def _from_dict_class(cls, data: dict, where: str) -> tuple[type, dict]:
        """from_dict's hook: FusedEncoderConfig for name fused. Folders saved before the split carry `members:
        null` on single encoders and every single-encoder key (null) on a fused one: dropped when default."""
        if data.get("name") != "fused" and data.get("members") is not None:
            raise ConfigError(f"encoder.members is only for name: fused (got name {data.get('name')!r})")
        if data.get("name") == "fused":
            return FusedEncoderConfig, FusedEncoderConfig._own_keys(data)
        return cls, {k: v for k, v in data.items() if k != "members"}


def _check_shared_encoder_fields(cfg) -> None:
    if not isinstance(cfg.trust_remote_code, bool):
        raise ConfigError(f"encoder.trust_remote_code must be true or false, got {cfg.trust_remote_code!r}")
    if cfg.image_aspect not in ("pad", "resize"):
        raise ConfigError(f"encoder.image_aspect must be pad or resize, got {cfg.image_aspect!r}")


@dataclass
class FusedEncoderConfig:
    """name fused: the encoders run side by side (features concatenated per patch; their grids must agree).
    The first member's image size and normalisation are the fused input's."""

    name: str = "fused"
    members: list[EncoderConfig] | None = None
    """At least 2 single encoders (EncoderConfig mappings)."""
    image_aspect: str = "pad"
    """pad: pad to a square with the mean colour (LLaVA-1.5); resize: stretch to the square."""
    trust_remote_code: bool = False
    """Let transformers run Python code shipped with a member's hub checkpoint (never on unless asked)."""

    def __post_init__(self):
        if self.name != "fused":
            raise ConfigError(f"encoder.members is only for name: fused (got name {self.name!r})")
        _check_shared_encoder_fields(self)
        if not isinstance(self.members, list) or len(self.members) < 2:
            raise ConfigError(f"encoder fused needs `members`: a list of at least 2 encoders, got {self.members!r}")
        self.members = [m if isinstance(m, (EncoderConfig, FusedEncoderConfig))
                        else from_dict(EncoderConfig, m, f"encoder.members[{i}]") for i, m in enumerate(self.members)]
        if any(isinstance(m, FusedEncoderConfig) for m in self.members):
            raise ConfigError("encoder fused: a member cannot itself be fused")

    @classmethod
    def _own_keys(cls, data: dict) -> dict:
        """`data` without single-encoder keys that hold their default (None); any other is refused by name."""
        single = _field_names(EncoderConfig) - _field_names(cls)
        refused = sorted(k for k in single & set(data) if data[k] != EncoderConfig.__dataclass_fields__[k].default)
        if refused:
            raise ConfigError(f"encoder fused: set {refused} on its members, not on the fused encoder (the "
                              "first member's image size and normalisation are the input's)")
        return {k: v for k, v in data.items() if k not in single}


@dataclass
class ConnectorConfig:
    name: str = "mlp2x_gelu"
    """Registry key of a connector in the `connectors` package."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the connector's constructor."""


QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class QuantizationConfig:
    """4-bit base weights for QLoRA (bitsandbytes; needs a CUDA GPU). Passed to transformers as a
    BitsAndBytesConfig. A quantized LLM can only be frozen or trained through LoRA adapters."""

    load_in_4bit: bool = True
    """Only 4-bit (QLoRA) is supported."""
    quant_type: str = "nf4"
    """nf4 (QLoRA's NormalFloat) | fp4."""
    compute_dtype: str = "bfloat16"
    """dtype the 4-bit weights are dequantized to for each matmul: bfloat16 | float16 | float32."""
    double_quant: bool = True
    """Quantize the quantization constants too (QLoRA's double quantization, ~0.4 bit/param saved)."""

    def __post_init__(self):
        for key in ("load_in_4bit", "double_quant"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"llm.quantization.{key} must be true or false, got {getattr(self, key)!r}")
        if not self.load_in_4bit:
            raise ConfigError("llm.quantization: only load_in_4bit: true is supported (QLoRA); "
                              "drop `quantization` for full precision")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"llm.quantization.quant_type must be one of {', '.join(QUANT_TYPES)}, "
                              f"got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"llm.quantization.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                              f"got {self.compute_dtype!r}")


@dataclass
class LLMConfig:
    path: str | None = None
    """Hub id or local directory of an AutoModelForCausalLM. None: random weights from `config`."""
    config: dict[str, Any] | None = None
    """transformers config kwargs (with `model_type`) used when `path` is None."""
    tokenizer: str | None = None
    """Tokenizer path; defaults to `path`."""
    image_token: str = "<image>"
    """Placeholder token added once to the tokenizer."""
    attn_implementation: str | None = None
    """transformers' attention (sdpa, eager, flex_attention, ...) or `varlen`: vlmkit's per-sample attention
    for packed batches (data.pack; PyTorch's variable-length flash attention on CUDA), SDPA otherwise. None:
    transformers' default (sdpa)."""
    trust_remote_code: bool = False
    """Let transformers run Python code shipped with the checkpoint / tokenizer (never on unless asked)."""
    quantization: QuantizationConfig | None = None
    """None: weights in the model's dtype. A mapping (QuantizationConfig): 4-bit base weights (QLoRA),
    e.g. {load_in_4bit: true, quant_type: nf4, compute_dtype: bfloat16, double_quant: true}."""

    def __post_init__(self):
        if isinstance(self.quantization, dict):
            self.quantization = from_dict(QuantizationConfig, self.quantization, "llm.quantization")
        if not isinstance(self.trust_remote_code, bool):
            raise ConfigError(f"llm.trust_remote_code must be true or false, got {self.trust_remote_code!r}")
        if self.path is None and self.config is None:
            raise ConfigError("llm: give `path` (hub id or local dir) or `config` (random weights)")
        if self.path is None and self.tokenizer is None:
            raise ConfigError("llm: a random LLM needs `tokenizer` (a local dir or hub id)")


TILING_MODES = ("none", "anyres", "internvl", "naflex")
LLAVA_NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
"""LLaVA-NeXT's AnyRes canvases in tiles, (rows, cols): x 336 px they are its image_grid_pinpoints."""


@dataclass
class TilingConfig:
    """High-resolution input: how one image becomes several encoder tiles. Saved with the model.

    One class per mode, chosen by `mode`: `TilingConfig(mode, ...)` (and `from_dict(TilingConfig, ...)`)
    returns that mode's class, which holds and checks only its own fields.
    none (NoTiling): one tile per image (the encoder's square input; LLaVA-1.5). anyres (AnyresTiling):
    LLaVA-NeXT (a base tile first, then the best-fitting canvas cut row-major; with `unpad` the padding is
    cropped from the features and a learned `image_newline` ends each feature row). internvl (InternVLTiling):
    InternVL dynamic tiling (row-major tiles of the closest-aspect grid, then a thumbnail). naflex
    (NaflexTiling): SigLIP 2 NaFlex (a siglip2_vision_model encoder; each image resized keeping its aspect
    ratio to at most `max_num_patches` patches, its own patch grid and so its own number of tokens).
    """

    mode: str = "none"
    """none | anyres | internvl | naflex."""

    MODE: ClassVar[str] = ""
    """The mode a subclass stands for (registered in TILING_CLASSES)."""

    def __new__(cls, *args, **kwargs):
        if cls is not TilingConfig:
            return super().__new__(cls)
        sub = _tiling_class(args[0] if args else kwargs.get("mode", "none"))
        foreign = sorted(set(kwargs) - _field_names(sub))
        for key in foreign:  # another mode's option: say so instead of a bare TypeError
            owner = next((c.MODE for c in TILING_CLASSES.values() if key in _field_names(c)), None)
            if owner is not None:
                raise ConfigError(f"tiling.{key} is a{'n' if owner[0] in 'aeiou' else ''} {owner} option; "
                                  f"mode is {sub.MODE!r}")
        return super().__new__(sub)

    def __post_init__(self):
        if self.mode != self.MODE:
            raise ConfigError(f"tiling.mode {self.mode!r} does not fit {type(self).__name__} (mode {self.MODE!r})")

    @classmethod
    def _from_dict_class(cls, data: dict, where: str) -> tuple[type, dict]:
        """from_dict's hook: the mode's class and the keys it takes. Saved folders written before the split
        carry every mode's keys: another mode's key is dropped when it holds its default, refused otherwise."""
        if cls is not TilingConfig:
            return cls, data
        sub = _tiling_class(data.get("mode", "none"))
        kept = {}
        for key, value in data.items():
            owner = next((c for c in TILING_CLASSES.values() if key in _field_names(c)), None)
            if key in _field_names(sub) or owner is None:  # its own key, or an unknown one (from_dict names it)
                kept[key] = value
            elif value != owner.__dataclass_fields__[key].default:
                raise ConfigError(f"tiling.{key} is a{'n' if owner.MODE[0] in 'aeiou' else ''} {owner.MODE} "
                                  f"option; mode is {sub.MODE!r}")
        return sub, kept


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _tiling_class(mode) -> type[TilingConfig]:
    if not isinstance(mode, str) or mode not in TILING_CLASSES:
        raise ConfigError(f"tiling.mode must be one of {', '.join(TILING_MODES)}, got {mode!r}")
    return TILING_CLASSES[mode]


def _check_positive_or_none(key: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"tiling.{key} must be a positive integer or null, got {value!r}")


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"tiling.{key} must be true or false, got {value!r}")


@dataclass
class NoTiling(TilingConfig):
    """mode none: one tile per image."""

    MODE: ClassVar[str] = "none"


@dataclass
class AnyresTiling(TilingConfig):
    """mode anyres: LLaVA-NeXT's AnyRes (LLaVA-OneVision's anyres_max_N with `anyres_max`)."""

    MODE: ClassVar[str] = "anyres"
    mode: str = "anyres"
    grid_pinpoints: str | list[list[int]] | None = None
    """Canvases: a range "(1x1),...,(3x3)" in tiles (rows x cols), a list of [height, width] pixel
    pairs (transformers' image_grid_pinpoints; multiples of the tile), or None: LLaVA-NeXT's 1x2, 2x1,
    2x2, 3x1, 1x3 tiles."""
    anyres_max: int | None = None
    """N of LLaVA-OneVision's anyres_max_N (the unpadded feature grid is downscaled to about
    N tiles' worth of tokens); None: no limit. Needs `unpad`."""
    unpad: bool = True
    """Crop the padding from the feature grid and end each row with `image_newline`
    (LLaVA-NeXT's spatial_unpad); false: all tile tokens, no newline (spatial)."""

    def __post_init__(self):
        super().__post_init__()
        from .tiling.functions import parse_grid_pinpoints

        _check_bool("unpad", self.unpad)
        try:
            if self.grid_pinpoints is not None:
                parse_grid_pinpoints(self.grid_pinpoints, 1)
        except (ValueError, SyntaxError, TypeError) as e:
            raise ConfigError(f"tiling.grid_pinpoints {self.grid_pinpoints!r}: {e}") from None
        _check_positive_or_none("anyres_max", self.anyres_max)
        if self.anyres_max is not None and not self.unpad:
            raise ConfigError("tiling.anyres_max needs unpad: true (LLaVA-OneVision downscales the unpadded grid)")


@dataclass
class InternVLTiling(TilingConfig):
    """mode internvl: InternVL dynamic tiling."""

    MODE: ClassVar[str] = "internvl"
    mode: str = "internvl"
    min_tiles: int = 1
    """Bounds on the tile grid (cols x rows)."""
    max_tiles: int = 12
    """Per sample; with n images each gets max(1, max_tiles // n)."""
    thumbnail: bool = True
    """Add the whole image as a last tile when there is more than one tile."""

    def __post_init__(self):
        super().__post_init__()
        _check_bool("thumbnail", self.thumbnail)
        for key in ("min_tiles", "max_tiles"):
            if not isinstance(getattr(self, key), int) or isinstance(getattr(self, key), bool):
                raise ConfigError(f"tiling.{key} must be an integer, got {getattr(self, key)!r}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"tiling: need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")


@dataclass
class NaflexTiling(TilingConfig):
    """mode naflex: SigLIP 2 NaFlex."""

    MODE: ClassVar[str] = "naflex"
    mode: str = "naflex"
    max_num_patches: int | None = None
    """At most this many patches per image (the SigLIP 2 processor's max_num_patches); None: the
    checkpoint's num_patches (256 for google/siglip2-*-naflex)."""

    def __post_init__(self):
        super().__post_init__()
        _check_positive_or_none("max_num_patches", self.max_num_patches)


TILING_CLASSES: dict[str, type[TilingConfig]] = {c.MODE: c for c in (NoTiling, AnyresTiling, InternVLTiling,
                                                                       NaflexTiling)}
"""mode -> its config class; a new tiling mode adds its class here."""


VIDEO_POOLS = ("none", "average", "max", "bilinear")
VIDEO_NEWLINES = ("none", "frame", "video")


@dataclass
class VideoConfig:
    """How a video becomes tokens (`model.video`; absent: the model takes no video). Each frame is one encoder
    tile (resized like an image, no tiling), its token grid pooled, the frames' tokens concatenated in order."""

    token: str = "<video>"
    """Placeholder token added once to the tokenizer (its own special token, beside llm.image_token)."""
    pool: str = "bilinear"
    """Spatial pooling of each frame: none | average | max (a pool_stride x pool_stride window over the
    encoder's patch grid before the connector, floor at the edges: LLaVA-NeXT-Video's vision_resampler) |
    bilinear (the connector's output grid resized to ceil(rows / pool_stride) x ceil(cols / pool_stride):
    LLaVA-OneVision; needs a connector that keeps a grid: mlp2x_gelu, pixel_shuffle, avgpool_mlp)."""
    pool_stride: int = 2
    """The pooling factor per side (ignored with pool none)."""
    newline: str = "video"
    """none | frame (a learned vector after each frame's tokens) | video (one after the whole video:
    LLaVA-OneVision's one_token). The vector is image_newline when the model has one (AnyRes with unpad, as
    LLaVA-NeXT / OneVision share it), else the model's own `video_newline` (a stage plan component)."""

    def __post_init__(self):
        if not isinstance(self.token, str) or not self.token.strip():
            raise ConfigError(f"video.token must be a non-empty string, got {self.token!r}")
        if self.pool not in VIDEO_POOLS:
            raise ConfigError(f"video.pool must be one of {', '.join(VIDEO_POOLS)}, got {self.pool!r}")
        if not isinstance(self.pool_stride, int) or isinstance(self.pool_stride, bool) or self.pool_stride < 1:
            raise ConfigError(f"video.pool_stride must be an integer >= 1, got {self.pool_stride!r}")
        if self.newline not in VIDEO_NEWLINES:
            raise ConfigError(f"video.newline must be one of {', '.join(VIDEO_NEWLINES)}, got {self.newline!r}")


@dataclass
class ModelConfig:
    encoder: EncoderConfig
    """A single encoder, or a FusedEncoderConfig (name fused; EncoderConfig and from_dict pick it)."""
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig | None = None
    template: str = "vicuna_v1"
    """Chat template for inference and default for training: a registered name or `tokenizer`."""
    tiling: TilingConfig = field(default_factory=TilingConfig)
    """High-resolution tiling (none by default: one encoder tile per image)."""
    video: VideoConfig | None = None
    """None: the model takes no video. A mapping (VideoConfig): `<video>` placeholders, frames one tile each."""

    def __post_init__(self):
        if self.llm is None:
            raise ConfigError("model.llm is required")
        if isinstance(self.video, dict):
            self.video = from_dict(VideoConfig, self.video, "model.video")
        if self.video is not None and self.video.token == self.llm.image_token:
            raise ConfigError(f"model.video.token {self.video.token!r} is llm.image_token too: give video its own")
        if isinstance(self.tiling, dict):
            self.tiling = from_dict(TilingConfig, self.tiling, "model.tiling")


DATA_FORMATS = ("auto", "llava", "messages")
"""data.format's values (vlmkit.data.formats reads the layouts)."""
DATA_FIELDS = ("id", "conversations", "messages", "image", "images", "video", "videos")
"""The vlmkit field names data.columns may map."""


@dataclass
class DataConfig:
    path: str = ""
    """A .json (list) / .jsonl / .parquet / .arrow file; a folder of such files (one kind; shards read in sorted
    order); a `save_to_disk` folder (Dataset, or a DatasetDict's `train` split); or a hub dataset id
    (`hf:org/name[:split]`, or a bare `org/name[:split]` that is not a local path; split default train)."""
    format: str = "auto"
    """Sample layout: llava (`conversations` of from/value + `image`), messages (`messages` of role/content, the
    content a string with `<image>` (LLaMA-Factory, ms-swift) or a typed list (TRL, hub VLM datasets), + `images`),
    or auto (from each sample's fields). See README "Data formats"."""
    columns: dict[str, str] = field(default_factory=dict)
    """vlmkit field -> the dataset's column name, for data whose columns are named otherwise (keys: id,
    conversations, messages, image, images), e.g. {messages: dialogue, images: pictures}."""
    streaming: bool = False
    """Read the data as a stream instead of listing it (datasets too large to list or download first): in stream
    order, each process its own share, resumed at the exact stream position. The stage needs `max_steps`."""
    group_by_modality_length: bool = False
    """LLaVA-1.5's batching: samples with images and text-only samples in separate batches, each megabatch (world
    size x per-device batch) sorted by estimated length (words + 128 per image), megabatches shuffled (per epoch,
    from the seed). Not with `streaming`."""
    image_folder: str = ""
    """Images are resolved relative to this folder (default: the JSON's folder)."""
    template: str | None = None
    """Overrides model.template for this stage (e.g. `plain` for caption pre-training)."""
    max_length: int = 2048
    on_bad_sample: str = "error"
    """error: stop with the sample named; skip: leave it out, counted and listed in the metrics."""
    num_workers: int = 2
    max_image_pixels: int | None = 178_956_970
    """An image whose header declares more pixels is refused before decoding (a decompression bomb);
    None or 0: no vlmkit limit (PIL's own, 2 x PIL.Image.MAX_IMAGE_PIXELS, still applies)."""
    max_aspect_ratio: float | None = 200
    """An image more elongated than this (long side / short side) is refused from its header (a bad sample);
    None or 0: no limit. check-data notes every image over 10:1 and says what training does with it."""
    allow_absolute_image_paths: bool = False
    """Image paths must lead inside `image_folder` (no absolute paths, no `..` or symlinks out of it); true:
    any path is opened (for data that keeps its images elsewhere, and is trusted)."""
    pack: bool = False
    """Concatenate each micro-batch's samples into one row (or rows of at most `pack_max_tokens`) without padding;
    positions restart at 0 and attention stays within each sample. Same samples per step, same loss; best with
    llm.attn_implementation `varlen` (sdpa / eager build a dense block-diagonal mask over the row)."""
    pack_max_tokens: int = 0
    """With `pack`: the most tokens in one packed row (0: the whole micro-batch in one row). A longer sample gets a
    row of its own."""

    # --- video samples (`"video": "clip.mp4"` or a folder of frames; vlmkit/data/video.py) ---
    video_folder: str = ""
    """Video files and frame folders are resolved relative to this folder (default: `image_folder`); paths must
    stay inside it as image paths do (`allow_absolute_image_paths` lifts that for both)."""
    max_frames: int = 8
    """The most frames sampled from one video, uniformly over the clip (LLaVA-NeXT's `frames_upbound`)."""
    fps: float | None = None
    """Sample at this many frames per second of video (every round(rate / fps)-th frame), capped at `max_frames`
    (uniformly over the clip when there would be more); null: `max_frames` frames uniformly."""
    max_video_tokens: int | None = None
    """Per-video placeholder budget: the frame count is lowered (before decoding) until the video's tokens fit;
    a video over it even at one frame is a bad sample (video_too_long). Null: no budget."""
    video_time_prompt: bool = False
    """Add LLaVA-Video's time prompt ("The video lasts for X seconds, and N frames are uniformly sampled from it.
    These frames are located at ...") between the video and the first question."""
    max_frame_pixels: int | None = 4096 * 4096
    """A video whose header declares frames of more pixels is refused before decoding; null or 0: no limit."""
    frames_fps: float = 1.0
    """Frames per second of a folder of frames (its timestamps: frame i at i / frames_fps seconds)."""
    max_video_seconds: float | None = None
    """A video longer than this (from its header) is a bad sample (video_too_long); null: any length."""

    def _check_video(self) -> None:
        if not isinstance(self.max_frames, int) or isinstance(self.max_frames, bool) or self.max_frames < 1:
            raise ConfigError(f"data.max_frames must be an integer >= 1, got {self.max_frames!r}")
        for key in ("fps", "max_video_seconds", "frames_fps"):
            v = getattr(self, key)
            if (v is not None or key == "frames_fps") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                           or v <= 0):
                raise ConfigError(f"data.{key} must be a number > 0{'' if key == 'frames_fps' else ' or null'}, "
                                  f"got {v!r}")
        for key in ("max_video_tokens", "max_frame_pixels"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"data.{key} must be an integer >= 0 or null, got {v!r}")
        if not isinstance(self.video_time_prompt, bool):
            raise ConfigError(f"data.video_time_prompt must be true or false, got {self.video_time_prompt!r}")
        if not isinstance(self.video_folder, str):
            raise ConfigError(f"data.video_folder must be a path, got {self.video_folder!r}")

    def __post_init__(self):
        self._check_video()
        if self.on_bad_sample not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_sample must be error or skip, got {self.on_bad_sample!r}")
        if not isinstance(self.pack, bool):
            raise ConfigError(f"data.pack must be true or false, got {self.pack!r}")
        if not isinstance(self.allow_absolute_image_paths, bool):
            raise ConfigError(f"data.allow_absolute_image_paths must be true or false, "
                              f"got {self.allow_absolute_image_paths!r}")
        for key in ("max_image_pixels", "max_aspect_ratio"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ConfigError(f"data.{key} must be a number >= 0 or null, got {v!r}")
        if not isinstance(self.pack_max_tokens, int) or self.pack_max_tokens < 0:
            raise ConfigError(f"data.pack_max_tokens must be an integer >= 0, got {self.pack_max_tokens!r}")
        self._check_layout()

    def _check_layout(self) -> None:
        FIELDS = DATA_FIELDS
        if self.format not in DATA_FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        if not isinstance(self.columns, dict) or not all(isinstance(v, str) for v in self.columns.values()):
            raise ConfigError(f"data.columns must map vlmkit field names to column names, got {self.columns!r}")
        unknown = [k for k in self.columns if k not in FIELDS]
        if unknown:
            raise ConfigError(f"data.columns: unknown field(s) {', '.join(map(repr, unknown))} (known: "
                              f"{', '.join(FIELDS)})")
        for key in ("streaming", "group_by_modality_length"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"data.{key} must be true or false, got {getattr(self, key)!r}")
        if self.streaming and self.group_by_modality_length:
            raise ConfigError("data.group_by_modality_length needs the whole dataset's lengths: not with "
                              "data.streaming (a stream is read in its own order)")


@dataclass
class ComponentPlan:
    """How one component trains in a stage. In YAML either a bare mode (`llm: full`) or a mapping
    (`llm: {mode: lora, r: 64, lr: 2e-4}`)."""

    mode: str = "frozen"
    """frozen | full | lora (peft adapters; base weights stay frozen) | partial (last `layers` blocks)."""
    lr: float | None = None
    """Learning rate of this component; None: the stage's `lr`."""
    weight_decay: float | None = None
    """None: the stage's `weight_decay`. Norm weights and biases are never decayed."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    """lora: module names (suffixes), a regex, or `all-linear` (every Linear but the output head)."""
    layers: int = 0
    """partial: how many of the last transformer blocks train."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode == "partial" and self.layers < 1:
            raise ConfigError("mode partial needs `layers` >= 1 (the last N blocks train)")
        if self.mode == "lora" and (self.r < 1 or self.alpha <= 0):
            raise ConfigError(f"lora needs r >= 1 and alpha > 0, got r={self.r}, alpha={self.alpha}")

    @property
    def trains(self) -> bool:
        return self.mode != "frozen"


@dataclass
class StageConfig:
    name: str
    train: dict[str, ComponentPlan]
    """component -> mode or ComponentPlan. Components not named are frozen."""
    data: DataConfig
    lr: float = 2e-5
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0
    """Optimizer steps; >0 overrides `epochs`."""
    global_batch_size: int = 128
    per_device_batch_size: int = 16
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    gradient_checkpointing_every: int = 1
    """With gradient_checkpointing: recompute only every k-th LLM decoder layer (1: all of them); the others keep
    their activations (faster, more memory)."""
    gradient_checkpointing_skip: int = 0
    """With gradient_checkpointing: leave this many of the LLM's last decoder layers un-checkpointed (a finer
    memory / speed trade than `gradient_checkpointing_every`)."""
    compile: bool = False
    """torch.compile each LLM decoder layer for this stage's training (`VLM.compile_decoder_layers`, dynamic
    shapes): the first steps are slower while it compiles, later ones faster on GPU."""
    optimizer: str = "adamw"
    """adamw (torch.optim.AdamW, fused on CUDA) | adamw_8bit (bitsandbytes' 8-bit AdamW: CUDA only; under
    train.precision bf16-master its 8-bit states belong to the fp32 master weights; vlmkit/training/optim.py)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    lr_scheduler: str = "cosine"
    """Any schedule `transformers.get_scheduler` knows: cosine | linear | constant | constant_with_warmup |
    cosine_with_restarts | polynomial | inverse_sqrt | cosine_with_min_lr | cosine_warmup_with_min_lr |
    warmup_stable_decay (not the ones that step on a metric: reduce_lr_on_plateau, greedy). Warmup: warmup_ratio."""
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the schedule's function (transformers' `scheduler_specific_kwargs`), e.g. {num_cycles: 2} for
    cosine_with_restarts, {min_lr_rate: 0.1} for cosine_with_min_lr, {num_decay_steps: 100} for
    warmup_stable_decay."""

    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("adamw", "adamw_8bit")
    """The values `optimizer` takes (vlmkit/training/optim.py builds them)."""
    SCHEDULERS_REFUSED: ClassVar[dict[str, str]] = {
        "reduce_lr_on_plateau": "it steps on a validation metric, and the loop steps the schedule once per "
                                "optimizer step without one",
        "greedy": "it steps on a metric, and the loop steps the schedule once per optimizer step without one"}
    """transformers schedules a stage cannot use, with the reason."""

    def __post_init__(self):
        self._check_optimizer()
        if not isinstance(self.compile, bool):
            raise ConfigError(f"stage {self.name!r}: compile must be true or false, got {self.compile!r}")
        for key in ("gradient_checkpointing_every", "gradient_checkpointing_skip"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key.endswith("every") else 0):
                raise ConfigError(f"stage {self.name!r}: {key} must be an integer >= "
                                  f"{1 if key.endswith('every') else 0}, got {v!r}")
        plans = {}
        for comp, spec in self.train.items():
            try:
                plans[comp] = (spec if isinstance(spec, ComponentPlan) else
                               ComponentPlan(mode=spec) if isinstance(spec, str) else
                               from_dict(ComponentPlan, spec, comp))
            except ConfigError as e:
                raise ConfigError(f"stage {self.name!r}: {comp}: {e}") from None
        self.train = plans
        if not any(p.trains for p in plans.values()):
            raise ConfigError(f"stage {self.name!r} trains nothing")
        if isinstance(self.data, DataConfig) and self.data.streaming and not self.max_steps:  # data (issue 18)
            raise ConfigError(f"stage {self.name!r}: data.streaming has no length to count epochs in: set max_steps")
        if self.global_batch_size < 1 or self.per_device_batch_size < 1:
            raise ConfigError(f"stage {self.name!r}: batch sizes must be >= 1")

    def _check_optimizer(self) -> None:
        """optimizer, betas, eps and lr_scheduler name known values (the schedule's kwargs are checked by building
        it: vlmkit.training.optim.check_stages, before the model is built)."""
        if self.optimizer not in self.OPTIMIZERS:
            raise ConfigError(f"stage {self.name!r}: unknown optimizer {self.optimizer!r}; known: "
                              f"{', '.join(self.OPTIMIZERS)}")
        betas = self.betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"stage {self.name!r}: betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = [float(b) for b in betas]
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ConfigError(f"stage {self.name!r}: eps must be a number > 0, got {self.eps!r}")
        if self.lr_scheduler in self.SCHEDULERS_REFUSED:
            raise ConfigError(f"stage {self.name!r}: lr_scheduler {self.lr_scheduler} cannot be used: "
                              f"{self.SCHEDULERS_REFUSED[self.lr_scheduler]}; known: {', '.join(scheduler_names())}")
        if self.lr_scheduler not in scheduler_names():
            raise ConfigError(f"stage {self.name!r}: unknown lr_scheduler {self.lr_scheduler!r}; known: "
                              f"{', '.join(scheduler_names())}")
        if not isinstance(self.lr_scheduler_kwargs, dict):
            raise ConfigError(f"stage {self.name!r}: lr_scheduler_kwargs must be a mapping, "
                              f"got {self.lr_scheduler_kwargs!r}")

    # derived quantities: how the global batch is split on `world` processes and how many steps the stage takes

    @staticmethod
    def split_batch(global_batch: int, per_device: int, world: int, stage: str = "") -> tuple[int, int]:
        """(micro-batch per device, accumulation steps) that make up exactly `global_batch`.

        `per_device` is the largest micro-batch; on more processes than the global batch needs at that
        size, the micro-batch shrinks (e.g. global 32, per-device 32, 2 processes -> 16 x 2 x 1).
        """
        micro = min(per_device, global_batch // world) if world else per_device
        if micro < 1 or global_batch % (micro * world):
            raise ValueError(f"stage {stage}: global_batch_size {global_batch} cannot be split into "
                             f"per-device micro-batches of at most {per_device} over {world} process(es)")
        return micro, global_batch // (micro * world)

    def micro_batching(self, world: int) -> tuple[int, int]:
        """(micro-batch per device, accumulation steps) of this stage's global batch on `world` processes."""
        return self.split_batch(self.global_batch_size, self.per_device_batch_size, world, self.name)

    def accumulation_steps(self, world: int) -> int:
        """Micro-batches each process accumulates per optimizer step."""
        return self.micro_batching(world)[1]

    def total_steps(self, samples: int, world: int) -> int:
        """Optimizer steps of the stage over `samples` samples: `max_steps`, or `epochs` of the data (at least 1)."""
        import math

        micro, accum = self.micro_batching(world)
        batches = math.ceil(samples / (micro * world))  # micro-batches of one epoch, per process
        return self.max_steps or max(1, math.ceil(self.epochs * batches / accum))

    def warmup_steps(self, total: int) -> int:
        """Learning-rate warmup steps of a stage of `total` optimizer steps."""
        import math

        return math.ceil(self.warmup_ratio * total)


def scheduler_names() -> list[str]:
    """The learning-rate schedules a stage can name: those `transformers.get_scheduler` knows, less the ones that
    step on a metric (StageConfig.SCHEDULERS_REFUSED)."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType if s.value not in StageConfig.SCHEDULERS_REFUSED]


def tracker_names() -> list[str]:
    """The experiment trackers `train.log_with` can name: accelerate's (LoggerType, and any registered with
    accelerate's `register_tracker_class`)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


@dataclass
class TrainConfig:
    output_dir: str = "runs/vlmkit"
    mixed_precision: str | None = None
    """no | bf16 | fp16; None: whatever `accelerate launch` / its config file says."""
    seed: int = 0
    log_with: str | list[str] | None = "tensorboard"
    """Experiment trackers: one name or a list of accelerate's: tensorboard, wandb, comet_ml, aim, mlflow, clearml,
    dvclive, swanlab, trackio; null / none: none. One that cannot start (not installed, init fails) is an error
    before the model is built (vlmkit/training/trackers.py)."""
    project: str = "vlmkit"
    """The trackers' project (wandb / comet_ml / swanlab / trackio project, mlflow experiment, aim experiment,
    clearml project; TensorBoard: output_dir/<project>/<run_name>/)."""
    run_name: str | None = None
    """The trackers' run name (wandb name, mlflow run, TensorBoard folder, ...); null: the output_dir's folder name."""
    log_every: int = 10
    save_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end of each stage)."""
    keep_checkpoints: int = 2
    """How many of a stage's newest checkpoints to keep (older ones are deleted after a save succeeds)."""
    resume: str | bool = "auto"
    """auto: continue from output_dir's last checkpoint / finished stage when there is one, else start;
    latest: the same, but an error when there is nothing to resume; never: start over (the old
    checkpoints, logs and stage markers under output_dir are removed); or a checkpoint folder's path."""
    log_samples: bool = False
    """Also write output_dir/samples.jsonl: the sample ids of every optimizer step (all processes)."""
    precision: str = "auto"
    """Where the weights live and what the optimizer keeps (vlmkit/training/precision.py). auto: under
    `mixed_precision: bf16` (one process or DDP) `bf16-master`: bf16 weights and matrix work, fp32 master weights
    and optimizer states for the trained parameters only; under DeepSpeed / FSDP the engine's own master weights;
    without mixed precision fp32. Or explicitly: bf16-master | autocast (fp32 weights under torch.autocast:
    slower) | bf16-pure (bf16 optimizer states: rounds away updates under ~1/256 of a weight) | fp32."""
    save_models: bool = True
    """Write each stage's model folder and output_dir/model. false: nothing is saved and a rerun cannot resume
    (benchmarks, dry runs)."""

    PRECISIONS = ("auto", "bf16-master", "autocast", "bf16-pure", "fp32")
    """The values `precision` takes (a class constant, not a field; vlmkit/training/precision.py implements them)."""

    def __post_init__(self):
        self._check_trackers()
        if self.precision not in self.PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(self.PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be an integer >= 1, got {self.keep_checkpoints!r}")
        if self.resume is True or self.resume is False:  # YAML true / false
            self.resume = "latest" if self.resume else "never"
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError(f"train.resume must be auto, latest, never or a checkpoint path, got {self.resume!r}")


    def _check_trackers(self) -> None:
        """log_with: null / none / [] -> None; every name one accelerate knows; project / run_name strings."""
        names = self.log_with if isinstance(self.log_with, list) else [] if self.log_with is None else [self.log_with]
        if any(not isinstance(n, str) for n in names):
            hint = (" (YAML reads yes / no / on / off unquoted as true / false: quote it, or write null for none)"
                    if isinstance(self.log_with, bool) else "")
            raise ConfigError(f"train.log_with must be a tracker name, a list of them or null, got "
                              f"{self.log_with!r}{hint}")
        names = [n for n in names if n.strip().lower() not in ("none", "null", "")]
        unknown = [n for n in names if n not in tracker_names()]
        if unknown:
            raise ConfigError(f"train.log_with: unknown tracker(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(tracker_names())} (or null for none)")
        self.log_with = (None if not names else names[0] if isinstance(self.log_with, str)
                         else list(dict.fromkeys(names)))
        if not isinstance(self.project, str) or not self.project.strip():
            raise ConfigError(f"train.project must be a non-empty string, got {self.project!r}")
        if self.run_name is not None and (not isinstance(self.run_name, str) or not self.run_name.strip()):
            raise ConfigError(f"train.run_name must be a non-empty string or null, got {self.run_name!r}")

    def trackers(self) -> list[str]:
        """The tracker names of `log_with`, as a list ([] for none)."""
        return [] if self.log_with is None else [self.log_with] if isinstance(self.log_with, str) else list(self.log_with)

    def tracker_run_name(self) -> str:
        """`run_name`, or the name of the output_dir's folder."""
        return self.run_name or Path(self.output_dir).resolve().name or "run"


def add_resume_args(parser) -> None:
    """--resume [CHECKPOINT] / --no-resume on a training command line (default: TrainConfig.resume)."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from output_dir's last checkpoint or finished stage (an error if there is none), "
                        "or from the CHECKPOINT folder given. Without any flag a run continues when output_dir "
                        "holds one (train.resume: auto)")
    g.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                   help="start over: the checkpoints, logs and stage markers in output_dir are removed")


def apply_run_args(train: "TrainConfig", args) -> None:
    """--output-dir and --resume / --no-resume from a recipe's command line onto the train section."""
    if getattr(args, "output_dir", None):
        train.output_dir = args.output_dir
    if getattr(args, "resume", None):
        train.resume = args.resume


@dataclass
class RunConfig:
    model: ModelConfig
    stages: list[StageConfig]
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique: {names}")


_SAME_FAMILY = {EncoderConfig: (FusedEncoderConfig,)}
"""Classes another builds too (EncoderConfig(name="fused") is a FusedEncoderConfig): taken as they are."""


def from_dict(cls, data: Any, where: str = ""):
    """Build a (nested) dataclass from plain data, refusing unknown keys with the path to them."""
    if not dataclasses.is_dataclass(cls):
        return data
    if isinstance(data, (cls, *_SAME_FAMILY.get(cls, ()))):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    if hasattr(cls, "_from_dict_class"):  # a family of classes (one per tiling mode, ...): the member that fits
        cls, data = cls._from_dict_class(data, where)
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs, problems = {}, []
    for key, value in data.items():
        try:
            kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key)
        except _WrongType as e:  # reported below, unless the dataclass's own check says it better
            problems.append(str(e))
            kwargs[key] = value
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except Exception as e:
        if problems:
            raise ConfigError(problems[0]) from None
        if isinstance(e, TypeError):
            raise ConfigError(f"{where or cls.__name__}: {e}") from None
        raise
    if problems:
        raise ConfigError(problems[0])
    return obj


_UNION_TYPES = (typing.Union, getattr(__import__("types"), "UnionType", None))


class _WrongType(ConfigError):
    """A value whose type does not fit its field (from_dict reports it after the dataclass's own checks)."""


def _type_name(tp) -> str:
    """A type hint in words, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin is list or tp is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _type_ok(tp, value) -> bool:
    """Does `value` (plain YAML / JSON data) fit the type hint `tp`? Containers are checked for their kind (and a
    list's items); a dataclass's own fields are checked when it is built."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in _UNION_TYPES:
        return any(_type_ok(a, value) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list or tp is list:
        return isinstance(value, list) and (not args or all(_type_ok(args[0], v) for v in value))
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict) or (dataclasses.is_dataclass(tp) and isinstance(value, tp))
    return True


def _convert(tp, value, where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise _WrongType(f"{where} must be a list of mappings, got {value!r}")
        return [from_dict(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in _UNION_TYPES:
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        if len(inner) == 1:
            return _convert(inner[0], value, where)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise _WrongType(f"{where} must be a number, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not _type_ok(tp, value):
        hint = (" (YAML reads yes / no / on / off unquoted as true / false: quote it)"
                if isinstance(value, bool) and _type_ok(tp, "x") else "")
        raise _WrongType(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")
    return value


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _plain(value):
    """`value` with tuples as lists (what yaml.safe_dump and the loader take)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(cfg: "RunConfig", path: str | Path) -> Path:
    """Write the resolved run config (after overrides, every default filled in) as YAML `load_config` reads back."""
    path = Path(path)
    path.write_text("# the resolved config of this run (vlmkit train this file runs it again)\n"
                    + yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False))
    return path


def flat_config(cfg: "RunConfig") -> dict:
    """The run config as one flat mapping for trackers' hyper-parameters (TensorBoard takes scalars and strings):
    dotted keys as overrides write them (stages by name: `stages.finetune.lr`), lists and null as strings."""
    data = _plain(to_dict(cfg))
    data["stages"] = {s["name"]: s for s in data["stages"]}
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # lists, null, empty mappings
            flat[prefix] = str(value)

    walk("", data)
    return flat


@dataclass
class PlanConfig:
    """A stage plan without a model: for fine-tuning a model that already exists."""

    stages: list[StageConfig]
    train: TrainConfig = field(default_factory=TrainConfig)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path` (or a shipped config by name, e.g. `llava15_7b`: vlmkit/shipped.py); a syntax
    error is one line naming the file, line and column."""
    from .shipped import resolve_config

    path = resolve_config(path)
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: invalid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping (key: value lines), got {type(data).__name__}")
    return data


def load_stages(path: str | Path) -> tuple[list[StageConfig], TrainConfig]:
    """`stages:` (and optionally `train:`) of a plan file; a full run config's model section is ignored."""
    data = read_yaml(path)
    data = {k: v for k, v in data.items() if k in ("stages", "train")}
    try:
        plan = from_dict(PlanConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return plan.stages, plan.train


def load_config(path: str | Path, overrides=()) -> RunConfig:
    """The run config in `path`, with dotted `key=value` overrides (see `apply_overrides`) applied first."""
    data = apply_overrides(read_yaml(path), overrides)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        given = f" (with overrides {' '.join(overrides)})" if overrides else ""
        raise ConfigError(f"{path}{given}: {e}") from None


def apply_overrides(data: dict, overrides) -> dict:
    """A copy of the raw config `data` with each `a.b.c=value` of `overrides` set, before the typed config is built
    (so its checks and errors apply as to the YAML). Values are YAML scalars or flow lists (`true`, `1e-4`,
    `[1, 2]`, `null`); in a list, a part is an index (`stages.0.lr`) or a stage name (`stages.finetune.lr`);
    missing mappings on the way are created (their keys are checked when the config is built)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r}: expected dotted.key=value (e.g. stages.finetune.lr=1e-4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        node = data
        for i, part in enumerate(parts):
            where = ".".join(parts[:i]) or "the config"
            last = i == len(parts) - 1
            if isinstance(node, list):
                index = _list_index(node, part, item, where)
                if last:
                    node[index] = value
                else:
                    node[index] = {} if node[index] is None else node[index]
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node[part] = {} if node.get(part) is None else node[part]
                    node = node[part]
            else:
                raise ConfigError(f"override {item!r}: {where} is {node!r}, not a mapping or a list")
    return data


def _list_index(items: list, part: str, item: str, where: str) -> int:
    """The position `part` names in the list `items` (at `where`): an index, or the name of an item (a stage)."""
    names = [x.get("name") for x in items if isinstance(x, dict)]
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"override {item!r}: {where} has {len(items)} item(s), no index {index}")
        return index % len(items)
    if part not in names:
        raise ConfigError(f"override {item!r}: {where} has no item named {part!r}; names: "
                          f"{', '.join(map(str, names)) or '(none)'}")
    return names.index(part)


def parse_run_args(parser, argv=None):
    """`parser.parse_args(argv)` where `key=value` overrides may also come after options (`x.yaml --cpu a=1`):
    they are added to `args.overrides` (a parser without `add_override_args` takes none)."""
    args, extra = parser.parse_known_args(argv)
    takes = hasattr(args, "overrides")
    bad = [x for x in extra if not takes or x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if takes:
        args.overrides = list(args.overrides or []) + extra
    return args


def add_override_args(parser) -> None:
    """Positional `key=value` overrides after the config on a training command line."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the config, applied before it is checked, e.g. "
                             "stages.finetune.lr=1e-4 stages.0.max_steps=10 train.output_dir=runs/x "
                             "model.tiling.mode=anyres (values are YAML: true, 1e-4, [1, 2], null)")
