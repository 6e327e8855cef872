"""accounting/ has no import cycle, and the base accountant knows nothing about its subclasses."""

import ast
from pathlib import Path

ACCOUNTING = Path(__file__).resolve().parents[1] / "hf_ewtune" / "accounting"


def _imports(path: Path) -> set[str]:
    """Sibling modules of accounting/ that ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                found.add(mod.split(".")[0] if mod else "")
                if not mod:
                    found.update(a.name for a in node.names)
            elif mod.startswith("hf_ewtune.accounting."):
                found.add(mod.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("hf_ewtune.accounting."))
    return {m for m in found if (ACCOUNTING / f"{m}.py").exists()}


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in ACCOUNTING.glob("*.py") if p.stem != "__init__"}


def test_accounting_import_graph_is_acyclic():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []  # old main: base -> edgeworth_accountant -> base


def test_base_imports_no_accountant_subclass_module():
    subclass_modules = {"edgeworth_accountant", "certified", "registry", "calibration", "compare"}
    assert _imports(ACCOUNTING / "base.py") & subclass_modules == set()
    assert "edgeworth_report" in _imports(ACCOUNTING / "edgeworth_accountant.py")
