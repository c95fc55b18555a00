"""The end of a process group: destroyed at interpreter exit, before Python finalizes.

Why (seen as a rank aborting with "terminate called without an active exception", SIGABRT, after its work
was done): gloo runs each collective on a worker thread of its own. The caller returns once the collective
has finished, and the worker thread drops its reference to it (and the tensors it held) a moment later. A
tensor whose Python object the caller has already released is kept alive from C++ until then, so that
release takes the GIL. When the collective was the program's last step, the main thread may meanwhile have
reached interpreter finalization; CPython then ends any thread that asks for the GIL with pthread_exit, which
unwinds through a C++ destructor that may not throw, and std::terminate aborts the process (a core dump shows
the gloo worker in ~AsyncAllgatherWork -> decref -> take_gil -> PyThread_exit_thread). A barrier does not
help: it waits for the previous collective to finish, not for the worker thread to let go of it.

Destroying the process group joins gloo's threads (torch releases the GIL while it waits for them), so nothing
of it runs at finalization. It is a local step on each process, not a collective: a process leaving with an
error does not wait for the others. atexit handlers run before finalization starts, also after an uncaught
exception. Within a program the group stays up: `vlmkit.training.run.run` returns an accelerator that can still
synchronise processes (an ablation runs several in one launch).
"""
from __future__ import annotations

import atexit
import gc

_registered = False


def destroy_process_group() -> None:
    """Destroy the default process group (and every other) if there is one; nothing otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # a wrapper left in a reference cycle (DDP keeps the group) lets go of it now


def destroy_at_exit() -> None:
    """Destroy the process group at interpreter exit (registered once per process)."""
    global _registered
    if not _registered:
        atexit.register(destroy_process_group)
        _registered = True
