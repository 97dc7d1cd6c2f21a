"""Which parts of the product may import which: every import statement of every product module, lazy ones too.

The layers: the spec imports nothing of the runtime or the operator; the runtime is model <- engine <-
parallel <- serve (kernels live with the model); the operator never imports the runtime. Ray is
imported only where the product talks to a Ray cluster: the Serve graph and the expert-parallel
group's Ray transport.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Product folders and the package each installs as (pyproject.toml's mapping).
PACKAGES = {"r1serve": "r1serve", "runtime": "r1serve.runtime", "operator": "r1serve.operator"}
GENERATED = ("r1serve/protos/r1serve/",)

# Each layer and the r1serve packages it must never import.
FORBIDDEN = {
    "r1serve.spec": ("r1serve.runtime", "r1serve.operator", "r1serve.cli"),
    "r1serve.runtime.model": ("r1serve.runtime.engine", "r1serve.runtime.parallel", "r1serve.runtime.serve",
                              "r1serve.spec", "r1serve.operator", "r1serve.cli"),
    "r1serve.runtime.engine": ("r1serve.runtime.parallel", "r1serve.runtime.serve", "r1serve.spec",
                               "r1serve.operator", "r1serve.cli"),
    "r1serve.runtime.parallel": ("r1serve.runtime.serve", "r1serve.spec", "r1serve.operator", "r1serve.cli"),
    "r1serve.runtime.serve": ("r1serve.operator", "r1serve.cli"),
    "r1serve.operator": ("r1serve.runtime", "r1serve.cli"),
}
RAY_ALLOWED = ("r1serve.runtime.serve", "r1serve.runtime.parallel.transport")
KERNELS_ALLOWED = ("r1serve.runtime.model",)


def product_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(GENERATED) or "__pycache__" in relative:
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(module: str, path: Path) -> set[str]:
    """Absolute names of everything `module` imports, at any depth of its code."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = product_modules()


def test_the_scan_sees_the_product():
    assert {"r1serve.spec.model", "r1serve.runtime.model.model", "r1serve.runtime.engine.engine",
            "r1serve.runtime.parallel.group", "r1serve.runtime.serve.app", "r1serve.operator.handlers"} <= set(MODULES)
    # Lazy imports inside functions count: the engine factory imports the group only when a pool has ranks.
    assert "r1serve.runtime.parallel.group" in imports_of("r1serve.runtime.serve.engine_factory",
                                                          MODULES["r1serve.runtime.serve.engine_factory"])


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_lies_below_it(layer):
    wrong = sorted(f"{module} imports {name}"
                   for module, path in MODULES.items() if _within(module, layer)
                   for name in imports_of(module, path)
                   if any(_within(name, forbidden) for forbidden in FORBIDDEN[layer]))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("library,allowed", [("ray", RAY_ALLOWED), ("triton", KERNELS_ALLOWED)])
def test_cluster_and_kernel_libraries_are_imported_only_where_they_belong(library, allowed):
    wrong = sorted(module for module, path in MODULES.items()
                   if any(_within(name, library) for name in imports_of(module, path))
                   and not any(_within(module, place) for place in allowed))
    assert not wrong, f"{library} imported outside {', '.join(allowed)}: {', '.join(wrong)}"


def test_the_product_never_imports_the_tests():
    wrong = sorted(module for module, path in MODULES.items()
                   if any(_within(name, top) for name in imports_of(module, path)
                          for top in ("tests", "r1serve_testing", "benchmarks")))
    assert not wrong, wrong
