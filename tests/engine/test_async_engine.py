import asyncio

import pytest
import torch

from zizhu.engine.async_engine import AsyncLLMEngine
from zizhu.engine.llm_engine import LLMEngine
from zizhu.errors import QueueFullError
from zizhu.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    return LLMEngine.from_model(path, dtype="float32", block_size=4, kv_cache_memory=1 << 20, max_num_seqs=16)


def _prompts(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 256, (int(l),), generator=g).tolist() for l in torch.randint(1, 20, (n,), generator=g)]


async def _collect(aengine, rid, prompt, params):
    last = None
    async for out in aengine.generate(rid, prompt, params):
        last = out
    return last.outputs[0].token_ids


def test_concurrent_streams_match_sequential_runs(engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = _prompts(24)

    async def main():
        aengine = AsyncLLMEngine(engine)
        alone = [await _collect(aengine, f"s{i}", p, params) for i, p in enumerate(prompts)]
        together = await asyncio.gather(*(_collect(aengine, f"c{i}", p, params) for i, p in enumerate(prompts)))
        await aengine.shutdown()
        return alone, together

    alone, together = asyncio.run(main())
    assert alone == list(together)
    assert engine.stats().num_blocks_used == 0


def test_leaving_a_stream_early_frees_its_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        aengine = AsyncLLMEngine(engine)

        async def read_two(i, prompt):
            n = 0
            async for _ in aengine.generate(f"a{i}", prompt, params):
                n += 1
                if n == 2:
                    break

        await asyncio.gather(*(read_two(i, p) for i, p in enumerate(_prompts(10))))
        for _ in range(200):
            if engine.stats().num_blocks_used == 0 and not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await aengine.shutdown()

    asyncio.run(main())
    assert engine.stats().num_blocks_used == 0
    assert not engine.has_unfinished_requests()


def test_queue_full_is_refused(engine):
    async def main():
        aengine = AsyncLLMEngine(engine, max_waiting=0)
        with pytest.raises(QueueFullError):
            async for _ in aengine.generate("q", [1, 2, 3], SamplingParams(max_tokens=2)):
                pass
        await aengine.shutdown()

    asyncio.run(main())
