"""Preemption: SIGTERM (what schedulers send before they take a machine back) and SIGINT (Ctrl-C) end a run at
the next optimizer-step boundary with a resumable checkpoint, so that the same command continues it exactly.

The command-line entry points (`vlmkit train`, the recipes) install the handlers around a run (`handlers()`);
the training loop asks `requested(accelerator)` after each step (every process agrees, so all of them save the
same checkpoint together) and, when a stop was asked for, saves and raises `Preempted`. A second Ctrl-C stops at
once (KeyboardInterrupt), as without vlmkit. Library use (`vlmkit.training.run.run` from Python) leaves the process's
signal handlers alone: nothing is installed unless an entry point asks.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None


class Preempted(Exception):
    """The run stopped on a signal after saving a resumable checkpoint. `exit_code`: 128 + the signal number."""

    def __init__(self, signum: int, stage: str, step: int, checkpoint):
        self.signum, self.stage, self.step, self.checkpoint = signum, stage, step, checkpoint
        self.exit_code = 128 + int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of stage {stage}: the "
                         f"resumable checkpoint {checkpoint} is saved; rerun the same command to continue from it")

    def __reduce__(self):
        return type(self), (self.signum, self.stage, self.step, self.checkpoint)


def _handler(signum, frame) -> None:
    global _requested
    if _requested is not None or _in_worker():  # a data-loader worker (forked with the handler) keeps serving
        return
    _requested = signum
    name = signal.Signals(signum).name
    again = "; Ctrl-C again stops at once, without a checkpoint" if signum == signal.SIGINT else ""
    print(f"\nvlmkit: {name} received: stopping after this step with a resumable checkpoint{again}",
          file=sys.stderr, flush=True)
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def worker_init(worker_id: int) -> None:
    """A data-loader worker's `worker_init_fn`: the worker goes on serving batches through a SIGTERM sent to its
    whole process group, and still ends when its own loader ends it.

    A worker is forked with the handler above, but torch's worker start-up then installs its own C-level SIGTERM
    handler, which ends the worker at once unless the signal came from its parent. A SIGTERM sent to a whole
    process group reaches the workers too: torch's elastic agent (accelerate launch / torchrun) passes a SIGTERM on
    to each rank's process group, and so do schedulers that signal every process of a job. The dead worker then
    failed the rank's next batch (RuntimeError "DataLoader worker ... is killed by signal: Terminated") before the
    step boundary, so no checkpoint was saved. Here SIGTERM is blocked in the worker and taken by a thread that
    keeps torch's one exception: from the parent (the loader's shutdown, multiprocessing's terminate) it ends the
    worker; from anyone else it is ignored, and the main process stops at the step boundary."""
    if signal.getsignal(signal.SIGTERM) is not _handler:  # no entry point asked for a graceful stop
        return
    if not hasattr(signal, "sigwaitinfo"):  # macOS / Windows: torch's own handling stays
        return
    import os

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=watch, name="vlmkit-sigterm", daemon=True).start()


def _in_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


@contextmanager
def handlers():
    """SIGTERM and SIGINT ask the training loop to stop at its next step boundary (inside the block)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    _requested = None
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _requested = None


def request(signum: int = signal.SIGTERM) -> None:
    """Ask for a stop as the signal would (tests, or a caller with its own reasons)."""
    global _requested
    _requested = signum


def requested(accelerator=None) -> int | None:
    """The signal that asked for a stop (on any process, so every process answers the same), or None."""
    local = _requested or 0
    if accelerator is not None and accelerator.num_processes > 1:
        import torch

        local = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "max"))
    return local or None
