"""Imports go one way: a module imports modules of its own layer or below, never above.

cli > ops > runner > layout > quant > checkpoint > arch > shared (errors, _util, data, the package's
own __init__). Function-level imports count as much as module-level ones.
"""

import ast
from pathlib import Path

import moetool

PACKAGE = Path(moetool.__file__).parent
LAYERS = {name: rank for rank, names in enumerate((
    ("errors", "_util", "data", ""),   # "" is moetool/__init__.py (__version__)
    ("arch",),
    ("checkpoint",),
    ("quant",),
    ("layout",),
    ("runner",),
    ("ops",),
    ("cli", "__main__"),
)) for name in names}
# importer -> imported module allowed to go up: the public API's lazy loader
ALLOWED = {("moetool", "moetool.runner.model")}   # moetool.load_model


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer of a moetool module, by its subpackage (or top-level module)."""
    part = module.split(".")[1] if "." in module else ""
    if part.startswith("_util"):
        part = "_util"
    assert part in LAYERS, f"{module}: no layer assigned to moetool.{part}; add it to LAYERS"
    return LAYERS[part]


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported moetool module) for every import in PATH, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            if base == "moetool":   # from moetool import X: X may be a subpackage
                out.extend((node.lineno, f"moetool.{a.name}" if _is_submodule(a.name) else "moetool")
                           for a in node.names)
            else:
                out.append((node.lineno, base))
    return [(line, name) for line, name in out if name == "moetool" or name.startswith("moetool.")]


def _is_submodule(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in _modules():
        _layer(_module_name(path))


def test_imports_go_down():
    upward = []
    for path in _modules():
        module = _module_name(path)
        own = _layer(module)
        for line, imported in _imports(path, module):
            if _layer(imported) > own and (module, imported) not in ALLOWED:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {imported}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_checks_catch_an_upward_import(tmp_path):
    """The walk sees function-level and relative imports."""
    fake = tmp_path / "model.py"
    fake.write_text("def f():\n    from moetool.ops.convert import convert\n    from ..cli import app\n")
    found = [name for _, name in _imports(fake, "moetool.runner.model")]
    assert found == ["moetool.ops.convert", "moetool.cli"]
    assert all(_layer(name) > _layer("moetool.runner.model") for name in found)
