"""No module of the project imports one that imports it back, not even from inside a function or under
TYPE_CHECKING: such a circle works only by the order modules happen to load in."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports() -> dict:
    """module -> the project modules it names in any import statement, anywhere in its source."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for package in ("prismatic", "craft") for p in (ROOT / package).rglob("*.py")}
    edges = {}
    for module, path in files.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                named |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
        edges[module] = {m for m in named & set(files) if m != module}
    return edges


def test_no_two_modules_import_each_other():
    edges = _imports()
    assert "prismatic.models.checkpoint" in edges["prismatic.models"]  # the scan sees package imports
    circles = sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges[b]
                     and not b.startswith(a + ".") and not a.startswith(b + "."))  # a package and its modules
    assert circles == []
