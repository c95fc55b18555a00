"""README.md is checked against the code:

1. every field of every config dataclass in vlmkit/config.py appears in the YAML block of README's "## Configs";
2. every command README's bash blocks and `Reproduce:` lines show (`vlmkit ...`, `python -m vlmkit...`, `python recipes/...`,
   `accelerate launch ... recipes/...` or `-m vlmkit.cli ...`) parses with its entry point's own parser, and that
   entry point answers `--help` with exit status 0; every `recipes/...` path it names exists;
3. every figure (a markdown table with measured numbers) in README.md and BENCHMARKS.md has the command that
   reproduces it nearby: a ```bash block or a `Reproduce:` line within FIGURE_WINDOW lines (CONTRIBUTING.md).

Each failure lists exactly the keys, commands or figures that are missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import runpy
import shlex
from pathlib import Path

import pytest

import vlmkit.config as config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIGURE_WINDOW = 12
"""Lines above a figure's first row or below its last in which its command must appear."""


# ---- 1. config keys ---------------------------------------------------------------------------------------------

def configs_block(text: str) -> str:
    section = text.split("\n## Configs\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def config_classes() -> list[type]:
    return [c for c in vars(config).values()
            if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == config.__name__]


def undocumented_keys(text: str) -> list[str]:
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", configs_block(text)))
    return [f"{c.__name__}.{f.name}" for c in config_classes() for f in dataclasses.fields(c)
            if f.name not in words]


def test_every_config_key_is_in_the_configs_yaml_block():
    assert len(config_classes()) >= 12  # ModelConfig, EncoderConfig, ..., TrainConfig: the classes were found
    missing = undocumented_keys(README.read_text())
    assert not missing, "config keys missing from README's '## Configs' YAML block: " + ", ".join(missing)


def test_the_key_check_can_fail():
    text = README.read_text().replace("max_aspect_ratio", "max_aspect")
    assert undocumented_keys(text) == ["DataConfig.max_aspect_ratio"]


# ---- 2. commands ------------------------------------------------------------------------------------------------

def bash_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of each command in README's bash blocks: continuations joined, comments dropped,
    `a && b` split."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            start, line = i + 1, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            words = shlex.split(line, comments=True)
            cmd = []
            for w in words + ["&&"]:
                if w == "&&":
                    if cmd:
                        out.append((start, cmd))
                    cmd = []
                else:
                    cmd.append(w)
            i += 1
    return out


def reproduce_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, command) of each backticked command on a `Reproduce:` line."""
    return [(n, shlex.split(cmd)) for n, line in enumerate(text.splitlines(), 1) if line.startswith("Reproduce: ")
            for cmd in re.findall(r"`([^`]+)`", line)]


def entry_point(words: list[str]) -> tuple[str, str, list[str]] | None:
    """("vlmkit", "", args) or ("recipe", path, args) for a command this test checks, else None."""
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VLMKIT_CPU_THREADS=1 accelerate launch ...
        words = words[1:]
    if not words:
        return None
    if words[0] == "vlmkit":
        return "vlmkit", "", words[1:]
    if words[:2] == ["accelerate", "launch"] or words[0] in ("python", "python3"):
        for j, w in enumerate(words):
            if w == "-m" and j + 1 < len(words) and words[j + 1].startswith("vlmkit"):
                return "vlmkit", "", words[j + 2:]
            if w.startswith("recipes/") and w.endswith(".py"):
                return "recipe", w, words[j + 1:]
    return None


def _exit_code(fn) -> int:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            fn()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def check_command(words: list[str]) -> str | None:
    """What is wrong with a README command, or None."""
    from vlmkit.cli import build_parser
    from vlmkit.config import parse_run_args

    kind, path, args = entry_point(words)
    missing = [w for w in words if w.startswith("recipes/") and not (ROOT / w).exists()]
    if missing:
        return f"names files that do not exist: {', '.join(missing)}"
    if kind == "vlmkit":
        if not args or _exit_code(lambda: build_parser().parse_args([args[0], "--help"])) != 0:
            return f"`vlmkit {args[0] if args else ''} --help` fails"
        if "..." not in args and _exit_code(lambda: parse_run_args(build_parser(), args)) != 0:
            return "its arguments do not parse (vlmkit.cli.build_parser)"
        return None
    main = runpy.run_path(str(ROOT / path), run_name="readme_check")["main"]
    shown = [] if "..." in args else args
    if _exit_code(lambda: main([*shown, "--help"])) != 0:
        return f"`{path} {' '.join(shown)} --help` does not exit 0"
    return None


def test_every_command_shown_answers_help():
    text = README.read_text()
    commands = [(n, w) for n, w in bash_commands(text) + reproduce_commands(text) if entry_point(w)]
    assert len(commands) >= 25, len(commands)  # the commands were found
    assert {entry_point(w)[1] for _, w in commands} >= {"", "recipes/llava15.py", "recipes/lora_finetune.py"}
    bad = [f"README.md:{n}: {' '.join(w)}: {why}" for n, w in commands if (why := check_command(w))]
    assert not bad, "commands in README that do not run:\n" + "\n".join(bad)


def test_the_command_check_can_fail():
    assert check_command(["vlmkit", "eval", "m", "--data", "x", "--no-such-flag"]) == (
        "its arguments do not parse (vlmkit.cli.build_parser)")
    assert check_command(["vlmkit", "nope"]) == "`vlmkit nope --help` fails"
    assert check_command(["X=1", "accelerate", "launch", "recipes/llava15.py", "--demo-train-images", "many"]) == (
        "`recipes/llava15.py --demo-train-images many --help` does not exit 0")
    assert check_command(["accelerate", "launch", "recipes/llava15.py", "--config", "recipes/configs/x.yaml"]) == (
        "names files that do not exist: recipes/configs/x.yaml")


# ---- 3. figures -------------------------------------------------------------------------------------------------

NUMBER = re.compile(r"^[~*]*[\d,]*\.?\d+\s*(x|%|s|GiB|MiB|h|M)?[*]*$")


def figures(text: str) -> list[tuple[int, int]]:
    """(first line, last line), 1-based, of each markdown table with a cell that is a measured number."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            cells = [c.strip() for row in lines[i + 2:j] for c in row.strip("|").split("|")]
            if any(NUMBER.match(c) and re.search(r"\d", c) for c in cells):
                out.append((i + 1, j))
            i = j
        else:
            i += 1
    return out


