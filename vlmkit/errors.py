"""Errors as a user meets them: one clear line on the terminal and a non-zero exit, never a traceback
(`--debug` or VLMKIT_DEBUG=1 shows it), and file errors that name the file.

    guard(fn, prog)      runs a command (the `vlmkit` verbs, the recipes) and turns an exception into that line
    load_file(path)      safetensors' load_file, naming the file when it is truncated or not safetensors
    disk_full(e, path)   an OSError saying "no space left on device" and the path being written
"""
from __future__ import annotations

import errno
import os
import sys
import traceback

DEBUG_ENV = "VLMKIT_DEBUG"


# ---- files ---------------------------------------------------------------------------------------
def load_file(path, device: str = "cpu") -> dict:
    """`safetensors.torch.load_file`, with an error that names the file when it is missing, truncated (a copy
    cut short, a disk that filled up) or not a safetensors file."""
    from safetensors.torch import load_file as _load

    try:
        return _load(str(path), device=device)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: weights file not found") from None
    except Exception as e:  # SafetensorError is not an OSError; a short file fails inside its reader
        if isinstance(e, OSError) and e.errno not in (None, 0):
            raise
        try:
            size = os.path.getsize(path)
        except OSError:
            size = None
        raise ValueError(f"{path}: damaged weights file ({size if size is not None else '?'} bytes; truncated or not "
                         f"safetensors): {e}") from None


def is_disk_full(e: BaseException) -> bool:
    """An OSError of a full disk (ENOSPC, EDQUOT), or a writer's own error saying so (safetensors reports it
    as a SafetensorError carrying the OS message)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


class DiskFullError(OSError):
    """No space left on the device being written; the message names the path."""


def disk_full(e: BaseException, path, what: str = "") -> DiskFullError:
    """The DiskFullError for `e`, met while writing `path` (a folder being saved, or the run's output_dir)."""
    file = getattr(e, "filename", None)
    detail = ", ".join(x for x in (f"at {os.path.basename(str(file))}" if file else "", what) if x)
    err = DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}"
                                      f"{f' ({detail})' if detail else ''}: free space there (or choose another "
                                      f"output_dir) and rerun the same command")
    err.filename = str(path)
    return err


# ---- the terminal --------------------------------------------------------------------------------
OWN_ERRORS = ("ConfigError", "SampleError", "ImageError", "VideoError", "DatasetError", "RemoteCodeRefused", "DiskFullError",
              "FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "PermissionError")
"""Errors whose message is meant for the user wherever they come from: shown as they are."""
PACKAGE_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                     for d in ("vlmkit", "connectors", "recipes"))


def debug_requested(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def strip_debug(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--debug"]


def _raised_by_vlmkit(e: BaseException) -> bool:
    """Was `e` raised by vlmkit's own code (a message written for the user), not deep inside a library?"""
    tb = traceback.extract_tb(e.__traceback__) if e.__traceback__ is not None else []
    return bool(tb) and os.path.abspath(tb[-1].filename).startswith(PACKAGE_DIRS)


def message(e: BaseException) -> str:
    """One line (or a few, for a message that has them) for an exception: vlmkit's own messages as they are,
    anything else with its type and a pointer to --debug."""
    if isinstance(e, DiskFullError):
        return e.strerror or str(e)
    if is_disk_full(e):
        where = getattr(e, "filename", None)
        return f"no space left on device{f' while writing {where}' if where else ''} ({e})"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    names = {c.__name__ for c in type(e).__mro__}
    if text and (names & set(OWN_ERRORS) or _raised_by_vlmkit(e)):
        return text
    return f"{type(e).__name__}: {text} (rerun with --debug or {DEBUG_ENV}=1 to see where it happened)"


def _close_progress_bars() -> None:
    """A progress bar left open by the exception would redraw itself after the message: close it first."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - cosmetic only
            pass


def report(e: BaseException, prog: str, stream=None) -> int:
    """Print `e` for the user; the exit status for it."""
    stream = stream or sys.stderr
    _close_progress_bars()
    if isinstance(e, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=stream)
        return 130
    if type(e).__name__ == "Preempted":  # vlmkit.training.preempt: not an error, a stop that was asked for
        print(f"{prog}: {e}", file=stream)
        return e.exit_code
    print(f"{prog}: error: {message(e)}", file=stream)
    return 1


def guard(fn, prog: str, argv=None, *args, **kwargs) -> int:
    """Run `fn(*args, **kwargs)`: its return value (an int, else 0) is the exit status; an exception becomes one
    line on stderr and exit status 1 (130 on Ctrl-C), unless --debug / VLMKIT_DEBUG=1 asks for the traceback."""
    debug = debug_requested(argv)
    try:
        rc = fn(*args, **kwargs)
    except SystemExit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        if debug and type(e).__name__ != "Preempted":
            traceback.print_exc()
            return 130 if isinstance(e, KeyboardInterrupt) else 1
        return report(e, prog)
    return rc if isinstance(rc, int) else 0


def run_recipe(main, prog: str) -> None:
    """A recipe's `if __name__ == "__main__"`: `main()` under `guard` and the preemption handlers (SIGTERM /
    Ctrl-C save a resumable checkpoint at the next step), `--debug` taken off its command line."""
    from .training.preempt import handlers
    from .security import no_prompt_for_remote_code

    debug = debug_requested()
    sys.argv[1:] = strip_debug(sys.argv[1:])
    if debug:
        os.environ[DEBUG_ENV] = "1"
    no_prompt_for_remote_code()
    with handlers():
        code = guard(main, prog)
    sys.exit(code)
