"""The fused MoE Triton kernels against the torch path (RoutedExperts.forward), the reference.

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Inputs are fresh random each run; the seed is printed and named in every failure message.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from r1serve.runtime.model import fused_moe
from r1serve.runtime.model.moe import RoutedExperts
from r1serve.runtime.model.tiny import tiny_config

from .hopper import compile_for_hopper, triton_sites

needs_triton = pytest.mark.skipif(
    not fused_moe.HAVE_TRITON, reason="triton is not installed (pip install -e '.[test]' brings it)"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Hidden 48 and intermediate 40 are not multiples of any tile's block_n or block_k, so the masked edges
# are exercised.
HIDDEN, INTERMEDIATE = 48, 40

# name -> (token copies, slots, which slots receive copies)
CASES = {
    "empty batch": (0, 4, None),
    "single token": (1, 4, None),
    "slots with no tokens": (23, 6, [1, 4]),
    # 3 x 37 copies: each slot spans two blocks of the middle tiles with a partial last one, and the torch
    # path takes its contiguous (per-expert loop) branch rather than the padded bmm.
    "many tokens per slot": (111, 3, None),
    # 2 x 150 copies: prefill-sized, the biggest tiles.
    "prefill-sized": (300, 2, None),
}

# bf16: the torch path rounds gate, up, silu(gate) * up and the output to bf16, the kernel only the
# intermediate activation and the output, so the two differ by a few roundings. Asserted:
# |fused - torch| <= 2**-5 * max|torch| element-wise, i.e. at most 4 bf16 units in the last place of the
# largest output; 930 random cases of these shapes stayed under 0.018 * max|torch|.
BF16_BOUND = 2**-5


def make_experts(num_slots: int, dtype: torch.dtype, gen: torch.Generator) -> RoutedExperts:
    config = tiny_config({"hidden_size": HIDDEN, "moe_intermediate_size": INTERMEDIATE,
                          "n_routed_experts": num_slots, "n_group": 1, "topk_group": 1,
                          "num_experts_per_tok": 1})
    experts = RoutedExperts(config, range(num_slots), dtype, DEVICE)
    # Scaled so that gate/up and the outputs are O(1), as in a trained model.
    experts.w13.copy_(torch.randn(experts.w13.shape, generator=gen) / HIDDEN**0.5)
    experts.w2.copy_(torch.randn(experts.w2.shape, generator=gen) / INTERMEDIATE**0.5)
    return experts


def make_inputs(case: str, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    n, num_slots, used = CASES[case]
    x = torch.randn(n, HIDDEN, generator=gen).to(dtype)
    if case in ("many tokens per slot", "prefill-sized"):
        slots = torch.arange(num_slots).repeat_interleave(n // num_slots)[torch.randperm(n, generator=gen)]
    else:
        choices = torch.tensor(used if used is not None else range(num_slots))
        slots = choices[torch.randint(len(choices), (n,), generator=gen)]
    return x.to(DEVICE), slots.to(DEVICE), num_slots


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_fused_experts_matches_torch_path(case, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, slots, num_slots = make_inputs(case, dtype, gen)
    experts = make_experts(num_slots, dtype, gen)

    expected = experts(x, slots)
    got = fused_moe.fused_experts(x, slots, experts.w13, experts.w2, experts.intermediate)

    assert got.shape == expected.shape and got.dtype == expected.dtype, f"seed={seed}"
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}: {m}")
    else:
        scale = expected.float().abs().max() if expected.numel() else torch.tensor(0.0)
        error = (got.float() - expected.float()).abs().max() if expected.numel() else torch.tensor(0.0)
        assert error <= BF16_BOUND * scale, f"seed={seed}: max error {error:.3g} > {BF16_BOUND} x {scale:.3g}"


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_to_blocks_groups_each_slot_in_whole_blocks(block_m, seed):
    gen = torch.Generator().manual_seed(seed)
    num_slots = 7
    slots = torch.randint(num_slots, (50,), generator=gen)
    slots[slots == 3] = 2  # a slot with no tokens

    sorted_ids, block_slot = fused_moe.align_to_blocks(slots, num_slots, block_m)

    counts = torch.bincount(slots, minlength=num_slots)
    used = [s for s in range(num_slots) for _ in range(-(-int(counts[s]) // block_m))]
    # The launch size depends only on the number of copies and slots (no wait on the device); the spare
    # blocks after the used ones are marked -1 and hold only padding.
    assert block_slot.tolist() == used + [-1] * (len(block_slot) - len(used)), f"seed={seed}"
    assert (sorted_ids.view(-1, block_m)[len(used):] == len(slots)).all(), f"seed={seed}"
    real = sorted_ids[sorted_ids < len(slots)].long()
    assert sorted(real.tolist()) == list(range(len(slots))), f"seed={seed}: every copy exactly once"
    rows = sorted_ids.view(-1, block_m).long()
    for block, slot in zip(rows, block_slot.tolist()):
        copies = block[block < len(slots)]
        assert (slots[copies] == slot).all(), f"seed={seed}: a block mixes slots"
        assert torch.equal(copies, copies.sort().values), f"seed={seed}: copies keep their order within a slot"


def test_imports_without_triton(monkeypatch):
    # The serving install has no triton: the module must still import, and say why it cannot run.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("fused_moe_without_triton", fused_moe.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)

    assert not module.HAVE_TRITON
    with pytest.raises(RuntimeError, match="needs triton"):
        module.fused_experts(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), torch.zeros(1, 8, 4),
                             torch.zeros(1, 4, 4))


# Compiles both kernels for Hopper (sm_90, the H100/H200 the product targets) in both dtypes, without a
# GPU: the interpreter checks the arithmetic but not that Triton's compiler accepts the kernels.
COMPILE_FOR_HOPPER = """
import itertools
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from r1serve.runtime.model import fused_moe as fm

HOPPER_SHARED = 227 * 1024
dtypes = ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32"))
for (dtype, pointer), tiles, kernel in itertools.product(dtypes, fm.ALL_TILES, (fm._gate_up_kernel, fm._down_kernel)):
    constexprs = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k,
                  **fm.dot_options(dtype)}
    names = kernel.arg_names
    signature = {
        name: "constexpr" if name in constexprs else "*i32" if name in ("sorted_ids_ptr", "block_slot_ptr")
        else pointer if name.endswith("_ptr") else "i32"
        for name in names
    }
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert "cubin" in compiled.asm
    assert compiled.metadata.shared <= HOPPER_SHARED, (kernel.fn.__name__, tiles, dtype, compiled.metadata.shared)
"""


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("site", triton_sites())
def test_kernels_compile_for_hopper(tmp_path, site):
    compile_for_hopper(COMPILE_FOR_HOPPER, tmp_path, site)
