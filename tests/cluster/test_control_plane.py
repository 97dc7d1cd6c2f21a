"""The test control plane starts either etcd: the real one's flags, or a minimal build's."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from .control_plane import etcd_flags

REAL_HELP = "Usage:\n  etcd [flags]\n  --listen-client-urls 'http://localhost:2379'\n"
MINIMAL_HELP = "Usage of etcd:\n  -listen-client-url string\n  -listen-peer-url string\n"


@pytest.mark.parametrize("help_text, stream, expected", [
    (REAL_HELP, "1", ["--data-dir=/d", "--listen-client-urls=http://127.0.0.1:1",
                      "--advertise-client-urls=http://127.0.0.1:1",
                      "--listen-peer-urls=http://127.0.0.1:2",
                      "--initial-advertise-peer-urls=http://127.0.0.1:2",
                      "--initial-cluster=default=http://127.0.0.1:2"]),
    (MINIMAL_HELP, "2", ["--data-dir=/d", "--listen-client-url=http://127.0.0.1:1",
                         "--listen-peer-url=http://127.0.0.1:2"]),
], ids=["real", "minimal"])
def test_etcd_flags_follow_the_binary(tmp_path, help_text, stream, expected):
    etcd = tmp_path / "etcd"
    etcd.write_text(f"#!/bin/sh\ncat >&{stream} <<'HELP'\n{help_text}HELP\n")
    etcd.chmod(etcd.stat().st_mode | stat.S_IXUSR)
    assert etcd_flags(etcd, Path("/d"), 1, 2) == expected
