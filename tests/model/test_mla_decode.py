"""The paged MLA decode kernel against its torch reference (paged_mla_decode_torch).

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Inputs are fresh random each run; the seed is printed and named in every failure message.

Cache rows that no context covers (the tails of last blocks, blocks of no sequence, blocks that block
tables name past a context) hold NaN, so reading one as context fails the comparison.

float32: the kernel's dots are IEEE float32, asserted to rtol = atol = 1e-5. bfloat16: the kernel rounds
the softmax probabilities to bf16 before the value dot (as a tensor-core flash attention does), the
reference keeps them in float32; both round the output to bf16. Asserted:
|kernel - reference| <= BF16_BOUND * max|reference| element-wise, BF16_BOUND = 2**-6, i.e. 2 to 4 bf16
units in the last place of the largest output; 660 random cases of these shapes stayed under
0.008 * max|reference| (about one unit).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from r1serve.runtime.model import mla_decode

from .hopper import compile_for_hopper, triton_sites

needs_triton = pytest.mark.skipif(
    not mla_decode.HAVE_TRITON, reason="triton is not installed (pip install -e '.[test]' brings it)"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BF16_BOUND = 2**-6

# name -> (context lengths, block_size, heads H, latent C, rope R, num_splits). BLOCK_N is 32: with
# block_size 16 a tile spans two cache blocks.
CASES = {
    "empty batch": ([], 16, 4, 32, 8, None),
    "single token": ([37], 16, 4, 32, 8, None),
    # crossing blocks, ending mid-block, exactly one and four blocks, a single position
    "mixed lengths": ([50, 16, 1, 64, 33], 16, 4, 32, 8, None),
    "block_size 64, whole blocks": ([64, 128], 64, 4, 32, 8, 1),
    "block_size 64, mid-block": ([100, 5], 64, 4, 32, 8, 1),
    "block_size 1": ([7, 40], 1, 4, 32, 8, 1),
    "two splits": ([90, 33, 1], 16, 4, 32, 8, 2),
    # 40 positions are two tiles and 3 one tile: most of the 8 splits are empty, a context of 0 all of them
    "more splits than tiles": ([40, 3, 0], 16, 4, 32, 8, 8),
    "zero context, one split": ([0, 20], 16, 4, 32, 8, 1),
    "heads not a multiple of 16": ([45, 12], 16, 19, 32, 8, 2),
    "non-power-of-two C": ([29, 70], 16, 3, 24, 8, 3),
    "strided q and cache": ([21, 66], 16, 4, 32, 8, 2),
}


def make_inputs(case: str, dtype: torch.dtype, gen: torch.Generator) -> dict:
    lens, block_size, heads, latent, rope, num_splits = CASES[case]
    width = latent + rope
    blocks_needed = [-(-n // block_size) for n in lens]
    max_blocks = max(blocks_needed, default=0) + 1  # every table has entries past its context
    num_blocks = sum(blocks_needed) + 3  # and the cache has blocks of no sequence
    # Sequences own scattered blocks in shuffled order.
    owned = torch.randperm(num_blocks, generator=gen)[: sum(blocks_needed)].split(blocks_needed)
    block_tables = torch.randint(num_blocks, (len(lens), max_blocks), generator=gen, dtype=torch.int32)
    pad = 5 if case == "strided q and cache" else 0
    cache = torch.full((num_blocks * block_size, width + pad), float("nan"))
    for d, (n, blocks) in enumerate(zip(lens, owned)):
        block_tables[d, : len(blocks)] = blocks.to(torch.int32)
        positions = torch.arange(n)
        slots = blocks[positions // block_size] * block_size + positions % block_size
        cache[slots, :width] = torch.randn(n, width, generator=gen)
    # Scores of a few units: softmaxes between flat and peaked.
    q = 2 * torch.randn(len(lens), heads, width + pad, generator=gen)
    return {
        "q": q[..., :width].to(dtype).to(DEVICE),
        "cache": cache[:, :width].to(dtype).to(DEVICE),
        "block_tables": block_tables.to(DEVICE),
        "context_lens": torch.tensor(lens, dtype=torch.int32).to(DEVICE),
        "block_size": block_size,
        "kv_lora_rank": latent,
        "softmax_scale": width**-0.5,
    }, num_splits


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_paged_mla_decode_matches_reference(case, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs, num_splits = make_inputs(case, dtype, gen)

    expected = mla_decode.paged_mla_decode_torch(**inputs)
    got = mla_decode.paged_mla_decode(**inputs, num_splits=num_splits)

    q = inputs["q"]
    assert got.shape == (q.shape[0], q.shape[1], inputs["kv_lora_rank"]) == expected.shape, f"seed={seed}"
    assert got.dtype == dtype == expected.dtype, f"seed={seed}"
    assert not expected.isnan().any(), f"seed={seed}: the reference read a NaN row"
    empty = inputs["context_lens"] == 0
    assert (got[empty] == 0).all(), f"seed={seed}: a context of 0 gives zeros"
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}: {m}")
    elif expected.numel():
        scale = expected.float().abs().max()
        error = (got.float() - expected.float()).abs().max()
        assert error <= BF16_BOUND * scale, f"seed={seed}: max error {error:.3g} > {BF16_BOUND} x {scale:.3g}"


@needs_triton
def test_split_counts_agree(seed):
    # The merge is exact up to float32 rounding: any split count gives the one-split result.
    gen = torch.Generator().manual_seed(seed)
    inputs, _ = make_inputs("mixed lengths", torch.float32, gen)
    one = mla_decode.paged_mla_decode(**inputs, num_splits=1)
    for num_splits in (2, 3, 5):
        got = mla_decode.paged_mla_decode(**inputs, num_splits=num_splits)
        torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=num_splits: f"seed={seed}, {n} splits: {m}")


def test_default_num_splits():
    # One long sequence on a full model: the cap; a full decode batch already fills the GPU: none.
    assert mla_decode.default_num_splits(1, 128, 160 * 1024) == mla_decode.MAX_SPLITS
    assert mla_decode.default_num_splits(64, 128, 160 * 1024) == 1
    # Short contexts are not split below MIN_SPLIT_TOKENS per split.
    assert mla_decode.default_num_splits(1, 128, 512) == 2
    assert mla_decode.default_num_splits(1, 4, 64) == 1
    # Between: enough splits for about TARGET_PROGRAMS programs.
    assert mla_decode.default_num_splits(4, 128, 160 * 1024) == 9
    assert mla_decode.default_num_splits(0, 128, 4096) >= 1


BAD_ARGUMENTS = [
    ({"q": torch.zeros(2, 4, 40, 1)}, "q must be"),
    ({"cache": torch.zeros(64, 41)}, "cache must be"),
    ({"cache": torch.zeros(64, 40, dtype=torch.float64)}, "q and cache must share"),
    ({"kv_lora_rank": 41}, "kv_lora_rank"),
    ({"block_size": 0}, "block_size"),
    ({"block_tables": torch.zeros(1, 4, dtype=torch.int32)}, "block_tables must be"),
    ({"block_tables": torch.zeros(2, 4, dtype=torch.int64)}, "block_tables must be"),
    ({"context_lens": torch.zeros(2, dtype=torch.int64)}, "context_lens must be"),
    ({"context_lens": torch.ones(2, dtype=torch.int32, device="meta")}, "context_lens must be on q's device"),
]


@needs_triton
@pytest.mark.parametrize("bad, message", BAD_ARGUMENTS + [({"num_splits": 0}, "num_splits")])
def test_kernel_names_mismatched_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        mla_decode.paged_mla_decode(**{**valid_arguments(), **bad})


@pytest.mark.parametrize("bad, message", BAD_ARGUMENTS)
def test_reference_names_mismatched_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        mla_decode.paged_mla_decode_torch(**{**valid_arguments(), **bad})


def valid_arguments() -> dict:
    return {"q": torch.zeros(2, 4, 40), "cache": torch.zeros(64, 40),
            "block_tables": torch.zeros(2, 4, dtype=torch.int32), "context_lens": torch.ones(2, dtype=torch.int32),
            "block_size": 16, "kv_lora_rank": 32,
            "softmax_scale": 0.1}


def test_imports_without_triton(monkeypatch):
    # The serving install has no triton: the module must still import, say why the kernel cannot run,
    # and keep the torch reference.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("mla_decode_without_triton", mla_decode.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert not module.HAVE_TRITON
    args = (torch.zeros(1, 4, 40), torch.zeros(16, 40), torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), 16, 32, 0.1)
    with pytest.raises(RuntimeError, match="needs triton"):
        module.paged_mla_decode(*args)
    assert module.paged_mla_decode_torch(*args).shape == (1, 4, 32)


# Compiles both kernels for Hopper (sm_90, the H100/H200 the product targets) at the real model's sizes
# (H = 128 heads in blocks of 16, C = 512, R = 64, block_size 64) in both dtypes, without a GPU: the
# interpreter checks the arithmetic but not that Triton's compiler accepts the kernels. The shared memory
# they ask for must fit Hopper's 227 KiB per block, or the launch would fail.
COMPILE_FOR_HOPPER = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from r1serve.runtime.model import mla_decode as md

HOPPER_SHARED = 227 * 1024
options = {"num_warps": md.NUM_WARPS, "num_stages": md.NUM_STAGES}


def build(kernel, constexprs, pointers, opts):
    names = kernel.arg_names
    signature = {
        name: "constexpr" if name in constexprs else pointers[name] if name.endswith("_ptr")
        else "fp32" if name == "qk_scale" else "i32"
        for name in names
    }
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=opts)
    assert "cubin" in compiled.asm
    assert compiled.metadata.shared <= HOPPER_SHARED, (kernel.fn.__name__, compiled.metadata.shared)


for dtype, pointer in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
    blocks = {"BLOCK_H": md.BLOCK_H, "BLOCK_N": md.BLOCK_N, "BLOCK_C": 512, "BLOCK_R": 64, "BLOCK_SIZE": 64,
              **md.dot_options(dtype)}
    common = {"q_ptr": pointer, "cache_ptr": pointer, "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
              "lse_ptr": "*fp32"}
    # One split writes the output (q's dtype); several write float32 partials, then merge.
    build(md._decode_kernel, {**blocks, "NUM_SPLITS": 1}, {**common, "partial_ptr": pointer}, options)
    build(md._decode_kernel, {**blocks, "NUM_SPLITS": md.MAX_SPLITS}, {**common, "partial_ptr": "*fp32"}, options)
    build(md._merge_kernel, {"NUM_SPLITS": md.MAX_SPLITS, "BLOCK_S": md.MAX_SPLITS, "BLOCK_C": 512},
            {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": pointer}, {})
"""


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("site", triton_sites())
def test_kernels_compile_for_hopper(tmp_path, site):
    compile_for_hopper(COMPILE_FOR_HOPPER, tmp_path, site)
