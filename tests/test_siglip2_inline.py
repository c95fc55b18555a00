"""`name: siglip2` with an inline config and no model_type means the NaFlex model: one info line says so."""
from __future__ import annotations

import logging

from conftest import _VIT

from vlmkit.config import EncoderConfig
from vlmkit.models.encoders import encoder_hf_config

NAME = "vlmkit.models.encoders"


def test_inline_siglip2_without_model_type_is_naflex_and_says_so_once(caplog):
    cfg = EncoderConfig(name="siglip2", config=dict(num_patches=16, patch_size=4, **_VIT, num_channels=3))
    with caplog.at_level(logging.INFO, logger=NAME):
        assert encoder_hf_config(cfg).model_type == "siglip2_vision_model"
        encoder_hf_config(cfg)  # the same config again: no second line
    lines = [r.getMessage() for r in caplog.records if r.name == NAME]
    assert lines == ["encoder siglip2 with an inline config and no model_type: building the NaFlex SigLIP 2 "
                     "(siglip2_vision_model), which vlmkit export refuses; add model_type: siglip_vision_model to "
                     "the config for the fixed-resolution SigLIP that exports to Llava"]


def test_inline_siglip2_with_model_type_says_nothing(caplog):
    for mt, extra in (("siglip_vision_model", {"image_size": 16}), ("siglip2_vision_model", {"num_patches": 16})):
        cfg = EncoderConfig(name="siglip2", config=dict(model_type=mt, patch_size=4, **_VIT, **extra))
        with caplog.at_level(logging.INFO, logger=NAME):
            assert encoder_hf_config(cfg).model_type == mt
    assert [r for r in caplog.records if r.name == NAME] == []
