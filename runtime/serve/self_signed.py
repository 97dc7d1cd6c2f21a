"""A self-signed certificate for trying `spec.api.tls` locally, and for the TLS tests and benchmark.

Needs `cryptography` (in the test and bench extras); production certificates come from a real CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from r1serve.spec.constants import TLS_CERT_FILE, TLS_KEY_FILE


def write_self_signed(folder: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> bytes:
    """Write folder/tls.crt and folder/tls.key for `hosts` (names or IP addresses) and return the
    certificate PEM, which a client passes as its trusted root. Each file is swapped in whole, as the
    kubelet updates a Secret volume, so a server watching the files never reads half of one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([_san(host) for host in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    for file, data in ((TLS_KEY_FILE, key_pem), (TLS_CERT_FILE, cert_pem)):
        (folder / f"{file}.new").write_bytes(data)
        os.replace(folder / f"{file}.new", folder / file)
    return cert_pem


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