def headings(lines: list[str]) -> set[int]:
    """0-based indices of markdown headings (outside fenced blocks, where `# ...` is a shell comment)."""
    out, fenced = set(), False
    for i, x in enumerate(lines):
        if x.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6} ", x):
            out.add(i)
    return out


def unreproducible(text: str) -> list[tuple[int, str]]:
    """Figures without a ```bash block or a `Reproduce:` line within FIGURE_WINDOW lines, in their own section
    (the window stops at a heading)."""
    lines, bad = text.splitlines(), []
    heads = headings(lines)
    for first, last in figures(text):
        above = [i for i in range(first - 2, max(-1, first - 2 - FIGURE_WINDOW), -1)]
        below = [i for i in range(last, min(len(lines), last + FIGURE_WINDOW))]
        near = []
        for side in (above, below):
            for i in side:
                if i in heads:
                    break
                near.append(lines[i])
        if not any(x.strip() == "```bash" or x.startswith("Reproduce: `") for x in near):
            bad.append((first, lines[first - 1][:70]))
    return bad


@pytest.mark.parametrize("doc", ["README.md", "BENCHMARKS.md"])
def test_every_figure_has_its_command_nearby(doc):
    text = (ROOT / doc).read_text()
    assert figures(text)
    bad = unreproducible(text)
    assert not bad, f"figures in {doc} without a command within {FIGURE_WINDOW} lines (CONTRIBUTING.md):\n" + \
        "\n".join(f"{doc}:{n}: {head}" for n, head in bad)


def test_the_figure_check_can_fail():
    table = "| a | b |\n|---|---:|\n| x | 0.95 |\n"
    assert figures(table) == [(1, 3)] and unreproducible(table) == [(1, "| a | b |")]
    assert unreproducible("Reproduce: `vlmkit eval m --data d`\n\n" + table) == []
    assert figures("| a | b |\n|---|---|\n| `clip` | CLS |\n") == []  # words only: not a figure
    assert unreproducible("```bash\nvlmkit eval m --data d\n```\n## Next\n" + table) == [(5, "| a | b |")]
