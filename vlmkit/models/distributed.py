"""What the model side needs to know about sharded weights (DeepSpeed ZeRO-3, FSDP2)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def param_id(p: torch.Tensor):
    """A parameter's identity (tied weights share one). DeepSpeed ZeRO-3 leaves every partitioned parameter an
    empty tensor, so there it is the parameter's ds_id, not its address."""
    return ("ds", p.ds_id) if hasattr(p, "ds_id") else p.data_ptr()


@contextmanager
def whole(p: torch.Tensor):
    """Write access to a parameter as a whole tensor. A ZeRO-3-partitioned one is gathered from every process
    (each must call this for the same parameters in the same order); on exit process 0's values are kept and
    partitioned again. Any other parameter is already whole."""
    if not hasattr(p, "ds_id"):
        yield
        return
    from ..extras import require

    deepspeed = require("deepspeed", "deepspeed", "a ZeRO-3 partitioned parameter")
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        yield


def is_dtensor(t: torch.Tensor) -> bool:
    """An FSDP2 shard (a DTensor parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def is_sharded(p: torch.Tensor) -> bool:
    """A parameter split across processes (ZeRO-3 or FSDP2): its module's forward gathers it collectively."""
    return hasattr(p, "ds_id") or is_dtensor(p)
