"""Write bench/results/latest.json and a Markdown table with small SVG bar charts."""

from __future__ import annotations

import json
import platform
import time
from html import escape
from pathlib import Path

from bench.records import Figure

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def bar_chart_svg(title: str, bars: list[tuple[str, float]], unit: str) -> str:
    """A horizontal bar chart as a self-contained SVG (no plotting library needed)."""
    width, row, left = 640, 28, 230
    height = 40 + row * len(bars)
    top = max((v for _, v in bars), default=1.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12"><text x="10" y="20" font-weight="bold">{escape(title)} ({escape(unit)})</text>'
    ]
    for i, (label, value) in enumerate(bars):
        y = 32 + i * row
        w = max(1.0, (width - left - 90) * value / top)
        parts.append(f'<text x="10" y="{y + 15}">{escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row - 8}" fill="#3b7dd8"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{escape(_fmt(value))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_results(figures: list[Figure], errors: dict[str, str], directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    doc = {"meta": meta, "figures": [f.to_json() for f in figures], "errors": errors}
    path = directory / "latest.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Benchmark results",
        "",
        f"Run {meta['time']} on {meta['host']} (kernel {meta['kernel']}, Python {meta['python']}).",
        "",
        "| group | figure | value | unit | peer | peer value | ratio |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for f in figures:
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        lines.append(
            f"| {f.group} | {f.name} | {_fmt(f.value)} | {f.unit} | {f.peer or ''} | {_fmt(f.peer_value)} | {ratio} |"
        )
    charts = []
    for f in figures:
        if f.peer is not None and f.peer_value is not None:
            svg = directory / f"{f.name.replace('/', '_').replace(' ', '_')}.svg"
            svg.write_text(bar_chart_svg(f.name, [("esplanade", f.value), (f.peer, f.peer_value)], f.unit))
            charts.append(f"![{f.name}]({svg.name})")
    if charts:
        lines += ["", "## Side by side", "", *charts]
    if errors:
        lines += ["", "## Benchmarks that failed", ""] + [f"- `{name}`: {err}" for name, err in errors.items()]
    (directory / "latest.md").write_text("\n".join(lines) + "\n")
    return path
