"""LLaVA-1.5: CLIP + 2-layer MLP + LLM, stage 1 (connector) then stage 2 (connector + LLM).

    accelerate launch recipes/llava15.py                      # the embedded demo (CPU, no network)
    accelerate launch recipes/llava15.py --config recipes/configs/llava15_7b.yaml

The demo writes its data, tokenizer, stages and final model under runs/llava15/ and its
evaluation (accuracy on held-out questions, with real and with blank images) to metrics.json.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlmkit.config import add_override_args, add_resume_args, apply_run_args  # noqa: E402
from vlmkit.config import load_config, parse_run_args  # noqa: E402
from vlmkit.experiments.demo import prepare, relocate  # noqa: E402
from vlmkit.experiments.metrics import demo_metrics  # noqa: E402
from vlmkit.training.engine import make_accelerator  # noqa: E402
from vlmkit.training.run import run  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a run config (YAML); default: the embedded demo")
    ap.add_argument("--output-dir", default=None, help="override train.output_dir")
    ap.add_argument("--cpu", action="store_true", help="force CPU (e.g. a 2-process gloo run)")
    ap.add_argument("--demo-train-images", type=int, default=12000)
    add_resume_args(ap)
    add_override_args(ap)
    args = parse_run_args(ap, argv)

    demo = args.config is None
    cfg = load_config(args.config or HERE / "configs" / "llava15_demo.yaml", args.overrides)
    apply_run_args(cfg.train, args)
    out = Path(cfg.train.output_dir)
    if demo:  # the demo writes its data and tokenizer under the chosen output dir
        relocate(cfg, out)
    accelerator = make_accelerator(cfg.train, cpu=args.cpu)
    t0 = time.perf_counter()
    if demo:
        if accelerator.is_main_process:
            prepare(out, args.demo_train_images, cfg.model.encoder.config["image_size"])
        accelerator.wait_for_everyone()
    model, accelerator, stage_metrics = run(cfg, accelerator=accelerator)
    if not demo or not accelerator.is_main_process:
        return
    metrics = demo_metrics(model, str(out / "data" / "eval.json"), stage_metrics, t0)
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps({k: metrics[k] for k in ("eval_accuracy", "eval_accuracy_no_image",
                                              "train_samples_per_second", "wall_seconds")}))
    print(f"per type: {metrics['eval_accuracy_per_type']}  |  blank images: {metrics['eval_accuracy_no_image_per_type']}")
    print(f"model: {out / 'model'}  metrics: {out / 'metrics.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlmkit.errors import run_recipe

    run_recipe(main, "recipes/llava15.py")  # one line per error (--debug: traceback); SIGTERM: checkpoint, exit
