"""`vlmkit train | eval | chat | export | import | check-data | recipe`.

    vlmkit train CONFIG.yaml [KEY=VALUE ...] (or: accelerate launch -m vlmkit.cli train CONFIG.yaml ...)
    vlmkit eval MODEL_DIR --data eval.json   accuracy against reference answers
    vlmkit chat MODEL_DIR --image cat.png --prompt "What is this?"   one-shot; without --prompt: interactive
    vlmkit export RUN_OR_MODEL_DIR OUT_DIR   transformers-native Llava / LlavaNext / InternVL / LlavaNextVideo /
                                             LlavaOnevision (picked from the parts)
    vlmkit import HF_DIR_OR_HUB_ID OUT_DIR   a Llava / LlavaNext / InternVL checkpoint -> a vlmkit model folder
    vlmkit check-data --config RUN.yaml      scan every stage's data for bad samples (exit 1 if any)
    vlmkit check-data data.json --model MODEL_DIR --json report.json
    vlmkit recipe list                       the shipped recipes and configs (--config llava15_7b names one)
    vlmkit recipe llava15 [ARGS ...]         run one (or: accelerate launch -m vlmkit.cli recipe llava15 ...)
    vlmkit recipe copy llava15 DIR           the recipe and its configs, to edit

An error prints one line and exits with status 1 (--debug, or VLMKIT_DEBUG=1, shows the traceback).
A model folder's own Python code never runs unless --trust-remote-code is given for that command.
`vlmkit train` stops on SIGTERM / Ctrl-C after the current step, with a resumable checkpoint (exit status
128 + the signal).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path


def cmd_train(args) -> int:
    from .config import load_config
    from .training.preempt import handlers
    from .training.run import run

    cfg = load_config(args.config, args.overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    if args.resume:
        cfg.train.resume = args.resume
    with handlers():  # SIGTERM / Ctrl-C: a resumable checkpoint at the next step, then exit
        run(cfg, cpu=args.cpu)
    return 0


def cmd_eval(args) -> int:
    """Several processes under `accelerate launch` each answer a shard; the main one writes the report."""
    from accelerate import Accelerator

    from .training.distributed import destroy_at_exit
    from .evaluate import evaluate, markdown_table, write_report
    from .models import VLM
    from .models.build import resolve_model_dir

    acc = Accelerator(cpu=args.cpu)
    destroy_at_exit()  # its last step is a collective (the answers gathered): see vlmkit/training/distributed.py
    model = VLM.from_pretrained(resolve_model_dir(args.model), trust_remote_code=args.trust_remote_code).to(acc.device)
    settings = {"images": False, "blank images": True} if args.blank_images else {"images": False}
    results = {name: evaluate(model, args.data, args.image_folder, blank_images=blank, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, accelerator=acc, limit=args.limit,
                              video=_video_options(args))
               for name, blank in settings.items()}
    if acc.is_main_process:
        print(markdown_table(results), end="")
        if args.output_dir:
            print("wrote", *write_report(results, args.output_dir))
    return 0



def _video_options(args):
    """The data.* video keys given on the command line (vlmkit/data/dataset.py VideoOptions)."""
    from .data.dataset import VideoOptions

    return VideoOptions(folder=getattr(args, "video_folder", "") or "", max_frames=args.max_frames, fps=args.fps,
                        max_video_tokens=args.max_video_tokens)


def _add_video_args(p) -> None:
    p.add_argument("--max-frames", type=int, default=8, help="frames sampled per video, uniformly (data.max_frames)")
    p.add_argument("--fps", type=float, help="sample at this many frames per second, capped at --max-frames")
    p.add_argument("--max-video-tokens", type=int, help="per-video token budget: fewer frames when over it")


def cmd_chat(args) -> int:
    """One-shot with --prompt; otherwise the interactive session of vlmkit/chat.py (roles, /image, /clear, /exit)."""
    from .chat import ChatSession
    from .models import VLM
    from .models.build import resolve_model_dir

    model = VLM.from_pretrained(resolve_model_dir(args.model), trust_remote_code=args.trust_remote_code).eval()
    gen = {"do_sample": args.temperature > 0, "max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    session = ChatSession(model, gen, video=_video_options(args))
    if args.image:
        session.attach(args.image)  # one-shot or not, a bad --image is an error before anything is asked
    if args.video:
        session.attach_video(args.video)
    if args.prompt:
        session.answer(args.prompt)
        return 0
    session.loop(sys.stdin)
    return 0


def cmd_export(args) -> int:
    from .export import EXPORT_TYPES, export_model
    from .models.build import resolve_model_dir

    from .security import RemoteCodeRefused

    src = resolve_model_dir(args.model)
    try:
        out = export_model(src, args.out_dir, template=args.template)
    except RemoteCodeRefused as e:
        raise RemoteCodeRefused(f"{e}. But an export writes a transformers-native class, which runs no model code: "
                                f"a model that needs its own code cannot be exported") from None
    model_type = json.loads((Path(out) / "config.json").read_text())["model_type"]
    print(f"exported {src} -> {out} ({EXPORT_TYPES[model_type]}; load with AutoModelForImageTextToText "
          f"and AutoProcessor)")
    return 0


def cmd_import(args) -> int:
    from .export import import_model

    model = import_model(args.source, template=args.template, image_aspect=args.image_aspect)
    model.save_pretrained(args.out_dir)
    print(f"imported {args.source} -> {args.out_dir} (vlmkit model folder: encoder {model.encoder.kind}, "
          f"connector {model.config.connector.name}, tiling {model.config.tiling.mode})")
    return 0


def cmd_recipe(args) -> int:
    """`recipe list`, `recipe copy NAME DIR`, or `recipe NAME ARGS...` (the recipe's own command line)."""
    from .shipped import RecipeError, configs, copy_recipe, recipes, recipes_dir, run_recipe

    if args.name == "list":
        rows = recipes()
        width = max(map(len, rows))
        print("\n".join(f"{name:<{width}}  {doc}" for name, doc in rows.items()))
        print(f"\nin {recipes_dir()} (configs/, accelerate/); shipped configs (--config NAME): {', '.join(configs())}")
        return 0
    if args.name == "copy":
        if len(args.args) != 2:
            raise RecipeError("usage: vlmkit recipe copy NAME DIR (e.g. vlmkit recipe copy llava15 my_recipe)")
        written = copy_recipe(*args.args)
        print(f"copied {args.args[0]} to {args.args[1]}: " + ", ".join(str(p) for p in written))
        return 0
    return run_recipe(args.name, args.args)


def cmd_check_data(args) -> int:
    from .check_data import run_cli

    return run_cli(args)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, each option's default (where it has one) after its help, one line per verb."""

    def __init__(self, prog, **kw):
        super().__init__(prog, **{"max_help_position": 30, "width": 110, **kw})

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, "", argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """`vlmkit VERB ...`: one sub-parser per verb, each with --debug (and --trust-remote-code where a model
    folder is loaded)."""
    ap = argparse.ArgumentParser(prog="vlmkit", description=__doc__, formatter_class=HelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (or VLMKIT_DEBUG=1)")
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust-remote-code", action="store_true",
                       help="let the model folder's own Python code run, for this command (only for a folder "
                            "whose author you trust; a folder's config.json cannot switch this on)")
    sub = ap.add_subparsers(dest="cmd", required=True, title="verbs")
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)  # defaults shown
    for add in (_add_train, _add_eval, _add_chat, _add_export, _add_import, _add_check_data, _add_recipe):
        add(sub, common, trust)
    return ap


