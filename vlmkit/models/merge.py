"""Image features into the token sequence: the placeholder scatter and its one count check.

The counts come from the ImageTokenCounter (vlmkit.tiling.counter), the same place the data side expands
`<image>` with; a mismatch names the batch, the sample or the image that disagrees.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import is_sharded


def check_inputs(tiling, n_tiles: int, image_sizes, images_per_sample, batch: int) -> None:
    """What a tiling mode needs beside the pixels: every image's size, and with InternVL each sample's image
    count (its tile budget depends on it)."""
    if tiling is None:
        return
    if n_tiles and image_sizes is None:
        raise ValueError(f"{tiling.mode} tiling needs image_sizes (width, height per image) with "
                         "pixel_values: pass the processor's / collate's image_sizes")
    if images_per_sample is None and batch > 1 and tiling.mode == "internvl":
        raise ValueError("internvl tiling with a batch of several samples needs images_per_sample "
                         "(the tile budget depends on each sample's image count): pass collate's")


def check_counts(mask: torch.Tensor, per_image: list[int], expected: list[int], images_per_sample=None,
                 cu_seqlens=None, what: str = "image") -> None:
    """The one count check: placeholders in the text (`mask` [B, T]) == features of the images (`per_image`)
    == the counter's `expected` tokens, for the batch, for each image and (given `images_per_sample`) for each
    sample. A packed batch (`cu_seqlens`: sample boundaries
    over the flattened rows) holds its samples in row-major order. `what`: image or video (the same checks on
    the `<video>` placeholders, with `videos_per_sample`)."""
    found, total = int(mask.sum()), sum(expected)
    if found != total or sum(per_image) != total:
        raise ValueError(f"{what} token mismatch: {len(expected)} {what}(s) give {sum(per_image)} "
                         f"features (expected {total}), the text holds {found} placeholder tokens")
    for k, (got, want) in enumerate(zip(per_image, expected)):
        if got != want:
            raise ValueError(f"{what} {k}: its features are {got} tokens, the counter {want}")
    if images_per_sample is not None:
        _check_rows(mask, per_image, images_per_sample, cu_seqlens, what)


def _check_rows(mask: torch.Tensor, per_image: list[int], images_per_sample, cu_seqlens=None,
                what: str = "image") -> None:
    """Each sample's placeholders must match its own images' tokens (not only the batch total)."""
    per_sample = images_per_sample.tolist() if torch.is_tensor(images_per_sample) else list(images_per_sample)
    if cu_seqlens is None:
        found = mask.sum(1).tolist()
    else:  # packed: each sample is a segment of the flattened rows
        cs = F.pad(mask.reshape(-1).long().cumsum(0), (1, 0))
        cu = cu_seqlens.to(cs.device).long()
        found = (cs[cu[1:]] - cs[cu[:-1]]).tolist()
    if len(per_sample) != len(found):
        raise ValueError(f"{what}s_per_sample has {len(per_sample)} entries for {len(found)} sample(s)")
    start = 0
    for r, n in enumerate(per_sample):
        want = per_image[start:start + n]
        start += n
        if sum(want) != found[r]:
            raise ValueError(f"{what} token mismatch in sample {r}: its {n} {what}(s) give {want} features "
                             f"(expected {sum(want)}), its text holds {found[r]} placeholder tokens")


def scatter(embeds: torch.Tensor, mask: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
    """Token embeddings [B, T, D] with the images' tokens (in order) at the placeholder positions `mask` [B, T]."""
    flat = torch.cat(feats) if feats else embeds.new_zeros(0, embeds.shape[-1])  # [sum L_i, D]
    return embeds.masked_scatter(mask.unsqueeze(-1), flat.to(embeds.dtype))


def image_path_must_run(model) -> bool:
    """Training with a batch of no image: must the encoder + connector run anyway? Yes when they (or
    image_newline) train, since DDP waits for their gradients on every process, and when the weights are
    sharded (DeepSpeed ZeRO-3, FSDP): each module's forward gathers its shards with a collective that every
    process must join. Never in inference."""
    if not model.training:
        return False
    parts = [model.encoder, model.connector] + ([model.image_newline] if model.image_newline is not None else [])
    params = [p for part in parts for p in ([part] if isinstance(part, nn.Parameter) else part.parameters())]
    return any(p.requires_grad or is_sharded(p) for p in params)


def unused_image_path(model, embeds: torch.Tensor) -> torch.Tensor:
    """A zero that depends on every image-side parameter: one blank tile through encoder + connector
    (+ image_newline), times 0. Every process then runs the same modules the same number of times per step
    (the known cause of ZeRO-3 / DDP hangs is a module some ranks skip), and the loss is unchanged."""
    s = model.encoder.image_size
    blank = torch.zeros(1, 3, s, s, device=embeds.device)  # [1, 3, S, S]
    used = model.encode_images(blank).float().sum()  # encoder + connector
    if model.image_newline is not None:
        used = used + model.image_newline.float().sum()
    return (used * 0).to(embeds.dtype)  # [] exactly 0: the features are finite
