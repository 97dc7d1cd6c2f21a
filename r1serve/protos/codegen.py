"""Compiles protos/**/*.proto into Python stubs under r1serve/protos/; used by setup.py and by the sync test.

Kept free of r1serve imports: setup.py loads this file by path before the package is installed.
"""

from __future__ import annotations

from pathlib import Path

# protoc sees protos/ as r1serve/protos/, so generated stubs import each other from that namespace
# and .proto files import one another by the same path.
VIRTUAL_ROOT = "r1serve/protos"


def proto_files(proto_root: Path) -> list[str]:
    """The .proto files under proto_root, as protoc's virtual paths."""
    return sorted(f"{VIRTUAL_ROOT}/{p.relative_to(proto_root).as_posix()}" for p in proto_root.rglob("*.proto"))


def generate(proto_root: Path, out_root: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto into out_root/r1serve/protos/...

    Returns the generated files. Raises RuntimeError with protoc's exit status when it fails.
    """
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files(proto_root)
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root}")
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{VIRTUAL_ROOT}={proto_root}", f"-I{well_known}",
            f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *protos]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}: {' '.join(args)}")
    return sorted(p for p in (out_root / VIRTUAL_ROOT).rglob("*_pb2*.py*"))
