"""The import layering of ARCHITECTURE.md, enforced: a module imports only modules of lower layers (so
there is no import cycle), never from inside a function (no hidden cycle), and every module has its place."""

from __future__ import annotations

import ast
from pathlib import Path

import hotloop

PACKAGE = Path(hotloop.__file__).parent

# Lowest first. Keep in step with the module map in ARCHITECTURE.md.
LAYERS: list[set[str]] = [
    {
        "_build_info",
        "_shared",
        "batching",
        "clipping",
        "eager_draws",
        "faster_ops",
        "events",
        "metrics",
        "plotting",
        "sinks",
        "speed_rules",
        "layouts",
    },  # leaves
    {"_native", "fidelity"},
    {"_checks", "_optim_specs", "distributed"},
    {"optim", "op_capture", "plan", "many_optim"},
    {"engines.base", "native_eval", "many_capture", "aot_compile"},
    {"engines.python", "engines.native", "engines.cuda_graph", "many_eval"},
    {"engines.aot"},
    {"engines", "evaluation", "stages", "many_stages"},
    {"fit"},
    {"many"},
    {""},  # the package itself
]
# The loader of the compiled module imports it lazily, to turn a missing or stale build into a clear error.
LAZY_IMPORTS = {"_native": {"_C", "_build_info"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """hotloop modules imported at module level, and those imported inside functions."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    top, nested = set(), set()
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        base = package[: len(package) - (node.level - 1)]
        targets = (
            [".".join([*base, node.module])]
            if node.module
            else [".".join([*base, alias.name]) for alias in node.names]
        )
        (top if id(node) in top_level else nested).update(targets)
    return top, nested


def _layer_of(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"hotloop.{name} has no layer in tests/test_architecture.py (and ARCHITECTURE.md)")


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        _layer_of(_module_name(path))


def test_modules_import_only_lower_layers():
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        top, _ = _imports(path)
        for target in top - {"_C"}:
            assert _layer_of(target) < _layer_of(name), f"hotloop.{name} imports hotloop.{target}"


def test_no_imports_hidden_in_functions():
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        _, nested = _imports(path)
        assert nested <= LAZY_IMPORTS.get(name, set()), f"hotloop.{name} imports {nested} inside a function"
