"""Layering of models/ read from the source (ast): no argparse Namespace below ``build_model``, no import circle,
shared parts that never name a family."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import models

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
# The table's names and every family folder (a folder not yet in the table included).
FAMILY_NAMES = set(models.FAMILIES) | {p.name for p in MODELS.iterdir() if (p / "__init__.py").is_file()}
# The published interface edges: build_model(args) (models/__init__.py) and build_matcher(args).
EDGE_FUNCTIONS = {("models/__init__.py", "build_model"), ("models/matcher.py", "build_matcher")}
EDGE_IMPORTS = {"models/__init__.py"}  # the module of build_model may import argparse for its annotation


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _model_files() -> list[Path]:
    return sorted(MODELS.rglob("*.py"))


def namespace_uses(source: str, name: str) -> list[str]:
    """Where ``source`` (file ``name``, relative to the repository) imports argparse, annotates or takes an
    argparse Namespace (a parameter called ``args``), or calls ``getattr(args, ...)``; edge functions excepted."""
    found: list[str] = []
    tree = ast.parse(source)

    def visit(node: ast.AST, function: str | None) -> None:
        edge = (name, function) in EDGE_FUNCTIONS
        if isinstance(node, ast.Import | ast.ImportFrom) and name not in EDGE_IMPORTS:
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] == "argparse" for m in modules):
                found.append(f"{name}:{node.lineno} imports argparse")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
            edge = (name, function) in EDGE_FUNCTIONS
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            for arg in arguments:
                if edge:
                    continue
                if arg.arg == "args":
                    found.append(f"{name}:{node.lineno} {function}() takes a parameter 'args'")
                if arg.annotation is not None and "Namespace" in ast.unparse(arg.annotation):
                    found.append(f"{name}:{node.lineno} {function}() annotates {arg.arg} as a Namespace")
            if node.returns is not None and "Namespace" in ast.unparse(node.returns) and not edge:
                found.append(f"{name}:{node.lineno} {function}() returns a Namespace")
        if isinstance(node, ast.AnnAssign) and "Namespace" in ast.unparse(node.annotation) and not edge:
            found.append(f"{name}:{node.lineno} annotates a Namespace")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "args"
            and not edge
        ):
            found.append(f"{name}:{node.lineno} calls getattr(args, ...)")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_no_namespace_below_build_model():
    sources = [(p.read_text(), _relative(p)) for p in [*_model_files(), ROOT / "engine.py"]]
    found = [use for source, name in sources for use in namespace_uses(source, name)]
    assert not found, "\n".join(found)


def test_the_namespace_check_can_fail():
    bad = (
        "import argparse\n"
        "def build(args: argparse.Namespace):\n"
        "    return getattr(args, 'masks', False)\n"
        "def run(settings) -> argparse.Namespace:\n"
        "    x: argparse.Namespace = settings\n"
    )
    found = namespace_uses(bad, "models/x.py")
    assert len(found) == 6, found  # import, parameter 'args', its annotation, getattr, return, AnnAssign
    assert namespace_uses(bad.replace("import argparse\n", ""), "models/__init__.py") != []
    edge = "import argparse\ndef build_model(args: argparse.Namespace):\n    return getattr(args, 'model', 'detr')\n"
    assert namespace_uses(edge, "models/__init__.py") == []


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path, root: Path) -> str:
    """The package relative imports in ``path`` resolve against."""
    name = _module_name(path, root)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def import_graph(files: list[Path], root: Path = ROOT) -> dict[str, set[str]]:
    """models module -> the models modules it imports (any depth in the file, lazy imports included).

    Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` unless the importer lives inside ``a.b`` (then that
    package is already being initialised), so those packages count as imported too.
    """
    nodes = {_module_name(p, root) for p in files}
    graph: dict[str, set[str]] = {name: set() for name in nodes}
    for path in files:
        importer = _module_name(path, root)
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _package_of(path, root).split(".")
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.append(module)
                targets += [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in nodes]
        for target in targets:
            while target and target not in nodes:  # a name inside a module: the module itself
                target = target.rpartition(".")[0]
            if not target or target == importer:
                continue
            graph[importer].add(target)
            parts = target.split(".")
            for depth in range(2, len(parts)):  # parent packages below the top-level 'models'
                package = ".".join(parts[:depth])
                if package in nodes and not (importer == package or importer.startswith(package + ".")):
                    graph[importer].add(package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_among_models_modules():
    graph = import_graph(_model_files())
    assert "models.detr.segmentation" in graph["models.detr.build"]  # the lazy import is seen
    assert "models.deformable_detr" in graph["models.dino.model"]  # a family package's __init__ runs first
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_can_fail(tmp_path):
    package = tmp_path / "models"
    (package / "fam").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import fam\n")
    (package / "shared.py").write_text("def f():\n    from .fam.model import X\n")  # lazy, still a circle
    (package / "fam" / "__init__.py").write_text("from .model import X\n")
    (package / "fam" / "model.py").write_text("from ..shared import f\nX = 1\n")
    graph = import_graph(sorted(package.rglob("*.py")), tmp_path)
    assert find_cycle(graph) == ["models.fam", "models.fam.model", "models.shared", "models.fam"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _shared_files() -> list[Path]:
    """models/*.py outside the family folders, except the table (``__init__``) and the Family spec."""
    return [p for p in sorted(MODELS.glob("*.py")) if p.name not in ("__init__.py", "family.py")]


def family_name_literals(source: str, names: set[str] = FAMILY_NAMES) -> list[int]:
    """Lines of string literals equal to a family name, except docstrings and logger names (``getLogger("detr")``
    is the project's logger, not a choice of family)."""
    tree = ast.parse(source)
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skipped.add(id(first.value))
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("getLogger") and node.args:
            skipped.add(id(node.args[0]))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in skipped
    ]


def test_shared_parts_never_select_a_family():
    assert len(_shared_files()) >= 14
    found = [f"{_relative(p)}:{line}" for p in _shared_files() for line in family_name_literals(p.read_text())]
    assert not found, f"family names in shared parts: {found}"
    graph = import_graph(_model_files())
    families = {f"models.{name}" for name in FAMILY_NAMES}
    into_families = [
        f"{_module_name(p)} -> {target}"
        for p in _shared_files()
        for target in graph[_module_name(p)]
        if target in families or target.rpartition(".")[0] in families
    ]
    assert not into_families, f"shared parts import a family: {into_families}"


@pytest.mark.parametrize(
    ("source", "lines"),
    [
        ('"""Mentions dino in a docstring."""\nx = 1\n', []),
        ('def f(model):\n    """detr"""\n    return model == "dino"\n', [3]),
        ('KINDS = {"detr": 1, "sine": 2}\n', [1]),
        ('import logging\nlog = logging.getLogger("detr")\n', []),
    ],
)
def test_the_family_literal_check_can_fail(source, lines):
    assert family_name_literals(source) == lines
