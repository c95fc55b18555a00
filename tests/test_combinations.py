"""Every encoder (and the fused pair) with every connector: builds, trains a step, saves, reloads with identical logits."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import ENCODER_CASES
from vlmkit import VLM
from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig
from vlmkit.data import collate
from vlmkit.stages import apply_stage

ENCODERS = ["clip", "siglip2_naflex", "dinov2", "internvit", "fused"]  # the four kinds + DINOv2 & SigLIP fused
CONNECTORS = {  # tiny options; each takes the 4 x 4 patch grid of a 16 px image
    "mlp2x_gelu": ({}, 16),
    "pixel_shuffle": ({"scale": 0.5}, 4),
    "qformer": (dict(num_queries=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, dropout=0.0), 3),
    "avgpool_mlp": ({"kernel": 2}, 4),
    "perceiver_resampler": (dict(num_latents=5, depth=1, heads=2), 5),
}


def encoder_config(case: str, dirs: dict) -> EncoderConfig:
    if case == "fused":
        return EncoderConfig(name="fused", members=[encoder_config("dinov2", dirs), encoder_config("siglip", dirs)])
    return EncoderConfig(name=ENCODER_CASES[case][0], path=dirs[case])


@pytest.mark.parametrize("connector", list(CONNECTORS))
@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_connector_pair(encoder, connector, encoder_dirs, llm_dir, tmp_path):
    options, n_tokens = CONNECTORS[connector]
    cfg = ModelConfig(encoder=encoder_config(encoder, encoder_dirs), connector=ConnectorConfig(connector, dict(options)),
                      llm=LLMConfig(path=llm_dir))
    torch.manual_seed(0)
    model = VLM.from_config(cfg)
    assert model.encoder.grid == (4, 4) and model.count_image_tokens.tokens_per_tile == n_tokens
    proc = model.processor()
    convs = [[{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}],
             [{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}]]
    imgs = [[Image.new("RGB", (16, 12), (220, 40, 40))], []]
    b = collate([proc(c, i) for c, i in zip(convs, imgs)], proc.tokenizer.pad_token_id)
    assert int((b["input_ids"] == model.image_token_id).sum()) == n_tokens  # placeholders == merged features

    apply_stage(model, {"connector": "full", "llm": "full"})
    model.eval()  # deterministic; gradients still flow
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model(**b)
    before.backward()
    assert all(p.grad is not None for p in model.connector.parameters())
    opt.step()
    with torch.no_grad():
        assert model(**b) < before

    model.save_pretrained(tmp_path / "m")
    loaded = VLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.connector == cfg.connector and loaded.encoder.kind == model.encoder.kind
    with torch.no_grad():
        ref = model.logits(b["input_ids"], b["attention_mask"], b["pixel_values"])
        assert torch.equal(loaded.logits(b["input_ids"], b["attention_mask"], b["pixel_values"]), ref)
