"""`data.streaming: true`: a dataset too large to list, read in order as a stream of micro-batches.

The stream (`sources.iter_records`: JSONL read line by line, parquet / hub datasets through `datasets` streaming,
arrow and saved folders memory-mapped) is cut into rounds of world_size x micro-batch records; in each round
process `rank` takes records [rank * B, (rank + 1) * B), so the processes share every round and none reads a
sample another trains on. Data-loader workers take whole rounds in turn (round k: worker k mod num_workers),
which the loader hands out in round order. Every round is one micro-batch per process, so a process's position
in the stream is the number of micro-batches it consumed: a resumed run `seek`s there and skips those rounds
without building their samples (JSONL lines are not parsed, HF streams skip before decoding). When the stream
ends, the next pass starts it again in the same order (an "epoch"); the stage length is `max_steps`. A last
round too short to reach process `rank` ends that process's pass a micro-batch early: it starts the next pass
while the processes before it finish theirs, and each process keeps reading exactly its own share of every pass
(no sample is trained by two processes; tests/test_streaming_multiprocess.py runs it on 2 processes).
"""
from __future__ import annotations

from itertools import islice

from torch.utils.data import IterableDataset, get_worker_info

from .sources import iter_records


class StreamingConversations(IterableDataset):
    """Collated micro-batches of this process's share of the stream, from `seek`'s position on."""

    shards_itself = True  # the loop must not hand it to accelerate's sharding

    def __init__(self, samples, collate_fn, batch_size: int = 1, rank: int = 0, world: int = 1):
        """`samples`: a ConversationDataset without records (its `process` makes a record a model input)."""
        self.samples, self.collate = samples, collate_fn
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.start = 0  # rounds already consumed

    @property
    def source(self) -> str:
        return self.samples.source

    def seek(self, epoch: int, offset: int) -> None:
        """Continue after `offset` micro-batches of a pass over the stream (every pass reads it in one order)."""
        self.start = offset

    def __iter__(self):
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        size = self.batch_size * self.world
        records = iter_records(self.source, skip=self.start * size)
        k = 0
        while True:
            chunk = list(islice(records, size))
            if not chunk:
                return
            if k % workers == me:
                mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                if not mine:  # the last, partial round has nothing for this process
                    return
                first = (self.start + k) * size + self.rank * self.batch_size  # stream index of mine[0]
                yield self.collate([self.samples.process(r, first + j) for j, r in enumerate(mine)])
            k += 1