def _add_train(sub, common, trust) -> None:
    from .config import add_override_args, add_resume_args

    t = sub.add_parser("train", help="run every stage of a config", parents=[common])
    t.add_argument("config", help="a run config (YAML: model, stages, train)")
    add_override_args(t)
    t.add_argument("--output-dir", help="override train.output_dir")
    t.add_argument("--cpu", action="store_true", help="force CPU (e.g. several gloo processes)")
    add_resume_args(t)
    t.set_defaults(fn=cmd_train)


def _add_eval(sub, common, trust) -> None:
    e = sub.add_parser("eval", help="accuracy on questions with reference answers (LLaVA-format file or HF dataset)",
                       parents=[common, trust])
    e.add_argument("model", help="a vlmkit model folder, or a run folder (its model/ is used)")
    e.add_argument("--data", required=True, help="questions with reference answers (LLaVA-format JSON/JSONL or HF)")
    e.add_argument("--image-folder", default="", help="images are relative to this folder ('': the data file's)")
    e.add_argument("--blank-images", action="store_true",
                   help="also answer with every image and video frame replaced by a blank one (how much comes "
                        "from the text alone; the row is called 'blank images')")
    e.add_argument("--batch-size", type=int, default=64, help="questions answered at once")
    e.add_argument("--max-new-tokens", type=int, default=16, help="longest answer")
    e.add_argument("--limit", type=int, help="answer only the first N questions (of the whole file, however many "
                                             "processes share them)")
    e.add_argument("--video-folder", default="", help="videos are relative to this folder ('': the image folder)")
    _add_video_args(e)
    e.add_argument("--output-dir", help="write eval.json (every answer) and eval.md (the table) here")
    e.add_argument("--cpu", action="store_true", help="force CPU (e.g. several gloo processes)")
    e.set_defaults(fn=cmd_eval)


def _add_chat(sub, common, trust) -> None:
    c = sub.add_parser("chat", help="talk to a model about an image", parents=[common, trust])
    c.add_argument("model", help="a vlmkit model folder, or a run folder (its model/ is used)")
    c.add_argument("--image", help="an image file to talk about (interactive: /image PATH adds or changes it)")
    c.add_argument("--video", help="a video file or folder of frames to talk about (interactive: /video PATH)")
    _add_video_args(c)
    c.add_argument("--prompt", help="one-shot: answer this and exit (without it: interactive, USER> prompts; "
                                    "/image PATH, /video PATH, /clear, /help, /exit or Ctrl-D)")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer")
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (with --temperature > 0)")
    c.set_defaults(fn=cmd_chat)


