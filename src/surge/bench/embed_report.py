"""Markdown tables of a `surge bench embed` result (the dict written to JSON), in the shape of
BENCHMARKS.md's sections."""

from __future__ import annotations

from surge.bench.machine import describe_cpu


def _num(value: object, digits: int = 1) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _x(value: object) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.2f}x"


def _verdict(meets: object) -> str:
    return {True: "met", False: "missed"}.get(meets, "not measured")


def format_header(result: dict) -> list[str]:
    """The section title, the machine line and the command."""
    m = result["machine"]
    cfg = result["config"]
    return [
        f"## Embeddings: `surge bench embed` ({str(result['started'])[:10]})",
        "",
        f"{describe_cpu(m)}, {m['memory_gib']} GiB; Python "
        f"{m['python']}, torch {m['torch']}, sentence-transformers {m['sentence_transformers']}. "
        f"{cfg['num_threads']} torch threads everywhere, {_num(cfg['duration_s'], 0)} s per point, "
        f"seed {cfg['seed']}.",
        "",
        "```bash",
        str(result["command"]),
        "```",
        "",
    ]


def format_throughput(part: dict, cfg: dict) -> list[str]:
    """Part 1: sentences/s of surge and the naive server by clients, the direct bound, ratios."""
    surge = part.get("surge") or {}
    naive = {p["clients"]: p for p in (part.get("naive") or {}).get("points", [])}
    ratios = part.get("ratios") or {}
    by_clients = ratios.get("by_clients") or {}
    lines = [
        "One text per request, closed loop; seeded English and Chinese chunks of 20-200 words "
        f"({cfg['chinese_fraction']:.0%} Chinese).",
        "",
        "| clients | surge sent/s | surge mean batch | surge p50 ms | surge p99 ms | naive sent/s "
        "| naive p50 ms | surge / naive | surge / direct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in surge.get("points", []):
        n, r = naive.get(p["clients"], {}), by_clients.get(str(p["clients"]), {})
        lines.append(
            f"| {p['clients']} | {_num(p.get('sentences_per_s'))} | {_num(p.get('mean_batch_size'))} "
            f"| {_num(p.get('latency_p50_ms'), 0)} | {_num(p.get('latency_p99_ms'), 0)} "
            f"| {_num(n.get('sentences_per_s'))} | {_num(n.get('latency_p50_ms'), 0)} "
            f"| {_x(r.get('vs_naive'))} | {_num(r.get('vs_direct'), 2)} |"
        )
    if surge.get("status") == "failed":
        lines.append(f"\nsurge failed: {surge.get('reason')}")
    direct = part.get("direct")
    summary = ""
    if direct:
        summary = (
            f"Direct sentence-transformers (one process, `encode` on {direct['texts_per_call']} "
            f"texts a call, which it sorts by length into batches of {direct['batch_size']}): "
            f"{_num(direct['sentences_per_s'])} sentences/s. "
        )
    summary += (
        f"At {ratios.get('clients', '-')} clients: surge / direct "
        f"{_num(ratios.get('vs_direct'), 2)} (target >= {ratios.get('target_vs_direct')}: "
        f"{_verdict(ratios.get('meets_vs_direct'))}), surge / naive {_x(ratios.get('vs_naive'))} "
        f"(target >= {ratios.get('target_vs_naive')}x: {_verdict(ratios.get('meets_vs_naive'))})."
    )
    lines += ["", summary, ""]
    return lines


def format_cold_start(part: dict) -> list[str]:
    """Part 2: seconds from a request for an unloaded model to its first output."""
    if part.get("status") != "ok":
        return [f"Cold start: {part.get('status')}: {part.get('reason')}", ""]
    lines = [
        "Cold start (`--models-dir`, model unloaded, files in the page cache; unloaded between "
        "repeats with the admin API):",
        "",
        "| model | measured to | cold s (mean) | cold s (min-max) | repeats | warm s |",
        "|---|---|---|---|---|---|",
    ]
    for s in part.get("summary", []):
        to = "first streamed token" if s["kind"] == "chat" else "embedding response"
        lines.append(
            f"| {s['model']} | {to} | {_num(s['cold_mean_s'], 2)} | {_num(s['cold_min_s'], 2)}-"
            f"{_num(s['cold_max_s'], 2)} | {s['repeats']} | {_num(s['warm_mean_s'], 3)} |"
        )
    return [*lines, ""]


def format_mixed(part: dict, cfg: dict) -> list[str]:
    """Part 3: chat throughput alone and with an embedding ingestion beside it."""
    if part.get("status") != "ok":
        return [f"Chat with ingestion: {part.get('status')}: {part.get('reason')}", ""]
    ingest = part["ingestion"]
    lines = [
        f"Chat at {cfg['chat_concurrency']} clients ({cfg['chat_max_tokens']} tokens, "
        f"ignore_eos) on `surge serve` with both bundled models, alone and with "
        f"{cfg['ingest_clients']} embedding clients ({cfg['ingest_texts_per_request']} text(s) "
        "per request) beside it:",
        "",
        "| chat | tok/s | req/s | TTFT p50 ms | ITL p50 ms | errors | sentences/s beside |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = (
        ("alone", "alone"),
        ("with ingestion", "with_ingestion"),
        ("alone again", "alone_after"),
    )
    for label, key in rows:
        if key not in part:
            continue
        s = part[key]
        beside = _num(ingest["sentences_per_s"]) if key == "with_ingestion" else "-"
        lines.append(
            f"| {label} | {_num(s['output_tokens_per_s'])} | {_num(s['requests_per_s'], 2)} "
            f"| {_num(s['ttft_p50_ms'], 0)} | {_num(s['itl_p50_ms'])} | {s['errors']} | {beside} |"
        )
    lines += [
        "",
        f"Chat tok/s with ingestion / alone (the mean of the runs before and after): "
        f"{_num(part.get('ratio'), 2)}.",
        "",
    ]
    return lines


def format_tables(result: dict) -> str:
    """The whole section, ready to paste into BENCHMARKS.md."""
    cfg = result["config"]
    lines = format_header(result)
    if "throughput" in result:
        lines += format_throughput(result["throughput"], cfg)
    if "cold_start" in result:
        lines += format_cold_start(result["cold_start"])
    if "mixed" in result:
        lines += format_mixed(result["mixed"], cfg)
    return "\n".join(lines).rstrip() + "\n"
