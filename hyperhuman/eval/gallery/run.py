"""The generation gallery of a ``hyperhuman eval`` run folder.

Reads ``metrics.json`` (either ``{"metrics": {name: number | null}, "skipped": {name: reason},
"warnings": {name: text}, "info": {...}}`` or the metrics flat at the top level) and
``samples.jsonl`` (per line: ``key``, ``prompt``, ``seed``, ``images`` = name → path relative to
the run, ``pose_score``, optional ``meta``), and writes by default into ``RUN/gallery/``: the
metrics table (with why a metric was skipped or why to distrust it) on top of every page, then per
sample the pose render, generated RGB, depth, normal, refined and reference images (placeholders
where one is missing; each thumbnail links to the full image), prompt, seed and pose score.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hyperhuman.config import ConfigError
from hyperhuman.eval.gallery.templates import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_THUMB_SIZE,
    SUMMARY_FILE,
    THUMBS,
    check_sizes,
    clean_previous,
    details,
    escape,
    figure,
    open_scaled,
    safe_name,
    save_thumb,
    table,
    value_html,
    write_pages,
)
from shards import codecs

IMAGE_ORDER = ("pose", "rgb", "depth", "normal", "refined", "reference")
ALWAYS_SHOWN = ("pose", "rgb", "depth", "normal")
_NOT_INFO = ("skipped", "warnings", "info")  # entries shown on their own, not under run info
_NOT_METRICS = (*_NOT_INFO, "time_s")


def read_run(run_dir: str) -> tuple[dict, list[dict]]:
    """``metrics.json`` (``{}`` while it does not exist yet) and the records of ``samples.jsonl``."""
    run = Path(run_dir)
    samples = run / "samples.jsonl"
    if not samples.is_file():
        raise FileNotFoundError(f"{samples} not found: pass a `hyperhuman eval` output folder (samples.jsonl)")
    records = []
    for number, line in enumerate(samples.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{samples} line {number} is not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{samples} line {number} is not a JSON object but {type(record).__name__}")
        records.append(record)
    metrics = run / "metrics.json"
    return (json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {}), records


def split_metrics(report: dict) -> tuple[dict, dict, dict]:
    """``metrics.json`` → ``(metrics, skipped, info)``. Metrics are under ``"metrics"`` or flat
    at the top level (numbers and nulls); a skipped metric appears in ``metrics`` as ``None``;
    ``info`` gathers ``info``, ``time_s`` and any other entry but ``warnings`` (see :func:`warnings_of`)."""
    skipped = report.get("skipped") if isinstance(report.get("skipped"), dict) else {}
    if isinstance(report.get("metrics"), dict):
        metrics = dict(report["metrics"])
        rest = {k: v for k, v in report.items() if k not in ("metrics", *_NOT_INFO)}
    else:
        metrics = {
            k: v
            for k, v in report.items()
            if k not in _NOT_METRICS and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
        }
        rest = {k: v for k, v in report.items() if k not in metrics and k not in _NOT_INFO}
    for name in skipped:
        metrics.setdefault(name, None)
    info = report.get("info") if isinstance(report.get("info"), dict) else {}
    return metrics, skipped, {**info, **rest}


def warnings_of(report: dict) -> dict[str, str]:
    """``metrics.json``'s warnings: metric name → why its value is unreliable (e.g. FID from few samples)."""
    found = report.get("warnings")
    return {str(name): str(text) for name, text in found.items()} if isinstance(found, dict) else {}


def _metrics_html(report: dict, with_info: bool) -> str:
    metrics, skipped, info = split_metrics(report)
    cautions = warnings_of(report)
    if not metrics:
        return '<h2>Metrics</h2><p class="muted">no metrics.json in this run (yet)</p>'
    rows = [
        [
            f'<span class="mono">{escape(name)}</span>',
            value_html(value),
            f'<span class="muted small">{escape(skipped.get(name, ""))}</span>'
            + (f'<span class="problem">{escape(cautions[name])}</span>' if name in cautions else ""),
        ]
        for name, value in metrics.items()
    ]
    metrics_table = table(["metric", "value", "skipped because / caution"], rows, numeric=frozenset({1}))
    return "<h2>Metrics</h2>" + metrics_table + (details("run info", info) if with_info and info else "")


def _generation_item(index: int, record: dict, columns: list[str], run: Path, output: Path, thumb_size: int) -> str:
    images = record.get("images") if isinstance(record.get("images"), dict) else {}
    key = str(record.get("key", ""))
    figures = []
    for name in columns:
        relative = images.get(name)
        source = run / relative if relative else None
        if source is None or not source.is_file():
            figures.append(figure(name, None, f"{name} missing" if relative else f"no {name}"))
            continue
        try:
            image = open_scaled(source.read_bytes(), thumb_size)
        except (OSError, codecs.DecodeError):
            figures.append(figure(name, None, f"{name} unreadable"))
            continue
        extension = "png" if name == "pose" else "jpg"
        thumb_name = f"{THUMBS}/{index:06d}-{safe_name(key)[:40]}.{safe_name(name)}.{extension}"
        full_image = os.path.relpath(source.resolve(), output.resolve())
        figures.append(figure(name, save_thumb(image, output, thumb_name, full_image), title=str(relative)))
    prompt = str(record.get("prompt") or "")
    text = (
        f'<div class="text"><span class="key">{escape(key)}</span> '
        f'<span class="muted small">#{index + 1} · seed {escape(record.get("seed", "—"))}</span>'
        + (
            f'<div class="caption">{escape(prompt)}</div>'
            if prompt
            else '<div class="caption muted">(empty prompt)</div>'
        )
        + f'<div class="small"><b>pose score</b><br>{value_html(record.get("pose_score"))}</div>'
        + (details("meta", record["meta"]) if record.get("meta") else "")
        + "</div>"
    )
    return f'<div class="item" id="s{index}">{text}<div class="imgs">{"".join(figures)}</div></div>'


def generation_gallery(
    run_dir: str,
    output_dir: str | None = None,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    thumb_size: int = DEFAULT_THUMB_SIZE,
) -> Path:
    """Write a static HTML gallery of a ``hyperhuman eval`` run folder (default output:
    ``RUN/gallery``); returns the path of its ``index.html``. Missing or unreadable images show
    as labelled placeholders; optional kinds (refined, reference, others) get a column when any
    sample has them."""
    check_sizes(page_size, thumb_size)
    run = Path(run_dir)
    report, records = read_run(run_dir)
    output = Path(output_dir) if output_dir else run / "gallery"
    output.mkdir(parents=True, exist_ok=True)
    clean_previous(output)

    present = {name for record in records if isinstance(record.get("images"), dict) for name in record["images"]}
    columns = [name for name in IMAGE_ORDER if name in ALWAYS_SHOWN or name in present]
    columns += sorted(present - set(IMAGE_ORDER))
    items = [_generation_item(i, record, columns, run, output, thumb_size) for i, record in enumerate(records)]
    pages = write_pages(
        output, items, prefix="samples", page_size=page_size, title=f"generations · {run.resolve().name}",
        what="samples", first="index.html", head=_metrics_html(report, with_info=False) + "<h2>Samples</h2>",
        first_head=_metrics_html(report, with_info=True) + "<h2>Samples</h2>", layout="square",
    )  # fmt: skip
    summary = {
        "kind": "generations",
        "run": str(run_dir),
        "samples": len(records),
        "columns": columns,
        "page_size": page_size,
        "pages": sorted(pages),
    }
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")
    return output / "index.html"
