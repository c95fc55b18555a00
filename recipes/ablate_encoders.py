"""Encoder / connector ablation: the same stage plan for each pair, one table and one plot.

    accelerate launch recipes/ablate_encoders.py                        # the four encoders + MLP, demo data
    accelerate launch recipes/ablate_encoders.py --preset compressors   # token compressors on one encoder
    accelerate launch recipes/ablate_encoders.py --encoders clip,dinov2 --connectors mlp2x_gelu
    accelerate launch recipes/ablate_encoders.py --config my_ablation.yaml   # your parts and data

Each pair trains under runs/ablation/<encoder>__<connector>/ (stage 1 then stage 2 of the base
config, evaluated with real and with blank images); finished pairs are reused when the ablation is
started again. At the end: runs/ablation/ablation.csv, ablation.md and ablation.png.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlmkit.experiments.ablation import load_ablation, run_ablation  # noqa: E402

HERE = Path(__file__).resolve().parent


def _names(text):
    return [n for n in text.split(",") if n] if text else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "ablations" / "demo.yaml"), help="an ablation file")
    ap.add_argument("--preset", default=None, help="a selection named in the ablation file's presets")
    ap.add_argument("--encoders", default=None, help="comma-separated encoder names (overrides the preset)")
    ap.add_argument("--connectors", default=None, help="comma-separated connector names (overrides the preset)")
    ap.add_argument("--output-dir", default=None, help="override the ablation's output_dir")
    ap.add_argument("--demo-train-images", type=int, default=None, help="demo data size (default: the file's)")
    ap.add_argument("--rerun", action="store_true", help="train every pair again, even finished ones")
    ap.add_argument("--cpu", action="store_true", help="force CPU")
    args = ap.parse_args(argv)

    abl, base = load_ablation(args.config)
    pairs = abl.select(_names(args.encoders), _names(args.connectors), args.preset, where="command line")
    if args.output_dir:
        old = Path(abl.output_dir)
        abl.output_dir = args.output_dir
        if abl.eval_data and Path(abl.eval_data).is_relative_to(old):
            abl.eval_data = str(Path(args.output_dir) / Path(abl.eval_data).relative_to(old))
    if abl.demo is not None:
        from accelerate import PartialState

        from vlmkit.experiments.demo import prepare, relocate

        out = Path(abl.output_dir)
        relocate(base, out)
        state = PartialState(cpu=args.cpu)
        n_train = abl.demo["train_images"] = args.demo_train_images or abl.demo.get("train_images", 12000)
        if state.is_main_process and not (out / "data" / f"ready-{n_train}").exists():
            prepare(out, n_train, base.model.encoder.config["image_size"])
            (out / "data" / f"ready-{n_train}").touch()
        state.wait_for_everyone()
    rows, paths = run_ablation(abl, base, pairs, rerun=args.rerun, cpu=args.cpu)
    if paths:
        print(open(paths["md"]).read())
        print(f"table: {paths['md']}  csv: {paths['csv']}  plot: {paths['png']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlmkit.errors import run_recipe

    run_recipe(main, "recipes/ablate_encoders.py")  # one line per error (--debug: traceback); SIGTERM: checkpoint, exit
