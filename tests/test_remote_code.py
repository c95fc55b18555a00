"""A model folder never runs its own code unless the user asks, for that load (issue 16, item 1): a saved
config.json cannot switch trust_remote_code on, a tokenizer_config.json auto_map is never followed, and a folder
that needs code is refused with a message saying how to opt in (chat, check-data, eval, export, from_pretrained)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_errors import one_line_error
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.model import load_processor
from vlmkit.security import RemoteCodeRefused

Q = "<image>\nWhat color is the shape?"
GOOD = [{"from": "human", "value": Q}, {"from": "gpt", "value": "red"}]


def write_json(path: Path, recs) -> str:
    path.write_text(json.dumps(recs))
    return str(path)


# ---- 1. code from a model folder -------------------------------------------------------------------------------
EVIL = '''import pathlib, os
pathlib.Path(os.environ["VLMKIT_TEST_MARKER"]).write_text("the folder's code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture
def evil_folder(vlm, tmp_path, monkeypatch):
    """A saved model whose config.json switches remote code on and whose tokenizer maps to a .py that leaves a
    marker file when it runs."""
    d = tmp_path / "evil"
    vlm.save_pretrained(d)
    (d / "tokenization_evil.py").write_text(EVIL)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["llm"]["trust_remote_code"] = True
    cfg["model"]["encoder"]["trust_remote_code"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("VLMKIT_TEST_MARKER", str(marker))
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # where transformers copies the code
    monkeypatch.setattr(sys, "path", list(sys.path))
    return d, marker


def test_a_model_folder_never_runs_its_code_unless_asked(evil_folder, tmp_path, capsys):
    d, marker = evil_folder
    with pytest.raises(RemoteCodeRefused, match="tokenizer_config.json maps AutoTokenizer.*--trust-remote-code"):
        VLM.from_pretrained(d)
    with pytest.raises(RemoteCodeRefused):
        load_processor(d)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    data = write_json(tmp_path / "d.json", [{"id": "a", "image": "x.png", "conversations": GOOD}])
    for argv in (["chat", str(d), "--prompt", "hi", "--max-new-tokens", "1"], ["check-data", data, "--model", str(d)],
                 ["eval", str(d), "--data", data, "--cpu"], ["export", str(d), str(tmp_path / "hf")]):
        assert main(argv) == 1, argv
        one_line_error(capsys.readouterr().err, "trust-remote-code")
    assert not marker.exists()  # nothing ran
    # the user opts in, for this load: the folder's code runs (and only then)
    VLM.from_pretrained(d, trust_remote_code=True)
    assert marker.exists()


def test_a_saved_trust_flag_alone_is_ignored(vlm, tmp_path):
    """config.json saying trust_remote_code: true switches nothing on; a folder with no code loads as usual."""
    d = tmp_path / "m"
    vlm.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["llm"]["trust_remote_code"] = cfg["model"]["encoder"]["trust_remote_code"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    m = VLM.from_pretrained(d)
    assert m.config.llm.trust_remote_code is False and m.config.encoder.trust_remote_code is False
    assert load_processor(d).tokenizer is not None
    # an inline part config mapping a class to code is refused too (AutoModel.from_config would import it)
    cfg["model"]["encoder"]["config"]["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeRefused, match="model.encoder.config maps AutoModel -> modeling_evil.EvilModel"):
        VLM.from_pretrained(d)


def test_import_runs_no_code_from_the_folder(vlm, tmp_path, monkeypatch):
    """`vlmkit import` of a native Llava folder that also maps classes to code: loaded natively, the code
    never imported."""
    from vlmkit.export import export_llava

    hf = export_llava(vlm, tmp_path / "hf")
    (Path(hf) / "tokenization_evil.py").write_text(EVIL)
    for name, key in (("tokenizer_config.json", "AutoTokenizer"), ("config.json", "AutoConfig")):
        c = json.loads((Path(hf) / name).read_text())
        c["auto_map"] = {key: [None, "tokenization_evil.EvilTokenizer"] if key == "AutoTokenizer"
                         else "tokenization_evil.EvilTokenizer"}
        (Path(hf) / name).write_text(json.dumps(c))
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("VLMKIT_TEST_MARKER", str(marker))
    assert main(["import", str(hf), str(tmp_path / "back")]) == 0
    assert not marker.exists()
