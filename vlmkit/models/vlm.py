"""The assembled VLM: image_features (encoder -> connector, per tiling mode) and video_features (frames ->
encoder -> connector -> pooling -> newline, video.py) -> merge at placeholders -> LLM.

The module only: it takes its parts. Building (build.py), saving and loading (serialization.py), LoRA (lora.py)
and the merge checks (merge.py) are functions in their own files; the methods named as in transformers
(`from_config`, `from_pretrained`, `save_pretrained`, ...) are one line each into them.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..data.conversation import IGNORE
from ..data.processor import Processor
from ..tiling.counter import ImageTokenCounter, image_layout
from . import build, lora, serialization
from . import video as video_path
from .encoders import VisionEncoder
from .llm import add_image_token
from .merge import check_counts, check_inputs, image_path_must_run, scatter, unused_image_path


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
                                                               encoder.image_size, encoder.geometry, config.video)
        self.tiling = self.count_image_tokens.tiling  # TileSpec or None
        if self.tiling is not None and self.tiling.uses_newline:
            # LLaVA-NeXT: appended after each row of AnyRes features; init randn / sqrt(D)
            d = llm.config.hidden_size
            self.image_newline = nn.Parameter(torch.randn(d) / math.sqrt(d))  # [D]
        else:
            self.image_newline = None
        self.video_token_id = None if config.video is None else add_image_token(tokenizer, config.video.token)
        if config.video is not None and config.video.newline != "none" and self.image_newline is None:
            d = llm.config.hidden_size  # the video's own newline, initialised like image_newline
            self.video_newline = nn.Parameter(torch.randn(d) / math.sqrt(d))  # [D]
        else:
            self.video_newline = None
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
        """The parts a stage plan can name (`image_newline` only when AnyRes with unpad uses it, `video_newline`
        when model.video appends a newline and there is no image_newline to share)."""
        comps = {"encoder": self.encoder, "connector": self.connector, "llm": self.llm}
        if self.image_newline is not None:
            comps["image_newline"] = self.image_newline
        if self.video_newline is not None:
            comps["video_newline"] = self.video_newline
        return comps

    # ---- building, saving, LoRA: one line each into build.py / serialization.py / lora.py -------------
    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype | None = None) -> VLM:
        """Pretrained parts from hub ids / local dirs, random ones from their configs (`build.build`)."""
        return build.build(cls, config, dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False) -> VLM:
        """Load a folder written by `save_pretrained` (`build.load`); its own code runs only with trust_remote_code."""
        return build.load(cls, path, dtype, trust_remote_code)

    def save_pretrained(self, path: str | os.PathLike, extra_files: dict | None = None,
                        weights: dict[str, torch.Tensor] | None = None) -> None:
        """Config, weights, adapters and tokenizer, written atomically (`serialization.save_pretrained`)."""
        serialization.save_pretrained(self, path, extra_files, weights)

    def load_weights(self, path: str | os.PathLike) -> None:
        """A saved folder's weights and adapters into this model, in place (`serialization.load_weights`)."""
        serialization.load_weights(self, path)

    def assign_weights(self, state: dict[str, torch.Tensor], what: str) -> None:
        """`state` into a model built on the meta device (`serialization.assign_weights`)."""
        serialization.assign_weights(self, state, what)

    def _state_to_save(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return serialization.state_to_save(self, state)

    def add_lora(self, name: str, plan, state: dict | None = None) -> None:
        """Wrap a component's Linear layers with peft LoRA adapters, in place (`lora.add_lora`)."""
        lora.add_lora(self, name, plan, state)

    def merge_lora(self, name: str | None = None) -> None:
        """Fold adapters into the base weights (`lora.merge_lora`)."""
        lora.merge_lora(self, name)

    def processor(self, template: str | None = None) -> Processor:
        return build.processor_for(self, template)

    # ---- images: one seam ---------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, image_sizes=None, images_per_sample=None,
                       tiles_per_image=None) -> list[torch.Tensor]:
        """The image seam: pixels in, one projected token sequence [L_i, D] per image out, in every tiling mode.

        pixel_values: [N_tiles, 3, T, T] (one tile per image without tiling; naflex: patch sequences
        [N_images, L, p*p*3], see `encode_naflex`). With tiling, the collated `image_sizes` [N_images, 2]
        (width, height), `images_per_sample` [B] and (checked) `tiles_per_image` [N_images] say which tiles
        make which image and which images which sample.
        """
        if self.tiling is None:
            return list(self.encode_images(pixel_values))  # [P', D] each
        if self.tiling.mode == "naflex":  # each image its own patch grid
            return self.encode_naflex(pixel_values, image_sizes, tiles_per_image)
        return self.pack_images(self.encode_images(pixel_values), image_sizes, images_per_sample, tiles_per_image)

    def _run_encoder(self, *inputs) -> torch.Tensor:
        """The encoder's features; a frozen encoder runs without autograd."""
        if any(p.requires_grad for p in self.encoder.parameters()):
            return self.encoder(*inputs)
        with torch.no_grad():
            return self.encoder(*inputs)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, P', D]. A frozen encoder runs without autograd."""
        return self.connect(self._run_encoder(pixel_values), self.encoder.grid)  # [N, P', D]

    def connect(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Encoder features [N, P, C] on `grid` -> connector tokens [N, P', D], in the connector's dtype."""
        w = next(self.connector.parameters(), None)
        if w is not None and w.is_floating_point() and feats.dtype != w.dtype:
            # parts may hold different dtypes (DeepSpeed ZeRO-3 under bf16 left a trained connector in fp32
            # beside a bf16 encoder): each part computes in its own weights' dtype
            feats = feats.to(w.dtype)
        return self.connector(feats, grid)  # [N, P', D]

    def video_features(self, pixel_values_videos: torch.Tensor, frames_per_video) -> list[torch.Tensor]:
        """The video seam: frames [N_frames, 3, T, T] of all videos (each one tile) and each video's frame count
        [N_videos] -> one token sequence [L_v, D] per video: encoder -> connector -> pooling -> newline
        (video.py; L_v is the counter's `count_video_tokens`)."""
        if self.config.video is None:
            raise ValueError("this model takes no video (model.video is not set): a video sample needs a model "
                             "built with model.video")
        return video_path.video_features(self, pixel_values_videos, frames_per_video)

    def encode_naflex(self, patches: torch.Tensor, image_sizes, tiles_per_image=None) -> list[torch.Tensor]:
        """NaFlex: patch sequences [N, L, p*p*3] (each image's rows * cols patches, then zero padding) -> one
        token sequence [L'_i, D] per image. Each image's grid (rows, cols) comes from its (width, height) through
        the counter's TileSpec, as on the data side. The encoder masks the padding out of attention; only the
        real patches reach the connector (one call per distinct grid), so padding never reaches the LLM."""
        sizes, _ = image_layout(image_sizes)
        grids = [self.tiling.grid(s) for s in sizes]
        given = tiles_per_image.tolist() if torch.is_tensor(tiles_per_image) else tiles_per_image
        longest = max((r * c for r, c in grids), default=0)
        if (patches.dim() != 3 or patches.shape[0] != len(sizes) or patches.shape[1] < longest
                or (given is not None and list(given) != [1] * len(sizes))):
            raise ValueError(f"naflex: image sizes {sizes} (width, height) give patch grids {grids} (rows, cols): "
                             f"pixel_values must be [{len(sizes)}, >= {longest}, patch*patch*3] patch sequences, one "
                             f"per image; got {tuple(patches.shape)}"
                             f"{'' if given is None else f' with tiles_per_image {list(given)}'}")
        feats = self._run_encoder(patches, grids)  # [N, L, C]
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        out: list[torch.Tensor] = [feats.new_zeros(0)] * len(sizes)
        for (rows, cols), idx in by_grid.items():
            tokens = self.connector(feats[idx, :rows * cols], (rows, cols))  # [n_g, P', D], padding dropped
            for j, i in enumerate(idx):
                out[i] = tokens[j]
        return out

    def pack_images(self, feats: torch.Tensor, image_sizes, images_per_sample=None,
                    tiles_per_image=None) -> list[torch.Tensor]:
        """Tile features [N_tiles, P', D] -> one token sequence [L_i, D] per image (tiling modes).

        `image_sizes`: (width, height) per image; `images_per_sample`: images of each sample in order
        (InternVL's tile budget depends on it; default: all in one sample). Each image's tile count and
        token count come from the counter, the one place that counts (checked in merge.check_counts).
        """
        sizes, n_of = image_layout(image_sizes, images_per_sample)
        tiles = [self.count_image_tokens.num_tiles(w, h, n) for (w, h), n in zip(sizes, n_of)]
        given = tiles_per_image.tolist() if torch.is_tensor(tiles_per_image) else tiles_per_image
        if (given is not None and list(given) != tiles) or sum(tiles) != feats.shape[0]:
            raise ValueError(f"image tile mismatch: image sizes {sizes} (width, height) give {tiles} tiles with "
                             f"{self.tiling.mode} tiling (total {sum(tiles)}); the batch has {feats.shape[0]} "
                             f"tile(s){'' if given is None else f' split as {list(given)}'}")
        return [self.tiling.pack(part, size, self.image_newline)  # [L_k, D]
                for part, size in zip(feats.split(tiles), sizes)]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes=None,
              images_per_sample=None, tiles_per_image=None, cu_seqlens=None, pixel_values_videos=None,
              frames_per_video=None, videos_per_sample=None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the image and video features scattered into their placeholders.

        Image arguments as `image_features` takes them, video ones as `video_features` (`videos_per_sample` [B]
        checks each sample's count). A packed batch (`cu_seqlens`: sample boundaries over the flattened rows)
        holds its samples in row-major order, so the placeholders meet the images in sample order as in a
        padded batch.
        """
        if self.video_token_id is None and pixel_values_videos is not None and pixel_values_videos.shape[0]:
            raise ValueError("this model takes no video (model.video is not set), but the batch holds "
                             f"{pixel_values_videos.shape[0]} video frame(s)")
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        mask = input_ids == self.image_token_id  # [B, T]
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        check_inputs(self.tiling, n_tiles, image_sizes, images_per_sample, batch=input_ids.shape[0])
        feats = self.image_features(pixel_values, image_sizes, images_per_sample, tiles_per_image) if n_tiles else []
        expected = self.count_image_tokens.per_image(n_tiles, image_sizes, images_per_sample)
        check_counts(mask, [f.shape[0] for f in feats], expected, images_per_sample, cu_seqlens)
        if not n_tiles and image_path_must_run(self):
            embeds = embeds + unused_image_path(self, embeds)
        embeds = scatter(embeds, mask, feats)
        return self._embed_videos(embeds, input_ids, pixel_values_videos, frames_per_video, videos_per_sample,
                                  cu_seqlens)

    def _embed_videos(self, embeds, input_ids, pixel_values_videos, frames_per_video, videos_per_sample,
                      cu_seqlens) -> torch.Tensor:
        """`embeds` [B, T, D] with the videos' tokens at the `<video>` placeholders (checked as images are)."""
        n_frames = 0 if pixel_values_videos is None else pixel_values_videos.shape[0]
        if self.video_token_id is None:
            return embeds
        if n_frames and frames_per_video is None:
            raise ValueError("pixel_values_videos needs frames_per_video (frames of each video): pass the "
                             "processor's / collate's")
        mask = input_ids == self.video_token_id  # [B, T]
        feats = self.video_features(pixel_values_videos, frames_per_video) if n_frames else []
        counts = [] if not n_frames else (frames_per_video.tolist() if torch.is_tensor(frames_per_video)
                                          else list(frames_per_video))
        expected = [self.count_image_tokens.count_video_tokens(int(n)) for n in counts]
        check_counts(mask, [f.shape[0] for f in feats], expected, videos_per_sample, cu_seqlens, what="video")
        if not n_frames and video_path.video_path_must_run(self):
            embeds = embeds + video_path.unused_video_path(self, embeds)
        return scatter(embeds, mask, feats)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None,
                num_items: int | None = None, image_sizes=None, images_per_sample=None, tiles_per_image=None,
                position_ids=None, cu_seqlens=None, max_seqlen: int | None = None, pixel_values_videos=None,
                frames_per_video=None, videos_per_sample=None, **_) -> torch.Tensor:
        """The training loss: cross-entropy over labelled positions only, summed / `num_items`.

        `num_items` is the number of labelled tokens in the whole optimizer step (all micro-batches,
        all processes), so gradient accumulation gives the same update as one large batch; by
        default the mean over this batch. Full-vocabulary logits are formed only where labelled.
        A packed batch (collate(..., pack=True): `position_ids`, `cu_seqlens`, `max_seqlen`) gives the
        same loss as the padded batch of the same samples; its `attention_mask` is not used.
        """
        embeds = self.embed(input_ids, pixel_values, image_sizes, images_per_sample, tiles_per_image, cu_seqlens,
                            pixel_values_videos, frames_per_video, videos_per_sample)
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
        from .attention import PACKED_IMPLEMENTATIONS, VARLEN, packed_forward

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
               tiles_per_image=None, position_ids=None, cu_seqlens=None, max_seqlen=None, pixel_values_videos=None,
               frames_per_video=None, videos_per_sample=None, **_) -> torch.Tensor:
        """Full logits [B, T, V] (for inference and tests; a packed batch too)."""
        embeds = self.embed(input_ids, pixel_values, image_sizes, images_per_sample, tiles_per_image, cu_seqlens,
                            pixel_values_videos, frames_per_video, videos_per_sample)
        if cu_seqlens is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits
        return self._decode(embeds, None, position_ids, cu_seqlens, max_seqlen, base=False)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                 image_sizes=None, images_per_sample=None, tiles_per_image=None, pixel_values_videos=None,
                 frames_per_video=None, videos_per_sample=None, **kwargs):
        """Generate with the LLM's KV cache; a batch must be left-padded. Returns only the new tokens."""
        embeds = self.embed(input_ids, pixel_values, image_sizes, images_per_sample, tiles_per_image, None,
                            pixel_values_videos, frames_per_video, videos_per_sample)
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
