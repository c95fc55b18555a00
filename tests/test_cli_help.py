"""`vlmkit --help` lists every verb on one line with its help; each verb's --help documents its positional
arguments and shows defaults."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

VERBS = ("train", "eval", "chat", "export", "import", "check-data", "recipe")


def helptext(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_top_level_help_lists_every_verb_on_one_line():
    text = helptext()
    for verb in VERBS:
        assert re.search(rf"^    {re.escape(verb)} +\S.*$", text, re.M), verb


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(verb):
    from vlmkit.cli import build_parser

    text = helptext(verb)
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices[verb]
    for action in sub._actions:
        if not action.option_strings:  # positional arguments carry help
            assert action.help, (verb, action.dest)
        if action.default not in (None, False, "", "==SUPPRESS==") and action.help and action.option_strings:
            assert f"(default: {action.default})" in " ".join(text.split()), (verb, action.dest)
