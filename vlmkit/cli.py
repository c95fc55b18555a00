"""`vlmkit train | eval | chat`.

    vlmkit train CONFIG.yaml                 (or: accelerate launch -m vlmkit.cli train CONFIG.yaml)
    vlmkit eval MODEL_DIR --data eval.json   accuracy against reference answers
    vlmkit chat MODEL_DIR --image cat.png --prompt "What is this?"   one-shot; without --prompt: interactive
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_train(args) -> int:
    from .config import load_config
    from .train import run

    cfg = load_config(args.config)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    run(cfg, cpu=args.cpu)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .model import VLM

    model = VLM.from_pretrained(args.model)
    res = evaluate(model, args.data, args.image_folder, blank_images=args.blank_images,
                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2))
    return 0


def cmd_chat(args) -> int:
    import torch
    from transformers import TextStreamer

    from .data.images import load_image
    from .model import VLM

    model = VLM.from_pretrained(args.model).eval()
    proc = model.processor()
    images = [load_image(args.image)] if args.image else []
    gen = {"do_sample": args.temperature > 0, "max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    history: list[dict] = []

    def answer(text: str) -> str:
        first = not history
        content = ("<image>\n" * len(images) if first else "") + text
        history.append({"role": "user", "content": content})
        p = proc(history, images, add_generation_prompt=True)
        streamer = TextStreamer(model.tokenizer, skip_special_tokens=True)
        with torch.no_grad():
            out = model.generate(p["input_ids"][None], None, p["pixel_values"], streamer=streamer, **gen)
        reply = model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        return reply

    if args.prompt:
        answer(args.prompt)
        return 0
    print("vlmkit chat: empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        answer(line.strip())
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vlmkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="run every stage of a config")
    t.add_argument("config")
    t.add_argument("--output-dir")
    t.add_argument("--cpu", action="store_true")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="accuracy on a LLaVA-format file with reference answers")
    e.add_argument("model")
    e.add_argument("--data", required=True)
    e.add_argument("--image-folder", default="")
    e.add_argument("--blank-images", action="store_true", help="replace every image by a blank one")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--output", help="write the full result JSON here")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("chat", help="talk to a model about an image")
    c.add_argument("model")
    c.add_argument("--image")
    c.add_argument("--prompt", help="one-shot: answer this and exit")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    c.add_argument("--top-p", type=float, default=0.9)
    c.set_defaults(fn=cmd_chat)

    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
