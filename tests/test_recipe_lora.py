"""recipes/lora_finetune.py on a user's data: adapters learn, base weights stay, peft layout on disk."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def test_lora_finetune_recipe_on_user_data(vlm, tmp_path):
    vlm.save_pretrained(tmp_path / "base")
    (tmp_path / "imgs").mkdir()
    recs = []
    for i in range(8):
        Image.new("RGB", (16, 16), (200, 30 * i, 40)).save(tmp_path / "imgs" / f"{i}.png")
        recs.append({"id": f"u{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]})
    (tmp_path / "train.json").write_text(json.dumps(recs))
    (tmp_path / "eval.json").write_text(json.dumps(recs[:4]))
    plan = yaml.safe_load((ROOT / "recipes" / "configs" / "plans" / "lora_finetune.yaml").read_text())
    st = plan["stages"][0]
    st.update(max_steps=4, global_batch_size=4, per_device_batch_size=4, gradient_checkpointing=False)
    st["train"]["llm"].update(r=4, alpha=8, lr=5e-3)
    st["data"]["num_workers"] = 0
    plan["train"] = {"output_dir": str(tmp_path / "run"), "log_with": None, "mixed_precision": "no", "log_every": 1}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import lora_finetune
    finally:
        sys.path.pop(0)
    lora_finetune.main(["--model", str(tmp_path / "base"), "--data", str(tmp_path / "train.json"),
                        "--image-folder", str(tmp_path / "imgs"), "--eval-data", str(tmp_path / "eval.json"),
                        "--config", str(tmp_path / "plan.yaml"), "--cpu"])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"eval_accuracy_before", "eval_accuracy"} <= set(m) and m["stages"][0]["steps"] == 4
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    out = tmp_path / "run" / "model"
    assert (out / "adapters" / "llm" / "adapter_config.json").exists()
    base, tuned = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    llm_keys = [k for k in base if k.startswith("llm.")]
    assert llm_keys and all(torch.equal(base[k], tuned[k]) for k in llm_keys)  # LLM base weights untouched
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith("connector."))  # connector trained
