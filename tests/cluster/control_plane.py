"""A real Kubernetes control plane for tests: etcd, kube-apiserver and (when present) kube-controller-manager
started from $KUBEBUILDER_ASSETS on free loopback ports, stopped exactly as started."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ASSETS_ENV = "KUBEBUILDER_ASSETS"
HOW_TO_GET = (
    f"set {ASSETS_ENV} to a folder holding etcd and kube-apiserver (and kube-controller-manager for "
    "garbage collection), e.g. what `setup-envtest use -p path` prints; .ci/run extracts them")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


def assets() -> Path | None:
    """The folder of the binaries, or None when $KUBEBUILDER_ASSETS does not name one with them."""
    folder = os.environ.get(ASSETS_ENV)
    if not folder:
        return None
    path = Path(folder)
    return path if all((path / name).is_file() for name in ("etcd", "kube-apiserver")) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_libc():
    with contextlib.suppress(Exception):
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    return None


# Loaded here, not in the child: after fork only async-signal-safe calls are safe, and the test
# process has threads by then.
_LIBC = _load_libc() if sys.platform == "linux" else None


def die_with_parent() -> None:
    """preexec_fn: a test run killed hard leaves no server or operator behind (Linux only)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def etcd_flags(etcd: Path, data: Path, client_port: int, peer_port: int) -> list[str]:
    """Flags for either etcd: the real one (as setup-envtest ships it) takes `--listen-*-urls` and
    wants `--advertise-client-urls`; a minimal embedded build takes the singular forms only."""
    shown = subprocess.run([str(etcd), "--help"], capture_output=True, text=True, timeout=30)
    help_text = shown.stdout + shown.stderr
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    if "listen-client-urls" in help_text:
        return [f"--data-dir={data}", f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}", f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=default={peer}"]
    return [f"--data-dir={data}", f"--listen-client-url={client}", f"--listen-peer-url={peer}"]


# --- Certificates: one CA signs the server's and the clients' certificates.

def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if organization:
        parts.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _certificate(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, cert: x509.Certificate | None = None, key=None) -> Path:
    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@dataclass
class Pki:
    """The CA, the API server's serving pair, client pairs and the service-account signing key."""

    folder: Path
    ca: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ca_key = _key()
        self._ca_name = _name("r1serve-test-ca")
        ca_cert = _certificate(self._ca_name, self._ca_key, self._ca_name, self._ca_key, ca=True)
        self.ca = _write_pem(self.folder / "ca.crt", ca_cert)
        sa_key = _key()
        self.sa_key = _write_pem(self.folder / "sa.key", key=sa_key)
        self.sa_pub = self.folder / "sa.pub"
        self.sa_pub.write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def pair(self, name: str, common: str, organization: str | None = None,
             server: bool = False) -> tuple[Path, Path]:
        key = _key()
        cert = _certificate(_name(common, organization), key, self._ca_name, self._ca_key,
                            server=server)
        return (_write_pem(self.folder / f"{name}.crt", cert),
                _write_pem(self.folder / f"{name}.key", key=key))


def write_kubeconfig(path: Path, server: str, ca: Path, *, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None) -> Path:
    user: dict = {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    import yaml

    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    path.chmod(0o600)
    return path


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback, as up.sh starts them.

    No scheduler and no kubelet: Pods are accepted and stay Pending.
    """

    def __init__(self, folder: Path, binaries: Path, *, controller_manager: bool = True) -> None:
        self.folder, self.binaries = folder, binaries
        self.with_controller_manager = controller_manager and (binaries / "kube-controller-manager").is_file()
        self.processes: list[subprocess.Popen] = []
        self.api_port = free_port()
        self.url = f"https://127.0.0.1:{self.api_port}"

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.folder / "logs" / f"{name}.log").open("ab")
        process = subprocess.Popen([str(self.binaries / name), *args], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=die_with_parent)
        log.close()
        self.processes.append(process)
        return process

    def _wait(self, what: str, process: subprocess.Popen, url: str, context: ssl.SSLContext | None,
              timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}:\n{self.log_tail(what)}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not become healthy in {timeout:.0f} s:\n{self.log_tail(what)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.folder / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def start(self) -> "ControlPlane":
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        pki = self.pki = Pki(self.folder / "pki")
        serving = pki.pair("apiserver", "kube-apiserver", server=True)
        self.admin = pki.pair("admin", "admin", organization="system:masters")
        try:
            self._start_all(pki, serving)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_all(self, pki: Pki, serving: tuple[Path, Path]) -> None:
        etcd_port, peer_port = free_port(), free_port()
        etcd = self._start("etcd", *etcd_flags(self.binaries / "etcd", self.folder / "etcd",
                                                etcd_port, peer_port))
        self._wait("etcd", etcd, f"http://127.0.0.1:{etcd_port}/health", None)
        apiserver = self._start(
            "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}", f"--tls-cert-file={serving[0]}",
            f"--tls-private-key-file={serving[1]}", f"--client-ca-file={pki.ca}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}", "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            f"--cert-dir={self.folder / 'pki' / 'generated'}", "--profiling=false", "--v=1")
        admin = ssl.create_default_context(cafile=str(pki.ca))
        admin.load_cert_chain(*map(str, self.admin))
        self._wait("kube-apiserver", apiserver, f"{self.url}/readyz", admin)
        self.kubeconfig = write_kubeconfig(self.folder / "kubeconfig", self.url, pki.ca,
                                           cert=self.admin[0], key=self.admin[1])
        if self.with_controller_manager:
            kcm = pki.pair("kcm", "system:kube-controller-manager")
            kcm_config = write_kubeconfig(self.folder / "kcm.kubeconfig", self.url, pki.ca,
                                          cert=kcm[0], key=kcm[1])
            port = free_port()
            process = self._start(
                "kube-controller-manager", f"--kubeconfig={kcm_config}",
                f"--authentication-kubeconfig={kcm_config}",
                f"--authorization-kubeconfig={kcm_config}", "--bind-address=127.0.0.1",
                f"--secure-port={port}", f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca}", "--use-service-account-credentials=true",
                "--service-cluster-ip-range=10.0.0.0/24", "--leader-elect=false", "--v=1")
            insecure = ssl.create_default_context()
            insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
            self._wait("kube-controller-manager", process, f"https://127.0.0.1:{port}/healthz",
                       insecure)

    def stop(self, grace_s: float = 3.0) -> None:
        """TERM each process, KILL what lingers: the API server would otherwise drain open
        watches for many seconds, and nothing of this throwaway cluster needs keeping."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """An API client as the cluster admin, or as whoever `token` belongs to."""
        config = kubernetes.client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self.pki.ca)
        if token:
            config.api_key = {"authorization": f"Bearer {token}"}
        else:
            config.cert_file, config.key_file = map(str, self.admin)
        return kubernetes.client.ApiClient(config)

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        return write_kubeconfig(path, self.url, self.pki.ca, token=token)
