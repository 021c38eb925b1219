"""OUT_DIR/report.html: one self-contained page (no file or network beside it) with the summary on top,
then per task and category each case's inputs, instruction, translated prompt and output side by side.

Images are inlined as `data:` URIs, scaled to at most `THUMB_SIDE` pixels a side (JPEG), so that a
full benchmark of several hundred cases stays a page a browser opens; the saved outputs keep full size.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dreamomni2.bench.summary import Summary, table_rows

THUMB_SIDE = 384

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; }
table.summary { border-collapse: collapse; margin-bottom: .5rem; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }
table.summary tr:last-child td { font-weight: 600; }
section.case { display: flex; gap: 1rem; align-items: flex-start; border-top: 1px solid #ddd;
  padding: .75rem 0; flex-wrap: wrap; }
figure { margin: 0; text-align: center; }
figure img { max-width: 192px; max-height: 192px; display: block; border: 1px solid #ccc; }
figcaption { font-size: 12px; color: #555; }
.text { flex: 1 1 320px; min-width: 240px; overflow-wrap: anywhere; }
.status-succeeded { color: #137333; } .status-failed, .status-canceled { color: #b3261e; }
.missing { width: 192px; height: 96px; border: 1px dashed #b3261e; color: #b3261e; font-size: 12px;
  display: flex; align-items: center; justify-content: center; }
"""


def data_uri(path: Path, side: int = THUMB_SIDE) -> str | None:
    """The image at `path` as a JPEG `data:` URI at most `side` pixels a side; None if unreadable."""
    try:
        with Image.open(path) as image:
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(path: Path | None, caption: str) -> str:
    uri = data_uri(path) if path is not None else None
    if uri is None:
        what = "no output" if path is None else f"cannot read {path.name}"
        body = f'<div class="missing">{escape(what)}</div>'
    else:
        body = f'<img src="{uri}" alt="{escape(caption)}">'
    return f"<figure>{body}<figcaption>{escape(caption)}</figcaption></figure>"


def _verdict(verdict: object) -> str:
    if not isinstance(verdict, dict):
        return ""
    if verdict.get("error"):
        return f'<p class="judge"><b>judge:</b> no answer ({escape(str(verdict["error"]))})</p>'
    scores = verdict.get("scores")
    if not isinstance(scores, dict):
        raw = str(verdict.get("raw") or "")
        return f'<p class="judge"><b>judge:</b> unscored; its answer: <q>{escape(raw[:500])}</q></p>'
    shown = ", ".join(f"{escape(str(name))} {escape(str(value))}" for name, value in scores.items())
    outcome = "success" if verdict.get("success") else "not a success"
    reason = f" &mdash; {escape(str(verdict['reason']))}" if verdict.get("reason") else ""
    return f'<p class="judge"><b>judge:</b> {outcome} ({shown}){reason}</p>'


def case_html(record: dict[str, Any], out_dir: Path) -> str:
    """One case: its inputs, its text (instruction, prompt, status, timings, verdict) and its output."""
    images = record.get("images") or []
    inputs = [_figure(Path(path), f"image {number}") for number, path in enumerate(images, start=1)]
    output = record.get("output")
    status = str(record.get("status"))
    latency = record.get("latency_s")
    error = record.get("error") or {}
    timings = ", ".join(f"{name} {value:.2f} s" for name, value in (record.get("timings") or {}).items()
                        if isinstance(value, int | float))  # fmt: skip
    lines = [
        f"<h4>{escape(str(record.get('case_id')))}</h4>",
        f"<p><b>instruction:</b> {escape(str(record.get('instruction') or ''))}</p>",
        f"<p><b>prompt:</b> {escape(str(record.get('prompt') or '-'))}</p>",
        f'<p><b>status:</b> <span class="status-{escape(status)}">{escape(status)}</span>'
        + (f" &mdash; {escape(str(error.get('code')))}: {escape(str(error.get('message')))}" if error else "")
        + "</p>",
        f"<p><b>scope:</b> {escape(str(record.get('scope')))}; "
        f"<b>job:</b> {escape(str(record.get('job_id')))}"
        + (f"; <b>latency:</b> {latency:.2f} s" if isinstance(latency, float | int) else "")
        + "</p>",
    ]
    if timings:
        lines.append(f"<p><b>stages:</b> {escape(timings)}</p>")
    lines.append(_verdict(record.get("judge")))
    text = '<div class="text">' + "".join(lines) + "</div>"
    result = _figure(out_dir / output if isinstance(output, str) else None, "output")
    return f'<section class="case">{"".join(inputs)}{text}{result}</section>'


def summary_html(summary: Summary) -> str:
    """The summary table and the service figures."""
    header, *rows = table_rows(summary)
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    rate = "-" if summary.jobs_per_minute is None else f"{summary.jobs_per_minute:.2f}"
    gpu = "-" if summary.gpu_s_per_case is None else f"{summary.gpu_s_per_case:.2f}"
    return (
        f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f'<p class="service">jobs per minute: {rate} ({summary.jobs_this_run} job(s) this run); '
        f"GPU seconds per case: {gpu} (the jobs' timings.total)</p>"
    )


def write_report(path: Path, records: list[dict[str, Any]], summary: Summary, title: str) -> Path:
    """Write the page for `records` (in their order, grouped by task and category) to `path`."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((str(record.get("task")), str(record.get("category"))), []).append(record)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        summary_html(summary),
    ]
    for task in sorted({task for task, _ in groups}, key=lambda t: (t != "edit", t)):
        parts.append(f"<h2>{escape(task)}</h2>")
        for (group_task, category), members in groups.items():
            if group_task == task:
                parts.append(f'<div class="category"><h3>{escape(task)} / {escape(category)} '
                             f"({len(members)} case(s))</h3>")  # fmt: skip
                parts += [case_html(record, path.parent) for record in members]
                parts.append("</div>")
    parts.append("</body></html>")
    temporary = path.with_suffix(".html.tmp")
    temporary.write_text("".join(parts), encoding="utf-8")
    temporary.replace(path)
    return path
