"""recipes/internvl.py's embedded demo end to end on a tiny data size: InternViT + InternVL dynamic tiling +
pixel_shuffle train both stages (a few steps), then the same model with one tile per image; the metrics
name both, per question type, and the two saved models cut a demo canvas into its tiles and into one."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_internvl_demo_runs_and_compares_with_one_tile(tmp_path, monkeypatch):
    from vlmkit.model import VLM

    raw = yaml.safe_load((ROOT / "recipes" / "configs" / "internvl_demo.yaml").read_text())
    for st in raw["stages"]:  # the shipped demo, a few steps: 1 (pretrain) + 2 (finetune) optimizer steps
        st.update(max_steps=1 if st["name"] == "pretrain" else 2, global_batch_size=4, per_device_batch_size=4)
        st["data"]["num_workers"] = 0
    raw["train"].update(log_with=None, log_every=1)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(raw))
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import internvl
    finally:
        sys.path.pop(0)
    (tmp_path / "recipes" / "configs").mkdir(parents=True)
    (tmp_path / "demo.yaml").rename(tmp_path / "recipes" / "configs" / "internvl_demo.yaml")
    monkeypatch.setattr(internvl, "HERE", tmp_path / "recipes")  # the recipe reads HERE/configs/internvl_demo.yaml
    out = tmp_path / "run"
    internvl.main(["--output-dir", str(out), "--demo-train-images", "12", "--demo-eval-images", "2", "--cpu"])

    m = json.loads((out / "metrics.json").read_text())
    assert set(m["eval_accuracy_per_type"]) == set(m["eval_accuracy_single_tile_per_type"]) == {"pattern", "color",
                                                                                                   "side"}
    assert m["eval_questions"] == m["single_tile"]["eval_questions"] == 6
    assert [s["steps"] for s in m["stages"]] == [s["steps"] for s in m["single_tile"]["stages"]] == [1, 2]
    tiled, single = VLM.from_pretrained(out / "model"), VLM.from_pretrained(out / "single_tile" / "model")
    assert type(tiled.connector).__name__ == type(single.connector).__name__ == "PixelShuffleProjector"
    rec = json.loads((out / "data" / "eval.json").read_text())[0]
    im = Image.open(out / "data" / rec["image"]).convert("RGB")
    w, h = im.size  # every demo canvas is a whole number of 64 px tiles: cut at full resolution, plus the thumbnail
    tiles = (w // 64) * (h // 64) + 1
    assert tiles in (3, 5)
    for model, n_tiles in ((tiled, tiles), (single, 1)):
        proc = model.processor()
        p = proc(rec["conversations"][:1], [im], add_generation_prompt=True)
        assert p["pixel_values"].shape == (n_tiles, 3, 64, 64)  # [n_tiles, 3, T, T]
        assert int((p["input_ids"] == proc.image_token_id).sum()) == 16 * n_tiles  # 8x8 patches -> 4x4 tokens
