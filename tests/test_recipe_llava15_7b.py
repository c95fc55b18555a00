"""The real LLaVA-1.5 recipe's loading path, with tiny stand-ins saved where the hub ids would be.

`recipes/configs/llava15_7b.yaml` is loaded as shipped; only the two hub ids are pointed at local
folders holding a full CLIPModel (vision + text, as openai/clip-vit-large-patch14-336 is, with
its preprocessor_config.json) and a Llama causal LM with its tokenizer. The data are laid out
as LLaVA's are, and the recipe script itself trains one step of each stage on them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "recipes" / "configs" / "llava15_7b.yaml"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Tiny checkpoints in the layout of openai/clip-vit-large-patch14-336 and lmsys/vicuna-7b-v1.5."""
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    from conftest import make_wordlevel_tokenizer

    d = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100)))
    clip.save_pretrained(d / "clip")
    (d / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "crop_size": {"height": 336, "width": 336}, "image_processor_type": "CLIPImageProcessor"}))
    tok = make_wordlevel_tokenizer(d / "vicuna")
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tok))
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 vocab_size=n, max_position_embeddings=2048)).save_pretrained(d / "vicuna")
    return d


def local_config(hub, workdir):
    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["model"]["encoder"]["path"] == "openai/clip-vit-large-patch14-336"
    assert raw["model"]["llm"]["path"] == "lmsys/vicuna-7b-v1.5"
    raw["model"]["encoder"]["path"] = str(hub / "clip")
    raw["model"]["llm"]["path"] = str(hub / "vicuna")
    return raw


def test_shipped_config_is_llava15():
    from vlmkit.config import load_config

    cfg = load_config(CONFIG)
    s1, s2 = cfg.stages
    assert (cfg.model.encoder.name, cfg.model.encoder.feature_layer, cfg.model.encoder.image_aspect) == ("clip", -2, "pad")
    assert cfg.model.connector.name == "mlp2x_gelu" and cfg.model.template == "vicuna_v1"
    modes = lambda st: {k: p.mode for k, p in st.train.items()}  # noqa: E731
    assert (modes(s1), s1.lr, s1.global_batch_size, s1.epochs, s1.data.template) == ({"connector": "full"}, 1e-3, 256, 1.0, "plain")
    assert (modes(s2), s2.lr, s2.global_batch_size, s2.epochs) == ({"connector": "full", "llm": "full"}, 2e-5, 128, 1.0)
    assert s1.warmup_ratio == s2.warmup_ratio == 0.03 and s2.data.max_length == 2048
    # the measured fast path (BENCHMARKS.md) is the recipe's default
    assert s1.data.pack and s2.data.pack and cfg.model.llm.attn_implementation == "varlen"


def test_loading_path_with_local_checkpoints(hub, tmp_path):
    from vlmkit.config import RunConfig, from_dict
    from vlmkit.model import VLM

    cfg = from_dict(RunConfig, local_config(hub, tmp_path))
    model = VLM.from_config(cfg.model)
    enc = model.encoder
    # the vision half of a dual CLIP checkpoint, its weights loaded (not re-initialised)
    from transformers import CLIPModel

    ref = CLIPModel.from_pretrained(hub / "clip").vision_model.state_dict()
    got = enc.model.state_dict()
    assert len(got) == len(ref)
    for k, v in got.items():  # every vision weight comes from the checkpoint, none re-initialised
        assert torch.equal(v, ref[k.removeprefix("vision_model.")]), k
    assert (enc.image_size, enc.grid, enc.num_tokens, enc.num_prefix_tokens) == (336, (24, 24), 576, 1)
    assert enc.mean == (0.48145466, 0.4578275, 0.40821073)
    assert model.connector.linear_1.in_features == 32 and model.connector.linear_2.out_features == 32
    assert model.tokenizer.convert_ids_to_tokens(model.image_token_id) == "<image>"
    assert model.llm.get_input_embeddings().num_embeddings == len(model.tokenizer)


