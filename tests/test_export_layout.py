"""vlmkit/export/ is one shared module, one file per target and one dispatcher, without import circles:
common.py imports no target, a target imports only common (video.py, LlavaNextVideo, also builds on llava.py's
LlavaNext image side; onevision.py on llava.py's AnyRes checks and video.py's shared video checks), and only the
package's __init__ imports every target."""
import ast
from pathlib import Path

import vlmkit

PKG = Path(vlmkit.__file__).parent / "export"
TARGETS = ("llava", "internvl", "video", "onevision")
ALLOWED = {"video": {"common", "llava"}, "onevision": {"common", "llava", "video"}}


def sibling_imports(path: Path) -> set[str]:
    """The vlmkit.export modules `path` imports (anywhere in it, function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {a.name for a in node.names} if node.module is None else {node.module}
    return out


def test_common_imports_no_target():
    assert sibling_imports(PKG / "common.py") == set()


def test_targets_import_only_common():
    for t in TARGETS:
        assert sibling_imports(PKG / f"{t}.py") == ALLOWED.get(t, {"common"}), t


def test_only_the_dispatcher_knows_every_target():
    assert set(TARGETS) <= sibling_imports(PKG / "__init__.py")
    from vlmkit.export import EXPORT_TYPES

    assert EXPORT_TYPES == {"llava": "LlavaForConditionalGeneration",
                            "llava_next": "LlavaNextForConditionalGeneration",
                            "internvl": "InternVLForConditionalGeneration",
                            "llava_next_video": "LlavaNextVideoForConditionalGeneration",
                            "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def test_deprecated_export_internvl_reexports():
    import vlmkit.export.internvl as new
    import vlmkit.export_internvl as old

    assert "deprecated" in old.__doc__.lower()
    for name in ("export_internvl", "import_internvl", "check_internvl_exportable", "internvl_config", "START"):
        assert getattr(old, name) is getattr(new, name)
