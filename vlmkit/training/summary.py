"""The end-of-run summary `run()` prints on the main process: one line per stage (steps, samples/s, tokens/s,
final loss, time, skipped samples) and where the model and the resolved config are."""
from __future__ import annotations

from pathlib import Path

COLUMNS = ("stage", "steps", "samples/s", "tokens/s", "final loss", "time", "skipped")


def _seconds(s) -> str:
    if s is None:
        return "-"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{s:.1f}s"


def _row(m: dict) -> tuple[str, ...]:
    def num(key, fmt):
        return "-" if m.get(key) is None else format(m[key], fmt)

    skipped = m.get("skipped")
    return (str(m.get("stage", "?")), num("steps", "d"), num("train_samples_per_second", ",.1f"),
            num("train_tokens_per_second", ",.0f"), num("final_loss", ".4f"), _seconds(m.get("seconds")),
            "-" if skipped is None else str(len(skipped)))


def summary(stage_metrics: list[dict], out: str | Path, model_saved: bool = True) -> str:
    """The text of the summary of a run whose stages reported `stage_metrics` (run()'s third value; a stage
    finished before a resume may lack figures: '-') and whose output folder is `out`."""
    rows = [COLUMNS] + [_row(m) for m in stage_metrics]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    out = Path(out)
    model = str(out / "model") if model_saved else "not saved (train.save_models: false)"
    return "\n".join([f"run finished: {len(stage_metrics)} stage(s)", *lines,
                      f"model: {model}", f"config: {out / 'config.yaml'}"]) + "\n"
