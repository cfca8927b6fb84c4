"""Plots, tables and the `## Serving` section of BENCHMARKS.md from `surge bench serve` results."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

from surge.bench.machine import describe_cpu

logger = logging.getLogger(__name__)

SECTION_TITLE = "## Serving: `surge bench serve` (issue #4)"
REPORT_COMMAND = "surge bench report"
_X_LABELS = {
    "concurrency": "concurrent users (closed loop)",
    "rate": "request rate, req/s (Poisson)",
}


def _points(result: dict, mode: str) -> dict[str, list[dict]]:
    """Points of one mode by system, in load order."""
    by_system: dict[str, list[dict]] = {}
    for system in result["systems"]:
        pts = [p for p in system.get("points", []) if p["mode"] == mode]
        if pts:
            by_system[system["name"]] = sorted(pts, key=lambda p: p["load"])
    return by_system


def _plot_lines(ax, by_system: dict[str, list[dict]], key: str, style: str, label: str) -> None:  # noqa: ANN001
    for i, (name, pts) in enumerate(by_system.items()):
        ys = [p[key] for p in pts]
        ax.plot(
            [p["load"] for p in pts],
            ys,
            style,
            color=f"C{i}",
            marker="o",
            label=f"{name} {label}".strip(),
        )


def _setup_axis(ax, mode: str, ylabel: str, loads: list[float], log_y: bool = False) -> None:  # noqa: ANN001
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if mode == "concurrency":
        ax.set_xscale("log", base=2)
    ax.set_xticks(loads)  # label the measured loads themselves: 1, 4, 16, not 2^0, 2^2
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(_X_LABELS[mode])
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def write_plots(result: dict, stem: Path) -> list[Path]:
    """Throughput and latency-percentile PNGs per load mode, next to the JSON; their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    title = f"{result['config']['workload']} workload, max_tokens {result['config']['max_tokens']}"
    paths = []
    for mode in ("concurrency", "rate"):
        by_system = _points(result, mode)
        if not by_system:
            continue
        loads = sorted({p["load"] for pts in by_system.values() for p in pts})
        suffix = "" if mode == "concurrency" else "_rate"
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        _plot_lines(left, by_system, "output_tokens_per_s", "-", "")
        _setup_axis(left, mode, "output tokens/s", loads)
        _plot_lines(right, by_system, "requests_per_s", "-", "req/s")
        _plot_lines(right, by_system, "goodput_requests_per_s", ":", "goodput")
        _setup_axis(right, mode, "requests/s", loads)
        fig.suptitle(f"Throughput: {title}")
        paths.append(_save(fig, stem, f"{suffix}_throughput.png"))
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for key, ax, ylabel in (
            ("ttft", left, "TTFT, ms"),
            ("itl", right, "inter-token latency, ms"),
        ):
            _plot_lines(ax, by_system, f"{key}_p50_ms", "-", "p50")
            _plot_lines(ax, by_system, f"{key}_p99_ms", "--", "p99")
            _setup_axis(ax, mode, ylabel, loads, log_y=True)
        fig.suptitle(f"Latency percentiles: {title}")
        paths.append(_save(fig, stem, f"{suffix}_latency.png"))
    return paths


