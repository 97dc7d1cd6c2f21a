"""Sampler: greedy rows, each filter on its own, per-row seeds and what can never be drawn."""

from __future__ import annotations

import pytest
import torch

from r1serve.runtime.engine.sampler import filtered_probs, make_generator, sample
from r1serve.runtime.engine.sampling import SamplingParams

VOCAB = 64


def random_logits(batch: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int | None = None) -> list[int]:
    """n single-row samples; with a seed, one generator across them, as a request owns one."""
    generator = make_generator(seed)
    return [int(sample(logits[None], [params], [generator])[0]) for _ in range(n)]


def test_greedy_is_argmax_for_any_dtype():
    logits = random_logits(8)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = sample(logits.to(dtype), [SamplingParams(temperature=0)] * 8, [None] * 8)
        assert out.dtype == torch.long and out.shape == (8,)
        assert torch.equal(out, logits.to(dtype).argmax(-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
        SamplingParams(temperature=1e-4),  # sharp enough that only the argmax has mass
        SamplingParams(temperature=2.0, top_k=1, top_p=0.5),
    ],
    ids=["top_k=1", "tiny-top_p", "min_p=1", "cold", "combined"],
)
def test_filters_that_leave_one_token_equal_greedy(params):
    logits = random_logits(16, seed=1)
    for _ in range(5):
        out = sample(logits, [params] * 16, [None] * 16)
        assert torch.equal(out, logits.argmax(-1))


def test_mixed_batch_greedy_rows_unaffected():
    logits = random_logits(6, seed=2)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=5),
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.3, seed=1),
        SamplingParams(min_p=0.2),
        SamplingParams(temperature=0),
    ]
    generators = [make_generator(p.seed) for p in params]
    out = sample(logits, params, generators)
    greedy = [0, 2, 5]
    assert torch.equal(out[greedy], logits[greedy].argmax(-1))
    assert ((out >= 0) & (out < VOCAB)).all()


def test_seeded_row_is_reproducible_and_independent_of_batch():
    flat = torch.zeros(VOCAB)
    params = SamplingParams(seed=1234, top_p=0.99)
    alone = draws(flat, params, 50, seed=1234)
    assert alone == draws(flat, params, 50, seed=1234)
    # The same request beside different neighbours, some seeded, some not, in another row.
    generator = make_generator(1234)
    neighbours = [SamplingParams(top_k=3), SamplingParams(seed=9), SamplingParams(temperature=0)]
    in_batch = []
    for step in range(50):
        logits = random_logits(4, seed=step)
        logits[2] = flat
        batch = [neighbours[0], neighbours[1], params, neighbours[2]]
        gens = [None, make_generator(9 + step), generator, None]
        in_batch.append(int(sample(logits, batch, gens)[2]))
    assert in_batch == alone


def test_different_seeds_differ():
    flat = torch.zeros(VOCAB)
    sequences = {tuple(draws(flat, SamplingParams(seed=s), 50, seed=s)) for s in range(5)}
    assert len(sequences) == 5


def test_unseeded_rows_use_the_global_generator():
    flat = torch.zeros(2, VOCAB)
    torch.manual_seed(0)
    first = sample(flat, [SamplingParams()] * 2, [None, None])
    torch.manual_seed(0)
    assert torch.equal(sample(flat, [SamplingParams()] * 2, [None, None]), first)


def crafted_logits() -> torch.Tensor:
    """Ten tokens with probabilities 0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.04, 0.02, 0.006, 0.004."""
    probs = torch.tensor([0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.04, 0.02, 0.006, 0.004])
    perm = torch.tensor([7, 2, 9, 0, 5, 3, 8, 1, 6, 4])  # scatter so the ordering is not the id order
    logits = torch.full((10,), -1.0)
    logits[perm] = probs.log()
    return logits, perm


@pytest.mark.parametrize(
    "params, allowed_ranks",
    [
        (SamplingParams(top_k=3), {0, 1, 2}),
        # Values sit between cumulative sums so float rounding cannot move the cut.
        (SamplingParams(top_p=0.65), {0, 1, 2}),  # 0.30+0.25 < 0.65, adding 0.15 passes it
        (SamplingParams(top_p=0.5), {0, 1}),  # 0.30 < 0.5: the second token still starts below p
        (SamplingParams(min_p=0.45), {0, 1, 2}),  # 0.15 >= 0.45 * 0.30, 0.10 is not
        (SamplingParams(top_k=4, min_p=0.4), {0, 1, 2}),
        (SamplingParams(top_p=0.95, top_k=8), {0, 1, 2, 3, 4, 5, 6}),
        (SamplingParams(), set(range(10))),
    ],
    ids=["top_k", "top_p", "top_p-edge", "min_p", "top_k+min_p", "top_p+top_k", "none"],
)
def test_filtered_tokens_are_never_drawn(params, allowed_ranks):
    logits, perm = crafted_logits()
    allowed = {int(perm[r]) for r in allowed_ranks}
    generator = make_generator(0)
    batch = logits.expand(4000, -1)
    out = sample(batch, [params] * 4000, [None] * 4000)
    seen = set(out.tolist())
    assert seen <= allowed
    # Every kept token is actually reachable (the rarest kept one has >= 4% of the kept mass here).
    if len(allowed) < 10:
        assert seen == allowed
    single = {int(sample(logits[None], [params], [generator])[0]) for _ in range(300)}
    assert single <= allowed


def test_kept_probabilities_are_renormalised():
    logits, perm = crafted_logits()
    probs, order = filtered_probs(logits[None], [SamplingParams(top_k=2)])
    assert order is not None and order[0, :2].tolist() == perm[:2].tolist()
    assert torch.allclose(probs[0, :2], torch.tensor([0.30, 0.25]) / 0.55)
    assert probs[0, 2:].sum() == 0


def test_rows_with_different_filters_in_one_batch():
    logits, perm = crafted_logits()
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.5), SamplingParams(min_p=0.45), SamplingParams()]
    out = sample(logits.expand(4, -1).repeat(500, 1), params * 500, [None] * 2000).view(500, 4)
    assert set(out[:, 0].tolist()) == {int(perm[0])}
    assert set(out[:, 1].tolist()) <= {int(perm[0]), int(perm[1])}
    assert set(out[:, 2].tolist()) <= {int(p) for p in perm[:3]}
    assert len(set(out[:, 3].tolist())) > 3


def test_temperature_extremes():
    logits, perm = crafted_logits()
    hot = sample(logits.expand(5000, -1), [SamplingParams(temperature=100)] * 5000, [None] * 5000)
    counts = torch.bincount(hot, minlength=10).float() / 5000
    assert counts.min() > 0.06 and counts.max() < 0.14  # nearly uniform over all ten
    cold = sample(logits.expand(100, -1), [SamplingParams(temperature=1e-3)] * 100, [None] * 100)
    assert set(cold.tolist()) == {int(perm[0])}


def test_masked_logits_are_never_drawn():
    logits = torch.zeros(1000, VOCAB)
    logits[:, 10:] = float("-inf")
    out = sample(logits, [SamplingParams(top_p=0.9)] * 500 + [SamplingParams()] * 500, [None] * 1000)
    assert out.max() < 10


def test_shape_errors():
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row"):
        sample(torch.zeros(2, 4), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.zeros(4), [SamplingParams()], [None])


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
