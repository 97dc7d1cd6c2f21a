"""The generated stubs are in sync with protos/ (they are build outputs: regenerate and compare)."""

from __future__ import annotations

from pathlib import Path

from r1serve.protos import codegen

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_match_the_protos(tmp_path):
    fresh = codegen.generate(ROOT / "protos", tmp_path)
    assert fresh, "no stubs generated"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        installed = ROOT / relative
        assert installed.exists(), f"{relative} is missing: reinstall (pip install -e .) to regenerate the stubs"
        assert installed.read_text() == path.read_text(), f"{relative} is stale: reinstall to regenerate it"


def test_stubs_import_from_the_namespace():
    from r1serve.protos.r1serve.v1 import inference_pb2, inference_pb2_grpc

    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert service.full_name == "r1serve.v1.Inference"
    assert {m.name for m in service.methods} == {"Generate", "GenerateUnary", "GetModelInfo"}
    assert callable(inference_pb2_grpc.add_InferenceServicer_to_server)
