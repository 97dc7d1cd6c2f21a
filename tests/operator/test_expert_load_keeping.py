"""The operator keeps the expert load the replicas report (through the status board) in the ConfigMap the
R1Deployment owns: written when newer, merged with the pools that said nothing, never held only in memory."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import yaml

from r1serve.operator import handlers
from r1serve.spec import expert_load, load_r1deployment

TINY = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml").read_text())
OWNER = {"metadata": {"name": "tiny", "namespace": "default", "uid": "uid-7"}}


class FakeApi:
    def __init__(self):
        self.configmaps: dict[tuple[str, str], dict] = {}
        self.applied = 0

    def get_configmap(self, namespace, name):
        return copy.deepcopy(self.configmaps.get((namespace, name)))

    def apply(self, obj):
        self.applied += 1
        self.configmaps[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = copy.deepcopy(obj)
        return obj


def _scaling(**pools) -> dict:
    return {"pools": {pool: {"expertLoad": {"load": load, "replicas": 1, "at": at}} for pool, (load, at) in
                      pools.items()}}


def test_reported_load_is_written_once_per_report_and_a_silent_pool_keeps_its_entry():
    memo = types.SimpleNamespace(api=FakeApi(), expert_load_kept={})
    deployment = load_r1deployment(copy.deepcopy(TINY))
    decode, prefill = expert_load.encode({1: [1, 2]}), expert_load.encode({1: [2, 1]})
    handlers._keep_expert_load(memo, OWNER, deployment, _scaling(decode=(decode, 100.0), prefill=(prefill, 90.0)))
    handlers._keep_expert_load(memo, OWNER, deployment, _scaling(decode=(decode, 100.0)))  # nothing newer
    assert memo.api.applied == 1
    configmap = memo.api.configmaps[("default", "tiny-expert-load")]
    assert configmap["data"] == {"decode.json": decode, "prefill.json": prefill}
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == "uid-7"
    newer = expert_load.encode({1: [5, 1]})
    memo.expert_load_kept.clear()  # an operator restarted: the ConfigMap, not its memory, holds the load
    handlers._keep_expert_load(memo, OWNER, deployment, _scaling(decode=(newer, 200.0)))
    assert memo.api.configmaps[("default", "tiny-expert-load")]["data"] == {"decode.json": newer,
                                                                           "prefill.json": prefill}
    handlers._keep_expert_load(memo, OWNER, deployment, {"pools": {"decode": {"engine": {}}}})  # no load: no write
    assert memo.api.applied == 2
