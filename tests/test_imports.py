"""The plugin's modules import one way: no circle in `adsa_vllm/` (function-level imports count too; imports under
`if TYPE_CHECKING:` do not, they never run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adsa_vllm"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(tree: ast.AST, package: str) -> set[str]:
    """Every module name an import statement of `tree` names, TYPE_CHECKING blocks left out."""
    names: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            names |= set().union(*(_imported(n, package) for n in node.orelse)) if node.orelse else set()
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
        names |= _imported(node, package)
    return names


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for target in _imported(ast.parse(path.read_text()), package):
            while target and target not in mods:     # `from pkg.mod import func` -> pkg.mod
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_plugin():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert "adsa_vllm.policy.base" in import_graph()["adsa_vllm.policy.tracker"]   # the walker sees real edges


# The serving core reads a model only through the family contract (adsa_vllm/family.py), never a family's folder;
# the family's own tools (reference, eval, cli, convert) may name it.
FAMILY_FREE = ("adsa_vllm.engine", "adsa_vllm.worker", "adsa_vllm.guidance", "adsa_vllm.policy", "adsa_vllm.settings",
               "adsa_vllm.config", "adsa_vllm.family", "adsa_vllm.request_validation", "adsa_vllm.plugin",
               "adsa_vllm.metrics")


def family_packages() -> set[str]:
    from adsa_vllm.family import FAMILIES
    return {entry.partition(":")[0].rpartition(".")[0] for entry in FAMILIES.values()}


def test_the_serving_core_imports_no_family_folder():
    graph = import_graph()
    families = family_packages()
    assert families == {"adsa_vllm.llamagen", "adsa_vllm.janus"}
    core = {m for m in graph if any(m == p or m.startswith(p + ".") for p in FAMILY_FREE)}
    assert {"adsa_vllm.engine.config_hook", "adsa_vllm.worker.worker", "adsa_vllm.guidance.api",
            "adsa_vllm.settings", "adsa_vllm.config"} <= core
    found = {m: sorted(e for e in graph[m] if any(e == f or e.startswith(f + ".") for f in families)) for m in core}
    assert {m: e for m, e in found.items() if e} == {}
    assert "adsa_vllm.llamagen.config" in graph["adsa_vllm.llamagen.model"]   # the walker sees family edges


def test_model_config_imports_neither_torch_nor_vllm():
    code = ("import sys, adsa_vllm.family, adsa_vllm.llamagen.config, adsa_vllm.llamagen.family; "
            "print(sorted({'torch', 'vllm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]", out


def test_pyproject_lists_every_package():
    """pyproject.toml lists the packages explicitly (patches/ installs as `adsa_vllm_patches`): every folder holding
    modules must be listed, or `pip install .` silently leaves it out (an editable install would not notice)."""
    import tomllib
    setuptools = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: PACKAGE.parent / path for name, path in setuptools["package-dir"].items()}
    assert folders == {"adsa_vllm": PACKAGE, "adsa_vllm_patches": PACKAGE.parent / "patches"}
    on_disk = {".".join((name,) + p.parent.relative_to(root).parts) for name, root in folders.items()
               for p in root.rglob("*.py")}
    assert set(setuptools["packages"]) == on_disk
