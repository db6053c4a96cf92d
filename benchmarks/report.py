"""Turn one run's results into ratios, target verdicts and a markdown report.

Standard library only. A run is a dict (the JSON file benchmarks.compare writes) holding
`results`, a list of EngineResult dicts, plus the model, workload, bandwidth and roofline.
"""

from __future__ import annotations

from benchmarks.workload import EngineResult

# Which zizhu variant a peer's row is compared with: the same weight dtype class.
ZIZHU_COUNTERPART = {"fp32": "fp32", "bf16": "bf16", "f16": "bf16", "q8_0": "int8"}
ENGINE_NAMES = {"zizhu": "zizhu", "hf": "HF transformers", "llamacpp": "llama.cpp", "vllm": "vLLM-CPU"}
NOT_INSTALLED = "not installed (run benchmarks/setup_peers.sh)"


def metric_keys(concurrency: list[int]) -> list[tuple[str, str]]:
    """(key, column title) of every throughput metric, in table order."""
    keys = [("prefill_tok_s", "prompt tok/s"), ("decode_b1_tok_s", "decode b1 tok/s")]
    keys += [(f"concurrent:{n}", f"{n} concurrent out tok/s") for n in concurrency]
    return keys


def metric(result: EngineResult, key: str) -> float | None:
    if key.startswith("concurrent:"):
        return result.concurrent_tok_s.get(key.split(":", 1)[1])
    return getattr(result, key)


def counterpart(results: list[EngineResult], peer: EngineResult) -> EngineResult | None:
    want = ZIZHU_COUNTERPART.get(peer.variant)
    for r in results:
        if r.engine == "zizhu" and r.variant == want and r.status == "ok":
            return r
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(results: list[EngineResult], concurrency: list[int]) -> list[dict]:
    """zizhu / peer for every peer row and metric (throughput: higher is better for zizhu;
    peak RSS and KV bytes: lower is better for zizhu)."""
    rows = []
    for peer in results:
        if peer.engine == "zizhu":
            continue
        z = counterpart(results, peer)
        row = {"engine": peer.engine, "variant": peer.variant,
               "zizhu_variant": z.variant if z else ZIZHU_COUNTERPART.get(peer.variant), "values": {}}
        for key, _ in metric_keys(concurrency):
            row["values"][key] = ratio(metric(z, key), metric(peer, key)) if z and peer.status == "ok" else None
        for key in ("peak_rss_bytes", "kv_bytes_per_token"):
            row["values"][key] = ratio(getattr(z, key), getattr(peer, key)) if z and peer.status == "ok" else None
        rows.append(row)
    return rows


def _find(results: list[EngineResult], engine: str, variant: str) -> EngineResult | None:
    for r in results:
        if r.engine == engine and r.variant == variant:
            return r
    return None


def _verdict(name: str, value: float | None, threshold: float, why_missing: str) -> dict:
    if value is None:
        return {"target": name, "value": None, "threshold": threshold, "status": f"not measured: {why_missing}"}
    return {"target": name, "value": value, "threshold": threshold,
            "status": "reached" if value >= threshold else "not reached"}


def _missing(*rows: tuple[str, str, EngineResult | None]) -> str:
    parts = []
    for engine, variant, r in rows:
        if r is None:
            parts.append(f"{engine} {variant} not run")
        elif r.status != "ok":
            parts.append(f"{engine} {variant} {r.status}")
    return "; ".join(parts) or "a case was skipped or failed (see notes)"


