"""vlmkit's training throughput where users train: `vlmkit.train.run` over LLaVA-format files on disk.

Writes a LLaVA-format JSON and 336x336 JPEG images (text lengths: the shared workload's, seed 0, the exact
number of tokens of a Llama-like BPE under the stage's template: `plain` captions for stage 1, `vicuna_v1`
conversations for stage 2), then trains one stage through the entry point a user runs: a `RunConfig` into
`vlmkit.train.run` (the real DataLoader with workers, the real loop, the recipe's default precision:
`mixed_precision: bf16` and `train.precision: auto`, logging on, no checkpoints). The model is the peer's shape
with random weights: CLIP ViT-L/14-336 (feature layer -2, 576 tokens) + mlp2x_gelu + a Llama-7B / Qwen2-1.5B /
Qwen2-0.5B-shaped LLM built from `config:`.

  python3 benchmarks/train_throughput.py --llm 7b --stage 2 --batch 16 --gc --steps 10
  python3 benchmarks/train_throughput.py --llm 7b --stage 1 --batch 32 --steps 10
  python3 benchmarks/train_throughput.py --llm 1.5b --stage 2 --batch 16 --gc --steps 10
  python3 benchmarks/train_throughput.py --llm 7b --stage 2 --batch 16 --gc --compile --steps 10
  python3 benchmarks/train_throughput.py --llm 7b --stage 2 --batch 16 --gc --video 8 --steps 10   # video samples
  python3 benchmarks/train_throughput.py --device cpu --llm tiny --batch 2 --steps 2 --warmup 1   # smoke
  python3 benchmarks/train_throughput.py --accelerate-config recipes/accelerate/zero2.yaml --num-processes 4 \
      --llm 7b --stage 2 --batch 16 --gc --steps 10   # several GPUs: the recipe under ZeRO-2 / ZeRO-3 / FSDP2

With `--accelerate-config FILE --num-processes N` (implies `--via-recipe`) the recipe runs under that accelerate
config on N GPUs, `--batch` samples per GPU per step (global batch N x batch, weak scaling); the precision is the
config's (DeepSpeed's JSON, FSDP2's mixed_precision). The JSON line then has total and per-GPU samples/s.

`--video F`: each sample is an H.264 clip (336x336, 30 fps, 3 s) decoded in the DataLoader workers, F frames
sampled uniformly, each frame's 24x24 CLIP grid average-pooled 2x2 (LLaVA-NeXT-Video): F x 144 placeholders in
place of the image's 576, the same text.

Rates are read from the run's own log (output_dir/log.jsonl: per step, cumulative samples, real tokens, model
FLOPs and seconds) between the end of step `--warmup` and the last step. MFU uses the peer's FLOP formula
(`vlmkit.flops` computes the same numbers) over real tokens against `--peak` TFLOP/s: `mfu` counts the vision
encoder's forward too (the peer's formula does), `mfu_llm` only the LLM. Prints one JSON line with the peer's
fields (impl "vlmkit") plus the memory breakdown of the stage.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # vlmkit and connectors from this checkout, installed or not
sys.path.insert(0, str(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used before the workers fork

import numpy as np  # noqa: E402

from peer_workload import LLMS, SOURCE, TINY_VISION, VISION, text_lengths  # noqa: E402

LR = {1: 1e-3, 2: 2e-5}  # LLaVA-1.5's


def write_data(folder: Path, a) -> dict:
    """Images (336x336 JPEG, photo-like), a Llama-like BPE and (warmup + steps) x batch samples whose text is
    exactly the workload's length in tokens under the stage's template."""
    import data_throughput as dt

    t0 = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    files = write_clips(folder / "images", rng, a) if a.video else []
    for k in range(0 if a.video else a.images):
        name = f"{k:06d}.jpg"
        dt.make_image(rng, 336, 336).save(folder / "images" / name, quality=90)
        files.append(name)
    words = dt.make_words(np.random.default_rng(a.seed), max(2 * a.vocab, 2000))
    tok_dir = dt.make_tokenizer(folder / "tokenizer", words, a.vocab, a.seed)
    from vlmkit.models.llm import load_tokenizer

    template = "plain" if a.stage == 1 else "vicuna_v1"
    maker = dt.TextMaker(load_tokenizer(tok_dir, "<image>"), words, template, a.seed)
    n = (a.warmup + a.steps) * a.batch * a.num_processes
    lengths = text_lengths(n, a.stage, a.seed)
    key = "video" if a.video else "image"
    records = [{"id": f"bench-{k:06d}", key: files[k % len(files)], "conversations": maker.conversation(t)}
               for k, t in enumerate(lengths)]
    if a.video:
        for r in records:
            r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "<video>", 1)
    (folder / "data.json").write_text(json.dumps(records))
    return {"json": str(folder / "data.json"), "image_folder": str(folder / "images"), "tokenizer": tok_dir,
            "template": template, "lengths": lengths, "seconds": time.perf_counter() - t0}


def write_clips(folder: Path, rng, a) -> list[str]:
    """`a.images // 4` H.264 clips of 90 photo-like 336x336 frames (a picture panning), 30 fps."""
    import data_throughput as dt

    from vlmkit.experiments.video_demo import write_mp4

    names = []
    for k in range(max(2, a.images // 4)):
        base = np.asarray(dt.make_image(rng, 336 + 90 * 2, 336, "RGB"))  # [H, W + 180, 3]
        frames = [np.ascontiguousarray(base[:, 2 * t:2 * t + 336]) for t in range(90)]
        names.append(f"{k:06d}.mp4")
        write_mp4(folder / names[-1], frames, rate=30)
    return names


def run_config(a, files: dict, out: Path):
    """The RunConfig a user would write for this shape (as recipes/configs/llava15_7b.yaml, random weights)."""
    from vlmkit.config import (ComponentPlan, ConnectorConfig, DataConfig, EncoderConfig, LLMConfig, ModelConfig,
                               RunConfig, StageConfig, TrainConfig, VideoConfig)

    mt, h, inter, layers, heads, kvh, vocab = LLMS[a.llm]
    llm = dict(model_type=mt, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kvh, vocab_size=vocab, max_position_embeddings=4096,
               tie_word_embeddings=False)
    model = ModelConfig(
        encoder=EncoderConfig(name="clip", config=dict(TINY_VISION if a.llm == "tiny" else VISION), feature_layer=-2,
                              image_aspect="pad"),
        connector=ConnectorConfig("mlp2x_gelu"),
        llm=LLMConfig(config=llm, tokenizer=files["tokenizer"], attn_implementation=a.attn), template="vicuna_v1",
        video=VideoConfig(pool="average", pool_stride=2, newline="none") if a.video else None)
    plan = {"connector": ComponentPlan(mode="full")}
    if a.stage == 2:
        plan["llm"] = (ComponentPlan(mode="lora", r=a.lora_r, alpha=2 * a.lora_r, dropout=0.05) if a.lora
                       else ComponentPlan(mode="full"))
    stage = StageConfig(
        name=f"stage{a.stage}", train=plan,
        data=DataConfig(path=files["json"], image_folder=files["image_folder"], template=files["template"],
                        max_length=2048 + 144 * a.video, num_workers=a.workers, pack=not a.no_pack,
                        **({"max_frames": a.video} if a.video else {})),
        lr=LR[a.stage], weight_decay=0.0, global_batch_size=a.batch * a.num_processes,
        per_device_batch_size=a.batch,
        max_steps=a.warmup + a.steps, warmup_ratio=0.03, gradient_checkpointing=a.gc,
        gradient_checkpointing_every=a.gc_every, gradient_checkpointing_skip=a.gc_skip, compile=a.compile)
    precision = None if a.accelerate_config else "bf16" if a.device == "cuda" else "no"  # the config's own
    train = TrainConfig(output_dir=str(out), mixed_precision=precision,
                        precision=a.precision, seed=0, log_with=a.log_with, log_every=1, save_steps=0,
                        save_models=False, resume="never")
    return RunConfig(model=model, stages=[stage], train=train)


def launch_recipe(cfg, root: Path, a) -> dict:
    """`accelerate launch recipes/llava15.py --config run.yaml` (one process) on the same config; the stage's
    metrics (precision, loss, memory) come from the last record of its log."""
    import subprocess

    import yaml

    from vlmkit.config import to_dict

    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(a.num_processes),
           "--num_machines", "1", "--dynamo_backend", "no"]
    if a.accelerate_config:
        cmd[3:3] = ["--config_file", str(a.accelerate_config)]
    else:
        cmd += ["--mixed_precision", cfg.train.mixed_precision or "no"]
    if a.device == "cpu":
        cmd.append("--cpu")
    cmd += [str(HERE.parent / "recipes" / "llava15.py"), "--config", str(path)]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    last = json.loads((root / "run" / "log.jsonl").read_text().splitlines()[-1])
    return {"precision": last.get("precision"), "final_loss": last["loss"], "memory": last.get("memory")}


def steady(log: list[dict], warmup: int) -> dict:
    """Rates between the end of step `warmup` and the last step of the run's log."""
    first = next(r for r in log if r["step"] == warmup)
    last = log[-1]
    dt = last["elapsed"] - first["elapsed"]
    return {"steps": last["step"] - warmup, "seconds": dt,
            **{k: (last[k] - first[k]) / dt for k in ("samples", "tokens", "flops", "llm_flops")}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="7b", choices=LLMS)
    p.add_argument("--stage", type=int, default=2, choices=[1, 2])
    p.add_argument("--batch", type=int, default=16, help="global batch = per-device batch (one optimizer step)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (workers start, kernels warm)")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--gc-every", type=int, default=1, help="with --gc: checkpoint every K-th decoder layer")
    p.add_argument("--gc-skip", type=int, default=0, help="with --gc: leave the last N decoder layers un-checkpointed")
    p.add_argument("--compile", action="store_true", help="the stage's compile: true (decoder layers)")
    p.add_argument("--lora", action="store_true", help="stage 2 with LoRA on the LLM")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--attn", default="varlen", help="llm.attn_implementation (the recipes': varlen)")
    p.add_argument("--no-pack", action="store_true", help="padded batches instead of data.pack")
    p.add_argument("--precision", default="auto", help="train.precision (auto: bf16-master on a GPU)")
    p.add_argument("--workers", type=int, default=4, help="data.num_workers")
    p.add_argument("--images", type=int, default=64, help="distinct image files (--video: a quarter as many clips)")
    p.add_argument("--video", type=int, default=0, metavar="F", help="video samples of F frames instead of images")
    p.add_argument("--vocab", type=int, default=4000, help="BPE vocabulary of the generated text")
    p.add_argument("--log-with", default="tensorboard", help="train.log_with ('none': off)")
    p.add_argument("--peak", type=float, default=790.0, help="bf16 dense TFLOP/s of the device (MFU)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", metavar="DIR", help="write data and run here and keep them (default: a temp dir)")
    p.add_argument("--accelerate-config", metavar="FILE", help="an accelerate config (recipes/accelerate/zero2.yaml, "
                   "zero3.yaml, fsdp2.yaml): the recipe under it (implies --via-recipe)")
    p.add_argument("--num-processes", type=int, default=1, help="with --accelerate-config: processes (GPUs)")
    p.add_argument("--via-recipe", action="store_true",
                   help="write the run config as YAML and train with `accelerate launch recipes/llava15.py --config`")
    a = p.parse_args(argv)
    if a.lora and a.stage != 2:
        p.error("--lora trains adapters on the LLM: use --stage 2")
    if (a.gc_every != 1 or a.gc_skip) and not a.gc:
        p.error("--gc-every / --gc-skip need --gc")
    a.log_with = None if a.log_with == "none" else a.log_with
    if a.num_processes != 1 and not a.accelerate_config:
        p.error("--num-processes goes with --accelerate-config")
    a.via_recipe = a.via_recipe or bool(a.accelerate_config)
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="vlmkit-train-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        files = write_data(root / "data", a)
        cfg = run_config(a, files, root / "run")
        os.environ["VLMKIT_PEAK_TFLOPS"] = str(a.peak)  # the loop's own MFU uses the same peak
        import torch

        from vlmkit.training.run import run

        t0 = time.perf_counter()
        if a.via_recipe:
            m = launch_recipe(cfg, root, a)
        else:
            m = run(cfg, cpu=a.device == "cpu")[2][0]
        wall = time.perf_counter() - t0
        log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
        rate = steady(log, a.warmup)
        mem = m.get("memory") or {}
        if not mem:
            import resource

            mem = {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # host RSS
        res = dict(impl="vlmkit", path="recipe" if a.via_recipe else "run", llm=a.llm, stage=a.stage, batch=a.batch, gc=a.gc,
                   video_frames=a.video, num_processes=a.num_processes,
                   accelerate_config=a.accelerate_config,
                   samples_s_per_gpu=round(rate["samples"] / a.num_processes, 2),
                   lengths="workload", samples_s=round(rate["samples"], 2), real_tokens_s=round(rate["tokens"]),
                   pad_fraction=0.0 if not a.no_pack else None, tflops=round(rate["flops"] / 1e12, 1),
                   mfu=round(rate["flops"] / 1e12 / (a.peak * a.num_processes), 3),
                   mfu_llm=round(rate["llm_flops"] / 1e12 / (a.peak * a.num_processes), 3),
                   peak_mem_gib=round(mem["peak_gib"], 1), memory=mem, precision=m["precision"],
                   mode="lora" if a.lora else "full", pack=not a.no_pack, attn=a.attn, compile=a.compile,
                   gc_every=a.gc_every, gc_skip=a.gc_skip, workers=a.workers, timed_steps=rate["steps"],
                   loss=round(m["final_loss"], 4), data_seconds=round(files["seconds"], 1),
                   run_seconds=round(wall, 1), workload=SOURCE, torch=torch.__version__)
        print(json.dumps(res), flush=True)
        return res
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
