"""Find where the project reaches into vLLM internals by reading its source (AST; vLLM's source is read as text,
never imported). Used by tests/test_touchpoints.py, which checks every finding against the ledger.

A *finding* (file, line, name, kind) is one of:
  import   a private vLLM module or name: `from vllm import _custom_ops`, `from vllm.x import _y`;
  private  `x._name` for any x (`self` and `super()` included; getattr/hasattr/setattr with a literal name too),
           a keyword argument `_name=` (`cm.replace(_seq_lens_cpu=None)`), or a method `def _name` in a class
           derived from vLLM, where `_name` is not the project's own;
  write    `x.name = ...`, `del x.name`, `setattr(x, "name", ...)` (monkeypatch.setattr too) with x not `self`/`cls`,
           when `name` is not the project's own (an attribute given to a vLLM object), or when the value is a
           function and `name` is not a method of a project class (a method rebound).
Not a finding: x rooted at a module imported from elsewhere than vLLM (`torch.backends.cuda.matmul.allow_tf32 = False`,
`prometheus_client.REGISTRY._collector_to_names`, `plugin._done` of the project's own module) or at an argparse
namespace (`args = ap.parse_args()`).
Dunder names (`__name__`, `__version__`) are Python's protocol and never count.

The project's own names: every member (method, class-body name, `self.x = ...` in a method) of a project class not
derived from vLLM; members of a class derived from vLLM (a base imported from vllm, a `*Mixin` written for a vLLM
class, or a base the scan cannot resolve, such as a local variable) except those vLLM's source defines too: such a
member overrides or extends vLLM's. The project's methods: the methods among those, tests/ left out (a test's
stand-in for a vLLM class must not make vLLM's method names the project's). Module-level names need no rule: code
reaches them through an imported module, which is not a vLLM object.

Known blind spots, by design: public attributes *read* from vLLM objects (`scheduler.running`) and writes of a name
some project class also uses (`cache_config.block_size = 16`: `block_size` is a field of project classes too) are
not findings, since by name alone they look like the project's; the ledger names the contracts of that kind by hand.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("adsa_vllm", "benchmarks", "tests", "patches")
IMPORTED_AS = {"patches": "adsa_vllm_patches"}   # folder -> package name where they differ (pyproject package-dir)
DYNAMIC = "<dynamic setattr>"   # setattr(x, name, ...) whose name the scan cannot resolve: never in a ledger


@dataclass(frozen=True, order=True)
class Finding:
    path: str       # relative to the repository root
    line: int
    name: str       # the attribute, imported name or private module component
    kind: str       # import | private | write

    def __str__(self):
        return f"{self.path}:{self.line}: {self.kind} {self.name}"


@functools.lru_cache(maxsize=1)
def vllm_names() -> frozenset[str]:
    """Every name vLLM's source defines: functions, class-body names, `self.x = ...` (a text scan, ~2 s)."""
    spec = importlib.util.find_spec("vllm")
    pattern = re.compile(r"def\s+(\w+)|self\.(\w+)\s*(?::[^=\n]+)?=(?!=)|^[ \t]+(\w+)\s*(?::[^=\n]+)?=(?!=)", re.M)
    names = set()
    for path in Path(next(iter(spec.submodule_search_locations))).rglob("*.py"):
        for m in pattern.finditer(path.read_text(errors="ignore")):
            names.add(m.group(1) or m.group(2) or m.group(3))
    return frozenset(names)


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _private(name: str) -> bool:
    return name.startswith("_") and not _dunder(name)


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


class _Module:
    def __init__(self, rel: str, source: str):
        self.rel = rel
        self.tree = ast.parse(source, rel)
        self.imports: dict[str, str] = {}      # local name -> the module it was imported from
        self.namespaces: set[str] = set()      # names bound to argparse results
        self.functions: set[str] = set()       # names of every def in the file (a value that is a function)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.imports[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    self.imports[a.asname or a.name] = "." * node.level + (node.module or "")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.add(node.name)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                call, names = node.value, [t.id for t in node.targets if isinstance(t, ast.Name)]
                fn = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
                if fn in ("parse_args", "parse_known_args"):
                    self.namespaces.update(names)
                elif fn == "import_module" and call.args and isinstance(call.args[0], ast.Constant):
                    self.imports.update(dict.fromkeys(names, str(call.args[0].value)))   # m = import_module("x")
        self.classes = [n for n in ast.walk(self.tree) if isinstance(n, ast.ClassDef)]

    def from_vllm(self, name: str | None) -> bool:
        return name is not None and self.imports.get(name, "").split(".")[0] == "vllm"

    def from_other_library(self, name: str | None) -> bool:
        """Imported, and not from vLLM: torch, prometheus_client, the project's own modules."""
        return name in self.imports and not self.from_vllm(name)

    def is_function(self, value: ast.AST) -> bool:
        """A lambda, a def of this file, or a method of self: what rebinding a method assigns."""
        return isinstance(value, ast.Lambda) or isinstance(value, ast.Name) and value.id in self.functions \
            or isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "self"


def _members(cls: ast.ClassDef) -> tuple[set[str], set[str]]:
    """(every member, the methods) of a class."""
    members, methods = set(), set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(node.name)
            if not isinstance(node, ast.ClassDef):
                methods.add(node.name)
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                        and isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls"):
                    members.add(sub.attr)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                members |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return members, methods


