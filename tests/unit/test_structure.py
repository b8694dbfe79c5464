"""The shape of the package, kept as tests: one-way imports, one owner per file format, file sizes.

* No import cycles in nestlm/, counting imports inside functions (imports under
  ``if TYPE_CHECKING:`` aside): the graph is read from every module's syntax tree.
* No module but nestlm/checkpoint.py names elastic.json, importance.json or the router file.
* trainer.py under 350 lines; no file in nestlm/ over 450 lines but model.py; no line over 120.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "nestlm"
OWNED_NAMES = ("elastic.json", "importance.json", "routers.safetensors")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions, methods, branches), but TYPE_CHECKING blocks."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for c in child.orelse:
                    visit_stmt(c)
                continue
            visit_stmt(child)

    def visit_stmt(child: ast.AST) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.append(child)
        visit(child)

    visit(tree)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package-internal modules it imports. ``root`` is the package directory.

    ``from .a import b`` counts as importing ``a.b`` when that is a module, else ``a``; importing
    ``x.y`` also imports the package ``x`` (its __init__), but the root package itself, the
    public facade every import passes through, is left out.
    """
    top = root.name
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    packages = {_module_name(p, root) for p in root.rglob("__init__.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name if name in packages else name.rpartition(".")[0]
        deps: set[str] = set()
        targets: list[str] = []
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
                continue
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                targets.append(sub if sub in files else mod)
        for t in targets:
            if t != top and not t.startswith(top + "."):
                continue
            parts = t.split(".")
            for i in range(2, len(parts) + 1):  # the module and every package above it but the root
                dep = ".".join(parts[:i])
                if dep in files and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := dfs(m)) is not None:
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)) is not None:
            return c
    return None


def test_nestlm_has_no_import_cycles():
    graph = import_graph(PKG)
    assert "nestlm.model" in graph and "nestlm.checkpoint" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_model_sits_at_the_bottom():
    graph = import_graph(PKG)
    below = {
        "nestlm.cache",
        "nestlm.config",
        "nestlm.ssd",
        "nestlm.ssd_steps",
        "nestlm.errors",
        "nestlm.tap",
        "nestlm.elastic",
    }
    below |= {"nestlm.elastic.index", "nestlm.elastic.arch"}
    # the thin conveniences: modules that never import the model back
    below |= {"nestlm.generate", "nestlm.checkpoint", "nestlm.elastic.slicing"}
    assert graph["nestlm.model"] <= below, graph["nestlm.model"] - below
    for mod in ("nestlm.generate", "nestlm.checkpoint", "nestlm.elastic.slicing", "nestlm.elastic.importance"):
        assert "nestlm.model" not in graph[mod], mod


def _fake_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "fakepkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "fakepkg"


def test_the_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    pkg = _fake_package(
        tmp_path,
        {
            "__init__.py": "from .a import f\n",
            "a.py": "from .sub.b import g\n\ndef f():\n    return g()\n",
            "sub/__init__.py": "",
            "sub/b.py": "def g():\n    from ..a import f  # the planted cycle\n    return f\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\nimport os\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["fakepkg.c"] == set()  # TYPE_CHECKING-only imports do not count
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"fakepkg.a", "fakepkg.sub.b"}
    (pkg / "sub" / "b.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_the_checker_follows_from_package_import_module(tmp_path):
    pkg = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "x.py": "from .sub import y\n",
            "sub/__init__.py": "",
            "sub/y.py": "import fakepkg.x\n",
        },
    )
    assert set(find_cycle(import_graph(pkg)) or []) == {"fakepkg.x", "fakepkg.sub.y"}


def _strings(tree: ast.AST) -> list[str]:
    """String constants of a module, docstrings left out."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_only_the_checkpoint_owner_names_its_files():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "checkpoint.py":
            continue
        for s in _strings(ast.parse(path.read_text())):
            offenders += [f"{path.relative_to(ROOT)}: {name}" for name in OWNED_NAMES if name in s]
    assert not offenders, offenders
    owner = "\n".join(_strings(ast.parse((PKG / "checkpoint.py").read_text())))
    assert all(name in owner for name in OWNED_NAMES)


def test_file_sizes_and_line_lengths():
    lines = {p: p.read_text().splitlines() for p in PKG.rglob("*.py")}
    assert len(lines[PKG / "train" / "trainer.py"]) < 350
    big = {str(p.relative_to(ROOT)): len(v) for p, v in lines.items() if len(v) > 450 and p.name != "model.py"}
    assert not big, big
    for d in ("nestlm", "tests", "benchmarks"):
        for p in (ROOT / d).rglob("*.py"):
            long = [i + 1 for i, ln in enumerate(p.read_text().splitlines()) if len(ln) > 120]
            assert not long, f"{p.relative_to(ROOT)} lines {long} are over 120 characters"


@pytest.mark.parametrize("bench", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_use_the_installed_package(bench):
    assert "sys.path" not in bench.read_text()
