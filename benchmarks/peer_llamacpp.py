"""Worker: llama.cpp (vendored by llama-cpp-python 0.3.36), run with .venvs/llamacpp/bin/python.

The checkpoint is converted once per weight format with the vendored convert_hf_to_gguf.py into
benchmarks/.cache/gguf/. Figures come from llama.cpp's own tools, built by setup_peers.sh:
- prefill: `llama-bench -p <prefill_len> -n 0`;
- batch 1 and N streams: `llama-batched-bench -npp <prompt_len> -ntg <output_len> -npl 1,N...`,
  each stream with its own prompt (not shared); decode at batch 1 is S_TG at B=1, aggregate output
  tokens/s is B * TG / T (total time, prefill included), as for the other engines;
- KV bytes per token: the KV buffer size llama.cpp logs, divided by its cell count.
The Python binding is timed too, at batch 1 (`extra.binding_decode_b1_tok_s`): the tools run the
same library without the Python loop.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runner import worker_args
from benchmarks.workload import EngineResult, Prompts, emit

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "benchmarks" / ".cache" / "llama-cpp-python-0.3.36" / "vendor" / "llama.cpp"
TOOLS = VENDOR / "build" / "bin"
GGUF_DIR = ROOT / "benchmarks" / ".cache" / "gguf"
OUTTYPES = {"f16": "f16", "q8_0": "q8_0"}
# "llama_kv_cache: size =    1.25 MiB (   256 cells,   4 layers,  8/8 seqs)": cells are per stream.
KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +\d+ layers, +\d+/(\d+) seqs")


def gguf_path(checkpoint: Path, variant: str) -> Path:
    stamp = (checkpoint / "BUILT").read_text().strip() if (checkpoint / "BUILT").exists() else "nostamp"
    return GGUF_DIR / f"{checkpoint.name}-{stamp}-{variant}.gguf"


def convert(checkpoint: Path, variant: str) -> Path:
    out = gguf_path(checkpoint, variant)
    if out.exists():
        return out
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    log.info("converting %s to %s", checkpoint, out.name)
    subprocess.run([sys.executable, str(VENDOR / "convert_hf_to_gguf.py"), str(checkpoint),
                    "--outtype", OUTTYPES[variant], "--outfile", str(tmp)], check=True)
    tmp.rename(out)
    return out


def run_tool(args: list[str]) -> str:
    """Run a llama.cpp tool; return its stdout and log, echoing them as they come for the run's log."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines = []
    for line in proc.stdout:
        sys.stderr.write(line)
        lines.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"{Path(args[0]).name} exited {proc.returncode}: {''.join(lines)[-2000:]}")
    return "".join(lines)


def binding_decode_b1(model: Path, wl) -> float:
    """Batch-1 decode tokens/s through llama-cpp-python's generator (greedy, no EOS check)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=wl.prompt_len + wl.output_len + 8, n_threads=wl.threads,
                n_threads_batch=wl.threads, n_batch=512, verbose=False)
    prompts = Prompts(wl.seed + 1)

    def run(max_tokens: int) -> float:
        llm.reset()
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompts.make(1, wl.prompt_len)[0], temp=0.0, reset=True)):
            if i + 1 == max_tokens:
                break
        return time.perf_counter() - start

    run(4)
    first, full = run(1), run(wl.output_len)
    return (wl.output_len - 1) / (full - first)


def main() -> None:
    args = worker_args(__doc__, list(OUTTYPES))
    wl = args.workload
    checkpoint = Path(args.checkpoint)
    model = convert(checkpoint, args.variant)
    if args.prepare_only:
        return
    import llama_cpp

    result = EngineResult(engine="llamacpp", variant=args.variant,
                          version=f"llama-cpp-python {llama_cpp.__version__} (vendored llama.cpp tools)")
    t = str(wl.threads)

    try:
        out = run_tool([str(TOOLS / "llama-bench"), "-m", str(model), "-p", str(wl.prefill_len), "-n", "0",
                        "-t", t, "-r", str(max(wl.repeats, 1)), "-o", "jsonl"])
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        result.prefill_tok_s = max(r["avg_ts"] for r in rows if r.get("n_prompt") == wl.prefill_len)
    except Exception as exc:  # noqa: BLE001
        result.notes.append(f"prefill failed: {exc!r}")

    levels = [1, 1, *wl.concurrency]  # the first level warms up; rows keyed by level keep the second
    n_ctx = max(levels) * (wl.prompt_len + wl.output_len)  # each stream gets n_ctx / max level cells
    try:
        out = run_tool([str(TOOLS / "llama-batched-bench"), "-m", str(model), "-c", str(n_ctx), "-b", "2048",
                        "-ub", "512", "-npp", str(wl.prompt_len), "-ntg", str(wl.output_len),
                        "-npl", ",".join(map(str, levels)), "-t", t, "-tb", t, "--output-format", "jsonl",
                        "-lv", "4"])  # verbosity 4 logs the KV cache size
        rows = {r["pl"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
        result.decode_b1_tok_s = rows[1]["speed_tg"]
        for n in wl.concurrency:
            r = rows.get(n)
            result.concurrent_tok_s[str(n)] = n * r["tg"] / r["t"] if r else None
        result.extra["batched_bench"] = list(rows.values())
        kv = KV_LINE.search(out)
        if kv:
            result.kv_bytes_per_token = float(kv.group(1)) * 2**20 / (int(kv.group(2)) * int(kv.group(3)))
            result.kv_source = "measured: llama_kv_cache size / (cells x streams) in llama.cpp's log"
    except Exception as exc:  # noqa: BLE001
        result.notes.append(f"batched-bench failed: {exc!r}")

    try:
        result.extra["binding_decode_b1_tok_s"] = binding_decode_b1(model, wl)
    except Exception as exc:  # noqa: BLE001
        result.notes.append(f"llama-cpp-python batch-1 check failed: {exc!r}")
    emit(result)


if __name__ == "__main__":
    main()
