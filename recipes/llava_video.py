"""LLaVA-NeXT-Video: each frame through CLIP, 2x2 average pooling, a 2-layer MLP, then the LLM (a video demo).

    accelerate launch recipes/llava_video.py                  # the embedded video demo (CPU, no network)
    accelerate launch recipes/llava_video.py --config my_video_run.yaml

The demo writes short procedural clips whose questions need several frames in order (direction of motion, which
shape appears first, how many bounces), a tokenizer, its stage(s) and the final model under runs/llava_video/, and
its evaluation to metrics.json: accuracy with the frames in order, shuffled, and one frame repeated.
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
from vlmkit.data.dataset import VideoOptions  # noqa: E402
from vlmkit.experiments.demo import relocate  # noqa: E402
from vlmkit.experiments.video_run import prepare, video_demo_metrics  # noqa: E402
from vlmkit.training.engine import make_accelerator  # noqa: E402
from vlmkit.training.run import run  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a run config (YAML); default: the embedded video demo")
    ap.add_argument("--output-dir", default=None, help="override train.output_dir")
    ap.add_argument("--cpu", action="store_true", help="force CPU (e.g. a 2-process gloo run)")
    ap.add_argument("--demo-train-clips", type=int, default=2000, help="training clips the demo writes")
    ap.add_argument("--demo-eval-clips", type=int, default=200, help="held-out clips (each in 3 variants)")
    add_resume_args(ap)
    add_override_args(ap)
    args = parse_run_args(ap, argv)

    demo = args.config is None
    cfg = load_config(args.config or HERE / "configs" / "llava_video_demo.yaml", args.overrides)
    apply_run_args(cfg.train, args)
    out = Path(cfg.train.output_dir)
    if demo:  # the demo writes its data and tokenizer under the chosen output dir
        relocate(cfg, out)
    accelerator = make_accelerator(cfg.train, cpu=args.cpu)
    data = cfg.stages[-1].data
    t0 = time.perf_counter()
    if demo:
        if accelerator.is_main_process:
            prepare(out, args.demo_train_clips, args.demo_eval_clips, cfg.model.encoder.config["image_size"],
                    data.max_frames)
        accelerator.wait_for_everyone()
    model, accelerator, stage_metrics = run(cfg, accelerator=accelerator)
    if not demo or not accelerator.is_main_process:
        return
    metrics = video_demo_metrics(model, out / "data", stage_metrics, t0, VideoOptions.of(data))
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps({k: metrics[k] for k in ("accuracy_ordered", "accuracy_shuffled", "accuracy_one",
                                              "train_samples_per_second", "wall_seconds")}))
    for v in ("ordered", "shuffled", "one"):
        print(f"{v:>8}: {metrics[f'accuracy_{v}']:.3f}  per type: {metrics[f'accuracy_{v}_per_type']}")
    print(f"model: {out / 'model'}  metrics: {out / 'metrics.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlmkit.errors import run_recipe

    run_recipe(main, "recipes/llava_video.py")  # one line per error (--debug: traceback); SIGTERM: checkpoint, exit
