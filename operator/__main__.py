"""`python -m r1serve.operator`: the operator's container entry point."""

import sys

from r1serve.operator.main import run_operator

sys.exit(run_operator(sys.argv[1:]))
