"""Batches: a stage's dataset and loader, the endless stream of micro-batches a run draws from (resumable at a
position), the accumulation window of one optimizer step and what it counts (targets, tokens, samples, FLOPs)."""
from __future__ import annotations

from functools import partial

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from torch.utils.data import DataLoader

from ..config import DataConfig, StageConfig
from ..data.conversation import IGNORE
from ..data.dataset import ConversationDataset
from ..data.processor import collate
from .flops import FlopCounter


def micro_batching(global_batch: int, per_device: int, world: int, stage: str = "") -> tuple[int, int]:
    """(micro-batch per device, accumulation steps) that make up exactly `global_batch`
    (`StageConfig.split_batch`; a stage's own: `stage.micro_batching(world)`)."""
    return StageConfig.split_batch(global_batch, per_device, world, stage)


class BatchStream:
    """Endless micro-batches: epoch after epoch of a prepared loader, each epoch reshuffled as a function of
    (seed, epoch) (accelerate's seedable sampler). `position` is (epoch, batches of it consumed) on this
    process; a stream started at a position skips exactly those batches, by index (their samples are not
    loaded), so a resumed run draws the same batches an uninterrupted one would have drawn."""

    def __init__(self, loader, epoch: int = 0, offset: int = 0):
        if len(loader) == 0:
            raise ValueError("the data loader yields no batch (empty dataset?)")
        self.loader, self.epoch, self.offset = loader, epoch, offset
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self._it = iter(skip_first_batches(self.loader, self.offset) if self.offset else self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it, self.epoch, self.offset = None, self.epoch + 1, 0
                continue
            self.offset += 1
            return batch

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch + 1, 0) if self.offset >= len(self.loader) else (self.epoch, self.offset)


def make_dataset(data: DataConfig, processor) -> ConversationDataset:
    """A stage's dataset: `data.path`'s samples through `processor` (a model's, or `vlmkit.model.build_processor`)."""
    return ConversationDataset(data.path, processor, data.image_folder, data.template, data.max_length,
                               data.on_bad_sample, data.max_image_pixels, data.max_aspect_ratio,
                               data.allow_absolute_image_paths)


def make_loader(dataset, data: DataConfig, batch_size: int, pad_id: int) -> DataLoader:
    """The training DataLoader of one process: shuffled micro-batches of `batch_size`, images decoded and tiled
    by the dataset in `data.num_workers` worker processes (kept across epochs), collated (padded or packed, as
    `data.pack` says) in the workers too. `benchmarks/data_throughput.py` measures this same loader."""
    # the loader's own generator: loading data never draws from (or disturbs) the global torch RNG
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator(),
                      num_workers=data.num_workers, persistent_workers=data.num_workers > 0,
                      collate_fn=partial(collate, pad_id=pad_id, pack=data.pack, max_tokens=data.pack_max_tokens))


COUNTS = ("labels", "tokens", "samples", "flops", "llm_flops")


def window_counts(accelerator: Accelerator, window: list[dict], flop_counter: FlopCounter) -> dict:
    """An optimizer step's trained targets, real tokens, samples and model FLOPs over every process: read from
    collate's plain-int counts (no device sync), then one all-reduce when there are several processes."""
    vals = [0.0] * len(COUNTS)
    for b in window:
        lengths = b["lengths"] if "lengths" in b else b["attention_mask"].sum(1).tolist()
        labels = b["num_labels"] if "num_labels" in b else int((b["labels"][:, 1:] != IGNORE).sum())
        tiles = 0 if b.get("pixel_values") is None else int(b["pixel_values"].shape[0])
        flops, llm_flops = flop_counter.step(lengths, tiles)
        for i, v in enumerate((labels, sum(lengths), len(b["ids"]), flops, llm_flops)):
            vals[i] += v
    if accelerator.num_processes > 1:
        vals = accelerator.reduce(torch.tensor(vals, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return dict(zip(COUNTS, vals))



def draw_window(stream: BatchStream, accum: int, skipped: list, stage: str, patience: int) -> list[dict]:
    """The next `accum` micro-batches that hold samples. A micro-batch whose samples were all skipped
    (on_bad_sample: skip) is replaced by the next one, so every process still makes exactly `accum`
    forward passes per step; its skipped samples are recorded in `skipped`."""
    window, empty = [], 0
    while len(window) < accum:
        b = next(stream)
        if stream.epoch == 0:  # each sample once: a later epoch meets the same bad samples again
            skipped += b.get("skipped", [])
        if "input_ids" in b:
            window.append(b)
            empty = 0
            continue
        empty += 1
        if empty > patience:
            raise RuntimeError(f"stage {stage}: {empty} micro-batches in a row had every sample skipped (a whole "
                               f"epoch): no usable data. First skipped: {skipped[:3]}")
    return window

