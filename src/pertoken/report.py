"""Gather ``docs/results/*.json`` into one self-contained HTML page with tables and plots.

A result file is a JSON object. Its section is its ``method`` field (else the file name, less a
``demo-`` prefix). Top-level scalars become a summary table, lists of objects become tables,
and a ``plots`` list draws matplotlib figures, embedded as PNG data so the page opens from
disk without a server. A plot is ``{"title", "kind": "line"|"bar", "x": [...],
"series": {"name": [...]}, "xlabel", "ylabel", "logy": false}``; in a line plot a series may
carry its own x values as ``{"x": [...], "y": [...]}``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from pathlib import Path

from pertoken.atomic import write_text_atomic
from pertoken.errors import UserError

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.file{color:#666;font-size:.85em}img{max-width:100%;border:1px solid #eee}
nav a{margin-right:1em}
"""


def _fmt(value) -> tuple[str, bool]:
    """Text for a cell and whether it is numeric."""
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, int):
        return f"{value:,}", True
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value), True
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}", True
        return f"{value:.4g}", True
    if value is None:
        return "", False
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value))[:200], False
    return html.escape(str(value)), False


def _cell(value, tag: str = "td") -> str:
    text, numeric = _fmt(value)
    return f'<{tag} class="num">{text}</{tag}>' if numeric and tag == "td" else f"<{tag}>{text}</{tag}>"


def _kv_table(items: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th>{_cell(v)}</tr>" for k, v in items.items())
    return f"<table>{rows}</table>"


def _rows_table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not isinstance(row[k], (dict, list))]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def plot_png(spec: dict) -> bytes:
    """Draw one plot spec (see the module docstring) and return PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    x = spec.get("x", [])
    series = spec.get("series", {})
    if spec.get("kind", "line") == "bar":
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            ax.bar([j + i * width for j in range(len(values))], values, width, label=name)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(x))])
        ax.set_xticklabels([str(v) for v in x], rotation=30 if len(x) > 5 else 0, ha="right"
                           if len(x) > 5 else "center")
    else:
        for name, values in series.items():
            if isinstance(values, dict):  # a series with its own x values
                ax.plot(values["x"], values["y"], marker="o", label=name)
            else:
                ax.plot(x, values, marker="o", label=name)
    if spec.get("logy"):
        ax.set_yscale("log")
    ax.set_title(spec.get("title", ""))
    ax.set_xlabel(spec.get("xlabel", ""))
    ax.set_ylabel(spec.get("ylabel", ""))
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _render_result(path: Path, result: dict) -> str:
    parts = [f"<h3>{html.escape(str(result.get('title', path.stem)))}</h3>",
             f'<p class="file">{html.escape(path.name)}</p>']
    if result.get("description"):
        parts.append(f"<p>{html.escape(str(result['description']))}</p>")
    scalars = {k: v for k, v in result.items()
               if k not in ("title", "description", "method", "plots")
               and not isinstance(v, (dict, list))}
    if scalars:
        parts.append(_kv_table(scalars))
    for key, value in result.items():
        if key == "plots":
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            parts.append(f"<h4>{html.escape(key)}</h4>{_rows_table(value)}")
        elif isinstance(value, dict) and value:
            flat = all(not isinstance(v, (dict, list)) for v in value.values())
            body = _kv_table(value) if flat else f"<pre>{html.escape(json.dumps(value, indent=1))}</pre>"
            parts.append(f"<h4>{html.escape(key)}</h4>{body}")
    for spec in result.get("plots", []):
        data = base64.b64encode(plot_png(spec)).decode("ascii")
        alt = html.escape(spec.get("title", "plot"))
        parts.append(f'<p><img alt="{alt}" src="data:image/png;base64,{data}"></p>')
    return "\n".join(parts)


def section_of(path: Path, result: dict) -> str:
    """The report section a result file belongs to."""
    if isinstance(result.get("method"), str):
        return result["method"]
    stem = path.stem
    return stem[len("demo-"):] if stem.startswith("demo-") else stem


def build_report(results_dir: Path, output: Path) -> Path:
    """Write the HTML report for every JSON file in ``results_dir`` to ``output`` (atomically)."""
    if not results_dir.is_dir():
        raise UserError(f"no results folder {results_dir}: run `pertoken demo` or a benchmark first")
    sections: dict[str, list[str]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            log.warning("skipping %s: not valid JSON (%s)", path, error)
            continue
        if not isinstance(result, dict):
            log.warning("skipping %s: not a JSON object", path)
            continue
        sections.setdefault(section_of(path, result), []).append(_render_result(path, result))
    nav = " ".join(f'<a href="#{html.escape(name)}">{html.escape(name)}</a>' for name in sections)
    body = "\n".join(f'<h2 id="{html.escape(name)}">{html.escape(name)}</h2>\n' + "\n".join(parts)
                     for name, parts in sections.items())
    if not sections:
        body = f"<p>No results in {html.escape(str(results_dir))} yet.</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>pertoken report</title>"
            f"<style>{_CSS}</style></head><body><h1>pertoken report</h1><nav>{nav}</nav>\n"
            f"{body}\n</body></html>\n")
    write_text_atomic(output, page)
    log.info("report with %d sections written to %s", len(sections), output)
    return output
