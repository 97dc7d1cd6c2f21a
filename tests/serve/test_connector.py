"""Which KV connector a replica uses (runtime/serve/connector.py): `auto` resolved by where the pools run, and
no named connector that cannot work here silently replaced by another."""

from __future__ import annotations

import pytest

from r1serve.runtime.serve import connector
from r1serve.runtime.serve.connector import DirectConnector, ObjectStoreConnector, make_connector, resolve_connector
from r1serve.spec import R1Deployment

from .conftest import tiny_doc


@pytest.mark.parametrize("nixl", [True, False])
def test_auto_is_gloo_on_cpus_and_nixl_where_importable_on_gpus(monkeypatch, nixl):
    monkeypatch.setattr(connector, "nixl_importable", lambda: nixl)
    assert resolve_connector("auto", gpus=False) == "gloo"
    assert resolve_connector("auto", gpus=True) == ("nixl" if nixl else "object-store")


def test_a_named_connector_that_cannot_work_here_is_an_error_naming_the_field(monkeypatch):
    monkeypatch.setattr(connector, "nixl_importable", lambda: False)
    with pytest.raises(RuntimeError, match=r"spec.kvTransfer.connector: nixl needs the nixl package"):
        resolve_connector("nixl", gpus=True)
    with pytest.raises(RuntimeError, match=r"spec.kvTransfer.connector: gloo moves host memory between CPU pools"):
        resolve_connector("gloo", gpus=True)
    with pytest.raises(RuntimeError, match=r"spec.kvTransfer.connector: nccl cannot be used here"):
        resolve_connector("nccl", gpus=True)
    with pytest.raises(RuntimeError, match=r"spec.kvTransfer.connector: cuda-ipc shares GPU memory; pools on CPUs"):
        resolve_connector("cuda-ipc", gpus=False)
    assert resolve_connector("cuda-ipc", gpus=True) == "cuda-ipc"  # never substituted


@pytest.mark.parametrize(("wanted", "kind", "name"), [
    ("object-store", ObjectStoreConnector, "object-store"),
    ("gloo", DirectConnector, "gloo"),
    ("auto", DirectConnector, "gloo"),  # the tiny deployment's pools run on CPUs
])
def test_the_replica_builds_the_connector_the_deployment_names(wanted, kind, name):
    deployment = R1Deployment.model_validate(tiny_doc(kvTransfer={"connector": wanted}))
    built = make_connector(deployment)
    assert (type(built), built.name) == (kind, name)


def test_cuda_ipc_is_refused_when_the_replica_finds_more_than_one_machine(monkeypatch):
    doc = tiny_doc(kvTransfer={"connector": "cuda-ipc"})
    for pool in ("prefill", "decode"):
        doc["spec"][pool]["gpusPerRank"] = 1
    deployment = R1Deployment.model_validate(doc)
    monkeypatch.setattr(connector, "alive_nodes", lambda: 1)
    built = make_connector(deployment)
    assert (type(built), built.name) == (DirectConnector, "cuda-ipc")
    monkeypatch.setattr(connector, "alive_nodes", lambda: 3)
    with pytest.raises(RuntimeError, match=r"spec.kvTransfer.connector: cuda-ipc shares GPU memory on one machine, "
                                           r"and this Ray cluster has 3 nodes"):
        make_connector(deployment)
