"""Deprecated path, kept for one release: the training code lives in the `vlmkit.training` package now.

`vlmkit.training.run` (run: stages + resume), `.loop` (train_stage, the one loop), `.batches` (dataset, loader,
micro-batches), `.engine` (accelerate / DeepSpeed / FSDP specifics) and `.checkpoint` (save_checkpoint,
save_model). This module only re-exports their names. Replacing a name here (e.g. monkeypatching
`vlmkit.train.train_stage`) no longer changes what `run` calls: patch `vlmkit.training.loop.train_stage`.
"""
from .training.batches import (COUNTS, BatchStream, draw_window, make_dataset, make_loader,  # noqa: F401
                               micro_batching, window_counts)
from .training.checkpoint import save_checkpoint, save_model  # noqa: F401
from .training.engine import (build_device, configure_engine, cpu_threads, engine, full_state_dict,  # noqa: F401
                              make_accelerator, match_zero3_dtype, plain_init, refresh_fsdp_precision,
                              shards_weights)
from .training.loop import make_optimizer, memory_report, numerical_fault, train_stage  # noqa: F401
from .training.run import run  # noqa: F401
