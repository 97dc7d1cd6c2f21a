"""Speculative decoding's acceptance rule as a pure function: greedy keeps exactly the main model's argmax
tokens; sampling keeps the main model's distribution whatever the draft distribution is."""

from __future__ import annotations

import pytest
import torch

from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.engine.speculative import accept_greedy, accept_sampled, draft_token, vocab_probs

# The 0.999 quantile of the chi-square distribution with 7 degrees of freedom (8 outcomes): a correct sampler
# fails one such check in a thousand seeds. The seeds are fixed, so the result does not change run to run.
CHI2_7_AT_0999 = 24.32
TRIALS = 20000


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_keeps_drafts_while_they_equal_the_argmax_then_takes_the_next_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 1.0, 4.0]])  # argmax 1, 0, 2
    assert accept_greedy(logits, [1, 0]) == [1, 0, 2]
    assert accept_greedy(logits, [1, 2]) == [1, 0]
    assert accept_greedy(logits, [2, 0]) == [1]
    with pytest.raises(ValueError, match="need logits at 3 positions for 2 draft tokens"):
        accept_greedy(logits[:2], [1, 0])


@pytest.mark.parametrize("k", [1, 2])
def test_each_token_kept_is_distributed_as_the_main_models_whatever_the_draft(k):
    gen = torch.Generator().manual_seed(1234 + k)
    p = torch.softmax(torch.randn(k + 1, 8, generator=gen) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, 8, generator=gen) * 1.5, dim=-1)  # a draft model that is often wrong
    first, later = torch.zeros(8), [torch.zeros(8) for _ in range(k)]
    for _ in range(TRIALS):
        drafts = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(k)]
        kept = accept_sampled(p, q, drafts, gen)
        assert 1 <= len(kept) <= k + 1
        first[kept[0]] += 1
        for j, token in enumerate(kept[1:]):
            later[j][token] += 1
    assert _chi_square(first, p[0]) < CHI2_7_AT_0999
    for j in range(k):  # given the tokens before it were kept, the next is distributed as p there
        assert later[j].sum() > 1000
        assert _chi_square(later[j], p[j + 1]) < CHI2_7_AT_0999


def test_a_draft_equal_to_the_main_model_is_always_kept():
    p = torch.softmax(torch.randn(2, 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    gen = torch.Generator().manual_seed(6)
    for _ in range(200):
        draft = int(torch.multinomial(p[0], 1, generator=gen))
        assert len(accept_sampled(p, p[:1], [draft], gen)) == 2


def test_a_seeded_request_repeats_its_draws():
    p = torch.softmax(torch.randn(2, 8, generator=torch.Generator().manual_seed(7)), dim=-1)
    q = torch.softmax(torch.randn(1, 8, generator=torch.Generator().manual_seed(8)), dim=-1)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(42)
        runs.append([accept_sampled(p, q, [int(torch.multinomial(q[0], 1, generator=gen))], gen) for _ in range(50)])
    assert runs[0] == runs[1]


def test_draft_tokens_follow_the_requests_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    assert draft_token(logits, SamplingParams(temperature=0), None) == (1, None)
    params = SamplingParams(temperature=1.0, top_k=2)
    probs = vocab_probs(logits[None], params)[0]
    assert probs[[0, 3, 4]].sum() == 0 and probs.sum() == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        token, q = draft_token(logits, params, gen)
        assert token in (1, 2) and torch.equal(q, probs)