def _write_llava_layout(root: Path):
    """data/LLaVA-Pretrain/{json, images/} and data/{json, coco/...} as LLaVA ships them."""
    pre = root / "data" / "LLaVA-Pretrain"
    (pre / "images" / "00000").mkdir(parents=True)
    (root / "data" / "coco" / "train2017").mkdir(parents=True)
    caps, convs = [], []
    for i in range(8):
        Image.new("RGB", (40 + 7 * i, 30), (30 * i, 90, 200)).save(pre / "images" / "00000" / f"{i:09d}.jpg")
        Image.new("RGB", (50, 60 + i), (200, 30 * i, 40)).save(root / "data" / "coco" / "train2017" / f"{i:012d}.jpg")
        caps.append({"id": f"{i:09d}", "image": f"00000/{i:09d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": "a red circle"}]})
        convs.append({"id": f"coco{i}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": [
            {"from": "human", "value": "What color is the shape?\n<image>"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "one"}]})
    (pre / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(caps))
    (root / "data" / "llava_v1_5_mix665k.json").write_text(json.dumps(convs))


def test_recipe_script_runs_the_real_config(hub, tmp_path, monkeypatch):
    """recipes/llava15.py --config: both stages, one step each, on data in LLaVA's layout."""
    raw = local_config(hub, tmp_path)
    for s in raw["stages"]:  # CPU-sized batches; everything else as shipped
        s.update(max_steps=1, per_device_batch_size=4, global_batch_size=8,
                 compile=False)  # inductor on a 2-core CPU takes minutes; compile's loss parity: test_distributed
        s["data"]["num_workers"] = 0
    raw["train"].update(mixed_precision="no", output_dir=str(tmp_path / "run"), log_with=None)
    cfg_path = tmp_path / "llava15_local.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    _write_llava_layout(tmp_path)
    monkeypatch.chdir(tmp_path)  # the config's data paths are relative to the working directory
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import llava15
    finally:
        sys.path.pop(0)
    llava15.main(["--config", str(cfg_path), "--cpu"])
    run = tmp_path / "run"
    for stage in ("pretrain", "finetune"):
        m = json.loads((run / stage / "metrics.json").read_text())
        assert m["steps"] == 1 and m["samples"] == 8 and m["skipped"] == []
    from vlmkit.model import VLM

    final = VLM.from_pretrained(run / "model")
    assert final.encoder.num_tokens == 576 and final.config.template == "vicuna_v1"


def test_recipe_script_takes_overrides(hub, tmp_path, monkeypatch, capsys):
    """recipes/llava15.py --config X key=value ...: the shipped config (hub ids pointed at the tiny stand-ins)
    made CPU-sized by overrides alone, stages by name and by index, options before and after them."""
    cfg_path = tmp_path / "llava15_local.yaml"
    cfg_path.write_text(yaml.safe_dump(local_config(hub, tmp_path)))
    _write_llava_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import llava15
    finally:
        sys.path.pop(0)
    stage = ["max_steps=1", "per_device_batch_size=4", "global_batch_size=8", "compile=false", "data.num_workers=0"]
    llava15.main(["--config", str(cfg_path), *[f"stages.pretrain.{o}" for o in stage], "--cpu",
                  *[f"stages.1.{o}" for o in stage], "stages.finetune.lr=1e-4", "train.mixed_precision='no'",
                  f"train.output_dir={tmp_path / 'run'}", "train.log_with=null"])
    run = tmp_path / "run"
    for name in ("pretrain", "finetune"):
        m = json.loads((run / name / "metrics.json").read_text())
        assert m["steps"] == 1 and m["samples"] == 8
    assert (run / "model" / "config.json").exists()
    from vlmkit.config import load_config

    saved = load_config(run / "config.yaml")  # the resolved config, overrides applied
    assert saved.stages[1].lr == 1e-4 and saved.stages[0].max_steps == 1 and saved.train.log_with is None
    out = capsys.readouterr().out  # the end-of-run summary
    assert "run finished: 2 stage(s)" in out and f"model: {run / 'model'}" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(("pretrain ", "finetune "))] == [
        ["pretrain", "1"], ["finetune", "1"]]
