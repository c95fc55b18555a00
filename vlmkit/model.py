"""The assembled VLM: encode_images -> connector -> merge at placeholders -> LLM -> loss.

Saved as a folder: config.json (every part's config, so no hub access is needed to rebuild),
model.safetensors (all weights under encoder.*, connector.*, llm.*) and the tokenizer files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, from_dict, to_dict
from .data.conversation import IGNORE
from .data.images import ImageTransform
from .data.processor import Processor
from .encoders import VisionEncoder, build_encoder, encoder_geometry
from .llm import add_image_token, build_llm, load_tokenizer
from .registry import CONNECTORS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class ImageTokenCounter:
    """The one place that counts placeholders: (width, height) of an image -> tokens it becomes.

    Used by the data side (to expand `<image>`) and the model side (to check the merge).
    Picklable, so data-loader workers carry it.
    """

    grid: tuple[int, int]
    connector: str
    options: tuple = ()

    def __call__(self, width: int, height: int) -> int:
        return CONNECTORS.get(self.connector).num_tokens(self.grid, **dict(self.options))

    @classmethod
    def for_config(cls, grid: tuple[int, int], connector: ConnectorConfig) -> ImageTokenCounter:
        return cls(tuple(grid), connector.name, tuple(sorted(connector.options.items())))


def make_processor(config: ModelConfig, tokenizer, geometry, count_image_tokens: ImageTokenCounter,
                   template: str | None = None) -> Processor:
    """The one way a Processor is built. `geometry`: the encoder (a VisionEncoder, or an EncoderGeometry
    read from its config): image_size, mean, std."""
    transform = ImageTransform(geometry.image_size, geometry.mean, geometry.std, config.encoder.image_aspect)
    image_token_id = add_image_token(tokenizer, config.llm.image_token)
    return Processor(tokenizer, transform, config.llm.image_token, image_token_id, count_image_tokens,
                     template or config.template)


def build_processor(config: ModelConfig, template: str | None = None, tokenizer=None) -> Processor:
    """The Processor `VLM.from_config(config).processor()` would give, without building the model: only
    the tokenizer, the encoder's transformers config (AutoConfig, no weights) and the connector's
    token count are read. Seconds instead of minutes for a 7B model (`vlmkit check-data`)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config.llm.tokenizer or config.llm.path, config.llm.image_token)
    geo = encoder_geometry(config.encoder)
    return make_processor(config, tokenizer, geo, ImageTokenCounter.for_config(geo.grid, config.connector), template)


