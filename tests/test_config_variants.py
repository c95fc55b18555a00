"""Config families chosen by a key: one TilingConfig class per `mode`; EncoderConfig or FusedEncoderConfig by `name`.
`TilingConfig(...)` / `EncoderConfig(...)` and from_dict pick the class; saved dicts written before the split (every
variant's keys) still load; another variant's key is refused by name unless it holds its default."""
import copy
import dataclasses
import pickle

import pytest

from vlmkit.config import (AnyresTiling, ConfigError, EncoderConfig, FusedEncoderConfig, InternVLTiling, LLMConfig,
                           ModelConfig, NaflexTiling, NoTiling, TilingConfig, from_dict, to_dict)

OLD_DEFAULTS = dict(mode="none", grid_pinpoints=None, anyres_max=None, unpad=True, min_tiles=1, max_tiles=12,
                    thumbnail=True, max_num_patches=None)
"""model.tiling as vlmkit wrote it into config.json before the split: every mode's keys."""


@pytest.mark.parametrize("made,cls,fields", [
    (TilingConfig("anyres", [[20, 16]]), AnyresTiling, dict(grid_pinpoints=[[20, 16]], anyres_max=None, unpad=True)),
    (TilingConfig("anyres", [[32, 16]], anyres_max=2), AnyresTiling, dict(anyres_max=2)),
    (TilingConfig(mode="anyres", unpad=False), AnyresTiling, dict(unpad=False, grid_pinpoints=None)),
    (TilingConfig("internvl", max_tiles=4), InternVLTiling, dict(min_tiles=1, max_tiles=4, thumbnail=True)),
    (TilingConfig("naflex"), NaflexTiling, dict(max_num_patches=None)),
    (TilingConfig("naflex", max_num_patches=64), NaflexTiling, dict(max_num_patches=64)),
    (TilingConfig(), NoTiling, {}),
    (TilingConfig("none"), NoTiling, {}),
])
def test_tiling_config_dispatches_on_mode(made, cls, fields):
    assert type(made) is cls and isinstance(made, TilingConfig) and made.mode == cls.MODE
    assert {k: getattr(made, k) for k in fields} == fields
    assert set(to_dict(made)) == {"mode", *(f.name for f in dataclasses.fields(cls))}  # its own keys only
    assert from_dict(TilingConfig, to_dict(made), "model.tiling") == made
    assert copy.deepcopy(made) == made and pickle.loads(pickle.dumps(made)) == made
    assert dataclasses.replace(made) == made and type(dataclasses.replace(made)) is cls


def test_model_config_default_tiling_is_no_tiling():
    m = ModelConfig(encoder=EncoderConfig("clip", config={}), llm=LLMConfig(path="x"))
    assert type(m.tiling) is NoTiling
    d = to_dict(m)
    d["tiling"] = {"mode": "internvl", "max_tiles": 6}
    assert type(from_dict(ModelConfig, d, "model").tiling) is InternVLTiling


@pytest.mark.parametrize("mode,own,cls", [
    ("none", {}, NoTiling),
    ("anyres", dict(grid_pinpoints="(1x1),...,(2x2)", anyres_max=3), AnyresTiling),
    ("anyres", dict(unpad=False), AnyresTiling),
    ("internvl", dict(min_tiles=2, max_tiles=6, thumbnail=False), InternVLTiling),
    ("naflex", dict(max_num_patches=128), NaflexTiling),
])
def test_old_saved_tiling_with_every_key_loads(mode, own, cls):
    old = dict(OLD_DEFAULTS, mode=mode, **own)
    cfg = from_dict(TilingConfig, old, "model.tiling")
    assert type(cfg) is cls and cfg == TilingConfig(mode, **own)
    m = from_dict(ModelConfig, {"encoder": {"name": "clip", "config": {}}, "llm": {"path": "x"}, "tiling": old},
                  "model")
    assert m.tiling == cfg


@pytest.mark.parametrize("mode,key,value,owner", [
    ("anyres", "max_num_patches", 64, "naflex"),
    ("none", "grid_pinpoints", [[32, 16]], "anyres"),
    ("none", "anyres_max", 2, "anyres"),
    ("naflex", "unpad", False, "anyres"),
    ("anyres", "max_tiles", 4, "internvl"),
    ("internvl", "thumbnail", False, "internvl"),  # its own: no error (checked below)
])
def test_another_modes_key_is_refused_unless_default(mode, key, value, owner):
    data = dict(OLD_DEFAULTS, mode=mode, **{key: value})
    if owner == mode:
        assert getattr(from_dict(TilingConfig, data, "model.tiling"), key) == value
        return
    with pytest.raises(ConfigError, match=rf"tiling\.{key} is an? {owner} option; mode is '{mode}'"):
        from_dict(TilingConfig, data, "model.tiling")
    with pytest.raises(ConfigError, match=rf"tiling\.{key} is an? {owner} option; mode is '{mode}'"):
        TilingConfig(mode, **{key: value})


