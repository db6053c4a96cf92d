"""Worker for benchmarks.quality: llama.cpp's logits and greedy tokens on given sequences, run with
.venvs/llamacpp/bin/python.

    python -m benchmarks.quality_llamacpp CHECKPOINT VARIANT DIR

The checkpoint is converted to VARIANT (f16, q8_0) as the speed benchmark does (peer_llamacpp).
DIR holds `job.json` ({"sequences": [[ids]], "first": n, "tokens": n}). For each sequence this
writes `logits-<i>.npy`: the fp32 logits predicting sequence[first:], from one evaluation of the
sequence (teacher-forced, as llama-perplexity does), and `greedy.json`: the tokens llama.cpp itself
generates greedily from sequence[:first]. The comparison is quality.py's, so every engine is
measured by the same code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    from llama_cpp import Llama

    from benchmarks.peer_llamacpp import convert

    gguf, folder = convert(Path(sys.argv[1]), sys.argv[2]), Path(sys.argv[3])
    job = json.loads((folder / "job.json").read_text())
    first, tokens = job["first"], job["tokens"]
    longest = max(len(s) for s in job["sequences"])
    llm = Llama(model_path=str(gguf), n_ctx=longest + 8, n_threads=2, n_threads_batch=2, n_batch=512,
                logits_all=True, verbose=False)
    greedy = []
    for i, seq in enumerate(job["sequences"]):
        llm.reset()
        llm.eval(seq[:-1])
        np.save(folder / f"logits-{i}.npy", np.array(llm.scores[first - 1:len(seq) - 1], dtype=np.float32))
        out = []
        for token in llm.generate(seq[:first], temp=0.0, reset=True):
            out.append(int(token))
            if len(out) == tokens:
                break
        greedy.append(out)
    (folder / "greedy.json").write_text(json.dumps(greedy))


if __name__ == "__main__":
    main()