class Project:
    """The scanned files and the names the project itself defines. `extra`: {path: source} scanned as if on disk
    (how tests/test_touchpoints.py adds a touchpoint without writing a file)."""

    def __init__(self, root: Path = ROOT, dirs=SCANNED, extra: dict[str, str] | None = None):
        paths = [p for d in dirs for p in sorted((root / d).rglob("*.py"))]
        sources = {p.relative_to(root).as_posix(): p.read_text() for p in paths}
        sources.update(extra or {})
        self.modules = [_Module(rel, src) for rel, src in sources.items()]
        self._classes = {c.name: (m, c) for m in self.modules for c in m.classes}
        self._module_names = {m.rel.split("/")[-1][:-3] for m in self.modules} | set(SCANNED) \
            | set(IMPORTED_AS.values())
        self._derived: dict[ast.ClassDef, bool] = {}
        self.vllm = vllm = vllm_names()
        self.own, self.methods = set(), set()
        for mod in self.modules:
            for cls in mod.classes:
                members, methods = _members(cls)
                if self.is_derived(mod, cls):
                    members, methods = members - vllm, methods - vllm
                self.own |= members
                if not mod.rel.startswith("tests/"):
                    self.methods |= methods

    def is_derived(self, mod: _Module, cls: ast.ClassDef, seen: tuple = ()) -> bool:
        """Whether `cls` derives from (or, as a *Mixin, is written for) a vLLM class."""
        if cls not in self._derived:
            result = cls.name.endswith("Mixin")
            for base in cls.bases:
                if result:
                    break
                root = _root(base)
                source = mod.imports.get(root)
                if root is None or mod.from_vllm(root):
                    result = True
                elif root in self._classes and (source is None or source.startswith(".")
                                                or source.split(".")[0] in self._module_names):
                    result = root not in seen and self.is_derived(*self._classes[root], seen + (root,))
                elif source is not None or hasattr(builtins, root):
                    result = False   # another library's class (torch.nn.Module, enum.Enum) or a builtin
                else:
                    result = True    # a base the scan cannot resolve (a local variable): assume vLLM's
            self._derived[cls] = result
        return self._derived[cls]

    def findings(self) -> list[Finding]:
        return sorted(set().union(*(_scan(mod, self) for mod in self.modules)))


def _written_names(call: ast.Call, parents: dict) -> list[str]:
    """The attribute name(s) a setattr-like call writes: a literal, or a loop variable over literals."""
    arg = call.args[1]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    node = call
    while isinstance(arg, ast.Name) and node in parents:
        node = parents[node]
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == arg.id \
                and isinstance(node.iter, (ast.Tuple, ast.List)) \
                and all(isinstance(e, ast.Constant) for e in node.iter.elts):
            return [e.value for e in node.iter.elts]
    return [DYNAMIC]


_SETTERS = ("setattr", "delattr", "__setattr__", "__delattr__")


def _scan(mod: _Module, project: Project) -> set[Finding]:
    out: set[Finding] = set()
    parents = {child: node for node in ast.walk(mod.tree) for child in ast.iter_child_nodes(node)}

    def add(node, name, kind):
        out.add(Finding(mod.rel, node.lineno, name, kind))

    def foreign(target: ast.AST) -> bool:
        """Rooted at an argparse namespace or at a module imported from elsewhere than vLLM (torch.backends...,
        prometheus_client.REGISTRY, the project's own modules): not a vLLM object."""
        root = _root(target)
        return root in mod.namespaces or mod.from_other_library(root)

    def private(node, target: ast.AST, name: str) -> None:
        if name not in project.own and not foreign(target):
            add(node, name, "private")

    def write(node, target: ast.AST, name: str, value: ast.AST | None) -> None:
        if _private(name):
            return private(node, target, name)
        if _dunder(name) or isinstance(target, ast.Name) and target.id in ("self", "cls") or foreign(target):
            return
        rebinds = value is not None and mod.is_function(value) and name in project.vllm \
            and name not in project.methods
        if name == DYNAMIC or name not in project.own or rebinds:
            add(node, name, "write")

    for node in ast.walk(mod.tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
            for name in [p for p in node.module.split(".") if p.startswith("_")] \
                    + [a.name for a in node.names if a.name.startswith("_")]:
                add(node, name, "import")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "vllm":
                    for part in a.name.split(".")[1:]:
                        if part.startswith("_"):
                            add(node, part, "import")
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            value = None if isinstance(node, ast.Delete) else node.value
            pairs = []
            for t in targets:
                if isinstance(t, ast.Tuple) and isinstance(value, ast.Tuple) and len(t.elts) == len(value.elts):
                    pairs += zip(t.elts, value.elts)     # a.x, b.y = f, g
                else:
                    pairs += [(sub, value if sub is t else None) for sub in ast.walk(t)]
            for t, v in pairs:
                if isinstance(t, ast.Attribute) and isinstance(t.ctx, (ast.Store, ast.Del)):
                    write(node, t.value, t.attr, v)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            if _private(node.attr):
                private(node, node.value, node.attr)
        elif isinstance(node, ast.ClassDef) and project.is_derived(mod, node):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name) \
                        and item.name not in project.own:
                    add(item, item.name, "private")
        elif isinstance(node, ast.Call):
            for kw in node.keywords:   # cm.replace(_seq_lens_cpu=None): a private field of a vLLM dataclass
                if kw.arg is not None and _private(kw.arg) and kw.arg not in project.own:
                    add(node, kw.arg, "private")
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if len(node.args) < 2:
                continue
            if fn in _SETTERS:
                value = node.args[2] if len(node.args) > 2 else None
                for name in _written_names(node, parents):
                    write(node, node.args[0], name, value)
            elif fn in ("getattr", "hasattr") and isinstance(node.args[1], ast.Constant) \
                    and isinstance(node.args[1].value, str) and _private(node.args[1].value):
                private(node, node.args[0], node.args[1].value)
    return out


if __name__ == "__main__":   # python tests/touchpoint_scan.py: every finding, one a line
    for finding in Project().findings():
        print(finding)
