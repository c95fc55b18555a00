"""Data-loader throughput: vlmkit's training DataLoader over realistic LLaVA-format data, per tiling mode.

Everything is generated in a temp dir from a fixed seed: a pool of photo-like JPEGs (and some RGB / RGBA
PNGs) of varied sizes (mostly COCO-like 640x480, also 1920x1080, 2048x1536, panoramas, tall pages, small
crops), and LLaVA-format conversations (`<image>` in the first turn, 1-8 turns) whose text lengths are the
shared workload's (`../shared/bench/workload.py`, stage 2, seed 0: the same lengths as
`peer_workload.py`), exactly in tokens of a Llama-like BPE (Metaspace pre-tokenizer, 32,000 words by
default) trained in-process on a procedural corpus plus the Vicuna template's words.

The Processor is built as training builds it (`vlmkit.model.build_processor`: the tokenizer loaded from
disk with `load_tokenizer`, the encoder's geometry from an inline transformers config, no weights):
  none      CLIP ViT-L/14-336, pad to square, 1 tile, 576 tokens (LLaVA-1.5)
  anyres    CLIP ViT-L/14-336 with LLaVA-NeXT's pinpoints, unpad + newline (base tile + 2..4 tiles)
  internvl  InternViT-300M-448 geometry, dynamic tiling 1..12 tiles + thumbnail, pixel-shuffle
  naflex    SigLIP 2 so400m-patch16-naflex geometry: native aspect ratio, at most 256 patches
            connector (256 tokens per tile) when one is registered, else mlp2x_gelu (1024)
and the loader is the training one: `vlmkit.train.make_dataset` (ConversationDataset) and
`vlmkit.train.make_loader` (shuffle, `data.num_workers` persistent workers, collate / packed collate
in the workers). Image decoding, tiling, normalisation, tokenization and collation all run in the workers.

Timing: a warm-up pass of a few batches starts the workers (their first batches excluded), then one full
pass over the `--samples` samples is timed from the moment every worker is idle and tasked again (a new
epoch of the persistent workers) to the last batch. The loop consumes batches and does nothing else:
this is the most the loader can feed. Per-core figures divide by the processes doing the work
(`workers`, or 1 with `--workers 0`).

  python3 benchmarks/data_throughput.py --mode all --samples 512                   # default workers
  python3 benchmarks/data_throughput.py --mode none --workers 2 --vs-train-rate 11.73
  python3 benchmarks/data_throughput.py --mode all --workers 0,1,2 --samples 64     # one data set, three loaders
  python3 benchmarks/data_throughput.py --mode anyres --workers 0 --samples 64 --pack

Prints one JSON line per (workers, mode) (samples/s, images/s, tiles/s, the same per worker process, tokens/s, the
text-length check against the workload), and with --vs-train-rate one line per mode on stderr with
the loader-to-training ratio (issue 7 asks for >= 2x at the default workers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used before the workers fork

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # vlmkit and connectors from this checkout, installed or not
sys.path.insert(0, str(HERE))
from peer_workload import SOURCE, text_lengths  # noqa: E402  (the shared workload, one import path)

from vlmkit.config import (ConnectorConfig, DataConfig, EncoderConfig, LLMConfig, ModelConfig,  # noqa: E402
                           TilingConfig)
from vlmkit.data.conversation import VICUNA_SYSTEM, encode, get_template, normalize  # noqa: E402

MODES = ("none", "anyres", "internvl", "naflex")
CLIP_L336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=336, patch_size=14)  # openai/clip-vit-large-patch14-336
INTERNVIT_448 = dict(model_type="internvl_vision", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=448, patch_size=14)  # InternViT-300M-448px
SIGLIP2_NAFLEX = dict(model_type="siglip2_vision_model", hidden_size=1152, intermediate_size=4304,
                      num_hidden_layers=27, num_attention_heads=16, num_patches=256,
                      patch_size=16)  # google/siglip2-so400m-patch16-naflex
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # [height, width]
LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)  # read, never built
MAX_LENGTH = {"none": 2048, "anyres": 4096, "internvl": 4096, "naflex": 2048}  # the recipes' / plans' data.max_length
IMAGE_SIZES = (  # (width, height, share): LLaVA-665K-like (COCO, GQA/VG, TextVQA, OCR-VQA) plus large photos
    (640, 480, 0.30), (480, 640, 0.08), (640, 427, 0.14), (427, 640, 0.04), (500, 375, 0.10), (1024, 768, 0.08),
    (300, 475, 0.05), (1280, 720, 0.05), (1920, 1080, 0.05), (2048, 1536, 0.03), (1600, 400, 0.03),
    (700, 2000, 0.03), (256, 192, 0.02),
)
FORMATS = (("jpg", "RGB", 0.85), ("png", "RGB", 0.10), ("png", "RGBA", 0.05))
TURN_TOKENS = 150  # about one question/answer pair per this many text tokens (1..8 turns)


# ---- data: images -------------------------------------------------------------------------------------
def make_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A photo-like picture: a smooth colour field, 5-25 shapes, fine sensor-like noise (JPEG-realistic sizes)."""
    field = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    im = Image.fromarray(field, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(5, 26))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=colour)
    px = np.asarray(im, dtype=np.int16) + rng.normal(0, 14, (height, width, 3)).astype(np.int16)  # [H, W, 3]
    im = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = np.full((height, width), 255, np.uint8)
        alpha[: height // 8] = 128  # a translucent band: load_image composites it on white
        im.putalpha(Image.fromarray(alpha, "L"))
    return im


def make_images(folder: Path, n: int, seed: int) -> list[dict]:
    """`n` image files in `folder`: sizes and formats drawn from IMAGE_SIZES / FORMATS."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = rng.choice(len(IMAGE_SIZES), n, p=[s[2] for s in IMAGE_SIZES])
    fmts = rng.choice(len(FORMATS), n, p=[f[2] for f in FORMATS])
    out = []
    for k in range(n):
        w, h, _ = IMAGE_SIZES[sizes[k]]
        ext, mode, _ = FORMATS[fmts[k]]
        name = f"{k:06d}.{ext}"
        im = make_image(rng, w, h, mode)
        im.save(folder / name, **({"quality": 90} if ext == "jpg" else {}))
        out.append({"file": name, "size": (w, h), "bytes": (folder / name).stat().st_size})
    return out


# ---- data: tokenizer and text ---------------------------------------------------------------------------
def make_words(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct pronounceable pseudo-words (rank order = frequency order)."""
    onsets = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "tr", "pl", "gr", "br", "cl", "qu"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "nd", "st"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words: dict[str, None] = {}
    while len(words) < n:
        k = int(rng.choice([1, 2, 2, 3, 3, 4]))
        words["".join(syllables[i] for i in rng.integers(0, len(syllables), k))] = None
    return list(words)


def zipf(n: int) -> np.ndarray:
    p = 1.0 / (np.arange(n) + 2.7)
    return p / p.sum()


def make_tokenizer(out_dir: Path, words: list[str], vocab_size: int, seed: int) -> str:
    """A Llama-like BPE (Metaspace pre-tokenizer, `<s>` / `</s>` / `<unk>`) of `vocab_size` entries, trained on
    Zipf-distributed pseudo-word text, every word at least once, and the Vicuna template's words; saved with
    save_pretrained so `load_tokenizer` reads it as a hub tokenizer (pad = unk, as LLaVA pads Vicuna)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(words), size=20 * len(words), p=zipf(len(words)))
    lines = [" ".join(words[i] for i in idx[j:j + 20]) for j in range(0, len(idx), 20)]
    lines += [" ".join(words[j:j + 20]) for j in range(0, len(words), 20)]
    lines += [f"{VICUNA_SYSTEM} USER: ASSISTANT:"] * 200
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out_dir))
    return str(out_dir)


class TextMaker:
    """Conversations whose text (every id but the image placeholders: BOS, system prompt, roles, turns) is
    exactly a given number of tokens of `tokenizer` under `template`, when that many can hold the template."""

    def __init__(self, tokenizer, words: list[str], template: str, seed: int):
        self.tok, self.words, self.template = tokenizer, words, get_template(template)
        self.rng = np.random.default_rng(seed)
        self.p = zipf(len(words))
        self._overhead: dict[int, int] = {}
        vocab = tokenizer.get_vocab()  # single-token words: "\u2581word" entries, used to fill up exactly
        self.fill = [w for w in words[:2000] if "\u2581" + w in vocab] or [words[0]]
        sample = self.sentence(2000)
        self.ratio = len(tokenizer(" ".join(sample), add_special_tokens=False)["input_ids"]) / len(sample)
        """Tokens per word of running text (about 1.3 at 32,000 words)."""

    def text_tokens(self, conversations: list[dict]) -> int:
        ids, _ = encode(normalize(conversations), self.tok, self.template, "<image>", -1, [0])
        return len(ids)

    def sentence(self, n_words: int) -> list[str]:
        return [self.words[i] for i in self.rng.choice(len(self.words), max(1, n_words), p=self.p)]

    def overhead(self, turns: int) -> int:
        """Text tokens of a `turns`-turn conversation with one-word turns (BOS, system prompt, roles, ends)."""
        if turns not in self._overhead:
            self._overhead[turns] = self.text_tokens(self.render([["a"] for _ in range(2 * turns)]))
        return self._overhead[turns]

    def conversation(self, target: int) -> list[dict]:
        """A conversation of `target` text tokens: 1-8 turns, questions ~20% of a turn, then trimmed / filled."""
        turns = int(np.clip(1 + target // TURN_TOKENS, 1, 8))
        per_turn = max(2, (target - self.overhead(turns)) // turns) / self.ratio  # words
        parts = [self.sentence(round(per_turn * (0.2 if k % 2 == 0 else 0.8))) for k in range(2 * turns)]
        n = self.text_tokens(self.render(parts))
        for _ in range(256):
            if n > target:  # drop words from the last turn that has more than one, answers first
                k = next((k for k in range(len(parts) - 1, -1, -1) if len(parts[k]) > 1), None)
                if k is None:
                    break  # `target` cannot hold the template: the shortest conversation it allows
                del parts[k][-min(len(parts[k]) - 1, max(1, int((n - target) / (2 * self.ratio)))):]
            elif n < target:  # single-token words, about one token each
                parts[-1].extend(self.fill[int(i)] for i in self.rng.integers(0, len(self.fill), target - n))
            else:
                break
            n = self.text_tokens(self.render(parts))
        return self.render(parts)

    @staticmethod
    def render(parts: list[list[str]]) -> list[dict]:
        """Word lists of alternating human / gpt turns -> LLaVA turns, `<image>` first in the first one."""
        return [{"from": "human", "value": ("<image>\n" if k == 0 else "") + " ".join(ws) + "?"} if k % 2 == 0
                else {"from": "gpt", "value": " ".join(ws) + "."} for k, ws in enumerate(parts)]


def make_dataset_files(folder: Path, samples: int, n_images: int, vocab_size: int, seed: int = 0) -> dict:
    """Images, a tokenizer and `samples` LLaVA-format samples (text lengths: the shared workload's, stage 2)
    under `folder`; sample k shows image k mod `n_images`. Returns paths and what was made."""
    t0 = time.perf_counter()
    pool = make_images(folder / "images", n_images, seed)
    t_images = time.perf_counter() - t0
    words = make_words(np.random.default_rng(seed), max(2 * vocab_size, 2000))
    tok_dir = make_tokenizer(folder / "tokenizer", words, vocab_size, seed)
    from vlmkit.models.llm import load_tokenizer

    maker = TextMaker(load_tokenizer(tok_dir, "<image>"), words, "vicuna_v1", seed)
    lengths = text_lengths(samples, 2, seed)
    records = [{"id": f"bench-{k:06d}", "image": pool[k % n_images]["file"],
                "conversations": maker.conversation(n)} for k, n in enumerate(lengths)]
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return {"json": str(path), "image_folder": str(folder / "images"), "tokenizer": tok_dir, "lengths": lengths,
            "images": pool, "image_seconds": t_images, "seconds": time.perf_counter() - t0}


# ---- the loader as training builds it -------------------------------------------------------------------
def model_config(mode: str, tokenizer: str) -> ModelConfig:
    """The mode's model config: encoder geometry from an inline transformers config, a 7B LLM config (unbuilt)."""
    from vlmkit.registry import CONNECTORS

    llm = LLMConfig(config=dict(LLAMA_7B), tokenizer=tokenizer)
    if mode == "internvl":
        connector = "pixel_shuffle" if "pixel_shuffle" in CONNECTORS else "mlp2x_gelu"
        return ModelConfig(encoder=EncoderConfig("internvit", config=dict(INTERNVIT_448), feature_layer=-1),
                           connector=ConnectorConfig(connector), llm=llm,
                           tiling=TilingConfig("internvl", min_tiles=1, max_tiles=12, thumbnail=True))
    if mode == "naflex":  # native aspect ratio, at most 256 patches of 16 px, one token per patch
        return ModelConfig(encoder=EncoderConfig("siglip2", config=dict(SIGLIP2_NAFLEX), feature_layer=-2),
                           connector=ConnectorConfig("mlp2x_gelu"), llm=llm, tiling=TilingConfig("naflex"))
    tiling = (TilingConfig("anyres", grid_pinpoints=LLAVA_NEXT_PINPOINTS, unpad=True) if mode == "anyres"
              else TilingConfig("none"))
    return ModelConfig(encoder=EncoderConfig("clip", config=dict(CLIP_L336), feature_layer=-2, image_aspect="pad"),
                       connector=ConnectorConfig("mlp2x_gelu"), llm=llm, tiling=tiling)


def build_loader(mode: str, files: dict, workers: int, batch: int, pack: bool):
    """(loader, processor, data config, model config) for `mode`: the dataset and DataLoader `vlmkit.train.run`
    would make for it."""
    from vlmkit.models.build import build_processor
    from vlmkit.training.batches import make_dataset, make_loader

    cfg = model_config(mode, files["tokenizer"])
    processor = build_processor(cfg)
    max_length = MAX_LENGTH[mode]
    if mode == "internvl" and processor.count_image_tokens.tokens_per_tile > 256:  # no pixel shuffle: 13 x 1024 fit
        max_length = 16384
    data = DataConfig(path=files["json"], image_folder=files["image_folder"], max_length=max_length,
                      num_workers=workers, pack=pack)
    dataset = make_dataset(data, processor)
    return make_loader(dataset, data, batch, processor.tokenizer.pad_token_id), processor, data, cfg


def measure(loader, image_token_id: int, warmup: int) -> dict:
    """Warm-up batches (workers started), then one full timed pass; totals of what the timed pass yielded."""
    it = iter(loader)
    for _ in range(min(warmup, len(loader))):
        next(it)
    del it
    it = iter(loader)  # persistent workers: returns once every worker has finished its warm-up tasks
    tot = dict(samples=0, batches=0, images=0, tiles=0, tokens=0, image_tokens=0, rows=0, skipped=0)
    t0 = time.perf_counter()
    for b in it:
        tot["batches"] += 1
        tot["skipped"] += len(b.get("skipped", []))
        if "input_ids" not in b:
            continue
        tot["samples"] += len(b["ids"])
        tot["images"] += int(b["images_per_sample"].sum()) if "images_per_sample" in b else 0
        tot["tiles"] += int(b["pixel_values"].shape[0])
        tot["tokens"] += int(b["attention_mask"].sum())
        tot["image_tokens"] += int((b["input_ids"] == image_token_id).sum())
        tot["rows"] += int(b["input_ids"].shape[0])
    tot["seconds"] = time.perf_counter() - t0
    return tot


def run_mode(mode: str, files: dict, a, workers: int) -> dict:
    """One timed pass of `mode`'s training loader with `workers` worker processes -> the JSON record."""
    loader, processor, data, cfg = build_loader(mode, files, workers, a.batch, a.pack)
    warmup = a.warmup if a.warmup is not None else max(1, workers)
    tot = measure(loader, processor.image_token_id, warmup)
    del loader  # shuts the persistent workers down
    dt, procs, n = tot["seconds"], max(1, workers), max(1, tot["samples"])
    res = dict(
        bench="data_loader", mode=mode, workers=workers, default_workers=workers == DataConfig().num_workers,
        batch=a.batch, pack=a.pack, samples=tot["samples"], batches=tot["batches"], skipped=tot["skipped"],
        seconds=round(dt, 3), samples_s=round(tot["samples"] / dt, 2), images_s=round(tot["images"] / dt, 2),
        tiles_s=round(tot["tiles"] / dt, 2), images_s_per_worker=round(tot["images"] / dt / procs, 2),
        tiles_s_per_worker=round(tot["tiles"] / dt / procs, 2), tokens_s=round(tot["tokens"] / dt),
        tiles_per_image=round(tot["tiles"] / max(1, tot["images"]), 3),
        image_tokens_per_sample=round(tot["image_tokens"] / n, 1),
        text_tokens_per_sample=round((tot["tokens"] - tot["image_tokens"]) / n, 1),
        workload_text_tokens_per_sample=round(float(np.mean(files["lengths"])), 1),
        encoder=cfg.encoder.name, tile_px=processor.transform.size, connector=cfg.connector.name,
        tokens_per_tile=processor.count_image_tokens.tokens_per_tile,
        tiling=processor.tiling.mode if processor.tiling is not None else "none", max_length=data.max_length,
        vocab_size=len(processor.tokenizer), image_pool=len(files["images"]), warmup_batches=warmup,
        torch_threads=torch.get_num_threads(), cpus=len(os.sched_getaffinity(0)), workload=SOURCE,
    )
    if a.vs_train_rate:
        res["train_rate"] = a.vs_train_rate
        res["loader_vs_train"] = round(res["samples_s"] / a.vs_train_rate, 2)
        print(f"{mode}: loader {res['samples_s']:.2f} samples/s with {workers} worker(s) vs training "
              f"{a.vs_train_rate:.2f} samples/s: {res['loader_vs_train']:.2f}x (target >= 2x)", file=sys.stderr)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="all", choices=MODES + ("all",))
    p.add_argument("--workers", default=str(DataConfig().num_workers),
                   help="data-loader worker processes, or a comma list (e.g. 0,1,2,4) measured over the same data "
                        f"(default: DataConfig's, {DataConfig().num_workers}, as training uses)")
    p.add_argument("--samples", type=int, default=256, help="samples in the timed pass (one epoch)")
    p.add_argument("--batch", type=int, default=16, help="micro-batch (per device)")
    p.add_argument("--pack", action="store_true", help="packed collate (data.pack), as the 7B recipe trains")
    p.add_argument("--images", type=int, default=0, help="distinct image files (default: min(samples, 256))")
    p.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary size (Llama / Vicuna: 32000)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up batches, not timed (default: max(1, workers))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vs-train-rate", type=float, default=0.0,
                   help="training samples/s to compare with (e.g. 11.73: 7B stage 2, one H200); prints the ratio")
    a = p.parse_args(argv)
    try:
        a.workers = [int(w) for w in a.workers.split(",")]
    except ValueError:
        p.error(f"--workers: an integer or a comma list of integers, got {a.workers!r}")
    if min(a.workers) < 0 or a.samples < 1 or a.batch < 1 or a.images < 0 or a.vocab < 300 or (a.warmup or 0) < 0:
        p.error("--workers >= 0, --samples >= 1, --batch >= 1, --images >= 0, --vocab >= 300, --warmup >= 0")
    if a.vs_train_rate < 0:
        p.error("--vs-train-rate: samples/s > 0")
    return a


def main(argv=None) -> list[dict]:
    """Generate the data once, then one JSON line per (workers, mode)."""
    a = parse_args(argv)
    modes = MODES if a.mode == "all" else (a.mode,)
    out = []
    with tempfile.TemporaryDirectory(prefix="vlmkit-data-bench-") as tmp:
        files = make_dataset_files(Path(tmp), a.samples, a.images or min(a.samples, 256), a.vocab, a.seed)
        pool = files["images"]
        print(f"made {len(pool)} images ({np.mean([im['bytes'] for im in pool]) / 1024:.0f} KiB mean) and "
              f"{a.samples} samples in {files['seconds']:.1f}s; workload from {SOURCE}", file=sys.stderr)
        for workers in a.workers:
            for mode in modes:
                res = run_mode(mode, files, a, workers)
                print(json.dumps(res), flush=True)
                out.append(res)
    return out


if __name__ == "__main__":
    main()
