"""Which parts train in a stage, and how: plain, testable functions and the table they log.

A plan maps component names (encoder, connector, llm, and any extra a model has, such as
`image_newline`) to a ComponentPlan: frozen, full, lora (peft adapters on a frozen base) or
partial (the last N transformer blocks). Everything is checked before training starts.
"""
from __future__ import annotations

from torch import nn

from ..config import ComponentPlan, StageConfig
from ..models.llm import is_quantized
from ..models.lora import lora_targets


def components(model) -> dict[str, nn.Module | nn.Parameter]:
    return model.components()


def blocks_of(module: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a model: its longest nn.ModuleList."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(module).__name__} has no list of blocks for mode partial")
    return max(lists, key=len)


def partial_blocks(model, name: str, n: int) -> list[nn.Module]:
    """The last n blocks of a component. For the encoder: the last n that feed the features
    (with feature_layer -2 the final block's output is never used, so it is not trained)."""
    comp = components(model)[name]
    if getattr(comp, "no_partial", None):
        raise ValueError(f"{name}: mode partial does not work with {comp.no_partial}; train it full, with lora, "
                         "or keep it frozen")
    blocks = list(blocks_of(comp))
    if name == "encoder":
        fl = comp.feature_layer
        used = fl if fl >= 0 else len(blocks) + 1 + fl  # hidden_states[k] is the output of block k-1
        blocks = blocks[:used]
    if n > len(blocks):
        raise ValueError(f"{name}: partial layers={n} but only {len(blocks)} block(s) feed its output")
    return blocks[len(blocks) - n:]


def validate_plan(model, stage: StageConfig) -> None:
    """Raise a clear error for anything that would fail or do nothing once training started."""
    comps = components(model)
    for name, plan in stage.train.items():
        if name not in comps:
            raise ValueError(f"stage {stage.name!r}: unknown component {name!r}; this model has: {', '.join(comps)}")
        target = comps[name]
        if plan.mode in ("lora", "partial") and isinstance(target, nn.Parameter):
            raise ValueError(f"stage {stage.name!r}: {name} is a single tensor; use full or frozen")
        _check_not_quantized(name, target, plan)
        if plan.mode == "partial":
            partial_blocks(model, name, plan.layers)
        if plan.mode == "lora" and name not in model.adapters and not lora_targets(target, plan.target_modules):
            raise ValueError(f"stage {stage.name!r}: {name}: LoRA target_modules {plan.target_modules!r} match no "
                             f"Linear layer of {type(target).__name__}")


def _check_not_quantized(name: str, target, plan: ComponentPlan) -> None:
    if plan.mode in ("full", "partial") and isinstance(target, nn.Module) and is_quantized(target):
        raise ValueError(f"{name} has 4-bit quantized weights (llm.quantization): it can be frozen or trained "
                         f"through LoRA adapters (mode: lora), not {plan.mode}")


def _params(target) -> list[nn.Parameter]:
    return [target] if isinstance(target, nn.Parameter) else list(target.parameters())


def apply_stage(model, plan: dict[str, ComponentPlan], stage_lr: float | None = None) -> list[dict]:
    """Set trainability for every component by `plan` (unnamed ones are frozen); return table rows.

    lora adds adapters (kept from an earlier LoRA stage, if any) and trains only them; full on a
    component that has adapters merges them first.
    """
    plan = {k: (v if isinstance(v, ComponentPlan) else ComponentPlan(mode=v)) for k, v in plan.items()}
    unknown = set(plan) - set(components(model))
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; this model has: {', '.join(components(model))}")
    for name, p in plan.items():
        _check_not_quantized(name, components(model)[name], p)
    for name, p in plan.items():
        if p.mode == "lora":
            model.add_lora(name, p)
        elif p.mode in ("full", "partial") and name in model.adapters:
            model.merge_lora(name)
    rows = []
    for name, target in components(model).items():
        p = plan.get(name, ComponentPlan())
        params = _params(target)
        for q in params:
            q.requires_grad_(p.mode == "full")
        if p.mode == "partial":
            for block in partial_blocks(model, name, p.layers):
                block.requires_grad_(True)
        if p.mode == "lora":
            for n, q in target.named_parameters():
                q.requires_grad_("lora_" in n)
        total = sum(_numel(q) for q in params)
        trainable = sum(_numel(q) for q in params if q.requires_grad)
        mode = p.mode + (f" r={p.r}" if p.mode == "lora" else f" {p.layers}" if p.mode == "partial" else "")
        rows.append({"component": name, "mode": mode, "lr": (p.lr or stage_lr) if p.trains else None,
                     "params": total, "trainable": trainable})
    if not any(r["trainable"] for r in rows):
        raise ValueError(f"stage plan {plan} trains nothing")
    return rows


def _numel(q: nn.Parameter) -> int:
    """Elements of a parameter; of the whole one when DeepSpeed ZeRO-3 left only a shard here."""
    return getattr(q, "ds_numel", None) or q.numel()


def _ndim(q: nn.Parameter) -> int:
    shape = getattr(q, "ds_shape", None)
    return len(shape) if shape is not None else q.ndim


def param_groups(model, stage: StageConfig) -> list[dict]:
    """Optimizer groups per component: its own lr and weight decay; no decay on norms and biases (1-D)."""
    groups = []
    for name, target in components(model).items():
        p = stage.train.get(name, ComponentPlan())
        lr = p.lr if p.lr is not None else stage.lr
        wd = p.weight_decay if p.weight_decay is not None else stage.weight_decay
        trainable = [q for q in _params(target) if q.requires_grad]
        decay = [q for q in trainable if _ndim(q) >= 2 and wd > 0]
        rest = [q for q in trainable if not (_ndim(q) >= 2 and wd > 0)]
        for params, w, tag in ((decay, wd, "decay"), (rest, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": w, "name": f"{name}/{tag}"})
    return groups


def format_table(rows: list[dict], title: str = "") -> str:
    def n(x):
        return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K"

    lines = [title] if title else []
    lines.append(f"{'component':<14} {'mode':<12} {'lr':>9} {'params':>10} {'trainable':>10}  status")
    for r in rows:
        status = "TRAINABLE" if r["trainable"] else "Frozen"
        lr = f"{r['lr']:.2g}" if r.get("lr") else "-"
        lines.append(f"{r['component']:<14} {r['mode']:<12} {lr:>9} {n(r['params']):>10} {n(r['trainable']):>10}  "
                     f"{status}")
    tot = sum(r["params"] for r in rows)
    tr = sum(r["trainable"] for r in rows)
    lines.append(f"{'total':<14} {'':<12} {'':>9} {n(tot):>10} {n(tr):>10}  ({100 * tr / max(tot, 1):.1f}% trainable)")
    return "\n".join(lines)
