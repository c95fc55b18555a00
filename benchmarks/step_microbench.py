"""A component microbenchmark of vlmkit's training step (not the product's figure: see train_throughput.py).

It rebuilds the step in-process on synthetic tensors (no files, no DataLoader, bf16 weights without fp32
masters), so it isolates the model and optimizer from data loading and precision policy. Quote
`benchmarks/step_microbench.py` (the real entry point, files on disk) for vlmkit's speed.

The peer (../shared/bench/peer_hf_llava.py) trains transformers' LlavaForConditionalGeneration with a
plain loop; this script builds the same model as a `vlmkit.VLM` (CLIP ViT-L/14-336, feature layer -2:
576 tokens, mlp2x_gelu, a Llama-7B / Qwen2-1.5B / Qwen2-0.5B shaped LLM, random bf16 weights, SDPA)
and runs vlmkit's own training step, as `vlmkit.train.train_stage` runs it:
`apply_stage` / `param_groups` for the stage plan, `VLM.forward(**batch, num_items=...)` (labels on
text only), backward, gradient clipping (vlmkit's default max_grad_norm 1.0; 0 turns it off), fused
AdamW, cosine schedule. Text lengths come from the shared workload (same seed), batches are
right-padded to their longest sample like the peer's, and the same FLOP formula gives TFLOP/s and MFU.

  python3 benchmarks/step_microbench.py --llm 7b --stage 2 --batch 16 --gc --steps 10
  python3 benchmarks/step_microbench.py --llm 7b --stage 2 --batch 16 --lora    # LoRA r=64, alpha=128
  python3 benchmarks/step_microbench.py --llm 7b --stage 2 --batch 16 --qlora   # 4-bit NF4 base + LoRA
  python3 benchmarks/step_microbench.py --device cpu --llm tiny --batch 2 --steps 2 --warmup 1
  python3 benchmarks/step_microbench.py --llm 7b --stage 2 --batch 16 --gc --pack --attn varlen   # packed
  python3 benchmarks/step_microbench.py --llm 7b --stage 2 --batch 16 --gc --gc-every 2 --pack --attn varlen

--pack packs each step's samples (the same workload samples, so samples/s compares with the peer) with
vlmkit's collate(pack=True): one row (or rows of --pack-max-tokens), positions restarting per sample,
attention within each sample (--attn varlen: PyTorch's variable-length flash attention; sdpa / eager /
flex_attention: transformers' block-diagonal mask). Before timing, the first step's batch is run padded
and packed without gradients and the relative loss difference is reported as pack_check_rel.
--gc-every K / --gc-skip N: selective checkpointing (every K-th decoder layer / not the last N).
--compile: torch.compile each LLM decoder layer (dynamic shapes).

Several GPUs: `accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes N
benchmarks/step_microbench.py --distributed ...` runs the same step through accelerate (DDP, DeepSpeed
ZeRO-2/3 or FSDP2 as the config says; `vlmkit.train.configure_engine` sets DeepSpeed's batch shape):
each process trains --batch samples per step (its own slice of the workload), the loss is the token mean
over all processes' labelled tokens, and the JSON line (printed by the main process) adds `world_size`,
`samples_s_per_gpu` (samples/s over all GPUs / N) and `samples_s` for all of them together.

Prints one JSON line with the peer's fields (impl "vlmkit"). With --lora / --qlora the LLM's weights
are frozen, so the FLOPs are counted with the formula's stage-1 branch (LLM forward + input-gradient
backward; the adapters' own FLOPs are not counted).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # vlmkit and connectors from this checkout, installed or not
sys.path.insert(0, str(REPO / "benchmarks"))

from peer_workload import (IMAGE_TOKENS, LLMS, SOURCE, TINY_VISION, VISION, flops_per_sample,  # noqa: E402,F401
                           text_lengths)



def make_tokenizer(out_dir: str) -> str:
    """A minimal word-level tokenizer trained in-process (no hub access); the ids the benchmark feeds
    are random, so only its special tokens and the added <image> matter."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a photo of an image", "USER: ASSISTANT: describe it"],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(out_dir)
    return out_dir


