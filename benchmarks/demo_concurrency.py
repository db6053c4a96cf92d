"""The demo model through `zizhu serve`: concurrent requests must answer exactly as sequential ones.

    python benchmarks/demo_concurrency.py                 # start a server, 1,000 held-out problems, 64 at a time
    python benchmarks/demo_concurrency.py --url http://127.0.0.1:8000 -n 200

Greedy decoding of a model that is right or wrong: if batching, preemption, prefix caching or the
scheduler ever let one request disturb another, some answer changes. The script sends every problem
once alone and once among `--concurrency` others over /v1/completions, reports per-family accuracy and
exits non-zero on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zizhu.demo import tasks  # noqa: E402
from zizhu.demo.evaluate import MAX_NEW_TOKENS, report, score  # noqa: E402
from zizhu.demo.tokenizer import prompt_text  # noqa: E402

MODEL_NAME = "zizhu-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def demo_server(timeout: float = 120.0) -> Iterator[str]:
    """`zizhu serve` on the bundled demo model (float32) on a free port; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "zizhu", "serve", "--port", str(port), "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"zizhu serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"zizhu serve did not answer on {url} within {timeout:.0f}s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def complete_all(url: str, prompts: list[str], concurrency: int) -> list[str]:
    """Greedy completions of `prompts`, at most `concurrency` requests in flight."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:

        async def one(prompt: str) -> str:
            async with gate:
                body = {"model": MODEL_NAME, "prompt": prompt, "temperature": 0, "max_tokens": MAX_NEW_TOKENS}
                response = await client.post("/v1/completions", json=body)
                response.raise_for_status()
                return response.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(p) for p in prompts))


def compare(url: str, n: int, concurrency: int) -> tuple[list[tasks.Problem], list[str], list[int]]:
    """Run the held-out set alone and concurrently; return problems, sequential texts, differing rows."""
    problems = tasks.held_out_set(n)
    prompts = [prompt_text(p.prompt) for p in problems]
    sequential = asyncio.run(complete_all(url, prompts, concurrency=1))
    concurrent = asyncio.run(complete_all(url, prompts, concurrency=concurrency))
    return problems, sequential, [i for i, (a, b) in enumerate(zip(sequential, concurrent)) if a != b]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running `zizhu serve` of the demo model (default: start one)")
    parser.add_argument("-n", type=int, default=1000, help="held-out problems (default 1000)")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    start = time.time()
    with contextlib.nullcontext(args.url) if args.url else demo_server() as url:
        problems, sequential, differing = compare(url, args.n, args.concurrency)
    print(report(score(problems, sequential)))
    print(f"{len(differing)} of {len(problems)} answers differ between sequential and {args.concurrency} concurrent "
          f"requests ({time.time() - start:.0f}s)")
    for i in differing[:10]:
        print(f"  {problems[i].prompt!r}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
