"""How far zizhu's int8 and bf16 variants, and llama.cpp's F16 and Q8_0 files, move from zizhu's
fp32 model on one benchmark checkpoint.

    python -m benchmarks.quality --model tiny [--variants int8,bf16] [--llamacpp f16,q8_0] [--prompts 16] [--tokens 128]

zizhu fp32 equals HF transformers in fp32 to 1e-4 on every logit (tests/engine/test_hf_parity.py),
so it stands for the unquantized model. Both measures take it as the reference, on the same
checkpoint and the benchmark's kind of prompt (random token ids, as benchmarks.workload.Prompts
makes):
- **teacher-forced**: every variant reads the fp32 model's greedy continuations in one prefill,
  and its logits at each generated position are compared with fp32's there: top-1 agreement, the
  largest and mean |logit difference| (also as a fraction of the spread of the fp32 logits), and
  KL(fp32 || variant). These are the figures llama.cpp's `llama-perplexity --kl-divergence` gives
  for its quantizations. They compare next-token distributions, position by position.
- **free-running greedy**: every variant generates as many tokens from the same prompts, in one
  batch as the benchmark's N-stream rows do (decode path included); the share of tokens equal to
  fp32's at the same position, and the mean length of the common prefix. Once a near tie flips,
  the continuations part for good, so this share is lower than the teacher-forced agreement: on
  random weights the top two logits are often close.

Writes benchmarks/results/quality-<model>-<timestamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy
import torch

from benchmarks import checkpoints
from benchmarks.run_zizhu import VARIANTS  # variant -> (dtype, quantization), as the speed runs load it
from benchmarks.workload import TOKEN_ID_RANGE

log = logging.getLogger("benchmarks.quality")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LLAMACPP_PYTHON = ROOT / ".venvs" / "llamacpp" / "bin" / "python"
LLAMACPP_VARIANTS = ("f16", "q8_0")
SEED = 7  # prompts: not the seeds the speed cases use, so no prefix cache is warm for them
BLOCK = 16


@dataclass
class Deviation:
    """One variant against fp32."""

    variant: str
    positions: int
    top1_agreement: float  # teacher-forced: same argmax as fp32
    max_abs_logit_diff: float  # over every position and token
    median_position_max_diff: float  # the largest |difference| at a typical position
    mean_abs_logit_diff: float
    max_diff_over_logit_std: float  # max_abs_logit_diff / std of the fp32 logits at that position
    mean_kl: float  # KL(fp32 || variant), nats per position
    max_kl: float
    greedy_token_agreement: float  # free-running: same token at the same position
    mean_common_prefix: float  # free-running: tokens before the first difference, per prompt
    identical_sequences: int


def load(path: Path, variant: str, max_len: int):
    from zizhu import LLM

    dtype, quantization = VARIANTS[variant]
    return LLM(str(path), dtype=dtype, quantization=quantization, max_model_len=max_len, kv_cache_memory=1 << 28)


@torch.no_grad()
def forced_logits(llm, ids: list[int], first: int) -> torch.Tensor:
    """fp32 logits predicting ids[first:], from one prefill of ids[:-1] into a fresh cache."""
    from zizhu.layers.batch import AttentionBatch

    engine = llm.engine
    model, cfg = engine.model, engine.model_config
    n = len(ids) - 1
    blocks = -(-n // BLOCK)
    caches = engine.platform.allocate_kv_cache(cfg.num_hidden_layers, blocks, BLOCK, cfg.kv_latent_dim, engine.kv_dtype)
    batch = AttentionBatch(torch.arange(n), torch.arange(blocks)[None], torch.tensor([n]), [0, n], [n], num_decodes=0)
    hidden = model(torch.tensor(ids[:-1]), torch.arange(n), batch, caches)
    return model.compute_logits(hidden[first - 1:]).float()


def greedy(llm, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    from zizhu import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


def random_prompts(vocab_size: int, n: int, length: int) -> list[list[int]]:
    """The benchmark's kind of prompt (workload.Prompts), kept inside a smaller vocabulary."""
    lo, hi = min(TOKEN_ID_RANGE[0], vocab_size // 8), min(TOKEN_ID_RANGE[1], vocab_size)
    rng = random.Random(SEED)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def position_stats(ref: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per generated position: same argmax, largest and mean |difference|, fp32 spread, KL."""
    diff = (logits - ref).abs()
    log_ref = torch.log_softmax(ref, -1)
    return dict(
        agree=(logits.argmax(-1) == ref.argmax(-1)).float(), max_diff=diff.max(-1).values, mean_diff=diff.mean(-1),
        std=ref.std(-1), kl=(log_ref.exp() * (log_ref - torch.log_softmax(logits, -1))).sum(-1),
    )


def deviation(name: str, ref_logits: list[torch.Tensor], ref_out: list[list[int]], logits,
              out: list[list[int]]) -> Deviation:
    """`name`'s deviation from fp32: `logits` yields its forced logits sequence by sequence, `out`
    holds its free-running greedy tokens."""
    per_sequence = [position_stats(ref, mine) for ref, mine in zip(ref_logits, logits)]
    st = {key: torch.cat([p[key] for p in per_sequence]) for key in per_sequence[0]}
    tokens = sum(len(o) for o in ref_out)
    return Deviation(
        variant=name, positions=st["agree"].numel(), top1_agreement=st["agree"].mean().item(),
        max_abs_logit_diff=st["max_diff"].max().item(), median_position_max_diff=st["max_diff"].median().item(),
        mean_abs_logit_diff=st["mean_diff"].mean().item(),
        max_diff_over_logit_std=(st["max_diff"] / st["std"]).max().item(),
        mean_kl=st["kl"].mean().item(), max_kl=st["kl"].max().item(),
        greedy_token_agreement=sum(x == y for a, b in zip(ref_out, out) for x, y in zip(a, b)) / tokens,
        mean_common_prefix=sum(common_prefix(a, b) for a, b in zip(ref_out, out)) / len(ref_out),
        identical_sequences=sum(a == b for a, b in zip(ref_out, out)),
    )


def llamacpp_deviation(path: Path, variant: str, sequences, first: int, tokens: int, ref_logits, ref_out) -> Deviation:
    """The same measure for llama.cpp's `variant` (f16, q8_0), computed from the logits and tokens
    its worker writes (quality_llamacpp.py, in the llama.cpp virtualenv)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "job.json").write_text(json.dumps(dict(sequences=sequences, first=first, tokens=tokens)))
        subprocess.run([str(LLAMACPP_PYTHON), "-m", "benchmarks.quality_llamacpp", str(path), variant, tmp],
                       cwd=ROOT, check=True)
        logits = (torch.from_numpy(numpy.load(folder / f"logits-{i}.npy")) for i in range(len(sequences)))
        out = json.loads((folder / "greedy.json").read_text())
        return deviation(f"llama.cpp {variant}", ref_logits, ref_out, logits, out)


def compare(path: Path, variants: list[str], n_prompts: int, prompt_len: int, tokens: int,
            peers: tuple[str, ...] = ()) -> tuple[float, list[Deviation]]:
    """(how often fp32's forced argmax is its own greedy token, each variant's deviation). The first
    checks the measure itself: prefill and decode paths agree, and the positions line up."""
    max_len = prompt_len + tokens + BLOCK
    reference = load(path, "fp32", max_len)
    prompts = random_prompts(reference.engine.model_config.vocab_size, n_prompts, prompt_len)
    ref_out = greedy(reference, prompts, tokens)
    sequences = [p + o for p, o in zip(prompts, ref_out)]
    ref_logits = [forced_logits(reference, s, prompt_len) for s in sequences]
    del reference
    self_agreement = sum((r.argmax(-1) == torch.tensor(o)).sum().item() for r, o in zip(ref_logits, ref_out)) / (
        n_prompts * tokens)
    results = []
    for variant in variants:
        llm = load(path, variant, max_len)
        logits = (forced_logits(llm, s, prompt_len) for s in sequences)
        results.append(deviation(variant, ref_logits, ref_out, logits, greedy(llm, prompts, tokens)))
        del llm
    for peer in peers:
        try:
            results.append(llamacpp_deviation(path, peer, sequences, prompt_len, tokens, ref_logits, ref_out))
        except (OSError, subprocess.CalledProcessError) as exc:  # the zizhu rows still get written
            log.warning("llama.cpp %s skipped: %s", peer, exc)
    return self_agreement, results


def markdown(model: str, setup: dict, results: list[Deviation]) -> str:
    lines = [
        f"# zizhu variants against zizhu fp32: {model}",
        "",
        f"{setup['prompts']} prompts of {setup['prompt_len']} random tokens, {setup['tokens']} greedy tokens each; "
        f"{setup['when']}. fp32's own prefill picks its greedy (decode) token at "
        f"{setup['fp32_self_agreement']:.2%} of positions.",
        "",
        "| variant | top-1 agreement (forced) | max abs logit diff | median position's max diff | mean abs logit diff "
        "| max diff / logit std "
        "| mean KL | max KL | greedy tokens equal | mean common prefix | identical sequences |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.variant} | {r.top1_agreement:.2%} | {r.max_abs_logit_diff:.4f} | {r.median_position_max_diff:.4f} "
            f"| {r.mean_abs_logit_diff:.5f} "
            f"| {r.max_diff_over_logit_std:.3f} | {r.mean_kl:.2e} | {r.max_kl:.2e} | {r.greedy_token_agreement:.2%} "
            f"| {r.mean_common_prefix:.1f} of {setup['tokens']} | {r.identical_sequences} of {setup['prompts']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a benchmark checkpoint name (tiny, small) or a directory")
    parser.add_argument("--variants", default="int8,bf16", help="comma-separated, from: int8, bf16")
    parser.add_argument("--llamacpp", default="f16,q8_0",
                        help="llama.cpp formats measured the same way against zizhu fp32 (none: ''); skipped, "
                        "with a note, when .venvs/llamacpp is missing")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json and .md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS or v == "fp32"]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from int8, bf16")
    peers = tuple(v for v in args.llamacpp.split(",") if v)
    if any(v not in LLAMACPP_VARIANTS for v in peers):
        parser.error(f"--llamacpp takes {', '.join(LLAMACPP_VARIANTS)}")
    if peers and not LLAMACPP_PYTHON.exists():
        log.warning("llama.cpp skipped: %s is missing (benchmarks/setup_peers.sh creates it)", LLAMACPP_PYTHON)
        peers = ()
    path = Path(args.model) if Path(args.model).is_dir() else checkpoints.build(args.model)
    name = path.name if Path(args.model).is_dir() else args.model
    torch.manual_seed(0)
    self_agreement, results = compare(path, variants, args.prompts, args.prompt_len, args.tokens, peers)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    setup = dict(prompts=args.prompts, prompt_len=args.prompt_len, tokens=args.tokens,
                 fp32_self_agreement=self_agreement, when=time.strftime("%Y-%m-%d %H:%M"), checkpoint=str(path))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quality-{name}-{stamp}"
    report = {"model": name, **setup, "results": [asdict(r) for r in results]}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(name, setup, results)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
