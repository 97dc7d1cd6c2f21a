"""Installing the operator from manifests/ as the documentation says, on a fresh API server."""

from __future__ import annotations

import itertools

import kubernetes
import yaml

from r1serve.operator.manifests import NAMESPACE

from .conftest import DOCUMENTED, MANIFESTS


def test_every_install_file_creates_its_namespace_before_using_it():
    # `kubectl apply -f manifests/` reads the files alphabetically and `-f a -f b` in the order
    # given: whichever file comes first must not need a namespace that a later one creates.
    files = sorted(MANIFESTS.glob("*.yaml"))
    assert {path.name for path in files} == set(DOCUMENTED)
    for order in itertools.permutations(files):
        created: set[str] = set()
        for path in order:
            for doc in yaml.safe_load_all(path.read_text()):
                if doc["kind"] == "Namespace":
                    created.add(doc["metadata"]["name"])
                namespace = doc["metadata"].get("namespace")
                assert namespace is None or namespace in created, (
                    f"{path.name}: {doc['kind']} {doc['metadata']['name']} needs namespace "
                    f"{namespace}, created later in the order {[p.name for p in order]}")


def test_the_documented_install_works_on_a_fresh_cluster(operator_install):
    # The session's first install happened in the fixture, on a cluster that had never seen it.
    assert operator_install["fresh"], "the namespace existed before the install"
    kinds = [(obj["kind"], obj["metadata"]["name"]) for obj in operator_install["applied"]]
    assert ("Namespace", NAMESPACE) in kinds and ("Deployment", "r1serve-operator") in kinds


def test_the_operator_namespace_enforces_pod_security_restricted(cluster, operator_install):
    namespace = cluster.core.read_namespace(NAMESPACE)
    assert namespace.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # The Deployment was admitted; its pod template passes "restricted" when created as a Pod.
    apps = kubernetes.client.AppsV1Api(cluster.api)
    template = cluster.api.sanitize_for_serialization(
        apps.read_namespaced_deployment("r1serve-operator", NAMESPACE).spec.template)
    assert cluster.pod_refusal(NAMESPACE, "operator-dry-run", template) is None


def test_reapplying_the_install_changes_nothing(cluster, operator_install):
    def versions(objects):
        # generation where the kind has one (a CRD's status moves its resourceVersion on its own)
        return {(o["kind"], o["metadata"]["name"]):
                o["metadata"].get("generation") or o["metadata"]["resourceVersion"] for o in objects}

    before = versions(operator_install["applied"])
    assert versions(cluster.apply_files(*(MANIFESTS / name for name in DOCUMENTED))) == before
