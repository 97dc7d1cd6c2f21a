"""The distribution's package list matches the folders on disk (one namespace, nothing forgotten)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> tuple[set[str], dict[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(project["packages"]), project["package-dir"]


def test_every_package_folder_is_declared():
    declared, roots = _declared()
    found = set()
    for package, folder in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == declared, f"declare these in pyproject.toml: {sorted(found - declared)}; stale: {sorted(declared - found)}"


def test_no_top_level_package_but_r1serve():
    declared, roots = _declared()
    assert {name.split(".")[0] for name in declared} == {"r1serve"}
    assert all(key.startswith("r1serve") for key in roots)
