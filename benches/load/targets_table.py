#!/usr/bin/env python3
"""Issue 13's target table from one run of benches/load/targets.sh: medians of the wrk cells
(Nightingale, real Triton, the HTTP ceiling), the gRPC-vs-HTTP table of grpc_http_load, and
benches/cnn/kernels.sh's pure-Rust-vs-onnxruntime times, each set against its target.
Prints Markdown; with --write FILE it also replaces the text between the markers
`<!-- targets:begin -->` and `<!-- targets:end -->` in FILE."""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from datetime import date
from pathlib import Path

BEGIN, END = "<!-- targets:begin -->", "<!-- targets:end -->"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def read_cells(path: Path, kind: str, key: str) -> dict[tuple[str, int], list[dict]]:
    """The JSON cells of targets.sh's lines `KIND KEY=… concurrency=N round=R {…}`, by (KEY, N)."""
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    pattern = re.compile(rf"{kind} {key}=(\S+) concurrency=(\d+) round=\d+ (\{{.*\}})$")
    for line in path.read_text().splitlines():
        m = pattern.match(line)
        if m:
            cells[(m[1], int(m[2]))].append(json.loads(m[3]))
    return cells


def http_section(path: Path) -> list[str]:
    cells = read_cells(path, "http", "server")

    def med(server: str, c: int) -> tuple[float, float, float, int] | None:
        runs = cells.get((server, c))
        if not runs:
            return None
        rps = statistics.median(r["requests"] / (r["duration_us"] / 1e6) for r in runs)
        p50 = statistics.median(r["p50_us"] for r in runs)
        p99 = statistics.median(r["p99_us"] for r in runs)
        errors = sum(r["non_2xx_or_errors"] for r in runs)
        return rps, p50, p99, errors

    out = [
        "| connections | server | req/s | p50 µs | p99 µs | errors |",
        "|---|---|---|---|---|---|",
    ]
    for c in (1, 16):
        for server in ("nightingale", "triton", "ceiling"):
            m = med(server, c)
            if m:
                out.append(f"| {c} | {server} | {m[0]:,.0f} | {m[1]:.0f} | {m[2]:.0f} | {m[3]} |")
    out += ["", "| target | measured | verdict |", "|---|---|---|"]
    for c in (1, 16):
        ng, tr, ce = med("nightingale", c), med("triton", c), med("ceiling", c)
        if ng and tr:
            ratio, p99 = ng[0] / tr[0], ng[2] / tr[2]
            out.append(
                f"| {c} connection(s): ≥ 2× Triton's req/s, p99 ≤ 0.5× Triton's "
                f"| {ratio:.2f}×, p99 {p99:.2f}× | {verdict(ratio >= 2 and p99 <= 0.5)} |"
            )
        if ng and ce:
            want = 0.3 if c == 1 else 0.5
            ratio = ng[0] / ce[0]
            out.append(
                f"| {c} connection(s): ≥ {want}× the HTTP ceiling | {ratio:.2f}× "
                f"| {verdict(ratio >= want)} |"
            )
    return out


def grpc_section(path: Path) -> list[str]:
    table = [l for l in path.read_text().splitlines() if l.startswith("|")]
    out = list(table) + ["", "| target | measured | verdict |", "|---|---|---|"]
    rps: dict[tuple[int, str], float] = {}
    for l in table[2:]:
        cols = [c.strip() for c in l.strip("|").split("|")]
        rps[(int(cols[0]), cols[1])] = float(cols[2])
    for c in sorted({c for c, _ in rps}):
        grpc = rps.get((c, "grpc"))
        http = max((v for (cc, k), v in rps.items() if cc == c and k.startswith("http")), default=None)
        if grpc and http:
            out.append(
                f"| {c} client(s): gRPC ≥ HTTP (the faster HTTP kind) | {grpc / http:.2f}× "
                f"| {verdict(grpc >= http)} |"
            )
    return out


