"""The operator stays light: importing it pulls in neither torch nor ray."""

import subprocess
import sys

MODULES = ["r1serve.operator.handlers", "r1serve.operator.main", "r1serve.operator.render",
           "r1serve.operator.status", "r1serve.operator.manifests", "r1serve.spec.serve_config",
           "r1serve.spec.crd", "r1serve.spec.crd_rules"]


def test_operator_imports_neither_torch_nor_ray(tmp_path):
    code = (f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))\n"
            "assert not heavy, heavy\n")
    # Outside the checkout, so the repository's operator/ folder cannot shadow anything.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
