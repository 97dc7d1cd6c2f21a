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
    assert found == declared, (f"declare these in pyproject.toml: {sorted(found - declared)}; "
                               f"stale: {sorted(declared - found)}")


def test_no_top_level_package_but_r1serve():
    declared, roots = _declared()
    assert {name.split(".")[0] for name in declared} == {"r1serve"}
    assert all(key.startswith("r1serve") for key in roots)


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG ") and "=" in line:
            name, value = line[4:].split("=", 1)
            args[name] = value
    return args


def test_dockerfile_builds_on_the_pinned_ray_and_torch():
    """The image's Ray is the one the package pins and the operator renders; its torch is bootstrap's."""
    import importlib.util
    import re

    from r1serve.operator import constants as K

    spec = importlib.util.spec_from_file_location("bootstrap", ROOT / "bootstrap.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)

    args = _dockerfile_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [ray_pin] = [d for d in project["dependencies"] if d.startswith("ray[")]
    assert args["BASE"] == K.RAY_CPU_IMAGE
    assert re.search(r":(\d+\.\d+\.\d+)-", args["BASE"]).group(1) == ray_pin.split("==")[1]
    assert f"torch=={args['TORCH_VERSION']}" == bootstrap.TORCH
