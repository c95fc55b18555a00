"""Errors a user can cause reach the terminal as one line and exit status 1, without a traceback (`--debug` or
VLMKIT_DEBUG=1 shows it), from the CLI verbs and the recipes; files and config fields are named (issue 16,
item 10)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import model_config
from test_train import write_data
from vlmkit.cli import main
from vlmkit.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(err: str, *parts: str) -> None:
    """The terminal shows one `vlmkit ...: error: ...` line, no traceback, naming each of `parts`."""
    bar = re.compile(r"^\s*[\w-]+:\s+\d+%\|")  # a progress bar's own line (tqdm), not part of the error
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and not bar.match(x)]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and ": error: " in lines[0], err
    for p in parts:
        assert p in lines[0], (p, err)


# ---- 10. one line, no traceback ---------------------------------------------------------------------------------
def test_user_errors_are_one_line_without_a_traceback(vlm, encoder_dirs, llm_dir, tmp_path, capsys, monkeypatch):
    caps, _ = write_data(tmp_path / "data", n=4)
    good_cfg = {"model": dataclasses.asdict(model_config(encoder_dirs["clip"], llm_dir)),
                "stages": [{"name": "s", "train": {"connector": "full"}, "data": {"path": caps, "num_workers": 0}}],
                "train": {"output_dir": str(tmp_path / "run"), "log_with": None}}

    def config_with(name, change):
        c = json.loads(json.dumps(good_cfg))
        change(c)
        (tmp_path / name).write_text(yaml.safe_dump(c))
        return str(tmp_path / name)

    bad_lr = config_with("lr.yaml", lambda c: c["stages"][0].update(lr="fast"))
    bad_batch = config_with("batch.yaml", lambda c: c["stages"][0].update(global_batch_size="128"))
    bad_bool = config_with("bool.yaml", lambda c: c["train"].update(log_with=False))
    (tmp_path / "syntax.yaml").write_text("model: {encoder: [\n")
    model = tmp_path / "model"
    vlm.save_pretrained(model)
    cut = tmp_path / "cut"
    vlm.save_pretrained(cut)
    w = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(w[: len(w) // 2])
    typo = tmp_path / "typo"
    vlm.save_pretrained(typo)
    c = json.loads((typo / "config.json").read_text())
    c["model"]["llm"]["image_token"] = 5
    (typo / "config.json").write_text(json.dumps(c))
    broken = tmp_path / "broken"
    vlm.save_pretrained(broken)
    (broken / "config.json").write_text((broken / "config.json").read_text()[:200])
    cases = [
        (["train", str(tmp_path / "absent.yaml")], ["absent.yaml"]),
        (["train", bad_lr], ["lr.yaml", "stages[0].lr must be a number", "'fast'"]),
        (["train", bad_batch], ["batch.yaml", "stages[0].global_batch_size must be an integer", "'128'"]),
        (["train", bad_bool], ["bool.yaml", "train.log_with", "quote it"]),
        (["train", str(tmp_path / "syntax.yaml")], ["syntax.yaml", "line"]),
        (["chat", str(tmp_path / "nowhere"), "--prompt", "hi"], ["nowhere", "not a vlmkit model folder"]),
        (["chat", str(cut), "--prompt", "hi"], [str(cut / "model.safetensors"), "truncated"]),
        (["chat", str(typo), "--prompt", "hi"], [str(typo / "config.json"), "model.llm.image_token must be a string"]),
        (["eval", str(broken), "--data", caps, "--cpu"], [str(broken / "config.json"), "invalid JSON at line"]),
        (["eval", str(model), "--data", str(tmp_path / "none.json"), "--cpu"], ["none.json", "not found"]),
        (["check-data", caps, "--model", str(tmp_path / "nowhere")], ["nowhere"]),
        (["export", str(tmp_path / "nowhere"), str(tmp_path / "out")], ["nowhere"]),
    ]
    for argv, parts in cases:
        assert main(argv) == 1, argv
        one_line_error(capsys.readouterr().err, *parts)
    # --debug, or VLMKIT_DEBUG=1, shows the traceback
    assert main(cases[1][0] + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("VLMKIT_DEBUG", "1")
    assert main(cases[5][0]) == 1
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"lr\.yaml: stages\[0\]\.lr"):
        load_config(bad_lr)


def test_a_recipe_prints_one_line_and_exits_1(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("VLMKIT_DEBUG", None)
    p = subprocess.run([sys.executable, str(ROOT / "recipes" / "llava15.py"), "--config", str(tmp_path / "no.yaml")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1
    one_line_error(p.stderr, "recipes/llava15.py: error:", "no.yaml")
