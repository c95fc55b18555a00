"""The layout rules of the package: no import circles in vlmkit/ (function-level imports included), no function
over 80 lines in vlmkit/, connectors/ or recipes/, and recipes of about 100 lines at most."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "vlmkit"
MAX_FUNCTION_LINES = 80
KNOWN_CIRCLES: list = []  # none allowed
KNOWN_LONG: set = set()  # (file name, function) allowed over the limit: none
MAX_RECIPE_LINES = 100


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(cur: str, node, mods) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = cur.split(".")
            pkg = base[: len(base) - node.level + (1 if mods[cur].name == "__init__.py" else 0)]
            name = ".".join(pkg + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        subs = [name + "." + a.name for a in node.names]
        out = [x for x in subs if x in mods] + ([name] if any(x not in mods for x in subs) else [])
    else:
        out = [a.name for a in node.names]
    return [m for m in out if m in mods and m != cur]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[m].update(_imports(m, node, mods))
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    found = [c for c in circles(import_graph()) if c not in KNOWN_CIRCLES]
    assert not found, f"import circles in vlmkit/: {found}"


def test_the_model_side_registers_without_a_circle():
    graph = import_graph()
    assert not graph["vlmkit.registry"], "the registry holds tables only"
    assert "vlmkit.models.encoders" in graph["vlmkit.models"]


def test_no_function_over_80_lines():
    long = []
    top = ROOT.parent
    for f in [*ROOT.rglob("*.py"), *(top / "connectors").glob("*.py"), *(top / "recipes").glob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (f.name, node.name) not in KNOWN_LONG:
                    long.append(f"{f.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_recipes_stay_short():
    long = {f.name: n for f in (ROOT.parent / "recipes").glob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_RECIPE_LINES}
    assert not long, f"recipes over {MAX_RECIPE_LINES} lines: {long}"