def _add_export(sub, common, trust) -> None:
    x = sub.add_parser("export", help="a vlmkit model -> transformers-native Llava / LlavaNext / InternVL / "
                       "LlavaNextVideo / LlavaOnevision folder (picked from the parts)", parents=[common])
    x.add_argument("model", help="a model folder, or a run folder (its model/ is used)")
    x.add_argument("out_dir", help="the transformers-native folder to write")
    x.add_argument("--template", help="chat template to write (default: the model's)")
    x.set_defaults(fn=cmd_export)


def _add_import(sub, common, trust) -> None:
    m = sub.add_parser("import", help="a transformers-native Llava / LlavaNext / InternVL checkpoint -> vlmkit folder",
                       parents=[common])
    m.add_argument("source", help="a local folder or a hub id")
    m.add_argument("out_dir", help="the vlmkit model folder to write")
    m.add_argument("--template", help="vlmkit chat template (default: inferred from the checkpoint's)")
    m.add_argument("--image-aspect", choices=("pad", "resize"), help="Llava only (default: from its image processor)")
    m.set_defaults(fn=cmd_import)


def _add_check_data(sub, common, trust) -> None:
    k = sub.add_parser("check-data", help="scan datasets for bad samples before training (exit 1 if any)",
                       parents=[common])
    k.add_argument("data", nargs="*", help="data paths as data.path takes them (JSON/JSONL/parquet/arrow files, "
                                           "folders, saved or hub datasets) "
                                           "(with --config and none given: every stage's data)")
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a saved model folder (tokenizer + config.json; no weights are loaded)")
    src.add_argument("--config", help="a run config: each stage's data with its template and max_length")
    k.add_argument("--image-folder", help="images are relative to this folder (default: the data file's)")
    k.add_argument("--format", choices=("auto", "llava", "messages"),
                   help="sample layout (default: the stage's data.format, else auto: from each sample's fields)")
    k.add_argument("--column", action="append", metavar="FIELD=COLUMN",
                   help="map a vlmkit field (id, conversations, messages, image, images) to the data's column name; "
                        "repeatable (default: the stage's data.columns)")
    k.add_argument("--template", help="chat template (default: the stage's, else the model's)")
    k.add_argument("--max-length", type=int, help="default: the stage's, else 2048")
    k.add_argument("--max-image-pixels", type=int, help="refuse images whose header declares more pixels "
                   "(default: the stage's data.max_image_pixels, else 178,956,970; 0: no limit)")
    k.add_argument("--max-aspect-ratio", type=float, help="refuse images more elongated than this (long side / "
                   "short side; default: the stage's data.max_aspect_ratio, else 200; 0: no limit)")
    k.add_argument("--allow-absolute-image-paths", action="store_true", default=None,
                   help="accept image paths outside the image folder (absolute, '..', symlinks); default: refused")
    k.add_argument("--trust-remote-code", action="store_true",
                   help="with --model: let the folder's own Python code run (only for a folder you trust)")
    k.add_argument("--video-folder", help="videos are relative to this folder (default: the stage's "
                   "data.video_folder, else the image folder)")
    k.add_argument("--max-frames", type=int, help="frames sampled per video (default: the stage's data.max_frames, "
                   "else 8)")
    k.add_argument("--fps", type=float, help="sample at this many frames per second (default: the stage's data.fps)")
    k.add_argument("--max-video-tokens", type=int, help="per-video token budget: a video over it even at one frame "
                   "is video_too_long (default: the stage's data.max_video_tokens)")
    k.add_argument("--json", help="write the full report as JSON to this file ('-': stdout)")
    k.add_argument("--examples", type=int, default=5, help="offending samples kept per kind")
    k.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    k.add_argument("--limit", type=int, help="check only the first N samples of each dataset")
    k.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    k.set_defaults(fn=cmd_check_data)


def _add_recipe(sub, common, trust) -> None:
    r = sub.add_parser("recipe", help="the shipped recipes: list, run one (vlmkit recipe NAME ARGS...), copy one "
                                      "with its configs to edit")
    r.add_argument("name", metavar="list | copy | NAME",
                   help="list: the recipes and shipped configs; copy NAME DIR: the recipe and its configs into DIR; "
                        "NAME: run recipe NAME with ARGS (as accelerate launch recipes/NAME.py ARGS; under "
                        "accelerate launch -m vlmkit.cli recipe NAME ARGS on several processes)")
    r.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the recipe's own arguments (vlmkit recipe NAME --help lists them)")
    r.set_defaults(fn=cmd_recipe, debug=False)


def main(argv=None) -> int:
    from .config import parse_run_args
    from .errors import guard
    from .security import no_prompt_for_remote_code

    args = parse_run_args(build_parser(), argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    no_prompt_for_remote_code()
    return guard(args.fn, f"vlmkit {args.cmd}", argv + (["--debug"] if args.debug else []), args)


if __name__ == "__main__":
    sys.exit(main())
