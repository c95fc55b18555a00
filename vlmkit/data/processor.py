"""The data side of a model: images and video frames -> pixels, conversations -> ids and labels, placeholders
counted once.

A Processor is built from a model (`VLM.processor()`) or from a saved model dir, and holds no
weights, so it travels to data-loader workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import get_worker_info

from ..tiling import functions as T
from .conversation import IGNORE, SampleError, encode, get_template, normalize, truncate
from .images import ImageTransform


@dataclass
class Processor:
    tokenizer: object
    transform: ImageTransform
    image_token: str
    image_token_id: int
    count_image_tokens: Callable[[int, int], int]
    """(width, height) of an image -> its placeholder count: the one counting function the model uses too.
    With tiling it also takes `n_images` (the sample's image count, InternVL's tile budget)."""
    template: str = "vicuna_v1"
    tiling: object | None = None
    """A `vlmkit.highres.TileSpec` (anyres | internvl): each image becomes [n_tiles, 3, T, T]; None: one tile.
    naflex: each image becomes its own patch sequence: pixel_values [n_images, L, p*p*3], zero-padded to the
    sample's longest (L = its most patches); each image's (rows, cols) is the TileSpec's grid of its size."""
    video_token: str | None = None
    """model.video.token; None: the model takes no video."""
    video_token_id: int | None = None

    def __call__(self, conversations: list[dict], images: list[Image.Image], template: str | None = None,
                 max_length: int | None = None, add_generation_prompt: bool = False, videos=None) -> dict:
        """ids, labels and pixels of one sample. `videos`: each a list of PIL frames (or an object with a
        `.frames` list, vlmkit.data.video.Video); the k-th `<video>` becomes count_video_tokens(frames) video
        placeholders, the frames one tile each: pixel_values_videos [N_frames, 3, T, T], frames_per_video [N]."""
        messages = normalize(conversations)
        n = len(images)
        if self.tiling is None:
            counts = [self.count_image_tokens(*im.size) for im in images]
        else:
            counts = [self.count_image_tokens(*im.size, n_images=n) for im in images]
        ids, labels = encode(messages, self.tokenizer, get_template(template or self.template), self.image_token,
                             self.image_token_id, counts, add_generation_prompt, self.video_token)
        frames = [list(getattr(v, "frames", v)) for v in (videos or [])]
        ids, labels = self.expand_videos(ids, labels, frames)
        if max_length:
            if frames and max(i for i, t in enumerate(ids) if t == self.video_token_id) >= max_length:
                raise SampleError(f"{len(ids)} tokens with video tokens beyond max_length {max_length}: too long to "
                                  "keep its video(s)", "too_long_for_videos")
            ids, labels = truncate(ids, labels, max_length, self.image_token_id)
        size = self.transform.size
        if self.tiling is None:
            tiles = [[im] for im in images]
        else:  # anyres: base tile first, then row-major; internvl: row-major, then the thumbnail; naflex: resized
            tiles = [self.tiling.split(im, n) for im in images]
        if self.tiling is not None and self.tiling.mode == "naflex":
            pixels = self.naflex_pixels([ts[0] for ts in tiles])  # [n_images, L, p*p*3]
        else:
            pixels = (torch.stack([self.transform(t) for ts in tiles for t in ts]) if images
                      else torch.zeros(0, 3, size, size))  # [n_tiles, 3, T, T]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
                "image_sizes": torch.tensor([im.size for im in images], dtype=torch.long).view(n, 2),  # (w, h)
                "tiles_per_image": torch.tensor([len(ts) for ts in tiles], dtype=torch.long),
                **self.video_pixels(frames)}

    def expand_videos(self, ids: list[int], labels: list[int], frames: list[list]) -> tuple[list[int], list[int]]:
        """Each `<video>` token (one id: the tokenizer holds it as a special token) -> count_video_tokens(its
        frames) placeholders, never trained. The `<video>` count must equal the number of videos."""
        vid = self.video_token_id
        if vid is None:
            if frames:
                raise SampleError(f"{len(frames)} video(s), but this model takes no video (model.video is not set)",
                                  "video_count_mismatch")
            return ids, labels
        at = [i for i, t in enumerate(ids) if t == vid]
        if len(at) != len(frames):
            raise SampleError(f"{len(at)} {self.video_token} placeholder(s) in the text but {len(frames)} video(s)",
                              "video_count_mismatch")
        if any(labels[i] != IGNORE for i in at):
            raise SampleError(f"a {self.video_token} in an assistant turn", "video_in_assistant_turn")
        if any(not f for f in frames):
            raise SampleError("a video with no frames", "video_no_frames")
        out_ids, out_labels, k = [], [], 0
        for t, lab in zip(ids, labels):
            if t == vid:
                n = self.count_image_tokens.count_video_tokens(len(frames[k]))
                out_ids += [vid] * n
                out_labels += [IGNORE] * n
                k += 1
            else:
                out_ids.append(t)
                out_labels.append(lab)
        return out_ids, out_labels

    def video_pixels(self, frames: list[list]) -> dict:
        """Every video's frames as one tile each (the image transform): pixel_values_videos [N_frames, 3, T, T]
        and frames_per_video [N_videos]; empty tensors without video."""
        size = self.transform.size
        flat = [f for fs in frames for f in fs]
        pixels = torch.stack([self.transform(f) for f in flat]) if flat else torch.zeros(0, 3, size, size)
        return {"pixel_values_videos": pixels,
                "frames_per_video": torch.tensor([len(fs) for fs in frames], dtype=torch.long)}

    def canvas(self, width: int, height: int) -> tuple[int, str]:
        """The largest image buffer (in pixels) this processor makes from an image of (width, height), and what
        it is: known from the header, so an image whose buffer would be too large is refused before decoding
        (`vlmkit.data.images.check_size`). Pad mode centres the image on a square of its longest side; a tiling
        mode resizes it onto a canvas of tiles (AnyRes, InternVL) or a patch grid (NaFlex), bounded by its
        settings; the decoded image itself counts too."""
        if self.tiling is None:
            if self.transform.aspect == "pad":
                side = max(width, height)
                return side * side, f"padding it to a square (image_aspect pad) needs a {side}x{side} canvas"
            return width * height, "decoding it needs a buffer"
        if self.tiling.mode == "anyres":
            ch, cw = T.select_best_resolution((width, height), self.tiling.pinpoints)
            tiled, what = ch * cw, f"its AnyRes canvas is {cw}x{ch}"
        elif self.tiling.mode == "internvl":
            cols, rows = self.tiling.grid((width, height))  # the budget of a lone image: the largest
            tiled, what = (self.tiling.tile * cols) * (self.tiling.tile * rows), f"its {cols}x{rows} tile canvas"
        else:
            rows, cols = self.tiling.grid((width, height))
            tiled, what = rows * cols * self.tiling.patch ** 2, f"its {rows}x{cols} patch grid"
        if tiled > width * height:
            return tiled, what
        return width * height, "decoding it needs a buffer"

    def fit_note(self, width: int, height: int, n_images: int = 1) -> str:
        """What training does with an image of this size, in words (check-data's note on extreme aspect ratios)."""
        long, short = max(width, height), min(width, height)
        size = self.transform.size
        if self.tiling is None:
            if self.transform.aspect == "pad":
                return (f"padded to a square, then resized to {size}x{size}: the image fills {100 * short / long:.1f}% "
                        f"of the input ({max(1, round(size * short / long))} px across its short side)")
            return f"stretched to {size}x{size}: its short side is magnified {long / short:.0f}x more than its long side"
        if self.tiling.mode == "naflex":
            rows, cols = self.tiling.grid((width, height))
            return f"resized to a {rows}x{cols} patch grid"
        tiles = self.tiling.num_tiles((width, height), n_images)
        return f"cut into {tiles} tile(s) of {size}x{size}"

    def naflex_pixels(self, resized: list[Image.Image]) -> torch.Tensor:
        """Images already at their NaFlex size -> normalised patch sequences [N, L, p*p*3], each image's
        rows * cols patches first (row-major, channel-last), zero padding after (L: the longest)."""
        p = self.tiling.patch
        seqs = [T.naflex_patches(self.transform.normalize(im), p) for im in resized]  # [rows*cols, p*p*3] each
        return pad_patches(seqs, p * p * 3)

    def blank_like(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Uniform mean-colour images in the layout of `pixel_values` (tiles, or NaFlex patch sequences)."""
        blank = self.transform.blank()  # [3, T, T]
        if pixel_values.dim() == 3:  # NaFlex: every patch the mean colour, channel-last
            return blank[:, 0, 0].repeat(pixel_values.shape[-1] // 3).expand_as(pixel_values).clone()
        return blank.expand_as(pixel_values).clone()


def pad_patches(seqs: list[torch.Tensor], dim: int) -> torch.Tensor:
    """NaFlex patch sequences [L_i, D] -> [N, max L_i, D], zeros after each one's own patches."""
    out = torch.zeros(len(seqs), max((x.shape[0] for x in seqs), default=0), dim)
    for i, x in enumerate(seqs):
        out[i, :x.shape[0]] = x
    return out


def collate(samples: list[dict], pad_id: int, padding_side: str = "right", pack: bool = False,
            max_tokens: int = 0) -> dict:
    """Pad ids (pad_id) and labels (IGNORE) to the longest sample; stack all images in sample order.

    Samples that a dataset skipped (`{"skipped": ...}`) are left out and listed under `skipped`.
    With `pack`, see `collate_packed` (`max_tokens`: its row budget).
    """
    if pack:
        return collate_packed(samples, pad_id, max_tokens)
    kept = [s for s in samples if "skipped" not in s]
    skipped = [s["skipped"] for s in samples if "skipped" in s]
    if not kept:
        return {"skipped": skipped}
    T = max(len(s["input_ids"]) for s in kept)
    B = len(kept)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for r, s in enumerate(kept):
        n = len(s["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[r, sl] = s["input_ids"]
        labels[r, sl] = s["labels"]
        mask[r, sl] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": cat_pixels(kept),  # [N_tiles, 3, H, W]
        "ids": [s.get("id") for s in kept],
        "skipped": skipped,
        **_counts(kept),
        **_image_layout(kept),
        **_video_layout(kept),
    }


def collate_packed(samples: list[dict], pad_id: int, max_tokens: int = 0, pad_to_multiple_of: int = 1) -> dict:
    """Pack samples without padding between them: one row, or rows of at most `max_tokens` tokens (0: one row),
    filled in sample order (so images, stacked in sample order, meet their placeholders in row-major order).

    Besides collate's keys: `position_ids` [R, L] restarting at 0 at each sample, `cu_seqlens` int32 [S+1]
    (sample boundaries over the flattened rows) and `max_seqlen`. Rows are right-padded to the longest (and to a
    multiple of `pad_to_multiple_of`); a row's padding belongs to its last sample (positions continue, labels
    IGNORE), so it is never attended to by a real token. `attention_mask` marks real tokens (1) for counting: the
    model attends by sample, not by this mask. Each sample's first label is IGNORE: in a padded batch it is never
    a target; here it would be the target of the previous sample's last token.
    """
    kept = [s for s in samples if "skipped" not in s]
    skipped = [s["skipped"] for s in samples if "skipped" in s]
    if not kept:
        return {"skipped": skipped}
    rows: list[list[int]] = []
    used: list[int] = []
    for i, s in enumerate(kept):
        n = len(s["input_ids"])
        if rows and (not max_tokens or used[-1] + n <= max_tokens):
            rows[-1].append(i)
            used[-1] += n
        else:
            rows.append([i])
            used.append(n)
    L = max(used)
    L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    R = len(rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    labels = torch.full((R, L), IGNORE, dtype=torch.long)
    mask = torch.zeros((R, L), dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    cu = [0]
    for r, row in enumerate(rows):
        off = 0
        for j, i in enumerate(row):
            s = kept[i]
            n = len(s["input_ids"])
            ids[r, off:off + n] = s["input_ids"]
            labels[r, off:off + n] = s["labels"]
            labels[r, off] = IGNORE
            mask[r, off:off + n] = 1
            end = L if j == len(row) - 1 else off + n  # the row's padding joins its last sample
            pos[r, off:end] = torch.arange(end - off)
            cu.append(r * L + end)
            off += n
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "position_ids": pos,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        "pixel_values": cat_pixels(kept),  # [N_tiles, 3, H, W], sample order
        "ids": [s.get("id") for s in kept],
        "skipped": skipped,
        **_counts(kept),
        **_image_layout(kept),
        **_video_layout(kept),
    }


def _counts(kept: list[dict]) -> dict:
    """Plain-int counts of a batch, made in the loader's workers so that the training loop needs no device sync
    to read them: `lengths` (real tokens per sample) and `num_labels` (the targets the loss counts: each sample's
    labels[1:] other than IGNORE, padded or packed alike)."""
    lengths = [len(s["input_ids"]) for s in kept]
    labels = sum(int((torch.as_tensor(s["labels"])[1:] != IGNORE).sum()) for s in kept)
    return {"lengths": lengths, "num_labels": labels}


def cat_pixels(kept: list[dict]) -> torch.Tensor:
    """Every sample's tiles in sample order, [N_tiles, 3, H, W] (NaFlex: patch sequences zero-padded to the
    longest, [N_images, L, p*p*3]). In a data-loader worker the result is written
    straight into shared memory (as torch's default_collate does): the queue to the training process then passes
    it without the extra copy it would otherwise make (InternVL, ~11 tiles a sample: one worker 15-20% faster,
    benchmarks/data_throughput.py)."""
    parts = [s["pixel_values"] for s in kept]
    if any(x.dim() == 3 for x in parts):  # NaFlex [N_i, L_i, p*p*3]: zero-pad to the batch's longest L
        parts = [x for x in parts if x.dim() == 3]  # (a text-only sample made elsewhere holds [0, 3, H, W])
        length = max(x.shape[1] for x in parts)
        parts = [F.pad(x, (0, 0, 0, length - x.shape[1])) for x in parts]
    numel = sum(p.numel() for p in parts)
    out = None
    if numel and get_worker_info() is not None:
        storage = parts[0]._typed_storage()._new_shared(numel, device=parts[0].device)
        out = parts[0].new(storage).resize_(sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return torch.cat(parts, out=out)


def _video_layout(kept: list[dict]) -> dict:
    """Every sample's video frames in sample order and which frames / videos belong to which video / sample:
    pixel_values_videos [N_frames, 3, T, T], frames_per_video [N_videos], videos_per_sample [B]. Nothing when no
    sample carries video keys (a model without video)."""
    if not any("pixel_values_videos" in s for s in kept):
        return {}
    parts = [s["pixel_values_videos"] for s in kept if "pixel_values_videos" in s]
    counts = [s.get("frames_per_video", torch.zeros(0, dtype=torch.long)) for s in kept]
    return {
        "pixel_values_videos": cat_pixels([{"pixel_values": p} for p in parts]),  # [N_frames, 3, T, T]
        "frames_per_video": torch.cat(counts).long(),  # [N_videos]
        "videos_per_sample": torch.tensor([len(c) for c in counts], dtype=torch.long),  # [B]
    }


def _image_layout(kept: list[dict]) -> dict:
    """Which tiles belong to which image and which images to which sample (for the model's merge)."""
    if not all("image_sizes" in s for s in kept):  # samples made elsewhere: one tile per image
        return {}
    return {
        "image_sizes": torch.cat([s["image_sizes"] for s in kept]),  # [N_images, 2] (width, height)
        "tiles_per_image": torch.cat([s["tiles_per_image"] for s in kept]),  # [N_images]
        "images_per_sample": torch.tensor([len(s["image_sizes"]) for s in kept], dtype=torch.long),  # [B]
    }
