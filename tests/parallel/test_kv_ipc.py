"""How cuda-ipc ranks name their GPU (they see every GPU of the node, so that a CUDA IPC handle's device number
means the same GPU in the prefill and the decode rank, and each picks the one Ray gave it), and how a prefill rank
holds what it lends (LentLatents, in-process: shared host memory stands in for a GPU's)."""

from __future__ import annotations

import time

import pytest
import torch

from r1serve.runtime.parallel.kv_ipc import SEE_EVERY_GPU, visible_device
from r1serve.runtime.parallel.transport import GlooLatents, IpcLatents, rank_runtime_env


@pytest.mark.parametrize(("gpu_ids", "visible", "device"), [
    (["3"], None, "cuda:3"),  # the node shows all its GPUs: Ray's number is the index
    ([3], None, "cuda:3"),
    (["5"], "4,5,6", "cuda:1"),  # the node was started with some GPUs: Ray numbers them as listed
    (["GPU-a1"], "GPU-0f, GPU-a1", "cuda:1"),
])
def test_a_rank_that_sees_every_gpu_runs_on_the_one_ray_gave_it(gpu_ids, visible, device):
    assert visible_device("cuda", gpu_ids, visible) == device


def test_cpu_ranks_and_ranks_without_gpus_keep_their_device():
    assert visible_device("cpu", [], None) == "cpu"
    assert visible_device("cuda", [], None) == "cuda"
    assert visible_device("cuda:2", ["0"], None) == "cuda:2"


def test_a_gpu_missing_from_the_visible_list_is_an_error_naming_the_connector():
    with pytest.raises(RuntimeError, match=r"kvTransfer.connector cuda-ipc: GPU 7 given to this rank is not among "
                                           r"the node's CUDA_VISIBLE_DEVICES \(0,1\)"):
        visible_device("cuda", ["7"], "0,1")


def test_only_cuda_ipc_ranks_with_gpus_see_every_gpu():
    ipc = IpcLatents(5.0)
    assert rank_runtime_env({"CPU": 1, "GPU": 1}, ipc) == {"env_vars": SEE_EVERY_GPU}
    assert rank_runtime_env({"CPU": 1}, ipc) is None
    assert rank_runtime_env({"CPU": 1, "GPU": 1}, GlooLatents(5.0)) is None
    assert rank_runtime_env({"CPU": 1, "GPU": 1}, None) is None


def _latents() -> torch.Tensor:
    return torch.arange(3 * 8 * 4, dtype=torch.float32).reshape(3, 8, 4)


def test_lent_latents_are_held_until_released_and_shared_once():
    from r1serve.runtime.parallel.kv_ipc import LentLatents, copy_shared

    lent = LentLatents(timeout_s=30.0)
    key = lent.park(_latents())
    assert lent.waiting_bytes() == 3 * 8 * 4 * 4
    handle = lent.share(key, start=5)
    assert torch.equal(copy_shared(handle), _latents()[:, 5:])
    assert lent.share(key) is None  # taken once
    assert lent.waiting_bytes() == 3 * 8 * 4 * 4  # lent until released
    lent.release(key)
    assert lent.waiting_bytes() == 0
    refused = lent.park(_latents())  # a decode rank that refuses the hand-off releases it unshared
    lent.release(refused)
    assert lent.waiting_bytes() == 0 and lent.share(refused) is None


def test_lent_latents_are_let_go_after_the_timeout_even_unreleased():
    from r1serve.runtime.parallel.kv_ipc import LentLatents

    lent = LentLatents(timeout_s=0.2)
    parked, shared = lent.park(_latents()), lent.park(_latents())
    assert lent.share(shared) is not None
    time.sleep(0.3)  # both deadlines have passed: nothing is asked of the clock but that
    assert lent.waiting_bytes() == 0
    assert lent.share(parked) is None