def tritonclient_section(path: Path) -> list[str]:
    cells = read_cells(path, "tritonclient", "protocol")
    if not cells:
        return []
    out = [
        "| connections | client | req/s | p50 µs | p99 µs | errors |",
        "|---|---|---|---|---|---|",
    ]
    rps: dict[tuple[str, int], float] = {}
    for c in (1, 16):
        for proto in ("http", "grpc"):
            runs = cells.get((proto, c))
            if not runs:
                continue
            rps[(proto, c)] = statistics.median(r["requests_per_s"] for r in runs)
            p50 = statistics.median(r["latency_ms"]["p50"] for r in runs) * 1e3
            p99 = statistics.median(r["latency_ms"]["p99"] for r in runs) * 1e3
            errors = sum(r["errors"] for r in runs)
            name = "tritonclient.grpc" if proto == "grpc" else "tritonclient.http (JSON)"
            out.append(f"| {c} | {name} | {rps[(proto, c)]:,.0f} | {p50:.0f} | {p99:.0f} | {errors} |")
    out += ["", "| target | measured | verdict |", "|---|---|---|"]
    for c in (1, 16):
        if ("http", c) in rps and ("grpc", c) in rps:
            ratio = rps[("grpc", c)] / rps[("http", c)]
            out.append(
                f"| {c} connection(s): gRPC ≥ HTTP with Triton's own clients | {ratio:.2f}× "
                f"| {verdict(ratio >= 1)} |"
            )
    return out


def cnn_section(path: Path) -> list[str]:
    # Per (model, batch, engine): the medians and the minima of each round's calls.
    medians: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    minima: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for line in path.read_text().splitlines():
        m = re.match(
            r"(\S+) batch (\d+) (Nightingale|Tract|onnxruntime)[^:]*: median ([\d.]+) ms"
            r"(?:.*min ([\d.]+) ms)?",
            line,
        )
        if m:
            key = (m[1].split("/")[-3], int(m[2]), m[3])
            medians[key].append(float(m[4]))
            if m[5]:
                minima[key].append(float(m[5]))
    out = [
        "| model | batch | pure Rust ms (median / min) | onnxruntime ms (median / min) "
        "| onnxruntime ÷ pure Rust, medians (target ≥ 0.67) | the same, minima | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, batch in sorted({(m, b) for m, b, _ in medians}):
        ours = medians.get((model, batch, "Nightingale"))
        ort = medians.get((model, batch, "onnxruntime"))
        if not ours or not ort:
            continue
        a, b = statistics.median(ours), statistics.median(ort)
        ours_min = minima.get((model, batch, "Nightingale"))
        ort_min = minima.get((model, batch, "onnxruntime"))
        if ours_min and ort_min:
            a_min, b_min = min(ours_min), min(ort_min)
            mins = f"{a_min:.2f}"
            ort_mins = f"{b_min:.2f}"
            ratio_min = f"{b_min / a_min:.2f}"
            met_min = b_min / a_min >= 0.67
        else:
            mins = ort_mins = ratio_min = "–"
            met_min = False
        if b / a >= 0.67:
            result = "**met**"
        elif met_min:
            result = "**met by the minima only**"
        else:
            result = "**not met**"
        out.append(
            f"| {model} | {batch} | {a:.2f} / {mins} | {b:.2f} / {ort_mins} | {b / a:.2f} "
            f"| {ratio_min} | {result} |"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--grpc", type=Path)
    p.add_argument("--cnn", type=Path)
    p.add_argument("--commit", default="?")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--write", type=Path)
    a = p.parse_args()
    lines = [
        f"Run of {date.today().isoformat()}, commit `{a.commit}` (`benches/load/targets.sh`; "
        f"medians of {a.rounds} rounds, wrk {a.duration} s per cell, cells interleaved):",
        "",
        "**HTTP, 1-row JSON infers of wdbc-malignancy@1 asking for `probabilities`**",
        "",
        *http_section(a.results),
    ]
    if a.grpc:
        lines += ["", "**gRPC vs HTTP on the same server** (benches/grpc_http_load.rs)", ""]
        lines += grpc_section(a.grpc)
    triton_clients = tritonclient_section(a.results)
    if triton_clients:
        lines += ["", "**gRPC vs HTTP with Triton's own clients** (benches/load/triton_load.py)", ""]
        lines += triton_clients
    if a.cnn:
        lines += ["", "**Pure-Rust engine vs onnxruntime, one thread each** (benches/cnn/kernels.sh)", ""]
        lines += cnn_section(a.cnn)
    text = "\n".join(lines)
    print(text)
    if a.write:
        doc = a.write.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        a.write.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


if __name__ == "__main__":
    main()
