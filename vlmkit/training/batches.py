"""Batches: a stage's dataset and loader, the endless stream of micro-batches a run draws from (resumable at a
position), the accumulation window of one optimizer step and what it counts (targets, tokens, samples, FLOPs)."""
from __future__ import annotations

from functools import partial

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from ..config import DataConfig, StageConfig
from ..data.conversation import IGNORE
from ..data.dataset import ConversationDataset, VideoOptions
from ..data.processor import collate
from ..data.sampler import ModalityLengthBatchSampler
from ..data.streaming import StreamingConversations
from . import preempt
from .flops import FlopCounter


def micro_batching(global_batch: int, per_device: int, world: int, stage: str = "") -> tuple[int, int]:
    """(micro-batch per device, accumulation steps) that make up exactly `global_batch`
    (`StageConfig.split_batch`; a stage's own: `stage.micro_batching(world)`)."""
    return StageConfig.split_batch(global_batch, per_device, world, stage)


class BatchStream:
    """Endless micro-batches: epoch after epoch of a prepared loader, each epoch reshuffled as a function of
    (seed, epoch) (accelerate's seedable sampler). `position` is (epoch, batches of it consumed) on this
    process; a stream started at a position skips exactly those batches, by index (their samples are not
    loaded), so a resumed run draws the same batches an uninterrupted one would have drawn.

    A loader that shards itself (`shards_itself`: data.streaming, data.group_by_modality_length) was not prepared
    by accelerate: its batches are moved to `device` here. A streamed dataset has no length: it is positioned by
    its `seek`, and an epoch ends when the stream does."""

    def __init__(self, loader, epoch: int = 0, offset: int = 0, device=None):
        self.seekable = hasattr(loader.dataset, "seek")
        if not self.seekable and len(loader) == 0:
            raise ValueError("the data loader yields no batch (empty dataset?)")
        self.loader, self.epoch, self.offset, self.device = loader, epoch, offset, device
        self._it = None
        self._pass = None  # a stream's micro-batches per pass, once one pass was read from its start

    def __iter__(self):
        return self

    def _start_epoch(self):
        if self.seekable:
            self.loader.dataset.seek(self.epoch, self.offset)
            return iter(self.loader)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        elif hasattr(self.loader.batch_sampler, "set_epoch"):  # a self-sharding batch sampler
            self.loader.batch_sampler.set_epoch(self.epoch)
        return iter(skip_first_batches(self.loader, self.offset) if self.offset else self.loader)

    def __next__(self):
        while True:
            if self._it is None:
                self._from_start = self.offset == 0
                self._it = self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                if self.seekable and self.offset == 0:
                    raise ValueError(f"the data stream {self.loader.dataset.source} yields no batch") from None
                if self.seekable and self._pass is None and self._from_start:
                    self._pass = self.offset
                self._it, self.epoch, self.offset = None, self.epoch + 1, 0
                continue
            self.offset += 1
            return batch if self.device is None else send_to_device(batch, self.device)

    @property
    def patience(self) -> float:
        """Micro-batches in a row whose samples were all skipped before the data counts as unusable: one epoch
        (a stream: one pass, once its length is known)."""
        if not self.seekable:
            return len(self.loader)
        return float("inf") if self._pass is None else self._pass

    @property
    def position(self) -> tuple[int, int]:
        if self.seekable:  # no length: an ended stream shows at the next draw
            return (self.epoch, self.offset)
        return (self.epoch + 1, 0) if self.offset >= len(self.loader) else (self.epoch, self.offset)


def make_dataset(data: DataConfig, processor):
    """A stage's dataset: `data.path`'s samples through `processor` (a model's, or `vlmkit.model.build_processor`);
    with `data.streaming`, a `StreamingConversations` (its batch shape is set by `make_loader`)."""
    kw = dict(format=data.format, columns=data.columns)
    if data.streaming:
        kw["records"] = []  # read as a stream by StreamingConversations
    ds = ConversationDataset(data.path, processor, data.image_folder, data.template, data.max_length,
                             data.on_bad_sample, data.max_image_pixels, data.max_aspect_ratio,
                             data.allow_absolute_image_paths, video=VideoOptions.of(data), **kw)
    return StreamingConversations(ds, None) if data.streaming else ds


def make_loader(dataset, data: DataConfig, batch_size: int, pad_id: int, rank: int = 0, world: int = 1) -> DataLoader:
    """The training DataLoader of one process: shuffled micro-batches of `batch_size`, images decoded and tiled
    by the dataset in `data.num_workers` worker processes (kept across epochs), collated (padded or packed, as
    `data.pack` says) in the workers too. `benchmarks/data_throughput.py` measures this same loader.

    `data.streaming` and `data.group_by_modality_length` make a loader of process `rank`'s batches only
    (`loader.shards_itself`: not for accelerate's sharding)."""
    collate_fn = partial(collate, pad_id=pad_id, pack=data.pack, max_tokens=data.pack_max_tokens)
    # worker_init: a worker survives the SIGTERM a launcher sends the whole process group (see preempt.worker_init)
    workers = dict(num_workers=data.num_workers, persistent_workers=data.num_workers > 0,
                   worker_init_fn=preempt.worker_init)
    if isinstance(dataset, StreamingConversations):
        dataset.collate, dataset.batch_size, dataset.rank, dataset.world = collate_fn, batch_size, rank, world
        loader = DataLoader(dataset, batch_size=None, num_workers=data.num_workers,  # new workers per seek
                            worker_init_fn=preempt.worker_init)
    elif data.group_by_modality_length:
        sampler = ModalityLengthBatchSampler(dataset.modality_lengths(), batch_size, world, rank,
                                             seed=torch.initial_seed())  # the run's seed, as accelerate's sampler
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **workers)
    else:
        # the loader's own generator: loading data never draws from (or disturbs) the global torch RNG
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator(),
                          collate_fn=collate_fn, **workers)
    loader.shards_itself = True
    return loader


def dataset_size(dataset) -> int | None:
    """Samples in a stage's dataset; None for a stream (no length)."""
    return None if isinstance(dataset, StreamingConversations) else len(dataset)


def batching_shape(data: DataConfig) -> dict:
    """What a checkpoint records of how batches are drawn, beyond the batch shape: a resumed run must draw alike
    (empty for the default shuffled batches, so older checkpoints still match)."""
    if data.streaming:
        return {"batching": "stream"}
    return {"batching": "modality_length"} if data.group_by_modality_length else {}


COUNTS = ("labels", "tokens", "samples", "flops", "llm_flops")


def window_counts(accelerator: Accelerator, window: list[dict], flop_counter: FlopCounter) -> dict:
    """An optimizer step's trained targets, real tokens, samples and model FLOPs over every process: read from
    collate's plain-int counts (no device sync), then one all-reduce when there are several processes. A video
    frame is one encoder tile (`pixel_values_videos` rows), counted like an image tile; the zero-weighted blank
    frame a batch without video runs (so every rank runs the video path) is not model work and is not counted."""
    vals = [0.0] * len(COUNTS)
    for b in window:
        lengths = b["lengths"] if "lengths" in b else b["attention_mask"].sum(1).tolist()
        labels = b["num_labels"] if "num_labels" in b else int((b["labels"][:, 1:] != IGNORE).sum())
        tiles = sum(0 if b.get(k) is None else int(b[k].shape[0]) for k in ("pixel_values", "pixel_values_videos"))
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

