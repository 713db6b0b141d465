"""The direction of imports is the architecture: core <- tasks <- flows <- cli.

Every module of shrinkflow/, tasks/ and flows/ is imported, and its source is read with ast, so
an import hidden inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shrinkflow", "tasks", "flows")

#: Library internals imported on purpose, each with where and why; anything else private is refused.
LIBRARY_PRIVATE_ALLOWED = {
    # shrinkflow/export.py: the quantize/dequantize decompositions PT2E leaves behind live only there.
    "torch.ao.quantization.fx._decomposed",
    # shrinkflow/pte.py: reading a .pte back to check it; ExecuTorch has no public reader.
    "executorch.exir._serialize._program",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer(module: str) -> int | None:
    """0 core, 1 tasks, 2 flows, 3 the CLI; None for anything outside the project."""
    if module == "flows.cli" or module.startswith("flows.cli."):
        return 3
    top = module.split(".")[0]
    return {"shrinkflow": 0, "tasks": 1, "flows": 2}.get(top)


def imports(module: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, imported module, imported names) for every import in the module's source, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            found.append((node.lineno, target, tuple(alias.name for alias in node.names)))
    return found


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_walk_finds_every_layer():
    assert {"shrinkflow.specs", "shrinkflow.workloads.digits", "tasks.compress", "flows.compress", "flows.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    """shrinkflow imports nothing of tasks or flows, tasks nothing of flows, and only the CLI is above flows."""
    upward = [f"line {line}: {target}" for line, target, _ in imports(module)
              if layer(target) is not None and layer(target) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports from a layer above it: {upward}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_of_other_modules(module):
    """No ``from other import _name`` and no ``other._name`` on another project module, and no
    private module or name of a library, except the commented LIBRARY_PRIVATE_ALLOWED."""
    found = imports(module)
    bad = [f"line {line}: from {target} import {name}" for line, target, names in found for name in names
           if private(name) and target != module and target not in LIBRARY_PRIVATE_ALLOWED]
    bad += [f"line {line}: {target}" for line, target, _ in found
            if any(private(part) for part in target.split(".")) and target not in LIBRARY_PRIVATE_ALLOWED]
    bad += [f"line {line}: {alias}.{attr}" for line, alias, attr in _private_attributes(module)]
    assert not bad, f"{module} uses private names of other modules: {bad}"


def _private_attributes(module: str) -> list[tuple[int, str, str]]:
    """``alias._name`` where ``alias`` was bound by importing another project module."""
    tree = ast.parse(MODULES[module].read_text())
    aliases = set()
    for line, target, names in imports(module):
        aliases |= {name for name in names if f"{target}.{name}" in MODULES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if layer(a.name) is not None}
    return [(node.lineno, node.value.id, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in aliases and private(node.attr)]
