"""The operator as a child process signed in with a ServiceAccount's token, as in its pod."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .control_plane import SERVICE_ACCOUNT_ISSUER, die_with_parent


def service_account_token(cluster, namespace: str, name: str) -> str:
    """A token of the ServiceAccount, as the kubelet would mount it into the operator's pod."""
    request = {"spec": {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": 3600}}
    return cluster.core.create_namespaced_service_account_token(name, namespace, request).status.token


class Operator:
    """`python -m r1serve.operator` in a child process, with a kubeconfig holding only a token."""

    def __init__(self, kubeconfig: Path, workdir: Path, *argv: str) -> None:
        self.kubeconfig, self.workdir = kubeconfig, workdir
        self.argv = argv or ("--all-namespaces",)
        self.log = workdir / "operator.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Operator":
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONSAFEPATH": "1"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with self.log.open("a") as log:
            # cwd away from the repository, whose operator/ folder would shadow the stdlib module
            self.process = subprocess.Popen(
                [sys.executable, "-m", "r1serve.operator", *self.argv, "--liveness", ""],
                env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
