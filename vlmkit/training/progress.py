"""Training progress: samples/s, tokens/s, MFU and ETA over the most recent steps (not since the start, which
a first compiled or cold step would weigh down for the whole run)."""
from __future__ import annotations

import time
from collections import deque


class Meter:
    """Counts per optimizer step; rates over the last `window` steps (all steps while fewer were run).

    `peak`: the device's peak FLOP/s (vlmkit.training.flops.peak_flops), or None for no MFU."""

    def __init__(self, total: int, start: int = 0, window: int = 20, peak: float | None = None,
                 clock=time.perf_counter):
        self.total, self.step, self.peak, self.clock = total, start, peak, clock
        self.marks = deque(maxlen=window + 1)  # (time, samples, tokens, flops, llm_flops), cumulative
        self.marks.append((clock(), 0, 0, 0.0, 0.0))
        self.samples = self.tokens = 0
        self.flops = self.llm_flops = 0.0

    def update(self, samples: int, tokens: int, flops: float = 0.0, llm_flops: float = 0.0) -> None:
        """One optimizer step done: its samples, real tokens and model FLOPs (all processes together)."""
        self.step += 1
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        self.llm_flops += llm_flops
        self.marks.append((self.clock(), self.samples, self.tokens, self.flops, self.llm_flops))

    def rates(self) -> dict:
        """samples_per_second, tokens_per_second, seconds_per_step (and mfu, mfu_llm with a peak) over the
        window; {} before the first step."""
        (t0, s0, k0, f0, l0), (t1, s1, k1, f1, l1) = self.marks[0], self.marks[-1]
        steps, dt = len(self.marks) - 1, t1 - t0
        if steps < 1 or dt <= 0:
            return {}
        out = {"samples_per_second": (s1 - s0) / dt, "tokens_per_second": (k1 - k0) / dt,
               "seconds_per_step": dt / steps}
        if self.peak and f1 > f0:
            out["mfu"] = (f1 - f0) / dt / self.peak
            out["mfu_llm"] = (l1 - l0) / dt / self.peak
        return out

    def eta(self) -> float | None:
        """Seconds left at the recent pace."""
        r = self.rates()
        return None if not r else r["seconds_per_step"] * max(0, self.total - self.step)

    def postfix(self, loss: float) -> str:
        r = self.rates()
        if not r:
            return f"loss={loss:.4f}"
        parts = [f"loss={loss:.4f}", f"{r['samples_per_second']:.1f} samples/s",
                 f"{r['tokens_per_second']:,.0f} tok/s"]
        if "mfu" in r:
            parts.append(f"MFU {r['mfu']:.2f}")
        parts.append(f"ETA {format_seconds(self.eta())}")
        return ", ".join(parts)


def format_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"
