"""`r1serve operator`: command-line entry point that runs the kopf operator in this process."""

import argparse
import logging
import threading
from collections.abc import Sequence

from r1serve.operator import constants as K


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1serve operator",
        description="Run the r1serve Kubernetes operator (R1Deployment -> KubeRay RayService).")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch only this namespace (repeatable; globs allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default)")
    parser.add_argument("--default-image", metavar="IMAGE",
                        help="Ray pod image when an R1Deployment sets none "
                        "(env R1SERVE_DEFAULT_IMAGE; default ghcr.io/r1serve/r1serve:<version>[-gpu], "
                        "which the Dockerfile builds)")
    parser.add_argument("--liveness", metavar="URL",
                        default=f"http://0.0.0.0:{K.LIVENESS_PORT}{K.LIVENESS_PATH}",
                        help="kopf health endpoint for liveness/readiness probes ('' disables)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def run_operator(argv: Sequence[str] | None = None, *,
                 stop_flag: threading.Event | None = None,
                 ready_flag: threading.Event | None = None) -> int:
    """Run the operator until interrupted (or `stop_flag` is set); returns the exit code."""
    import dataclasses

    import kopf

    from r1serve.operator import handlers  # noqa: F401  (registers the handlers with kopf)
    from r1serve.operator.config import OperatorConfig

    args = _parser().parse_args(argv)
    config = OperatorConfig.from_env()
    if args.default_image:
        config = dataclasses.replace(config, default_image=args.default_image)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,  # one replica (Recreate): no peering objects to manage
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(config=config),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
    return 0