def targets(run: dict, results: list[EngineResult]) -> list[dict]:
    """The issue's targets, each reached, not reached, or not measured (with the reason)."""
    model = run["model"]
    out = []
    z32, z8 = _find(results, "zizhu", "fp32"), _find(results, "zizhu", "int8")
    q8, vl = _find(results, "llamacpp", "q8_0"), _find(results, "vllm", "fp32")

    def m(r: EngineResult | None, key: str) -> float | None:
        return metric(r, key) if r is not None and r.status == "ok" else None

    if model == "small":
        out.append(_verdict("small decode b1: zizhu int8 / llama.cpp Q8_0 >= 1.0",
                            ratio(m(z8, "decode_b1_tok_s"), m(q8, "decode_b1_tok_s")), 1.0,
                            _missing(("zizhu", "int8", z8), ("llamacpp", "q8_0", q8))))
        bound = run.get("roofline", {}).get("int8", {}).get("bound_tok_s")
        out.append(_verdict("small decode b1: zizhu int8 / roofline(int8) >= 0.6",
                            ratio(m(z8, "decode_b1_tok_s"), bound), 0.6,
                            _missing(("zizhu", "int8", z8))))
        out.append(_verdict("small 32 concurrent: zizhu int8 / llama.cpp Q8_0 >= 2.0",
                            ratio(m(z8, "concurrent:32"), m(q8, "concurrent:32")), 2.0,
                            _missing(("zizhu", "int8", z8), ("llamacpp", "q8_0", q8))))
    if model in ("small", "tiny"):
        out.append(_verdict(f"{model} 64 concurrent: zizhu fp32 / vLLM-CPU fp32 >= 1.5",
                            ratio(m(z32, "concurrent:64"), m(vl, "concurrent:64")), 1.5,
                            _missing(("zizhu", "fp32", z32), ("vllm", "fp32", vl))))
    concurrency = run["workload"]["concurrency"]
    for hf in (r for r in results if r.engine == "hf"):
        z = counterpart(results, hf)
        values = [ratio(m(z, k), m(hf, k)) for k, _ in metric_keys(concurrency)]
        measured = [v for v in values if v is not None]
        worst = min(measured) if measured and len(measured) == len(values) else None
        why = _missing(("zizhu", ZIZHU_COUNTERPART[hf.variant], z), ("hf", hf.variant, hf))
        if measured and worst is None:
            why = f"only {len(measured)} of {len(values)} rows measured (lowest {min(measured):.2f})"
        out.append(_verdict(f"every row: zizhu {ZIZHU_COUNTERPART[hf.variant]} / HF {hf.variant} >= 5 (lowest row)",
                            worst, 5.0, why))
    formula = run.get("kv_formula", {}).get("zizhu")
    zkv = z32.kv_bytes_per_token if z32 is not None and z32.status == "ok" else None
    if formula is not None and zkv is not None:
        ok = abs(zkv - formula) < 0.5
        out.append({"target": "KV bytes/token = (kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes",
                    "value": zkv, "threshold": formula,
                    "status": ("reached" if ok else "not reached") + f" ({z32.kv_source})"})
    else:
        out.append({"target": "KV bytes/token = (kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes",
                    "value": None, "threshold": formula, "status": "not measured: zizhu fp32 not run"})
    return out


# --- markdown -----------------------------------------------------------------------------------

