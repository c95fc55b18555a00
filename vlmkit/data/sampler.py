"""Batches grouped by modality and length (`data.group_by_modality_length`), as LLaVA-1.5 trains stage 2.

LLaVA's `LengthGroupedSampler(group_by_modality=True)`: samples with images and text-only samples never share a
batch; each modality is shuffled and cut into megabatches of world_size x per-device batch, each megabatch
sorted by length (longest first) and split into one micro-batch per process (LLaVA's balanced split: each sample
goes to the process with the least total length that still has room); the megabatches of both modalities are
then shuffled together. Lengths are LLaVA's cheap estimate (words + 128 per image, `formats.estimated_length`).

Unlike LLaVA, a modality's last, partial megabatch is never merged with the other modality's (LLaVA puts both
leftovers in one mixed last batch): it is split over the processes as evenly as it goes; a process it leaves
empty gets one of its samples again, so every process makes the same number of steps.

Each process draws only its own micro-batches (the sampler is given its rank), in an order that is a function of
(seed, epoch) alone, so a resumed run skipping the first n batches draws what an uninterrupted one would have.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ModalityLengthBatchSampler(Sampler):
    """Micro-batches (lists of sample indices) of process `rank` of `world`, one per megabatch."""

    def __init__(self, lengths: list[tuple[int, int]], batch_size: int, world: int = 1, rank: int = 0,
                 seed: int = 0):
        """`lengths`: (estimated length, number of images) of every sample."""
        self.lengths = [n for n, _ in lengths]
        self.multimodal = [k > 0 for _, k in lengths]
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        size = self.batch_size * self.world
        mm = sum(self.multimodal)
        return -(-mm // size) + -(-(len(self.lengths) - mm) // size)

    def __iter__(self):
        for megabatch in self.megabatches():
            yield megabatch[self.rank]

    def megabatches(self) -> list[list[list[int]]]:
        """This epoch's megabatches, each a list of `world` micro-batches (every process's share)."""
        g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**63)
        size = self.batch_size * self.world
        out = []
        for want in (True, False):
            group = [i for i, m in enumerate(self.multimodal) if m == want]
            order = [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
            for s in range(0, len(order), size):
                mega = sorted(order[s:s + size], key=lambda i: -self.lengths[i])
                out.append(self.split(mega))
        return [out[j] for j in torch.randperm(len(out), generator=g).tolist()]

    def split(self, mega: list[int]) -> list[list[int]]:
        """A megabatch (sorted, longest first) -> `world` micro-batches of balanced total length."""
        cap = -(-len(mega) // self.world)  # a full megabatch: batch_size each
        chunks: list[list[int]] = [[] for _ in range(self.world)]
        totals = [0] * self.world
        for i in mega:
            k = min((c for c in range(self.world) if len(chunks[c]) < cap), key=lambda c: totals[c])
            chunks[k].append(i)
            totals[k] += self.lengths[i]
        for c in chunks:
            if not c:  # fewer samples than processes: a sample again, so every process steps alike
                c.append(mega[0])
        return chunks
