from zizhu.engine.kv_cache import BlockManager
from zizhu.engine.request import Request
from zizhu.engine.scheduler import Scheduler
from zizhu.sampling_params import SamplingParams


def _request(rid: str, tokens: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, rid, 0, tokens, SamplingParams(max_tokens=max_tokens), arrival=0.0)


def _compute(bm: BlockManager, request: Request, n: int) -> None:
    assert bm.allocate(request, n)
    request.num_computed_tokens += n
    bm.register_full_blocks(request)


def test_prefix_reuse_and_reference_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _request("a", list(range(10)))
    _compute(bm, a, 10)
    assert len(a.block_ids) == 3 and len(a.block_hashes) == 2  # 2 full blocks hashed, 1 partial
    b = _request("b", list(range(8)) + [99, 98, 97])
    bm.match_prefix(b)
    assert b.block_ids == a.block_ids[:2] and b.num_computed_tokens == 8
    assert bm.ref_counts[a.block_ids[0]] == 2
    bm.free_request(a)
    assert bm.num_used_blocks == 2  # still held by b
    bm.free_request(b)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8


def test_full_prompt_hit_still_computes_one_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _request("a", list(range(8)))
    _compute(bm, a, 8)
    bm.free_request(a)
    b = _request("b", list(range(8)))
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4  # the last block is recomputed so its final token yields logits


def test_lru_eviction_prefers_the_oldest_free_block():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _request("a", [1, 2, 3, 4]), _request("b", [5, 6, 7, 8])
    _compute(bm, a, 4)
    _compute(bm, b, 4)
    bm.free_request(a)
    bm.free_request(b)
    c = _request("c", [9, 10])
    _compute(bm, c, 2)  # evicts a block of a (freed first)
    hit_b = _request("hb", [5, 6, 7, 8, 0])
    bm.match_prefix(hit_b)
    assert hit_b.num_computed_tokens == 4  # b's blocks survived
    hit_a = _request("ha", [1, 2, 3, 4, 0])
    bm.match_prefix(hit_a)
    assert hit_a.num_computed_tokens < 4


def test_no_prefix_cache_when_disabled():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = _request("a", [1, 2, 3, 4])
    _compute(bm, a, 4)
    bm.free_request(a)
    b = _request("b", [1, 2, 3, 4, 5])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0


def test_scheduler_budget_chunks_and_preempts():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    long, short = _request("long", list(range(20))), _request("short", list(range(100, 103)))
    sched.add(long)
    sched.add(short)
    batch = sched.schedule()
    assert batch.requests == [long] and batch.num_new_tokens == [8]  # budget spent on a chunk
    long.num_computed_tokens += 8
    batch = sched.schedule()
    assert batch.num_new_tokens == [8] and batch.requests == [long]
    long.num_computed_tokens += 8
    batch = sched.schedule()
    # the long prefill's last chunk fits with the short prompt: 4 + 3 tokens
    assert {r.request_id: n for r, n in zip(batch.requests, batch.num_new_tokens)} == {"long": 4, "short": 3}
    assert bm.num_free_blocks == 0
    for r, n in zip(batch.requests, batch.num_new_tokens):
        r.num_computed_tokens += n
    long.output_token_ids.append(1)
    short.output_token_ids.append(1)
    # long needs a 6th block for token 21 while short holds blocks: short (admitted last) is preempted
    batch = sched.schedule()
    assert [r.request_id for r in batch.requests] == ["long"]
    assert sched.num_preemptions == 1 and sched.waiting[0] is short and short.num_computed_tokens == 0
