"""Continuous batching decisions on plain data: budgets, chunking, FCFS waiting and preemption."""

from __future__ import annotations

from r1serve.runtime.engine.block_manager import BlockManager
from r1serve.runtime.engine.scheduler import Scheduler, SchedulerConfig
from r1serve.runtime.engine.sequence import Sequence


def _run_step(sched: Scheduler, next_token: int = 7):
    """What the engine does around the model: account computed tokens, append sampled ones."""
    chunks = sched.schedule()
    for c in chunks:
        completes = c.completes
        c.seq.num_computed_tokens += c.num_tokens
        sched.blocks.commit(c.seq)
        if completes:
            c.seq.token_ids.append(next_token)
    return chunks


def _scheduler(num_blocks=64, block_size=4, budget=32, max_running=8) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_running), BlockManager(num_blocks, block_size))


def test_long_prompt_is_chunked_and_decodes_keep_running():
    sched = _scheduler(budget=16)
    short = Sequence("short", [1, 2, 3], 3)
    sched.add(short)
    _run_step(sched)
    long = Sequence("long", list(range(100, 150)), 50)
    sched.add(long)
    sizes = []
    while long.num_computed_tokens < 50:
        chunks = _run_step(sched)
        assert sum(c.num_tokens for c in chunks) <= 16
        assert any(c.seq is short for c in chunks), "the decode must not stall behind the long prompt"
        sizes.append(next(c.num_tokens for c in chunks if c.seq is long))
    assert sizes == [15, 15, 15, 5]


def test_max_running_caps_admission_and_the_rest_wait_in_order():
    sched = _scheduler(max_running=2)
    seqs = [Sequence(f"r{i}", [i + 1] * 3, 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    _run_step(sched)
    assert sched.running == seqs[:2] and list(sched.waiting) == seqs[2:]
    sched.remove(seqs[0])
    _run_step(sched)
    assert sched.running == [seqs[1], seqs[2]]


def test_full_cache_preempts_the_newest_and_recomputes_it_later():
    sched = _scheduler(num_blocks=4, block_size=4, budget=64)
    a = Sequence("a", list(range(7)), 7)
    b = Sequence("b", list(range(20, 27)), 7)
    sched.add(a)
    sched.add(b)
    _run_step(sched)  # both prefilled: 2 blocks each, cache full
    assert sched.blocks.num_free_blocks == 0
    _run_step(sched)  # both now hold 8 tokens; a's 9th needs a block: b is preempted
    _run_step(sched)
    assert b.num_preemptions == 1 and b in sched.waiting and b.block_table == [] and b.num_computed_tokens == 0
    assert a.num_tokens == 10
    produced = list(b.token_ids)
    sched.remove(a)
    _run_step(sched)  # b recomputes everything it had, keeping its tokens
    assert b.token_ids[: len(produced)] == produced and b.num_computed_tokens == len(produced)


def test_a_waiting_request_that_does_not_fit_blocks_the_queue_without_failing():
    sched = _scheduler(num_blocks=3, block_size=4)
    big = Sequence("big", list(range(10)), 10)
    small = Sequence("small", [1], 1)
    hog = Sequence("hog", list(range(50, 58)), 8)
    sched.add(hog)
    _run_step(sched)
    sched.add(big)
    sched.add(small)
    _run_step(sched)
    assert list(sched.waiting) == [big, small]  # FCFS: small does not overtake big
    sched.remove(hog)
    _run_step(sched)
    assert big in sched.running
