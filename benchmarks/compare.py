"""Benchmark zizhu against its peers on one checkpoint and one workload.

    python -m benchmarks.compare --model small [--engines zizhu,hf,llamacpp,vllm] [--quick]

Builds the checkpoint if needed (benchmarks.checkpoints), measures memory bandwidth, then runs
each engine variant one after another, each in its own subprocess: zizhu with this Python, each
peer with the Python of its virtualenv under .venvs/ (benchmarks/setup_peers.sh creates them). A
peer that is not installed is reported as such, never silently dropped. Writes
benchmarks/results/<model>-<timestamp>.json and .md, with every worker's log under
benchmarks/results/logs/<model>-<timestamp>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import checkpoints, report, roofline
from benchmarks.model_math import MLAShape, kv_bytes_expanded_padded, kv_bytes_latent
from benchmarks.procs import run_tracked, wait_for_idle
from benchmarks.workload import EngineResult, Workload, parse_result

log = logging.getLogger("benchmarks.compare")

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
RESULTS = ROOT / "benchmarks" / "results"
TCMALLOC = "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
VLLM_MLA_LATENT = 576  # the only latent width vLLM's CPU MLA kernel accepts


@dataclass(frozen=True)
class Engine:
    name: str  # "zizhu", "hf", "llamacpp", "vllm"
    variants: tuple[str, ...]
    module: str  # worker module, run with -m
    venv: str | None  # .venvs/<venv>; None: this Python
    probe: str  # module that must import in that Python
    timeout_s: float = 3600.0
    prepare: bool = False  # run the worker with --prepare-only first, outside the measurement
    env: dict[str, str] = field(default_factory=dict)

    def python(self) -> Path:
        return Path(sys.executable) if self.venv is None else VENVS / self.venv / "bin" / "python"


ENGINES = {
    "zizhu": Engine("zizhu", ("fp32", "bf16", "int8"), "benchmarks.run_zizhu", None, "zizhu"),
    "hf": Engine("hf", ("fp32", "bf16"), "benchmarks.peer_hf", "hf", "transformers"),
    "llamacpp": Engine("llamacpp", ("f16", "q8_0"), "benchmarks.peer_llamacpp", "llamacpp", "llama_cpp",
                       prepare=True),
    "vllm": Engine("vllm", ("fp32",), "benchmarks.peer_vllm", "vllm", "vllm"),
}


def engine_env(engine: Engine, config: dict, workload: Workload) -> dict[str, str]:
    """The environment each engine runs best with on this machine (shared/peers.md)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = str(workload.threads)
    if engine.name == "vllm":
        shape = MLAShape.from_config(config)
        mla = config["kv_lora_rank"] + config["qk_rope_head_dim"] == VLLM_MLA_LATENT
        per_token = kv_bytes_latent(shape, 4) if mla else kv_bytes_expanded_padded(shape, 4)
        env.update({
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{workload.threads - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            # Whole GiB is vLLM's unit: the workload's need in its own cache format, rounded up.
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(workload.kv_budget_bytes(per_token) / 2**30))),
        })
        preload = [p for p in (TCMALLOC, str(VENVS / "vllm" / "lib" / "libiomp5.so")) if Path(p).exists()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        if not mla:
            env["VLLM_MLA_DISABLE"] = "1"
    env.update(engine.env)
    return env


def installed(engine: Engine) -> bool:
    python = engine.python()
    if not python.exists():
        return False
    import subprocess

    probe = subprocess.run([str(python), "-c", f"import {engine.probe}"], cwd=ROOT,
                           capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return probe.returncode == 0


def run_variant(engine: Engine, variant: str, ckpt: Path, workload: Workload, config: dict,
                log_dir: Path, wait_idle_s: float = 0.0) -> EngineResult:
    cmd = [str(engine.python()), "-m", engine.module, "--checkpoint", str(ckpt), "--variant", variant,
           "--workload", workload.to_json()]
    env = engine_env(engine, config, workload)
    if engine.prepare:
        prep = run_tracked(cmd + ["--prepare-only"], env, ROOT, log_dir / f"{engine.name}-{variant}-prepare.log",
                           engine.timeout_s)
        if prep.returncode != 0:
            return EngineResult(engine.name, variant, status="failed",
                                notes=[f"preparation failed (exit {prep.returncode}), see "
                                       f"{log_dir.name}/{engine.name}-{variant}-prepare.log"])
    if wait_idle_s:
        other = wait_for_idle(wait_idle_s)
        log.info("other processes use %.2f cores", other)
    log.info("running %s %s", engine.name, variant)
    load_before = load_average()
    done = run_tracked(cmd, env, ROOT, log_dir / f"{engine.name}-{variant}.log", engine.timeout_s)
    result = parse_result(done.output)
    if result is None:
        why = "timed out" if done.timed_out else f"exit {done.returncode}"
        tail = [line for line in done.output.splitlines() if line.strip()][-1:] or [""]
        return EngineResult(engine.name, variant, status="failed",
                            notes=[f"worker {why} after {done.wall_s:.0f} s: {tail[0][:300]}"],
                            peak_rss_bytes=done.peak_rss_bytes)
    result.peak_rss_bytes = done.peak_rss_bytes
    result.extra["worker_wall_s"] = done.wall_s
    # Other work on the machine slows every engine (2 threads on 2 cores): keep the evidence.
    result.extra["load_average"] = {"before": load_before, "after": load_average()}
    result.extra["other_cpu_cores"] = done.other_cpu_cores
    return result


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_engines(text: str) -> list[tuple[Engine, list[str]]]:
    """'zizhu,hf:fp32,llamacpp' -> engines with their variants (all when none is named)."""
    chosen = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, variants = item.partition(":")
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
        engine = ENGINES[name]
        picked = variants.split("+") if variants else list(engine.variants)
        bad = [v for v in picked if v not in engine.variants]
        if bad:
            raise SystemExit(f"{name} has no variant {bad[0]!r}; choose from {', '.join(engine.variants)}")
        chosen.append((engine, picked))
    return chosen


def reused_results(path: Path, fresh: list[dict]) -> list[dict]:
    """Results of engine variants measured in the earlier run at `path` and not in this one."""
    earlier = json.loads(path.read_text())
    have = {(r["engine"], r["variant"]) for r in fresh}
    reused = []
    for r in earlier["results"]:
        if (r["engine"], r["variant"]) not in have:
            r["notes"] = [f"from run {earlier['timestamp']} (--reuse)", *r["notes"]]
            reused.append(r)
    return reused


def write_run(run: dict, stem: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = [EngineResult.from_dict(d) for d in run["results"]]
    run["ratios"] = report.ratios(results, list(run["workload"]["concurrency"]))
    run["targets"] = report.targets(run, results)
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps(run, indent=2) + "\n")
    md_path.write_text(report.markdown(run))
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=list(checkpoints.SPECS))
    parser.add_argument("--engines", default="zizhu,hf,llamacpp,vllm",
                        help="comma-separated; pick variants with ':' and '+', e.g. zizhu:fp32+int8,hf:fp32")
    parser.add_argument("--quick", action="store_true", help="32 output tokens, one repetition, shorter limits")
    parser.add_argument("--concurrency", help="override the concurrency levels, e.g. 8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each engine, wait up to this long for other processes to go quiet")
    parser.add_argument("--reuse", type=Path,
                        help="an earlier run's JSON: engine variants not selected here are taken from it (marked so)")
    parser.add_argument("--max-case-seconds", type=float,
                        help="skip a case predicted (from the last measured rate) to take longer than this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    workload = Workload.quick() if args.quick else Workload.full()
    overrides = {"threads": args.threads}
    if args.max_case_seconds:
        overrides["max_case_seconds"] = args.max_case_seconds
    if args.concurrency:
        overrides["concurrency"] = tuple(int(n) for n in args.concurrency.split(","))
    workload = Workload(**{**workload.__dict__, **overrides})
    chosen = parse_engines(args.engines)

    ckpt = checkpoints.build(args.model)
    config = checkpoints.load_config(ckpt)
    shape = MLAShape.from_config(config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"{args.model}-{stamp}" + ("-quick" if args.quick else "")
    log_dir = RESULTS / "logs" / stem

    run = {
        "model": args.model, "timestamp": stamp, "checkpoint": str(ckpt.relative_to(ROOT)),
        "params": shape.total_params(), "seed": checkpoints.SEED, "config": checkpoints.SPECS[args.model],
        "workload": json.loads(workload.to_json()), "quick": args.quick,
        "machine": {**machine_info(), "load_before": load_average()},
        "kv_formula": {"zizhu": kv_bytes_latent(shape, 4.0), "latent_bf16": kv_bytes_latent(shape, 2.0)},
        "results": [],
    }
    log.info("measuring memory bandwidth")
    run["bandwidth"] = roofline.measure_bandwidth(threads=workload.threads)
    mean_context = workload.prompt_len + workload.output_len // 2
    run["roofline"] = roofline.bounds(config, run["bandwidth"]["bound_gb_s"], mean_context)

    for engine, variants in chosen:
        ok = installed(engine)
        for variant in variants:
            if not ok:
                status = report.NOT_INSTALLED if engine.venv else "not installed (zizhu does not import)"
                log.warning("%s: %s", engine.name, status)
                run["results"].append(EngineResult(engine.name, variant, status=status).to_dict())
                continue
            result = run_variant(engine, variant, ckpt, workload, config, log_dir, args.wait_idle)
            run["results"].append(result.to_dict())
            write_run(run, stem)  # keep what is measured so far if a later engine hangs
    if args.reuse:
        run["results"] += reused_results(args.reuse, run["results"])
    run["machine"]["load_after"] = load_average()
    json_path, md_path = write_run(run, stem)
    print(md_path.read_text())
    print(f"wrote {json_path.relative_to(ROOT)} and {md_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
