"""The layering of docs/architecture.md, checked on the source: imports only go down, no cycles, no Prefect
below flows/. Every import counts, at module level or inside a function."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "lookup", "models", "warehouse", "tasks", "flows")
# what each layer may import of ours (its own package included)
MAY_IMPORT = {
    "schemas": {"schemas"},
    "lookup": {"schemas", "lookup"},
    "models": {"schemas", "lookup", "models"},
    "warehouse": {"schemas", "lookup", "warehouse"},
    "tasks": {"schemas", "lookup", "models", "warehouse", "tasks"},
    "flows": set(PACKAGES),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("**/*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` names the submodule when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(name.split(".")[: len(name.split(".")) - node.level] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "tasks.ingest.ingest_corpus" -> "tasks.ingest"
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_imports_only_go_down_the_layers():
    wrong = [f"{m} imports {t}" for m, targets in _graph().items() for t in sorted(targets)
             if t.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]]
    assert wrong == []


def test_no_import_cycle_in_the_project():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_no_prefect_below_flows():
    mentions = [str(p.relative_to(ROOT)) for pkg in ("tasks", "models") for p in (ROOT / pkg).glob("**/*.py")
                if "prefect" in p.read_text()]
    assert mentions == []
    imports = [str(p.relative_to(ROOT)) for pkg in ("lookup", "warehouse", "schemas") for p in (ROOT / pkg).glob("**/*.py")
               if re.search(r"^\s*(import|from) prefect", p.read_text(), flags=re.M)]
    assert imports == []
    code = "import sys, tasks.ingest, tasks.annotate, tasks.pretrain; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_modules_stay_readable():
    """A module over ~500 lines says at its top why it is one piece."""
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for pkg in PACKAGES for p in (ROOT / pkg).glob("**/*.py")
            if (n := len(p.read_text().splitlines())) > 520 and "one module because" not in p.read_text()[:3000]]
    assert long == []
