"""The operator's one door to the Kubernetes API: the handful of calls its handlers make."""

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from r1serve.operator import constants as K

_APPLY = "application/apply-patch+yaml"
# Custom resources accept no strategic merge patch; the client would default to it.
_MERGE = "application/merge-patch+json"
_JSON_PATCH = "application/json-patch+json"
_PLURALS = {"RayService": K.RAYSERVICES}


class KubeApi:
    """The handful of calls the operator makes, through the blocking kubernetes client.

    kopf runs the (sync) handlers in its thread pool, so blocking here is fine.
    """

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)

    @classmethod
    def from_environment(cls) -> "KubeApi":
        """In-cluster service-account credentials, else $KUBECONFIG / ~/.kube/config."""
        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                               client_configuration=config)
        config.connection_pool_maxsize = 32
        return cls(kubernetes.client.ApiClient(config))

    def close(self) -> None:
        self.client.close()

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: creates or updates, owns exactly the rendered fields, and leaves
        an unchanged object untouched (no new resourceVersion, nothing for KubeRay to do)."""
        meta = obj["metadata"]
        options = {"field_manager": K.FIELD_MANAGER, "force": True, "_content_type": _APPLY}
        if obj["kind"] == "Service":
            result = self.core.patch_namespaced_service(meta["name"], meta["namespace"], obj,
                                                        **options)
            return self.client.sanitize_for_serialization(result)
        if obj["kind"] == "ConfigMap":
            result = self.core.patch_namespaced_config_map(meta["name"], meta["namespace"], obj,
                                                           **options)
            return self.client.sanitize_for_serialization(result)
        group, version = obj["apiVersion"].split("/")
        # Raw response: the client maps only 200 to a body, but an apply that creates answers 201.
        response = self.custom.patch_namespaced_custom_object(
            group, version, meta["namespace"], _PLURALS[obj["kind"]], meta["name"], obj,
            _preload_content=False, **options)
        return json.loads(response.data)

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.client.sanitize_for_serialization(self.core.read_namespaced_config_map(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_r1deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(K.R1D_GROUP, K.R1D_VERSION, namespace, K.R1D_PLURAL, name)

    def find_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The RayService called `name`, by list: the role grants no get on RayServices (their
        watch brings every change)."""
        found = self.custom.list_namespaced_custom_object(
            K.RAY_GROUP, K.RAY_VERSION, namespace, K.RAYSERVICES,
            field_selector=f"metadata.name={name}")
        return next((item for item in found.get("items") or []
                     if (item.get("metadata") or {}).get("name") == name), None)

    def get_raycluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(K.RAY_GROUP, K.RAY_VERSION, namespace, K.RAYCLUSTERS, name)

    def json_patch_raycluster(self, namespace: str, name: str,
                              operations: Sequence[Mapping[str, Any]]) -> None:
        """An RFC 6902 patch: unlike a merge patch it can address one list item, and its `test`
        operations make the server refuse it (422) when the list moved since it was read."""
        self.custom.patch_namespaced_custom_object(
            K.RAY_GROUP, K.RAY_VERSION, namespace, K.RAYCLUSTERS, name,
            [dict(op) for op in operations], _content_type=_JSON_PATCH)

    def _get(self, group: str, version: str, namespace: str, plural: str,
             name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_pods(self, namespace: str, cluster: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=f"{K.KUBERAY_CLUSTER_LABEL}={cluster}")
        items = self.client.sanitize_for_serialization(pods).get("items") or []
        # The selector is the server's job; re-checking keeps us right with servers that ignore it.
        return [p for p in items
                if (p.get("metadata") or {}).get("labels", {}).get(K.KUBERAY_CLUSTER_LABEL) == cluster]

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            K.R1D_GROUP, K.R1D_VERSION, namespace, K.R1D_PLURAL, name, {"status": dict(status)},
            _content_type=_MERGE)
