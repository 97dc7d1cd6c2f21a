"""Build hook: compiles protos/*.proto into r1serve/protos/ before the Python files are collected.

Everything else about the distribution is declared in pyproject.toml. The stubs are written into the
source tree, so regular, editable and sdist-based builds all find them where the package expects them.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def _generate_stubs() -> None:
    spec = importlib.util.spec_from_file_location("_r1serve_codegen", ROOT / "r1serve" / "protos" / "codegen.py")
    codegen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    codegen.generate(ROOT / "protos", ROOT)


class BuildPyWithProtos(build_py):
    def run(self):
        _generate_stubs()
        super().run()


class SdistWithProtos(sdist):
    def run(self):
        _generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