def build_model(a, device: torch.device, dtype: torch.dtype):
    from vlmkit import VLM
    from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, QuantizationConfig

    mt, h, inter, layers, heads, kvh, vocab = LLMS[a.llm]
    llm_cfg = dict(model_type=mt, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kvh, vocab_size=vocab,
                   max_position_embeddings=4096, tie_word_embeddings=False)
    cfg = ModelConfig(
        encoder=EncoderConfig(name="clip", config=dict(TINY_VISION if a.llm == "tiny" else VISION), feature_layer=-2),
        connector=ConnectorConfig("mlp2x_gelu"),
        llm=LLMConfig(config=llm_cfg, tokenizer=make_tokenizer(tempfile.mkdtemp(prefix="vlmkit-bench-tok-")),
                      attn_implementation=a.attn, quantization=QuantizationConfig() if a.qlora else None),
    )
    torch.manual_seed(0)
    with device:  # weights initialised on the device, as the peer does
        model = VLM.from_config(cfg, dtype=dtype)
    return model.to(device)


def stage_config(a):
    from vlmkit.config import ComponentPlan, DataConfig, StageConfig

    plan = {"connector": ComponentPlan(mode="full")}
    if a.stage == 2:
        plan["llm"] = (ComponentPlan(mode="lora", r=a.lora_r, alpha=a.lora_alpha, dropout=0.05)
                       if a.lora or a.qlora else ComponentPlan(mode="full"))
    return StageConfig(name=f"stage{a.stage}", train=plan,
                       data=DataConfig(path="synthetic", pack=a.pack, pack_max_tokens=a.pack_max_tokens), lr=a.lr,
                       global_batch_size=a.batch, per_device_batch_size=a.batch, max_grad_norm=a.max_grad_norm,
                       gradient_checkpointing=a.gc, gradient_checkpointing_every=a.gc_every,
                       gradient_checkpointing_skip=a.gc_skip, max_steps=a.warmup + a.steps)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="7b", choices=LLMS)
    p.add_argument("--stage", type=int, default=1, choices=[1, 2])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fixed-len", type=int, default=0, help="every sample this many text tokens")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gc", action="store_true", help="gradient checkpointing (VLM.enable_gradient_checkpointing)")
    p.add_argument("--lora", action="store_true", help="stage 2 with LoRA adapters on the LLM's linear layers")
    p.add_argument("--qlora", action="store_true", help="--lora on a 4-bit NF4 LLM (bitsandbytes, CUDA)")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="vlmkit's default clipping; 0: none")
    p.add_argument("--attn", default="sdpa", help="sdpa | eager | flex_attention | varlen (vlmkit's, for --pack)")
    p.add_argument("--pack", action="store_true", help="pack each step's samples into one row (vlmkit collate)")
    p.add_argument("--pack-max-tokens", type=int, default=0, help="with --pack: most tokens per row (0: one row)")
    p.add_argument("--gc-every", type=int, default=1, help="with --gc: checkpoint every K-th decoder layer")
    p.add_argument("--gc-skip", type=int, default=0, help="with --gc: leave the last N decoder layers un-checkpointed")
    p.add_argument("--compile", action="store_true", help="torch.compile each LLM decoder layer")
    p.add_argument("--no-pack-check", action="store_true", help="skip the padded-vs-packed loss check")
    p.add_argument("--peak", type=float, default=790.0, help="bf16 dense TFLOP/s of the device (MFU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--distributed", action="store_true",
                   help="run the step through accelerate (under `accelerate launch`: DDP / DeepSpeed / FSDP)")
    a = p.parse_args(argv)
    if (a.lora or a.qlora) and a.stage != 2:
        p.error("--lora / --qlora train adapters on the LLM: use --stage 2")
    if (a.gc_every != 1 or a.gc_skip) and not a.gc:
        p.error("--gc-every / --gc-skip select which layers --gc checkpoints: add --gc")
    if a.gc_every < 1 or a.gc_skip < 0 or a.pack_max_tokens < 0:
        p.error("--gc-every >= 1, --gc-skip >= 0, --pack-max-tokens >= 0")
    if a.pack_max_tokens and not a.pack:
        p.error("--pack-max-tokens needs --pack")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    from transformers import get_cosine_schedule_with_warmup

    from vlmkit.data.processor import collate
    from vlmkit.training.stages import apply_stage, format_table, param_groups, validate_plan

    acc, world, rank = None, 1, 0
    if a.distributed:
        from vlmkit.config import TrainConfig
        from vlmkit.training.engine import make_accelerator

        acc = make_accelerator(TrainConfig(log_with=None), cpu=a.device == "cpu")
        world, rank = acc.num_processes, acc.process_index
    device = acc.device if acc is not None else torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t_build = time.perf_counter()
    model = build_model(a, device, dtype)
    stage = stage_config(a)
    validate_plan(model, stage)
    rows = apply_stage(model, stage.train, stage.lr)
    print(format_table(rows, f"vlmkit {a.llm} {stage.name}"), file=sys.stderr)
    if stage.gradient_checkpointing:
        flags = model.enable_gradient_checkpointing(stage.gradient_checkpointing_every,
                                                    stage.gradient_checkpointing_skip)
        print(f"gradient checkpointing: {sum(flags)} of {len(flags)} decoder layers", file=sys.stderr)
    if a.compile:
        print(f"compiled {model.compile_decoder_layers()} decoder layers", file=sys.stderr)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, stage), lr=stage.lr, betas=(0.9, 0.999), fused=cuda)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(stage.warmup_ratio * stage.max_steps), stage.max_steps)
    if acc is not None:
        from vlmkit.training.engine import configure_engine, engine

        configure_engine(acc, a.batch, 1, stage.max_grad_norm, model.llm.config.hidden_size)
        model, opt = acc.prepare(model, opt)
        print(f"rank {rank}/{world}: {engine(acc)}", file=sys.stderr)
    params = [q for q in model.parameters() if q.requires_grad]
    print(f"built in {time.perf_counter() - t_build:.0f}s; workload from {SOURCE}", file=sys.stderr)

    raw = acc.unwrap_model(model) if acc is not None else model
    vocab = raw.llm.config.vocab_size
    image_token = raw.image_token_id
    n = (a.warmup + a.steps) * a.batch * world
    lens = [a.fixed_len] * n if a.fixed_len else text_lengths(n, a.stage)
    if world > 1:  # process r trains samples [i * world + r] of the global workload at step i
        lens = [l for i in range(a.warmup + a.steps) for l in lens[(i * world + rank) * a.batch:
                                                                     (i * world + rank + 1) * a.batch]]
    size = raw.encoder.image_size
    pix = torch.randn(a.batch, 3, size, size, device=device, dtype=dtype)

    def batch(i):  # the peer's batch: BOS, 576 image tokens, text; right-padded to the longest sample
        ls = lens[i * a.batch:(i + 1) * a.batch]
        T = IMAGE_TOKENS + max(ls)
        ids = torch.randint(0, vocab - 2, (a.batch, T), device=device)
        ids = ids.masked_fill(ids == image_token, image_token + 1)  # random text never hits the placeholder
        ids[:, 1:1 + IMAGE_TOKENS] = image_token
        mask = torch.zeros_like(ids)
        for r, l in enumerate(ls):
            mask[r, :IMAGE_TOKENS + l] = 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :1 + IMAGE_TOKENS] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pix}, ls

    def samples(i):  # the same work as batch(i), as vlmkit samples (ids, labels, one image each)
        ls = lens[i * a.batch:(i + 1) * a.batch]
        out = []
        for r, l in enumerate(ls):
            ids = torch.randint(0, vocab - 2, (IMAGE_TOKENS + l,))
            ids = ids.masked_fill(ids == image_token, image_token + 1)
            ids[1:1 + IMAGE_TOKENS] = image_token
            labels = ids.clone()
            labels[:1 + IMAGE_TOKENS] = -100
            out.append({"input_ids": ids, "labels": labels, "pixel_values": pix[r:r + 1], "id": r})
        return out, ls

    def to_device(b):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}

    pad_id = raw.tokenizer.pad_token_id

    def packed_batch(i):  # vlmkit's collate(pack=True) over the same lengths
        s, ls = samples(i)
        return to_device(collate(s, pad_id, pack=True, max_tokens=a.pack_max_tokens)), ls

    def pack_check():
        """Loss of one batch padded vs packed (no gradients): the packed path must give the same loss."""
        s, _ = samples(0)
        with torch.no_grad():
            ref = float(model(**to_device(collate(s, pad_id))))
            got = float(model(**to_device(collate(s, pad_id, pack=True, max_tokens=a.pack_max_tokens))))
        return abs(got - ref) / abs(ref)

    make = packed_batch if a.pack else batch

    def step(i):  # vlmkit.train.train_stage's step with one micro-batch on one process
        b, ls = make(i)
        n_items = int((b["labels"][:, 1:] != -100).sum())
        if acc is None:
            loss = model(**b, num_items=n_items)
            loss.backward()
            if stage.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
        else:  # as train_stage: token mean over every process's labelled tokens
            n_items = int(acc.reduce(torch.tensor(n_items, device=device), "sum"))
            loss = model(**b, num_items=n_items)
            acc.backward(loss * world)
            if stage.max_grad_norm > 0:
                acc.clip_grad_norm_(params, stage.max_grad_norm)
            loss = acc.reduce(loss.detach(), "sum")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss = float(loss.detach())  # train_stage checks every step's loss (a host sync, as there)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {i}")
        return loss, ls, b["input_ids"].numel()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    check = None
    if a.pack and not a.no_pack_check:
        check = pack_check()
        print(f"pack check: |packed - padded| / padded loss = {check:.2e}", file=sys.stderr)
    for i in range(a.warmup):
        step(i)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    flop_stage = 1 if (a.lora or a.qlora) else a.stage
    shapes = SimpleNamespace(vision_config=raw.encoder.model.config, text_config=raw.llm.config)
    real = padded = flops = 0
    t0 = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        loss, ls, numel = step(i)
        real += sum(IMAGE_TOKENS + l for l in ls)
        padded += numel
        flops += sum(flops_per_sample(shapes, l, flop_stage) for l in ls)
    sync()
    dt = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)
    res = dict(impl="vlmkit", llm=a.llm, stage=a.stage, batch=a.batch, gc=a.gc,
               lengths="fixed" if a.fixed_len else "workload",
               samples_s=round(a.steps * a.batch / dt, 2), real_tokens_s=round(real / dt),
               pad_fraction=round(1 - real / padded, 3), tflops=round(flops / dt / 1e12, 1),
               mfu=round(flops / dt / 1e12 / a.peak, 3), peak_mem_gib=round(peak, 1),
               mode="qlora" if a.qlora else "lora" if a.lora else "full", max_grad_norm=a.max_grad_norm,
               loss=round(loss, 4), pack=a.pack, pack_max_tokens=a.pack_max_tokens, gc_every=a.gc_every,
               gc_skip=a.gc_skip, attn=a.attn, compile=a.compile,
               pack_check_rel=None if check is None else float(f"{check:.3g}"))
    if acc is not None:  # this process's figures times the processes (the same work each): all GPUs together
        res.update(world_size=world, engine=engine(acc), samples_s_per_gpu=res["samples_s"],
                   samples_s=round(res["samples_s"] * world, 2))
        if not acc.is_main_process:
            return res
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
