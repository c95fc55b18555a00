"""LLaVA-NeXT: CLIP + AnyRes tiling + 2-layer MLP + LLM, stage 1 (connector) then stage 2 (all).

    accelerate launch recipes/llava_next.py                   # the embedded demo (CPU, no network)
    accelerate launch recipes/llava_next.py --config recipes/configs/llava_next_7b.yaml

AnyRes (`model.tiling`): each image is fitted onto the best of the grid pinpoints, cut into
encoder-sized tiles (plus a base tile of the whole image), and the tiles' features are laid out as
one grid, the padding cropped away and a learned `image_newline` appended after each row.

The demo's task needs the detail: a square on a canvas up to 128 px is plain, striped or checked with
a 2 px period, which a single 32 px tile averages away (colour and side survive). It trains the AnyRes model and (unless --no-compare-single-tile) the
same model with one tile per image (LLaVA-1.5's pad + resize), with the same encoder, data, plan and
seed, and writes both accuracies to runs/llava_next/metrics.json.
"""
import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlmkit.config import TilingConfig, add_resume_args, apply_run_args, load_config  # noqa: E402
from vlmkit.data.demo import relocate  # noqa: E402
from vlmkit.evaluate import demo_metrics  # noqa: E402
from vlmkit.train import make_accelerator, run  # noqa: E402

HERE = Path(__file__).resolve().parent


def prepare_demo(out: Path, n_train: int) -> None:
    from vlmkit.data.demo import corpus, train_tokenizer
    from vlmkit.data.demo_highres import make_highres_data

    paths = make_highres_data(out / "data", n_train=n_train, n_eval=120, seed=0)
    train_tokenizer(corpus([paths["captions"], paths["train"], paths["eval"]]), out / "tokenizer")


def single_tile(cfg, out: Path):
    """The same run with one tile per image: no tiling, so no image_newline in the plans."""
    cfg = copy.deepcopy(cfg)
    cfg.model.tiling = TilingConfig()
    for s in cfg.stages:
        s.train.pop("image_newline", None)
    cfg.train.output_dir = str(out / "single_tile")
    cfg.train.log_with = None
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a run config (YAML); default: the embedded demo")
    ap.add_argument("--output-dir", default=None, help="override train.output_dir")
    ap.add_argument("--cpu", action="store_true", help="force CPU (e.g. a 2-process gloo run)")
    ap.add_argument("--demo-train-images", type=int, default=2000)
    ap.add_argument("--compare-single-tile", action=argparse.BooleanOptionalAction, default=True,
                    help="demo: also train with one tile per image and report both accuracies (default: on)")
    add_resume_args(ap)
    args = ap.parse_args(argv)

    demo = args.config is None
    cfg = load_config(args.config or HERE / "configs" / "llava_next_demo.yaml")
    apply_run_args(cfg.train, args)
    out = Path(cfg.train.output_dir)
    if demo:  # the demo writes its data and tokenizer under the chosen output dir
        relocate(cfg, out)
    accelerator = make_accelerator(cfg.train, cpu=args.cpu)
    t0 = time.perf_counter()
    if demo:
        if accelerator.is_main_process:
            prepare_demo(out, args.demo_train_images)
        accelerator.wait_for_everyone()
    model, accelerator, stage_metrics = run(cfg, accelerator=accelerator)
    if not demo:
        return
    metrics = demo_metrics(model, str(out / "data" / "eval.json"), stage_metrics, t0) if accelerator.is_main_process else None
    if args.compare_single_tile:
        t1 = time.perf_counter()
        base, _, base_stages = run(single_tile(cfg, out), accelerator=accelerator)
        if accelerator.is_main_process:
            single = demo_metrics(base, str(out / "data" / "eval.json"), base_stages, t1)
            metrics["single_tile"] = single
            metrics["eval_accuracy_single_tile"] = single["eval_accuracy"]
            metrics["eval_accuracy_single_tile_per_type"] = single["eval_accuracy_per_type"]
    if not accelerator.is_main_process:
        return
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    keys = ("eval_accuracy", "eval_accuracy_single_tile", "eval_accuracy_no_image", "wall_seconds")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}))
    print(f"anyres per type: {metrics['eval_accuracy_per_type']}")
    if "single_tile" in metrics:
        print(f"single tile per type: {metrics['eval_accuracy_single_tile_per_type']}")
    print(f"model: {out / 'model'}  metrics: {out / 'metrics.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