def load_processor(path: str | os.PathLike, template: str | None = None) -> Processor:
    """The Processor of a folder written by `VLM.save_pretrained` (config.json + tokenizer; weights unread)."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} is not a vlmkit model folder (no {CONFIG_NAME})")
    with open(path / CONFIG_NAME) as f:
        config = from_dict(ModelConfig, json.load(f)["model"], "model")
    config.llm.tokenizer = str(path)
    return build_processor(config, template)


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
        self.count_image_tokens = ImageTokenCounter.for_config(encoder.grid, config.connector)
        self.adapters: dict[str, nn.Module] = {}  # component -> peft LoraModel (not a submodule)

    def components(self) -> dict[str, nn.Module | nn.Parameter]:
        """The parts a stage plan can name."""
        return {"encoder": self.encoder, "connector": self.connector, "llm": self.llm}

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
        tokenizer = load_tokenizer(config.llm.tokenizer or config.llm.path, config.llm.image_token)
        llm = build_llm(config.llm, tokenizer, dtype)
        connector = CONNECTORS.get(config.connector.name)(encoder.out_dim, llm.config.hidden_size,
                                                          **config.connector.options)
        model = cls(config, encoder, connector, llm, tokenizer)
        if dtype is not None:
            model.to(dtype)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> VLM:
        """Load a folder written by `save_pretrained`: parts rebuilt from config.json, weights from safetensors."""
        path = Path(path)
        if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{path} is not a vlmkit model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        with open(path / CONFIG_NAME) as f:
            saved = json.load(f)
        config = from_dict(ModelConfig, saved["model"], "model")
        config.llm.tokenizer = str(path)
        tokenizer = load_tokenizer(str(path), config.llm.image_token)
        with init_empty_weights(include_buffers=False):
            encoder = build_encoder(config.encoder)
            llm = build_llm(config.llm, tokenizer)
            connector = CONNECTORS.get(config.connector.name)(encoder.out_dim, llm.config.hidden_size,
                                                              **config.connector.options)
            model = cls(config, encoder, connector, llm, tokenizer)
        state = load_file(str(path / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        model.llm.tie_weights()
        still_empty = [n for n, p in model.named_parameters() if p.is_meta]
        if unexpected or still_empty:
            raise ValueError(f"{path / WEIGHTS_NAME}: weights do not match the config "
                             f"(missing {still_empty[:5]}, unexpected {unexpected[:5]})")
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

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config, weights and tokenizer to a temporary folder, then move it into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            enc = self.encoder
            cfg = replace(
                self.config,
                encoder=replace(self.config.encoder, path=None, config=enc.model.config.to_dict(),
                                image_size=enc.image_size, image_mean=list(enc.mean), image_std=list(enc.std)),
                llm=replace(self.config.llm, path=None, tokenizer=".", config=self.llm.config.to_dict()),
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
            save_file(self._state_to_save(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(str(tmp))
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _state_to_save(self) -> dict[str, torch.Tensor]:
        """All weights once: a tied target (lm_head sharing embed_tokens) is left out and re-tied on load."""
        # LoRA-wrapped layers keep their base weight as `<layer>.base_layer.weight`: save the plain names
        state = {k.replace(".base_layer.", "."): v for k, v in self.state_dict().items() if "lora_" not in k}
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
        return self.connector(feats, self.encoder.grid)  # [N, P', D]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features scattered into the placeholder positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        mask = input_ids == self.image_token_id  # [B, T]
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        feats = self.encode_images(pixel_values) if n_images else embeds.new_zeros(0, 0, embeds.shape[-1])
        expected = n_images * self.count_image_tokens(self.encoder.image_size, self.encoder.image_size)
        found = int(mask.sum())
        if found != expected or feats.shape[0] * feats.shape[1] != expected:
            raise ValueError(f"image token mismatch: {n_images} image(s) give {feats.shape[0] * feats.shape[1]} "
                             f"features (expected {expected}), the text holds {found} placeholder tokens")
        return embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None,
                num_items: int | None = None, **_) -> torch.Tensor:
        """The training loss: cross-entropy over labelled positions only, summed / `num_items`.

        `num_items` is the number of labelled tokens in the whole optimizer step (all micro-batches,
        all processes), so gradient accumulation gives the same update as one large batch; by
        default the mean over this batch. Full-vocabulary logits are formed only where labelled.
        """
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.llm.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]  # [B, T-1]
        sel = targets != IGNORE
        h = hidden[:, :-1][sel]  # [n, D]
        logits = self._logits(h).float()  # [n, V]
        loss = F.cross_entropy(logits, targets[sel], reduction="sum")
        return loss / (num_items if num_items else max(int(sel.sum()), 1))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.llm.get_output_embeddings()(h)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def logits(self, input_ids, attention_mask=None, pixel_values=None) -> torch.Tensor:
        """Full logits [B, T, V] (for inference and tests)."""
        embeds = self.embed(input_ids, pixel_values)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 32, **kwargs):
        """Generate with the LLM's KV cache; a batch must be left-padded. Returns only the new tokens."""
        embeds = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        # transformers >= 5.2x names it activation_checkpointing_enable; older 5.x gradient_checkpointing_enable
        if hasattr(self.llm, "activation_checkpointing_enable"):
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
