"""LoRA fine-tune of an existing vlmkit model on your own LLaVA-format data.

    accelerate launch recipes/lora_finetune.py --model runs/llava15/model --data my.json [--image-folder imgs/]
        [--eval-data my_eval.json] [--config recipes/configs/plans/lora_finetune.yaml] [--output-dir runs/lora]
    accelerate launch recipes/lora_finetune.py      # the demo: teach the llava15 demo model a new question type

The stage plan (which parts get adapters, ranks, learning rates) comes from the config; the
base weights stay untouched: the output holds them plus the adapters in peft's layout under
adapters/<component>/, and `vlmkit export` merges them. The demo needs runs/llava15/model
(run `accelerate launch recipes/llava15.py` first).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlmkit.config import RunConfig, add_resume_args, apply_run_args, load_stages  # noqa: E402
from vlmkit.experiments.lora_demo import make_new_type_data, replay  # noqa: E402
from vlmkit import VLM  # noqa: E402
from vlmkit.models.build import resolve_model_dir  # noqa: E402
from vlmkit.training.engine import make_accelerator  # noqa: E402
from vlmkit.training.run import run  # noqa: E402

HERE = Path(__file__).resolve().parent
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a vlmkit model (or run) folder; default: the llava15 demo's")
    ap.add_argument("--data", default=None, help="LLaVA-format JSON/JSONL or HF dataset to fine-tune on")
    ap.add_argument("--image-folder", default="")
    ap.add_argument("--eval-data", default=None, help="held-out questions with reference answers")
    ap.add_argument("--config", default=None, help="stage plan YAML (`stages:` and `train:`)")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="let the base model folder's own Python code run (only for a folder you trust)")
    add_resume_args(ap)
    args = ap.parse_args(argv)

    demo = args.data is None
    cfg_path = args.config or HERE / "configs" / "plans" / ("lora_finetune_demo.yaml" if demo else "lora_finetune.yaml")
    stages, train = load_stages(cfg_path)
    apply_run_args(train, args)
    out = Path(train.output_dir)
    base_dir = resolve_model_dir(args.model or "runs/llava15/model")
    if not (base_dir / "config.json").exists():
        sys.exit(f"no vlmkit model at {base_dir}" + ("; run `accelerate launch recipes/llava15.py` first" if demo else ""))
    accelerator = make_accelerator(train, cpu=args.cpu)
    model = VLM.from_pretrained(base_dir, trust_remote_code=args.trust_remote_code)
    t0 = time.perf_counter()
    data, eval_data = args.data, args.eval_data
    if demo:
        if accelerator.is_main_process:
            train_path, _ = make_new_type_data(out / "data", 1500, 120, model.encoder.image_size)
            replay(Path(train_path), base_dir.parent / "data" / "train.json", 1500)
        accelerator.wait_for_everyone()
        data, eval_data = str(out / "data" / "train.json"), str(out / "data" / "eval.json")
    for s in stages:
        s.data.path = s.data.path or data
        s.data.image_folder = s.data.image_folder or args.image_folder
        if demo:  # the replayed base-task samples name their images by absolute path (written just above)
            s.data.allow_absolute_image_paths = True
    from vlmkit.evaluate import evaluate

    before = evaluate(model, eval_data, args.image_folder, progress=False) if eval_data and accelerator.is_main_process else None
    model, accelerator, stage_metrics = run(RunConfig(model=model.config, stages=stages, train=train), model=model,
                                            accelerator=accelerator)
    if not accelerator.is_main_process:
        return
    metrics = {"base_model": str(base_dir), "stages": stage_metrics,
               "train_samples_per_second": sum(m["samples"] for m in stage_metrics) / sum(m["seconds"] for m in stage_metrics),
               "wall_seconds": round(time.perf_counter() - t0, 1)}
    if eval_data:
        after = evaluate(model, eval_data, args.image_folder, progress=False)
        metrics.update(eval_accuracy_before=before["accuracy"], eval_accuracy=after["accuracy"],
                       eval_examples=after["examples"])
    if demo:  # the base model's own questions: what the adapters left intact
        base_eval = base_dir.parent / "data" / "eval.json"
        if base_eval.exists():
            metrics["base_task_accuracy_after"] = evaluate(model, str(base_eval), progress=False)["accuracy"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("stages", "eval_examples")}))
    print(f"model (base + adapters): {out / 'model'}  metrics: {out / 'metrics.json'}")


if __name__ == "__main__":
    from vlmkit.errors import run_recipe

    run_recipe(main, "recipes/lora_finetune.py")  # one line per error (--debug: traceback); SIGTERM: checkpoint, exit
