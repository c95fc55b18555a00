"""LLaVA-NeXT: CLIP + AnyRes tiling + 2-layer MLP + LLM, stage 1 (connector) then stage 2 (all).

    accelerate launch recipes/llava_next.py                   # the embedded demo (CPU, no network)
    accelerate launch recipes/llava_next.py --config recipes/configs/llava_next_7b.yaml

AnyRes (`model.tiling`): each image is fitted onto the best of the grid pinpoints, cut into
encoder-sized tiles (plus a base tile of the whole image), and the tiles' features are laid out as
one grid, the padding cropped away and a learned `image_newline` appended after each row.

The demo's task needs the detail (vlmkit/data/demo_highres.py): a square on a canvas of up to 128 px is
plain, striped or checked in 1 px bands, which one 64 px tile averages away (its colour and side
survive). It trains the AnyRes model and (unless --no-compare-single-tile) the same model with one tile
per image (LLaVA-1.5's pad + resize), with the same encoder, data, plan and seed (vlmkit/tiling_demo.py),
and writes both accuracies, per question type, to runs/llava_next/metrics.json.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlmkit.config import add_resume_args, apply_run_args, load_config  # noqa: E402
from vlmkit.data.demo import relocate  # noqa: E402
from vlmkit.data.demo_highres import prepare  # noqa: E402
from vlmkit.tiling_demo import report, run_demo  # noqa: E402
from vlmkit.train import make_accelerator, run  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a run config (YAML); default: the embedded demo")
    ap.add_argument("--output-dir", default=None, help="override train.output_dir")
    ap.add_argument("--cpu", action="store_true", help="force CPU (e.g. a 2-process gloo run)")
    ap.add_argument("--demo-train-images", type=int, default=2000)
    ap.add_argument("--demo-eval-images", type=int, default=120, help="demo: held-out images (3 questions each)")
    ap.add_argument("--compare-single-tile", action=argparse.BooleanOptionalAction, default=True,
                    help="demo: also train with one tile per image and report both accuracies (default: on)")
    add_resume_args(ap)
    args = ap.parse_args(argv)

    demo = args.config is None
    cfg = load_config(args.config or HERE / "configs" / "llava_next_demo.yaml")
    apply_run_args(cfg.train, args)
    out = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train, cpu=args.cpu)
    if not demo:
        run(cfg, accelerator=accelerator)
        return
    relocate(cfg, out)  # the demo writes its data and tokenizer under the chosen output dir
    t0 = time.perf_counter()
    if accelerator.is_main_process:
        prepare(out, args.demo_train_images, args.demo_eval_images)
    accelerator.wait_for_everyone()
    metrics = run_demo(cfg, out, accelerator, compare=args.compare_single_tile, t0=t0)
    if metrics is not None:
        report(metrics, out, "anyres")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
