"""The assembled VLM: encode_images -> connector -> merge at placeholders -> LLM -> loss.

Saved as a folder: config.json (every part's config, so no hub access is needed to rebuild),
model.safetensors (all weights under encoder.*, connector.*, llm.*) and the tokenizer files.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import ModelConfig, to_dict
from .data.conversation import IGNORE
from .data.images import ImageTransform
from .data.processor import Processor
from .models.encoders import VisionEncoder, build_encoder, encoder_geometry
from .errors import disk_full, is_disk_full, load_file
from .tiling.counter import ImageTokenCounter
from .models.llm import add_image_token, build_llm, load_tokenizer, prepare_quantized
from .registry import CONNECTORS
from .security import read_model_folder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _param_id(p: torch.Tensor):
    """A parameter's identity (tied weights share one). DeepSpeed ZeRO-3 leaves every partitioned parameter an
    empty tensor, so there it is the parameter's ds_id, not its address."""
    return ("ds", p.ds_id) if hasattr(p, "ds_id") else p.data_ptr()


@contextmanager
def _whole(p: torch.Tensor):
    """Write access to a parameter as a whole tensor. A ZeRO-3-partitioned one is gathered from every process
    (each must call this for the same parameters in the same order); on exit process 0's values are kept and
    partitioned again. Any other parameter is already whole."""
    if not hasattr(p, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        yield


def resolve_model_dir(path) -> Path:
    """A model folder, or a run folder holding its final model under model/."""
    path = Path(path)
    return path / "model" if (path / "model" / CONFIG_NAME).exists() else path


def make_processor(config: ModelConfig, tokenizer, geometry, count_image_tokens: ImageTokenCounter,
                   template: str | None = None) -> Processor:
    """The one way a Processor is built. `geometry`: the encoder (a VisionEncoder, or an EncoderGeometry
    read from its config): image_size, mean, std."""
    transform = ImageTransform(geometry.image_size, geometry.mean, geometry.std, config.encoder.image_aspect)
    image_token_id = add_image_token(tokenizer, config.llm.image_token)
    return Processor(tokenizer, transform, config.llm.image_token, image_token_id, count_image_tokens,
                     template or config.template, getattr(count_image_tokens, "tiling", None))


def build_processor(config: ModelConfig, template: str | None = None, tokenizer=None) -> Processor:
    """The Processor `VLM.from_config(config).processor()` would give, without building the model: only
    the tokenizer, the encoder's transformers config (AutoConfig, no weights) and the connector's
    token count are read. Seconds instead of minutes for a 7B model (`vlmkit check-data`)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config.llm.tokenizer or config.llm.path, config.llm.image_token,
                                   trust_remote_code=config.llm.trust_remote_code)
    geo = encoder_geometry(config.encoder)
    counter = ImageTokenCounter.for_config(geo.grid, config.connector, config.tiling, geo.image_size, geo)
    return make_processor(config, tokenizer, geo, counter, template)


def load_processor(path: str | os.PathLike, template: str | None = None, trust_remote_code: bool = False) -> Processor:
    """The Processor of a folder written by `VLM.save_pretrained` (config.json + tokenizer; weights unread).
    The folder's own code runs only with `trust_remote_code` (vlmkit.security)."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} is not a vlmkit model folder (no {CONFIG_NAME})")
    _, config = read_model_folder(path, trust_remote_code)
    config.llm.tokenizer = str(path)
    return build_processor(config, template)


def _is_dtensor(t: torch.Tensor) -> bool:
    """An FSDP2 shard (a DTensor parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new files, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class VLM(nn.Module):
    def __init__(self, config: ModelConfig, encoder: VisionEncoder, connector: nn.Module, llm: nn.Module,
                 tokenizer):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token_id = add_image_token(tokenizer, config.llm.image_token)
        self.count_image_tokens = ImageTokenCounter.for_config(encoder.grid, config.connector, config.tiling,
                                                               encoder.image_size, encoder.geometry)
        self.tiling = self.count_image_tokens.tiling  # TileSpec or None
        if self.tiling is not None and self.tiling.uses_newline:
            # LLaVA-NeXT: appended after each row of AnyRes features; init randn / sqrt(D)
            d = llm.config.hidden_size
            self.image_newline = nn.Parameter(torch.randn(d) / math.sqrt(d))  # [D]
        else:
            self.image_newline = None
        self.adapters: dict[str, nn.Module] = {}  # component -> peft LoraModel (not a submodule)

    @property
    def _no_split_modules(self) -> list[str]:
        """The encoder's and LLM's block classes (transformers' `_no_split_modules`): what FSDP's
        transformer-based wrap policy (recipes/accelerate/fsdp2.yaml) shards as one unit each."""
        names = set(getattr(self.llm, "_no_split_modules", None) or [])
        for tower in getattr(self.encoder, "members", [self.encoder]):  # a fused encoder: each member's model
            names |= set(getattr(tower.model, "_no_split_modules", None) or [])
        present = {type(m).__name__ for m in self.modules()}  # e.g. CLIP's list names text-side classes too
        return sorted(names & present)

    def components(self) -> dict[str, nn.Module | nn.Parameter]:
        """The parts a stage plan can name (`image_newline` only when AnyRes with unpad uses it)."""
        comps = {"encoder": self.encoder, "connector": self.connector, "llm": self.llm}
        if self.image_newline is not None:
            comps["image_newline"] = self.image_newline
        return comps

    # ---- LoRA -----------------------------------------------------------------------------
    def add_lora(self, name: str, plan, state: dict | None = None) -> None:
        """Wrap a component's Linear layers with peft LoRA adapters, in place (kept if already there)."""
        if name in self.adapters:
            return
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        from .stages import lora_targets

        target = self.components()[name]
        cfg = LoraConfig(r=plan.r, lora_alpha=plan.alpha, lora_dropout=plan.dropout,
                         target_modules=lora_targets(target, plan.target_modules))
        self.adapters[name] = LoraModel(target, cfg, "default")
        if state is not None:
            from peft import set_peft_model_state_dict

            res = set_peft_model_state_dict(self.adapters[name], state)
            if res.unexpected_keys:
                raise ValueError(f"{name} adapter: unexpected keys {res.unexpected_keys[:5]}")

    def merge_lora(self, name: str | None = None) -> None:
        """Fold adapters into the base weights: afterwards the component is a plain transformers model."""
        for n in [name] if name else list(self.adapters):
            self.adapters.pop(n).merge_and_unload()

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype | None = None) -> VLM:
        """Pretrained parts from hub ids / local dirs, random ones from their configs."""
        encoder = build_encoder(config.encoder)
        tokenizer = load_tokenizer(config.llm.tokenizer or config.llm.path, config.llm.image_token,
                                   trust_remote_code=config.llm.trust_remote_code)
        llm = build_llm(config.llm, tokenizer, dtype)
        connector = CONNECTORS.get(config.connector.name)(encoder.out_dim, llm.config.hidden_size,
                                                          **config.connector.options)
        model = cls(config, encoder, connector, llm, tokenizer)
        if dtype is not None:
            model.to(dtype)
        if config.llm.quantization is not None:  # after the cast: its norms stay fp32
            prepare_quantized(model.llm)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False) -> VLM:
        """Load a folder written by `save_pretrained`: parts rebuilt from config.json, weights from safetensors.
        Code shipped in the folder runs only with `trust_remote_code` (the folder's own flags are ignored)."""
        path = Path(path)
        if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{path} is not a vlmkit model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        saved, config = read_model_folder(path, trust_remote_code)
        config.llm.tokenizer = str(path)
        tokenizer = load_tokenizer(str(path), config.llm.image_token, trust_remote_code=config.llm.trust_remote_code)
        with init_empty_weights(include_buffers=False):
            encoder = build_encoder(config.encoder)
            llm = build_llm(config.llm, tokenizer)
            connector = CONNECTORS.get(config.connector.name)(encoder.out_dim, llm.config.hidden_size,
                                                              **config.connector.options)
            model = cls(config, encoder, connector, llm, tokenizer)
        model.assign_weights(load_file(str(path / WEIGHTS_NAME)),
                             f"{path / WEIGHTS_NAME}: weights do not match the config")
        for name, sub in saved.get("adapters", {}).items():
            from peft import LoraConfig

            from .config import ComponentPlan

            lc = LoraConfig.from_pretrained(str(path / sub))
            plan = ComponentPlan(mode="lora", r=lc.r, alpha=lc.lora_alpha, dropout=lc.lora_dropout,
                                 target_modules=sorted(lc.target_modules))
            state = {k.removeprefix("base_model."): v for k, v in load_file(str(path / sub / "adapter_model.safetensors")).items()}
            model.add_lora(name, plan, state)
        if dtype is not None:
            model.to(dtype)
        return model

    def assign_weights(self, state: dict[str, torch.Tensor], what: str) -> None:
        """Put `state` into a model built on the meta device; re-tie tied weights; every parameter must be filled."""
        _, unexpected = self.load_state_dict(state, strict=False, assign=True)
        self.llm.tie_weights()
        still_empty = [n for n, p in self.named_parameters() if p.is_meta]
        if unexpected or still_empty:
            raise ValueError(f"{what} (missing {still_empty[:5]}, unexpected {unexpected[:5]})")

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load the weights (and LoRA adapters) of a folder written by `save_pretrained` into this model,
        in place: how a run resumes from a checkpoint or a finished stage. Adapters saved there and not
        yet on the model are added with their saved LoRA config. 4-bit (bitsandbytes) base weights are
        frozen and stay as loaded (the folder holds them dequantized)."""
        from peft import LoraConfig, set_peft_model_state_dict

        from .config import ComponentPlan

        path = Path(path)
        with open(path / CONFIG_NAME) as f:
            saved = json.load(f)
        extra = set(self.adapters) - set(saved.get("adapters", {}))
        if extra:
            raise ValueError(f"{path}: the model has LoRA adapters on {sorted(extra)}, the folder has none there")
        for name, sub in saved.get("adapters", {}).items():
            state = {k.removeprefix("base_model."): v
                     for k, v in load_file(str(path / sub / "adapter_model.safetensors")).items()}
            if name in self.adapters:
                res = set_peft_model_state_dict(self.adapters[name], state)
                if res.unexpected_keys:
                    raise ValueError(f"{path}: {name} adapter: unexpected keys {res.unexpected_keys[:5]}")
            else:
                lc = LoraConfig.from_pretrained(str(path / sub))
                self.add_lora(name, ComponentPlan(mode="lora", r=lc.r, alpha=lc.lora_alpha, dropout=lc.lora_dropout,
                                                  target_modules=sorted(lc.target_modules)), state)
        own = self.state_dict(keep_vars=True)
        plain = {k.replace(".base_layer.", "."): k for k in own if "lora_" not in k}  # saved name -> own name
        quant = {f"{n}.weight".replace(".base_layer.", ".") for n, m in self.named_modules()
                 if type(getattr(m, "weight", None)).__name__ == "Params4bit"}
        state = load_file(str(path / WEIGHTS_NAME))
        unexpected = [k for k in state if k not in plain and k not in quant]
        mapped = {plain[k]: v for k, v in state.items() if k in plain and k not in quant}
        loaded = {_param_id(own[k]) for k in mapped}
        missing = [k for k in plain.values() if k not in mapped and _param_id(own[k]) not in loaded  # tied
                   and not any(k.replace(".base_layer.", ".").startswith(q) for q in quant)]
        if unexpected or missing:
            raise ValueError(f"{path / WEIGHTS_NAME}: weights do not match this model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        with torch.no_grad():
            for k, v in mapped.items():  # the same order on every process (the file's)
                with _whole(own[k]):
                    own[k].copy_(v)

    def save_pretrained(self, path: str | os.PathLike, extra_files: dict | None = None,
                        weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write config, weights and tokenizer to a temporary folder, fsync it, then move it into place.

        `extra_files`: file name -> function writing that file (given its path) into the temporary folder,
        so that it appears together with the model or not at all (a training checkpoint's state).
        A crash midway leaves only a `.<name>.*` temporary folder, which readers ignore.
        `weights`: the weights to write instead of this module's own (a state dict gathered from ZeRO-3 / FSDP
        shards, where the module itself holds only its part).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            cfg = replace(
                self.config,
                encoder=self.encoder.saved_config(self.config.encoder),  # transformers config(s) inline
                # a 4-bit LLM is saved dequantized (see _state_to_save): the folder holds a plain model
                llm=replace(self.config.llm, path=None, tokenizer=".", quantization=None,
                            config={k: v for k, v in self.llm.config.to_dict().items() if k != "quantization_config"}),
            )
            adapters = {}
            for name, lora in self.adapters.items():
                from peft import get_peft_model_state_dict

                d = tmp / "adapters" / name
                d.mkdir(parents=True)
                lora.peft_config["default"].save_pretrained(str(d))
                # peft's PeftModel layout: keys under base_model.model.<component's own names>
                state = {f"base_model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(lora).items()}
                save_file(state, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
                adapters[name] = f"adapters/{name}"
            with open(tmp / CONFIG_NAME, "w") as f:
                json.dump({"vlmkit_version": __version__, "model": to_dict(cfg), "adapters": adapters}, f, indent=2)
            save_file(self._state_to_save(weights), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(str(tmp))
            for name, write in (extra_files or {}).items():
                write(tmp / name)
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            fsync_dir(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
            fsync_dir(path.parent)  # the rename itself survives a power loss
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):  # what was there before is untouched: only the temporary folder is gone
                raise disk_full(e, path, "nothing already saved was changed") from e
            raise

    def _state_to_save(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """All weights once: a tied target (lm_head sharing embed_tokens) is left out and re-tied on load.
        `state`: a full state dict gathered elsewhere (its tensors are copies: ties are read off this module)."""
        if state is not None:
            own = dict(self.named_parameters(remove_duplicate=False))
            tied = getattr(self.llm, "_tied_weights_keys", None) or {}
            state = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
            for target, source in (tied.items() if isinstance(tied, dict) else ()):
                t, s = own.get(f"llm.{target}"), own.get(f"llm.{source}")
                if t is not None and t is s:
                    state.pop(f"llm.{target}", None)
            return {k: v.detach().contiguous() for k, v in state.items()}
        state = self.state_dict()
        for name, m in self.named_modules():  # bitsandbytes 4-bit weights: saved dequantized (compute dtype)
            w = getattr(m, "weight", None)
            if type(w).__name__ == "Params4bit" and getattr(w, "quant_state", None) is not None:
                from bitsandbytes.functional import dequantize_4bit

                state = {k: v for k, v in state.items() if not k.startswith(f"{name}.weight.")}
                state[f"{name}.weight"] = dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype)
        # LoRA-wrapped layers keep their base weight as `<layer>.base_layer.weight`: save the plain names
        state = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
        tied = getattr(self.llm, "_tied_weights_keys", None) or {}
        for target, source in (tied.items() if isinstance(tied, dict) else ()):
            t, s = state.get(f"llm.{target}"), state.get(f"llm.{source}")
            if t is not None and s is not None and t.data_ptr() == s.data_ptr():
                del state[f"llm.{target}"]
        return {k: v.detach().contiguous() for k, v in state.items()}

    def processor(self, template: str | None = None) -> Processor:
        return make_processor(self.config, self.tokenizer, self.encoder, self.count_image_tokens, template)

    # ---- forward --------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, P', D]. A frozen encoder runs without autograd."""
        if any(p.requires_grad for p in self.encoder.parameters()):
            feats = self.encoder(pixel_values)  # [N, P, C]
        else:
            with torch.no_grad():
                feats = self.encoder(pixel_values)
        w = next(self.connector.parameters(), None)
        if w is not None and w.is_floating_point() and feats.dtype != w.dtype:
            # parts may hold different dtypes (DeepSpeed ZeRO-3 under bf16 left a trained connector in fp32
            # beside a bf16 encoder): each part computes in its own weights' dtype
            feats = feats.to(w.dtype)
        return self.connector(feats, self.encoder.grid)  # [N, P', D]

    def encode_naflex(self, patches: torch.Tensor, image_sizes, tiles_per_image=None) -> list[torch.Tensor]:
        """NaFlex: patch sequences [N, L, p*p*3] (each image's rows * cols patches, then zero padding) -> one
        token sequence [L'_i, D] per image. Each image's grid (rows, cols) comes from its (width, height) through
        the counter's TileSpec, as on the data side. The encoder masks the padding out of attention; only the
        real patches reach the connector (one call per distinct grid), so padding never reaches the LLM."""
        sizes = [tuple(int(v) for v in s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes)
                                                     else image_sizes)]
        grids = [self.tiling.grid(s) for s in sizes]
        given = tiles_per_image.tolist() if torch.is_tensor(tiles_per_image) else tiles_per_image
        longest = max((r * c for r, c in grids), default=0)
        if (patches.dim() != 3 or patches.shape[0] != len(sizes) or patches.shape[1] < longest
                or (given is not None and list(given) != [1] * len(sizes))):
            raise ValueError(f"naflex: image sizes {sizes} (width, height) give patch grids {grids} (rows, cols): "
                             f"pixel_values must be [{len(sizes)}, >= {longest}, patch*patch*3] patch sequences, one "
                             f"per image; got {tuple(patches.shape)}"
                             f"{'' if given is None else f' with tiles_per_image {list(given)}'}")
        if any(p.requires_grad for p in self.encoder.parameters()):
            feats = self.encoder(patches, grids)  # [N, L, C]
        else:
            with torch.no_grad():
                feats = self.encoder(patches, grids)
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        out: list[torch.Tensor] = [feats.new_zeros(0)] * len(sizes)
        for (rows, cols), idx in by_grid.items():
            tokens = self.connector(feats[idx, :rows * cols], (rows, cols))  # [n_g, P', D], padding dropped
            for j, i in enumerate(idx):
                out[i] = tokens[j]
        for k, (x, size) in enumerate(zip(out, sizes)):
            if x.shape[0] != self.count_image_tokens(*size):
                raise ValueError(f"image {k} ({size[0]}x{size[1]}): its {grids[k][0]}x{grids[k][1]} patch grid gave "
                                 f"{x.shape[0]} tokens, the counter {self.count_image_tokens(*size)}")
        return out

    def pack_images(self, feats: torch.Tensor, image_sizes, images_per_sample=None,
                    tiles_per_image=None) -> list[torch.Tensor]:
        """Tile features [N_tiles, P', D] -> one token sequence [L_i, D] per image (tiling modes).

        `image_sizes`: (width, height) per image; `images_per_sample`: images of each sample in order
        (InternVL's tile budget depends on it; default: all in one sample). Each image's tile count and
        token count come from the counter, the one place that counts; a mismatch names the image.
        """
        sizes = [tuple(int(v) for v in s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes)
                                                     else image_sizes)]
        per_sample = (images_per_sample.tolist() if torch.is_tensor(images_per_sample)
                      else list(images_per_sample) if images_per_sample is not None else [len(sizes)])
        if sum(per_sample) != len(sizes):
            raise ValueError(f"images_per_sample {per_sample} does not add up to the {len(sizes)} image size(s)")
        n_of = [n for n in per_sample for _ in range(n)]  # images in the sample of each image
        count = self.count_image_tokens
        tiles = [count.num_tiles(w, h, n) for (w, h), n in zip(sizes, n_of)]
        given = tiles_per_image.tolist() if torch.is_tensor(tiles_per_image) else tiles_per_image
        if (given is not None and list(given) != tiles) or sum(tiles) != feats.shape[0]:
            raise ValueError(f"image tile mismatch: image sizes {sizes} (width, height) give {tiles} tiles with "
                             f"{self.tiling.mode} tiling (total {sum(tiles)}); the batch has {feats.shape[0]} "
                             f"tile(s){'' if given is None else f' split as {list(given)}'}")
        out = []
        for k, (part, size, n) in enumerate(zip(feats.split(tiles), sizes, n_of)):
            packed = self.tiling.pack(part, size, self.image_newline)  # [L_k, D]
            if packed.shape[0] != count(*size, n):
                raise ValueError(f"image {k} ({size[0]}x{size[1]}): packing gave {packed.shape[0]} tokens, "
                                 f"the counter {count(*size, n)}")
            out.append(packed)
        return out

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes=None,
              images_per_sample=None, tiles_per_image=None, cu_seqlens=None) -> torch.Tensor:
        """Token embeddings with image features scattered into the placeholder positions.

        pixel_values: [N_tiles, 3, T, T] (one tile per image without tiling; naflex: patch sequences
        [N_images, L, p*p*3], see `encode_naflex`). With tiling, the
        collated `image_sizes` [N_images, 2] (width, height), `images_per_sample` [B] and (checked)
        `tiles_per_image` [N_images] say which tiles make which image and which images which sample.
        A packed batch (`cu_seqlens`: sample boundaries over the flattened rows) holds its samples in
        row-major order, so the placeholders meet the images in sample order as in a padded batch.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        mask = input_ids == self.image_token_id  # [B, T]
        found = int(mask.sum())
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if self.tiling is None:
            n_images = n_tiles
            feats = self.encode_images(pixel_values) if n_tiles else embeds.new_zeros(0, 0, embeds.shape[-1])
            per_image = [feats.shape[1]] * n_images
            feats = feats.reshape(-1, embeds.shape[-1])  # [N * P', D]
            expected = n_images * self.count_image_tokens(self.encoder.image_size, self.encoder.image_size)
        else:
            if n_tiles and image_sizes is None:
                raise ValueError(f"{self.tiling.mode} tiling needs image_sizes (width, height per image) with "
                                 "pixel_values: pass the processor's / collate's image_sizes")
            if images_per_sample is None and input_ids.shape[0] > 1 and self.tiling.mode == "internvl":
                raise ValueError("internvl tiling with a batch of several samples needs images_per_sample "
                                 "(the tile budget depends on each sample's image count): pass collate's")
            sizes = image_sizes if n_tiles else []
            n_images = len(sizes)
            if not n_tiles:
                parts = []
            elif self.tiling.mode == "naflex":  # each image its own patch grid
                parts = self.encode_naflex(pixel_values, sizes, tiles_per_image)
            else:
                parts = self.pack_images(self.encode_images(pixel_values), sizes, images_per_sample, tiles_per_image)
            per_image = [x.shape[0] for x in parts]
            feats = torch.cat(parts) if parts else embeds.new_zeros(0, embeds.shape[-1])  # [sum L_i, D]
            per_sample = images_per_sample if images_per_sample is not None else [n_images]
            n_of = [n for n in (per_sample.tolist() if torch.is_tensor(per_sample) else per_sample) for _ in range(n)]
            expected = sum(self.count_image_tokens(int(w), int(h), n) for (w, h), n in zip(
                sizes.tolist() if torch.is_tensor(sizes) else sizes, n_of))
        if found != expected or feats.shape[0] != expected:
            raise ValueError(f"image token mismatch: {n_images} image(s) give {feats.shape[0]} "
                             f"features (expected {expected}), the text holds {found} placeholder tokens")
        if images_per_sample is not None:
            self._check_rows(mask, per_image, images_per_sample, cu_seqlens)
        if not n_tiles and self._image_path_must_run():
            embeds = embeds + self._unused_image_path(embeds)
        return embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))

    def _image_path_must_run(self) -> bool:
        """Training with a batch of no image: must the encoder + connector run anyway? Yes when they (or
        image_newline) train, since DDP waits for their gradients on every process, and when the weights are
        sharded (DeepSpeed ZeRO-3, FSDP): each module's forward gathers its shards with a collective that every
        process must join. Never in inference."""
        if not self.training:
            return False
        parts = [self.encoder, self.connector] + ([self.image_newline] if self.image_newline is not None else [])
        params = [p for part in parts for p in ([part] if isinstance(part, nn.Parameter) else part.parameters())]
        return any(p.requires_grad or hasattr(p, "ds_id") or _is_dtensor(p) for p in params)

    def _unused_image_path(self, embeds: torch.Tensor) -> torch.Tensor:
        """A zero that depends on every image-side parameter: one blank tile through encoder + connector
        (+ image_newline), times 0. Every process then runs the same modules the same number of times per step
        (the known cause of ZeRO-3 / DDP hangs is a module some ranks skip), and the loss is unchanged."""
        s = self.encoder.image_size
        blank = torch.zeros(1, 3, s, s, device=embeds.device)  # [1, 3, S, S]
        used = self.encode_images(blank).float().sum()  # encoder + connector
        if self.image_newline is not None:
            used = used + self.image_newline.float().sum()
        return (used * 0).to(embeds.dtype)  # [] exactly 0: the features are finite

    @staticmethod
    def _check_rows(mask: torch.Tensor, per_image: list[int], images_per_sample, cu_seqlens=None) -> None:
        """Each sample's placeholders must match its own images' tokens (not only the batch total)."""
        per_sample = images_per_sample.tolist() if torch.is_tensor(images_per_sample) else list(images_per_sample)
        if cu_seqlens is None:
            found = mask.sum(1).tolist()
        else:  # packed: each sample is a segment of the flattened rows
            cs = F.pad(mask.reshape(-1).long().cumsum(0), (1, 0))
            cu = cu_seqlens.to(cs.device).long()
            found = (cs[cu[1:]] - cs[cu[:-1]]).tolist()
        if len(per_sample) != len(found):
            raise ValueError(f"images_per_sample has {len(per_sample)} entries for {len(found)} sample(s)")
        start = 0
        for r, n in enumerate(per_sample):
            want = per_image[start:start + n]
            start += n
            if sum(want) != found[r]:
                raise ValueError(f"image token mismatch in sample {r}: its {n} image(s) give {want} features "
                                 f"(expected {sum(want)}), its text holds {found[r]} placeholder tokens")

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None,
                num_items: int | None = None, image_sizes=None, images_per_sample=None, tiles_per_image=None,
                position_ids=None, cu_seqlens=None, max_seqlen: int | None = None, **_) -> torch.Tensor:
        """The training loss: cross-entropy over labelled positions only, summed / `num_items`.

        `num_items` is the number of labelled tokens in the whole optimizer step (all micro-batches,
        all processes), so gradient accumulation gives the same update as one large batch; by
        default the mean over this batch. Full-vocabulary logits are formed only where labelled.
        A packed batch (collate(..., pack=True): `position_ids`, `cu_seqlens`, `max_seqlen`) gives the
        same loss as the padded batch of the same samples; its `attention_mask` is not used.
        """
        embeds = self.embed(input_ids, pixel_values, image_sizes, images_per_sample, tiles_per_image, cu_seqlens)
        hidden = self._decode(embeds, attention_mask, position_ids, cu_seqlens, max_seqlen)
        targets = labels[:, 1:]  # [B, T-1]
        sel = targets != IGNORE
        h = hidden[:, :-1][sel]  # [n, D]
        logits = self._logits(h).float()  # [n, V]
        loss = F.cross_entropy(logits, targets[sel], reduction="sum")
        return loss / (num_items if num_items else max(int(sel.sum()), 1))

    def _decode(self, embeds, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None,
                base: bool = True):
        """The LLM over input embeddings: last hidden states (`base`) or the LM's output (logits).

        Packed (`cu_seqlens` given): no 2D mask, positions restarting per sample; transformers builds the
        block-diagonal mask for sdpa / eager / flex_attention, `varlen` reads the boundaries directly.
        """
        model = self.llm.base_model if base else self.llm
        if cu_seqlens is None:
            out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
            return out.last_hidden_state if base else out.logits
        from .models.attention import PACKED_IMPLEMENTATIONS, VARLEN, packed_forward

        impl = self.llm.config._attn_implementation
        if impl not in PACKED_IMPLEMENTATIONS:
            raise ValueError(f"a packed batch (data.pack) needs llm.attn_implementation varlen, sdpa, eager or "
                             f"flex_attention; this LLM runs {impl!r}")
        if position_ids is None:
            raise ValueError("a packed batch needs position_ids (restarting at 0 per sample): use collate(pack=True)")
        kw = {}
        if impl == VARLEN:
            cu = cu_seqlens.to(device=embeds.device, dtype=torch.int32)
            if max_seqlen is None:
                max_seqlen = int((cu[1:] - cu[:-1]).max())
            kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(max_seqlen), max_length_k=int(max_seqlen))
        with packed_forward():
            out = model(inputs_embeds=embeds, attention_mask=None, position_ids=position_ids.to(embeds.device),
                        use_cache=False, **kw)
        return out.last_hidden_state if base else out.logits

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.llm.get_output_embeddings()(h)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def logits(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, images_per_sample=None,
               tiles_per_image=None, position_ids=None, cu_seqlens=None, max_seqlen=None, **_) -> torch.Tensor:
        """Full logits [B, T, V] (for inference and tests; a packed batch too)."""
        embeds = self.embed(input_ids, pixel_values, image_sizes, images_per_sample, tiles_per_image, cu_seqlens)
        if cu_seqlens is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits
        return self._decode(embeds, None, position_ids, cu_seqlens, max_seqlen, base=False)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                 image_sizes=None, images_per_sample=None, tiles_per_image=None, **kwargs):
        """Generate with the LLM's KV cache; a batch must be left-padded. Returns only the new tokens."""
        embeds = self.embed(input_ids, pixel_values, image_sizes, images_per_sample, tiles_per_image)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, **kwargs)

    def decoder_layers(self) -> list[nn.Module]:
        """The LLM's decoder layers (transformers' GradientCheckpointingLayer blocks), in order."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in self.llm.modules() if isinstance(m, GradientCheckpointingLayer)]

    def compile_decoder_layers(self, **kwargs) -> int:
        """torch.compile each LLM decoder layer in place (`nn.Module.compile`; kwargs go to torch.compile,
        default dynamic=True: packed rows change length every step). Gradient checkpointing wraps the compiled
        layer. Returns how many layers were compiled."""
        kwargs.setdefault("dynamic", True)
        layers = self.decoder_layers()
        for layer in layers:
            layer.compile(**kwargs)
        return len(layers)

    def enable_gradient_checkpointing(self, every: int = 1, skip_last: int = 0) -> list[bool]:
        """Recompute the LLM's decoder layers in the backward instead of keeping their activations.

        `every`: only every k-th decoder layer (0, k, 2k, ...) is checkpointed; `skip_last`: the last n layers
        are not. The others keep their activations: less recomputation, more memory. Set on each
        transformers GradientCheckpointingLayer's own flag, so it works with any transformers 5.x (5.2x's
        `every_n_layers` is the same rule). Returns the flag of each decoder layer.
        """
        # transformers >= 5.2x names it activation_checkpointing_enable; older 5.x gradient_checkpointing_enable
        if hasattr(self.llm, "activation_checkpointing_enable"):
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = self.decoder_layers()
        flags = [i % max(1, every) == 0 and i < len(layers) - skip_last for i in range(len(layers))]
        for layer, flag in zip(layers, flags):
            layer.gradient_checkpointing = flag
        return flags
