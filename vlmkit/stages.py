"""Which parts train in a stage: a plain, testable function and the table it logs."""
from __future__ import annotations

from torch import nn

from .config import COMPONENTS


def components(model) -> dict[str, nn.Module]:
    return {name: getattr(model, name) for name in COMPONENTS}


def apply_stage(model, plan: dict[str, str]) -> list[dict]:
    """Freeze or unfreeze each component by `plan` (unnamed components are frozen); return table rows."""
    rows = []
    for name, module in components(model).items():
        mode = plan.get(name, "frozen")
        for p in module.parameters():
            p.requires_grad_(mode == "full")
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append({"component": name, "mode": mode, "params": total, "trainable": trainable})
    if not any(r["trainable"] for r in rows):
        raise ValueError(f"stage plan {plan} trains nothing")
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    def n(x):
        return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K"

    lines = [title] if title else []
    lines.append(f"{'component':<12} {'mode':<8} {'params':>10} {'trainable':>10}  status")
    for r in rows:
        status = "TRAINABLE" if r["trainable"] else "Frozen"
        lines.append(f"{r['component']:<12} {r['mode']:<8} {n(r['params']):>10} {n(r['trainable']):>10}  {status}")
    tot = sum(r["params"] for r in rows)
    tr = sum(r["trainable"] for r in rows)
    lines.append(f"{'total':<12} {'':<8} {n(tot):>10} {n(tr):>10}  ({100 * tr / max(tot, 1):.1f}% trainable)")
    return "\n".join(lines)