@pytest.mark.parametrize("bad,needle", [
    (dict(mode="tiles"), "tiling.mode must be one of none, anyres, internvl, naflex"),
    (dict(mode=None), "tiling.mode must be one of"),
    (dict(mode="naflex", max_num_patches=0), "tiling.max_num_patches must be a positive integer"),
    (dict(mode="internvl", max_tiles="4"), "max_tiles must be an integer"),
    (dict(mode="internvl", thumbnail="no"), "tiling.thumbnail must be true or false"),
    (dict(mode="none", bogus=1), r"model\.tiling: unknown keys \['bogus'\]"),
])
def test_each_mode_checks_its_own_fields(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(TilingConfig, bad, "model.tiling")


def test_a_subclass_refuses_another_mode():
    with pytest.raises(ConfigError, match="does not fit AnyresTiling"):
        AnyresTiling(mode="naflex")
    with pytest.raises(ConfigError, match="tiling.mode must be one of"):
        TilingConfig("tiles")


def test_every_shipped_config_gets_its_modes_class():
    from pathlib import Path

    from vlmkit.config import TILING_CLASSES, load_config

    configs = sorted((Path(__file__).resolve().parent.parent / "recipes" / "configs").glob("*.yaml"))
    modes = set()
    for path in configs:
        tiling = load_config(path).model.tiling
        assert type(tiling) is TILING_CLASSES[tiling.mode], path.name
        modes.add(tiling.mode)
    assert len(modes) > 1  # the shipped configs do use several modes


# ---- encoders: EncoderConfig (one encoder) and FusedEncoderConfig (name fused), chosen by name ----------
CLIP = {"name": "clip", "config": {"image_size": 16}}
SIGLIP = {"name": "siglip2", "config": {"image_size": 16}, "feature_layer": -1}
OLD_SINGLE = dict(name="clip", path=None, config=None, position_init_std=None, feature_layer=None, image_aspect="pad",
                  image_size=None, image_mean=None, image_std=None, trust_remote_code=False, members=None)
"""model.encoder as vlmkit wrote it before the split: single and fused keys in one mapping."""


def test_encoder_config_dispatches_on_name():
    single = EncoderConfig("internvit", config={})
    assert type(single) is EncoderConfig and not hasattr(single, "members")
    for fused in (EncoderConfig(name="fused", members=[CLIP, SIGLIP]),
                  from_dict(EncoderConfig, {"name": "fused", "members": [CLIP, SIGLIP]}, "model.encoder")):
        assert type(fused) is FusedEncoderConfig and [type(m) for m in fused.members] == [EncoderConfig] * 2
        assert set(to_dict(fused)) == {"name", "members", "image_aspect", "trust_remote_code"}
        assert from_dict(EncoderConfig, to_dict(fused), "model.encoder") == fused
        assert copy.deepcopy(fused) == fused and pickle.loads(pickle.dumps(fused)) == fused
        assert dataclasses.replace(fused) == fused
    m = ModelConfig(encoder=fused, llm=LLMConfig(path="x"))
    assert from_dict(ModelConfig, to_dict(m), "model") == m
    assert from_dict(EncoderConfig, fused, "model.encoder") is fused  # an instance of the family is taken as is


def test_old_saved_encoders_with_every_key_load():
    old_single = dict(OLD_SINGLE, config={"image_size": 16}, feature_layer=-1)
    single = from_dict(EncoderConfig, old_single, "model.encoder")
    assert single == EncoderConfig("clip", config={"image_size": 16}, feature_layer=-1)
    old_fused = dict(OLD_SINGLE, name="fused", image_aspect="resize",
                     members=[old_single, dict(OLD_SINGLE, name="siglip2", config={"image_size": 16})])
    fused = from_dict(EncoderConfig, old_fused, "model.encoder")
    assert type(fused) is FusedEncoderConfig and fused.image_aspect == "resize"
    assert fused.members == [single, EncoderConfig("siglip2", config={"image_size": 16})]


@pytest.mark.parametrize("data,needle", [
    (dict(OLD_SINGLE, name="fused", members=[CLIP, SIGLIP], image_size=32), r"set \['image_size'\] on its members"),
    (dict(CLIP, members=[CLIP, SIGLIP]), "encoder.members is only for name: fused"),
    ({"name": "fused", "members": [CLIP]}, "at least 2 encoders"),
    ({"name": "fused", "members": [CLIP, {"name": "fused", "members": [CLIP, SIGLIP]}]}, "cannot itself be fused"),
    ({"name": "fused", "members": [CLIP, SIGLIP], "bogus": 1}, r"unknown keys \['bogus'\]"),
    ({"name": "fused", "members": [CLIP, SIGLIP], "image_aspect": "crop"}, "image_aspect must be pad or resize"),
])
def test_encoder_foreign_and_bad_keys_are_named(data, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(EncoderConfig, data, "model.encoder")
    if "bogus" not in data:
        with pytest.raises(ConfigError, match=needle):
            EncoderConfig(**data)