def _save(fig, stem: Path, suffix: str) -> Path:  # noqa: ANN001
    import matplotlib.pyplot as plt

    path = stem.with_name(stem.name + suffix)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(value: object, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


_HEADER = (
    "| system | {load} | done/sent | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 ms | "
    "ITL p50 / p99 ms | E2E p50 ms | goodput req/s | errors | prefix hit |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _row(name: str, p: dict) -> str:
    hit = p.get("prefix_cache_hit_rate")
    cells = [
        name,
        f"{p['load']:g}",
        f"{p['completed']}/{p['num_requests']}",
        _fmt(p["requests_per_s"], 2),
        _fmt(p["output_tokens_per_s"], 1),
        f"{_fmt(p['ttft_p50_ms'])} / {_fmt(p['ttft_p99_ms'])}",
        _fmt(p["tpot_p50_ms"], 1),
        f"{_fmt(p['itl_p50_ms'], 1)} / {_fmt(p['itl_p99_ms'], 1)}",
        _fmt(p["e2e_p50_ms"]),
        _fmt(p["goodput_requests_per_s"], 2),
        str(p["errors"]),
        "-" if hit is None else f"{100 * hit:.0f}%",
    ]
    return "| " + " | ".join(cells) + " |"


def _ratios(by_system: dict[str, list[dict]], mode: str) -> list[str]:
    """surge's output tok/s over each other system's, at each load both measured."""
    if "surge" not in by_system or len(by_system) < 2:
        return []
    surge = {p["load"]: p["output_tokens_per_s"] for p in by_system["surge"]}
    lines = []
    for name, pts in by_system.items():
        pairs = [
            f"{p['load']:g}: {surge[p['load']] / p['output_tokens_per_s']:.2f}x"
            for p in pts
            if name != "surge" and p["load"] in surge and p["output_tokens_per_s"] > 0
        ]
        if pairs:
            lines.append(f"surge / {name} output tok/s by {mode}: " + ", ".join(pairs))
    return lines


def format_run_tables(result: dict) -> str:
    """Markdown tables of one run, one per load mode, then the ratios and any skipped systems."""
    out = []
    for mode in ("concurrency", "rate"):
        by_system = _points(result, mode)
        if not by_system:
            continue
        out.append(_HEADER.format(load="C" if mode == "concurrency" else "rate"))
        out += [_row(name, p) for name, pts in by_system.items() for p in pts]
        out += [""] + [f"- {line}" for line in _ratios(by_system, mode)]
        out += [
            f"- {name} {mode} {p['load']:g}: {p['errors']} errors, first: {p['first_error'][:200]}"
            for name, pts in by_system.items()
            for p in pts
            if p["errors"] and p.get("first_error")
        ]
    for system in result["systems"]:
        if system["status"] != "ok":
            out.append(f"- {system['name']}: {system['status']} ({system.get('reason', '')})")
    return "\n".join(out)


def _run_section(result: dict, json_path: Path, md_dir: Path) -> str:
    cfg, machine = result["config"], result["machine"]
    versions = ", ".join(s["version"] for s in result["systems"] if s.get("version"))
    loads = ", ".join(
        f"{s['name']} {s['loadavg_1m_at_start']:.2f}"
        for s in result["systems"]
        if s.get("loadavg_1m_at_start") is not None
    )
    slo = cfg["slo"]
    lines = [
        f"### Workload `{cfg['workload']}` ({result['started'][:10]})",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"Model {cfg['model']}; {cfg['num_prompts']} prompts per point (seed {cfg['seed']}), "
        f"max_tokens {cfg['max_tokens']}, ignore_eos {cfg['ignore_eos']}, streaming; "
        f"max duration per point {cfg['max_duration'] or 'none'} s; prefix caching "
        f"{'on' if cfg['prefix_caching'] else 'off'}; goodput SLO: TTFT <= {slo['ttft']} s and "
        f"TPOT <= {1000 * slo['tpot']:.0f} ms. Machine: {describe_cpu(machine)}, "
        f"{machine['memory_gib']} GiB; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}; {versions}. 1-minute load average when each "
        f"system started (it still holds the previous system's own load, which decays over a "
        f"minute): {loads or 'not recorded'}. "
        f"Results: `{_rel(json_path, md_dir)}`.",
        "",
        format_run_tables(result),
        "",
    ]
    for name in result.get("plots", []):
        lines.append(f"![{name}]({_rel(json_path.with_name(name), md_dir)})")
    return "\n".join(lines) + "\n"


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def serving_section(json_paths: Iterable[Path], md_dir: Path) -> str:
    """The whole `## Serving` section: how to regenerate it, then one part per results file."""
    parts = [
        SECTION_TITLE,
        "",
        f"Generated by `{REPORT_COMMAND}` from `benchmarks/results/serve_*.json` (each written by "
        "the `surge bench serve` command shown with it); edit the code, not this section. "
        "Columns: `done/sent` requests finished without error out of those started; TTFT = time to "
        "first token, TPOT = (E2E - TTFT) / (output tokens - 1), ITL = gap between streamed "
        "chunks, E2E = whole request, all client-side; goodput = requests/s meeting the SLO; "
        "`prefix hit` = the server's prefix-cache hit rate over the point (from its /metrics "
        "counters or its responses; `-` where it reports none). Systems: `surge`; `naive` (HF "
        "transformers `generate` behind FastAPI, one request at a time: "
        "`src/surge/bench/naive_server.py`); `vllm` and `llamacpp` (`llama-server`) from "
        "`$SURGE_PEERS` (default `~/.cache/surge/peers`), skipped with the reason when absent. "
        "Each system runs alone on the machine, started and stopped by the benchmark.",
        "",
    ]
    for path in sorted(json_paths):
        parts.append(_run_section(json.loads(path.read_text()), path.resolve(), md_dir))
    return "\n".join(parts)


def replace_section(markdown: str, section: str) -> str:
    """`markdown` with its `## Serving...` section (up to the next `## `) replaced, or appended."""
    lines = markdown.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("## Serving")), None)
    if start is None:
        return markdown.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def regenerate(results_dir: Path, markdown_path: Path) -> Path:
    """Rewrite the serving section of `markdown_path` from every serve_*.json in `results_dir`."""
    json_paths = sorted(results_dir.glob("serve_*.json"))
    if not json_paths:
        raise SystemExit(f"no serve_*.json results in {results_dir}")
    section = serving_section(json_paths, markdown_path.parent.resolve())
    text = markdown_path.read_text() if markdown_path.exists() else "# Benchmarks\n"
    markdown_path.write_text(replace_section(text, section))
    logger.info("rewrote the serving section of %s from %d results", markdown_path, len(json_paths))
    return markdown_path