def _num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _mib(v: float | None) -> str:
    return "–" if v is None else f"{v / 2**20:,.0f} MiB"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def engine_table(results: list[EngineResult], concurrency: list[int]) -> list[str]:
    keys = metric_keys(concurrency)
    head = ["engine", "weights", *[t for _, t in keys], "peak RSS", "KV B/token", "other CPU load", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [ENGINE_NAMES.get(r.engine, r.engine), r.variant]
        cells += [_num(metric(r, k)) for k, _ in keys]
        kv = "–" if r.kv_bytes_per_token is None else f"{r.kv_bytes_per_token:,.0f}"
        other = r.extra.get("other_cpu_cores")
        cells += [_mib(r.peak_rss_bytes), kv, "–" if other is None else f"{other:.2f} cores", r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_table(rows: list[dict], concurrency: list[int]) -> list[str]:
    keys = metric_keys(concurrency)
    head = ["peer", "zizhu row", *[t for _, t in keys], "peak RSS", "KV B/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{ENGINE_NAMES.get(row['engine'], row['engine'])} {row['variant']}", f"zizhu {row['zizhu_variant']}"]
        cells += [_x(row["values"].get(k)) for k, _ in keys]
        cells += [_x(row["values"].get("peak_rss_bytes")), _x(row["values"].get("kv_bytes_per_token"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(run: dict) -> str:
    results = [EngineResult.from_dict(d) for d in run["results"]]
    wl = run["workload"]
    conc = list(wl["concurrency"])
    lines = [f"# zizhu vs peers: `{run['model']}` ({run['timestamp']})", ""]
    lines.append(f"Checkpoint `{run['model']}`: {run.get('params', 0) / 1e6:,.1f}M parameters, random weights, "
                 f"seed {run.get('seed', '?')}. Workload: prompt {wl['prefill_len']} tokens for prompt tok/s; "
                 f"{wl['prompt_len']} in / {wl['output_len']} out per sequence otherwise, greedy, ignore_eos; "
                 f"{wl['threads']} threads; best of {wl['repeats']} for prompt and batch 1.")
    machine = run.get("machine", {})
    if machine:
        lines.append(f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; load average "
                     f"before {machine.get('load_before', '?')}, after {machine.get('load_after', '?')}.")
    lines += ["", "## Throughput, memory, KV cache", ""]
    lines += engine_table(results, conc)
    lines += ["", "Output tok/s at N concurrent = N x output tokens / wall time of the call, prefill included. "
              "Other CPU load: cores kept busy by other processes during that engine's run (of 2); "
              "above ~0.2 the engine's figures are depressed, by several times for llama.cpp.",
              "", "## zizhu / peer (same weight dtype class)", ""]
    lines += ratio_table(run.get("ratios", []), conc)
    lines += ["", "Throughput columns: above 1 means zizhu is faster. Peak RSS and KV columns: below 1 means "
              "zizhu uses less.", ""]
    bw = run.get("bandwidth")
    roof = run.get("roofline", {})
    if bw and roof:
        lines += ["## Roofline, batch-1 decode", "",
                  f"Memory bandwidth (torch copy, {bw.get('bytes', 0) / 2**30:.0f} GiB buffers, read + write): "
                  f"{bw['copy_gb_s']:.1f} GB/s; read-only (sum): {bw.get('read_gb_s', 0):.1f} GB/s. "
                  f"Bound = {bw.get('bound_gb_s', bw['copy_gb_s']):.1f} GB/s (the faster) / bytes read per "
                  "decoded token (weights of the selected experts only, plus the KV cache at the mean context). "
                  "Greedy decoding reads a full-precision head as its int8 screen (Platform.greedy_head), so "
                  "fp32 and bf16 have a second, higher bound; the fraction is of that one.",
                  "",
                  "| weights | MB read / token | bound tok/s | greedy: MB / token | greedy: bound tok/s "
                  "| zizhu tok/s | fraction |", "|---|---|---|---|---|---|---|"]
        for variant, r in roof.items():
            z = _find(results, "zizhu", variant)
            zt = metric(z, "decode_b1_tok_s") if z and z.status == "ok" else None
            greedy_bytes = r.get("greedy_bytes_per_token", r["bytes_per_token"])
            bound = r.get("greedy_bound_tok_s", r["bound_tok_s"])
            lines.append(f"| {variant} | {r['bytes_per_token'] / 1e6:.1f} | {r['bound_tok_s']:.1f} "
                         f"| {greedy_bytes / 1e6:.1f} | {bound:.1f} | {_num(zt)} "
                         f"| {_num(ratio(zt, bound) and 100 * ratio(zt, bound))}% |")
        lines.append("")
    lines += ["## Targets", "", "| target | value | status |", "|---|---|---|"]
    for t in run.get("targets", []):
        lines.append(f"| {t['target']} | {_num(t['value'], 2)} | {t['status']} |")
    lines += ["", "## Notes", ""]
    for r in results:
        bits = [f"status {r.status}"]
        if r.version:
            bits.append(r.version)
        if r.load_s is not None:
            bits.append(f"model load {r.load_s:.0f} s")
        if "load_average" in r.extra:
            la = r.extra["load_average"]
            bits.append(f"load average {la['before']} -> {la['after']}")
        if r.kv_source:
            bits.append(f"KV: {r.kv_source}")
        bits += r.notes
        lines.append(f"- **{ENGINE_NAMES.get(r.engine, r.engine)} {r.variant}**: " + "; ".join(bits))
    return "\n".join(lines) + "\n"
