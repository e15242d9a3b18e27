"""Static HTML galleries of HumanVerse shards and of ``hyperhuman eval`` runs.

Pages are plain HTML files with inline CSS (and three lines of inline JS: ← / → turn pages) that
reference thumbnails written beside them by relative paths, so ``index.html`` opens from disk
in any browser, with no server and nothing fetched from the network. Items are paginated
(``page_size`` per page, prev/next links and a page index on every page): 10,000 samples make
100 light pages, not one giant one. Page 1 of the items is ``index.html`` itself, under a summary.

Shard gallery (:func:`shard_gallery`)::

    index.html                 rows per status, annotators, shards; then kept samples 1..page_size
    samples-0002.html ...      the next kept samples: photo, pose overlay, depth, normal, mask,
                               caption, size, source, annotators, full metadata (collapsed)
    rejected.html              what the filters threw away and why: rows per status and per rule,
                               the most frequent reasons, links to the pages below
    status-rejected-0001.html  the rows of one status (rejected, failed), paginated
    rule-min_people-0001.html  the rows of one rule, paginated
    thumbs/SHARD/KEY.*.jpg     thumbnails (masks: PNG); rejected rows get one of their source
                               image when it is a local file (remote sources are never fetched)
    gallery.json               what was written (counts, pages), for tools and tests

The shard parquet stores each row's status and reason, not the name of the rule that rejected
it, so the rule is recovered from the reason's wording (:data:`RULE_PATTERNS`: the messages of
``pipelines/filters.py`` and ``pipelines/fetch.py``). A parquet with a ``rule`` column is used as
is; an unknown wording is grouped by its text up to the first colon, numbers masked.

Generation gallery (:func:`generation_gallery`) of an eval run folder: ``metrics.json`` (either
``{"metrics": {name: number | null}, "skipped": {name: reason}, "info": {...}}`` or the metrics
flat at the top level) and ``samples.jsonl`` (per line: ``key``, ``prompt``, ``seed``, ``images``
= name → path relative to the run, ``pose_score``, optional ``meta``), by default into
``RUN/gallery/``: the metrics table on top of every page, then per sample the pose render,
generated RGB, depth, normal, refined and reference images (placeholders where one is missing;
each thumbnail links to the full image), prompt, seed and pose score.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from shards import codecs

DEFAULT_PAGE_SIZE = 100
DEFAULT_THUMB_SIZE = 256
SUMMARY_FILE = "gallery.json"
THUMBS = "thumbs"
TOP_REASONS = 30
STATUS_ORDER = ("ok", "rejected", "failed")

RULE_PATTERNS = (
    ("min_side", r"shorter side below|px on a side"),
    ("max_aspect", r"^aspect ratio "),
    ("min_people", r"people found, fewer than"),
    ("max_people", r"people found, more than"),
    ("min_person_area", r"^people cover "),
    ("transient", r"^transient: "),
    ("http_error", r"^HTTP \d+"),
    ("unsupported_url", r"^unsupported URL scheme"),
    ("too_large", r"^body larger than|^refusing to decode|more than the limit"),
    ("too_many_redirects", r"^too many redirects"),
    ("unreadable_source", r"^cannot read "),
    ("undecodable", r"not a readable image|corrupt or truncated|^empty body"),
)
"""(rule, regular expression on the reason), first match wins."""
_RULES = tuple((rule, re.compile(pattern)) for rule, pattern in RULE_PATTERNS)
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+(?:\.\d+)?")

# ---------------------------------------------------------------------------------------------
# HTML building blocks

CSS = """
:root{--fg:#1d232a;--muted:#5f6b77;--line:#d9dee4;--bg:#f5f6f8;--card:#fff;--accent:#0b5cad;--head:#eef1f4;
  --w:170px;--h:150px}
body.square{--w:150px}
*{box-sizing:border-box}
body{margin:0;font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  color:var(--fg);background:var(--bg)}
header{position:sticky;top:0;z-index:2;background:var(--card);border-bottom:1px solid var(--line);padding:6px 14px}
header h1{font-size:15px;margin:0;display:inline}
header .sub{color:var(--muted);margin-left:8px}
main{padding:8px 14px 40px}
h2{font-size:14px;margin:14px 0 6px}
a{color:var(--accent);text-decoration:none}
a:hover{text-decoration:underline}
nav.pages{display:flex;flex-wrap:wrap;gap:3px;align-items:center;margin:6px 0}
nav.pages a,nav.pages span.page{padding:0 6px;min-width:24px;text-align:center;border:1px solid var(--line);
  border-radius:3px;background:var(--card)}
nav.pages span.current{background:var(--accent);color:#fff;border-color:var(--accent)}
nav.pages .home{margin-right:8px}
nav.pages .of{margin-left:8px;color:var(--muted)}
table{border-collapse:collapse;background:var(--card);margin:2px 0 8px}
th,td{border:1px solid var(--line);padding:2px 7px;text-align:left;vertical-align:top}
th{background:var(--head);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.summary{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.item{display:flex;gap:10px;background:var(--card);border:1px solid var(--line);border-radius:4px;
  padding:6px;margin:0 0 6px}
.text{flex:0 0 250px;min-width:0;overflow-wrap:anywhere}
.imgs{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
figure{margin:0;width:var(--w)}
td figure{width:128px}
figcaption{font-size:11px;color:var(--muted);text-align:center;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
figure img{display:block;width:var(--w);height:var(--h);object-fit:contain;background:#20242a}
td figure img{width:128px;height:96px}
.missing{display:flex;align-items:center;justify-content:center;width:var(--w);height:var(--h);padding:4px;
  text-align:center;color:var(--muted);font-size:11px;
  background:repeating-linear-gradient(45deg,#eceef1,#eceef1 6px,#f7f8f9 6px,#f7f8f9 12px)}
td .missing{width:128px;height:96px}
.mono,.key{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.key{font-weight:600}
.caption{margin:3px 0;font-size:13px}
.muted,.null{color:var(--muted)}
.small{font-size:11px}
.problem{color:#b00020;font-size:11px}
details{margin-top:3px}
summary{cursor:pointer;color:var(--accent);font-size:12px}
details pre{max-height:320px;overflow:auto;font-size:11px;background:#f2f4f6;border:1px solid var(--line);
  padding:4px;margin:2px 0;white-space:pre-wrap}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;background:#e4e8ec}
.badge.ok{background:#cdebd3}.badge.rejected{background:#fbe1c2}.badge.failed{background:#f7c8c8}
"""

KEYS_JS = (
    "document.addEventListener('keydown',function(e){if(e.altKey||e.ctrlKey||e.metaKey)return;"
    "var r=e.key==='ArrowLeft'?'prev':e.key==='ArrowRight'?'next':null;"
    "var a=r&&document.querySelector('nav.pages a[rel='+r+']');if(a)location.href=a.href;});"
)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _href(relative: str) -> str:
    """A relative path as an attribute value: POSIX separators, percent-encoded, escaped."""
    return _esc(urllib.parse.quote(relative.replace(os.sep, "/")))


def _link(relative: str, text: str, rel: str = "", css: str = "") -> str:
    attributes = (f' rel="{rel}"' if rel else "") + (f' class="{css}"' if css else "")
    return f'<a href="{_href(relative)}"{attributes}>{_esc(text)}</a>'


def _document(title: str, subtitle: str, body: str, layout: str = "") -> str:
    """A complete page; ``layout="square"`` sizes image cells for square generations."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n"
        + (f'<body class="{_esc(layout)}">' if layout else "<body>")
        + f'<header><h1>{_esc(title)}</h1><span class="sub">{_esc(subtitle)}</span></header>\n'
        + f"<main>\n{body}\n</main><script>{KEYS_JS}</script></body></html>\n"
    )


def format_number(value) -> str:
    """Numbers as a researcher reads them: 4 significant digits, ints whole, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_number(v) for v in value) + "]"
    return str(value)


def _value_html(value) -> str:
    if value is None:
        return '<span class="null">—</span>'
    if isinstance(value, dict):
        return "<br>".join(f'<span class="mono">{_esc(k)}</span> {_value_html(v)}' for k, v in value.items())
    return _esc(format_number(value))


def _table(header: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    """``rows`` hold HTML (already escaped); columns in ``numeric`` are right-aligned."""

    def cell(tag: str, index: int, content: str) -> str:
        return f'<{tag} class="num">{content}</{tag}>' if index in numeric else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", i, _esc(name)) for i, name in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _details(label: str, content) -> str:
    text = json.dumps(content, indent=1, sort_keys=True, default=str)
    return f"<details><summary>{_esc(label)}</summary><pre>{_esc(text)}</pre></details>"


def _people(count: int) -> str:
    return f"{count} {'person' if count == 1 else 'people'}"


@dataclass
class Thumb:
    """A thumbnail written under the gallery folder (``path`` relative to it)."""

    path: str
    width: int
    height: int
    link: str | None = None  # the full image, relative to the gallery folder, when there is one


def _figure(label: str, thumb: Thumb | None, missing: str = "missing", title: str = "") -> str:
    caption = f'<figcaption title="{_esc(label)}">{_esc(label)}</figcaption>'
    if thumb is None:
        return f'<figure><div class="missing">{_esc(missing)}</div>{caption}</figure>'
    img = (
        f'<img src="{_href(thumb.path)}" width="{thumb.width}" height="{thumb.height}" alt="{_esc(label)}" '
        f'title="{_esc(title or label)}" loading="lazy" decoding="async">'
    )
    return f'<figure><a href="{_href(thumb.link or thumb.path)}">{img}</a>{caption}</figure>'


# ---------------------------------------------------------------------------------------------
# Pagination


def page_name(prefix: str, number: int, first: str | None = None) -> str:
    """File name of page ``number`` (1-based); page 1 is ``first`` when given (e.g. index.html)."""
    return first if number == 1 and first else f"{prefix}-{number:04d}.html"


def paginate(items: list, page_size: int) -> list[list]:
    """Consecutive chunks of at most ``page_size`` items (one empty page when there are none)."""
    if page_size < 1:
        raise ValueError(f"page_size must be ≥ 1, got {page_size}")
    return [items[start : start + page_size] for start in range(0, len(items), page_size)] or [[]]


def page_numbers(current: int, total: int, around: int = 3) -> list[int | None]:
    """The page links shown: 1, current ± ``around``, last; ``None`` where pages are skipped."""
    shown = sorted({1, total, *range(max(1, current - around), min(total, current + around) + 1)})
    numbers: list[int | None] = []
    for number in shown:
        if numbers and number - numbers[-1] > 1:
            numbers.append(None)
        numbers.append(number)
    return numbers


def _nav(prefix: str, current: int, total: int, first: str | None, home: tuple[str, str] | None) -> str:
    parts = [_link(home[0], home[1], css="home")] if home else []
    if total > 1:
        if current > 1:
            parts.append(_link(page_name(prefix, current - 1, first), "‹ prev", rel="prev"))
        for number in page_numbers(current, total):
            if number is None:
                parts.append('<span class="muted">…</span>')
            elif number == current:
                parts.append(f'<span class="page current">{number}</span>')
            else:
                parts.append(_link(page_name(prefix, number, first), str(number)))
        if current < total:
            parts.append(_link(page_name(prefix, current + 1, first), "next ›", rel="next"))
    parts.append(f'<span class="of">page {current} of {total}</span>')
    return '<nav class="pages">' + "".join(parts) + "</nav>"


def _write_pages(
    output: Path,
    items: list[str],
    *,
    prefix: str,
    page_size: int,
    title: str,
    what: str,
    first: str | None = None,
    head: str = "",
    first_head: str | None = None,
    home: tuple[str, str] | None = None,
    wrap: Callable[[list[str]], str] = "\n".join,
    layout: str = "",
) -> list[str]:
    """Write ``items`` (HTML fragments) as numbered pages; returns the page file names."""
    pages = paginate(items, page_size)
    names = []
    for number, chunk in enumerate(pages, start=1):
        name = page_name(prefix, number, first)
        start = (number - 1) * page_size
        span = f"{what} {start + 1}–{start + len(chunk)} of {len(items)}" if chunk else f"no {what}"
        nav = _nav(prefix, number, len(pages), first, home)
        top = first_head if number == 1 and first_head is not None else head
        (output / name).write_text(_document(title, span, top + nav + wrap(chunk) + nav, layout), encoding="utf-8")
        names.append(name)
    return names


def _clean_previous(output: Path) -> None:
    """A rerun into the same folder replaces what the previous gallery wrote there (its pages,
    listed in its ``gallery.json``, and ``thumbs/``), so no stale page survives."""
    summary = output / SUMMARY_FILE
    if not summary.is_file():
        return
    previous = json.loads(summary.read_text(encoding="utf-8"))
    for name in previous.get("pages", []):
        if "/" not in name and "\\" not in name and name.endswith(".html"):
            (output / name).unlink(missing_ok=True)
    if (output / THUMBS).is_dir():
        shutil.rmtree(output / THUMBS)


def _check_sizes(page_size: int, thumb_size: int) -> None:
    if page_size < 1:
        raise ValueError(f"page_size must be ≥ 1, got {page_size}")
    if thumb_size < 16:
        raise ValueError(f"thumb_size must be ≥ 16 pixels, got {thumb_size}")


# ---------------------------------------------------------------------------------------------
# Thumbnails


def _safe(name: str) -> str:
    """A file-name-safe form of a key or shard name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:80] or "_"


def _save(image: Image.Image, output: Path, relative: str, link: str | None = None) -> Thumb:
    path = output / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if relative.endswith(".png"):
        image.save(path, format="PNG", compress_level=6)
    else:
        image.convert("RGB").save(path, format="JPEG", quality=85)
    return Thumb(relative, image.width, image.height, link)


def _open_scaled(data: bytes, size: int, mode: str = "RGB", upright: bool = False) -> Image.Image:
    """Decode an encoded image straight to thumbnail size (JPEG draft mode: a fraction of a full
    decode), refusing decompression bombs as the shard codecs do."""
    image = codecs.open_image(data)
    try:
        if image.format == "JPEG":
            image.draft(mode, (size, size))
        if upright:
            image = ImageOps.exif_transpose(image)
        image = image.convert(mode)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for corrupt or truncated data
        raise codecs.DecodeError(f"image data is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    return image


def pose_overlay(photo: Image.Image, pose: dict) -> Image.Image:
    """The OpenPose-style skeleton (:func:`annotators.render.render_pose`) drawn over a dimmed
    ``photo`` of any size: keypoints are scaled from the pose's own ``width`` × ``height``, so
    the skeleton is drawn crisply at the photo's size."""
    from annotators.render import render_pose

    sx, sy = photo.width / float(pose["width"]), photo.height / float(pose["height"])
    people = []
    for person in pose["people"]:
        scaled = {}
        for name in ("keypoints", "wholebody"):
            if person.get(name) is not None:
                points = np.array(person[name], dtype=np.float32)
                points[:, 0] *= sx
                points[:, 1] *= sy
                scaled[name] = points
        people.append(scaled)
    skeleton = render_pose({"width": photo.width, "height": photo.height, "people": people})
    drawn = skeleton.any(axis=2)
    out = (np.asarray(photo.convert("RGB"), dtype=np.float32) * 0.6).astype(np.uint8)
    out[drawn] = skeleton[drawn]
    return Image.fromarray(out)


def _depth_thumb(data: bytes, encoding: dict | None, size: int) -> Image.Image:
    """16-bit depth → area-downscaled → :func:`annotators.render.render_depth` colours."""
    import cv2

    from annotators.render import render_depth

    usable = encoding if encoding and all(name in encoding for name in ("kind", "min", "max")) else None
    depth = codecs.decode_depth(data, usable)
    height, width = depth.shape
    scale = min(1.0, size / max(width, height))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(depth, target, interpolation=cv2.INTER_AREA)
    return Image.fromarray(render_depth(small, (encoding or {}).get("kind", "metric")))


# ---------------------------------------------------------------------------------------------
# Shard gallery


def rule_of(reason: str | None, status: str = "rejected") -> str:
    """The filter rule (or kind of failure) behind a rejected or failed row's reason."""
    text = reason or ""
    for rule, pattern in _RULES:
        if pattern.search(text):
            return rule
    if not text:
        return f"{status} (no reason)"
    return reason_template(text.split(":", 1)[0])[:60] or status


def reason_template(reason: str) -> str:
    """A reason with its numbers (and hex addresses) masked, to count reasons by kind."""
    return _NUMBER.sub("N", reason).strip()


def _local_path(source: str | None) -> Path | None:
    """The local file behind a row's source (an absolute path or a file:// URL), if any."""
    if not source:
        return None
    if source.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
    elif "://" in source:
        return None  # remote: a gallery never fetches anything
    else:
        path = Path(source)
    return path if path.is_absolute() and path.is_file() else None


@dataclass
class _Collected:
    items: list[str] = field(default_factory=list)  # kept samples, as HTML
    rows: list[dict] = field(default_factory=list)  # rejected and failed parquet rows
    statuses: Counter = field(default_factory=Counter)
    annotators: Counter = field(default_factory=Counter)
    shards: list[tuple[str, int, Counter]] = field(default_factory=list)


def _sample_item(raw: dict, shard: str, output: Path, thumb_size: int) -> tuple[str, list[tuple]]:
    """One kept sample (raw members) → thumbnails on disk; its HTML and its annotators."""
    key = raw.get("__key__", "?")
    base = f"{THUMBS}/{_safe(shard)}/{_safe(key)}"
    problems: list[str] = []
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"json: not valid JSON ({exc})")
    meta = meta if isinstance(meta, dict) else {"metadata": meta}
    found = meta.get("annotations")
    annotations = {k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}
    annotators = [
        (modality, *(str(entry.get(name, "")) for name in ("annotator", "version", "weights")))
        for modality, entry in annotations.items()
    ]

    def thumb(member: str, label: str, make: Callable[[], Image.Image], name: str) -> tuple[str, Thumb | None]:
        if member not in raw:
            return f"no {label}", None
        try:
            return "", _save(make(), output, name)
        except codecs.DecodeError as exc:
            problems.append(f"{member}: {exc}")
            return f"{label} undecodable", None

    photo = None
    if "jpg" in raw:
        try:
            photo = _open_scaled(raw["jpg"], thumb_size)
        except codecs.DecodeError as exc:
            problems.append(f"jpg: {exc}")
    pose = None
    if "pose.json" in raw:
        try:
            pose = codecs.decode_pose(raw["pose.json"])
        except codecs.DecodeError as exc:
            problems.append(f"pose.json: {exc}")
    people = len(pose["people"]) if pose is not None else meta.get("num_people")
    depth_encoding = annotations.get("depth")
    depth_kind = (depth_encoding or {}).get("kind")
    figures = [
        _figure("photo", None if photo is None else _save(photo, output, f"{base}.jpg"), "no photo"),
        _figure(
            "pose · " + _people(people) if pose is not None else "pose",
            _save(pose_overlay(photo, pose), output, f"{base}.pose.jpg") if pose and photo is not None else None,
            "no pose" if "pose.json" not in raw else "pose unavailable",
        ),
    ]
    for member, label, make, name in (
        ("depth.png", "depth", lambda: _depth_thumb(raw["depth.png"], depth_encoding, thumb_size), "depth.jpg"),
        ("normal.png", "normal", lambda: _open_scaled(raw["normal.png"], thumb_size), "normal.jpg"),
        ("mask.png", "mask", lambda: _open_scaled(raw["mask.png"], thumb_size, "L"), "mask.png"),
    ):
        missing, made = thumb(member, label, make, f"{base}.{name}")
        shown = f"depth · {depth_kind}" if label == "depth" and depth_kind else label
        figures.append(_figure(shown, made, missing))

    caption = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else ""
    width, height = meta.get("width"), meta.get("height")
    facts = [f"{width}×{height}" if width and height else "", _people(people) if people is not None else ""]
    facts.append(f"jpg {len(raw['jpg']) / 1024:.0f} kB" if "jpg" in raw else "no jpg")
    provenance = "".join(
        f"<div>{_esc(modality)}: {_esc(entry.get('annotator', '?'))} "
        f'<span class="muted">{_esc(entry.get("version", ""))}</span></div>'
        for modality, entry in sorted(annotations.items())
    )
    text = (
        f'<div class="text"><span class="key">{_esc(key)}</span> <span class="muted small">{_esc(shard)}</span>'
        + (
            f'<div class="caption">{_esc(caption)}</div>'
            if caption
            else '<div class="caption muted">(no caption)</div>'
        )
        + f'<div class="small">{_esc(" · ".join(fact for fact in facts if fact))}</div>'
        + f'<div class="small muted mono">{_esc(meta.get("source", ""))}</div>'
        + f'<div class="small">{provenance}</div>'
        + "".join(f'<div class="problem">{_esc(problem)}</div>' for problem in problems)
        + _details("metadata", meta)
        + "</div>"
    )
    return f'<div class="item" id="{_esc(key)}">{text}<div class="imgs">{"".join(figures)}</div></div>', annotators


def _parquet_rows(tar_url: str, storage_options: dict) -> list[dict]:
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(tar_url.removesuffix(".tar") + ".parquet", **storage_options)
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, use_threads=False).to_pylist()


def _collect(urls: list[str], output: Path, thumb_size: int, storage_options: dict) -> _Collected:
    """Thumbnails and HTML of every kept sample, and the parquet rows, shard by shard (one
    sample in memory at a time), in the shards' order."""
    from shards.reader import read_shard

    collected = _Collected()
    for url in urls:
        shard = url.rsplit("/", 1)[-1].removesuffix(".tar")
        kept_before = len(collected.items)
        for raw in read_shard(url, decode=False, storage_options=storage_options):
            item, annotators = _sample_item(raw, shard, output, thumb_size)
            collected.items.append(item)
            collected.annotators.update(annotators)
        _add_rows(collected, shard, kept_before, _parquet_rows(url, storage_options))
    return collected


def _add_rows(collected: _Collected, shard: str, kept_before: int, rows: list[dict]) -> None:
    counts = Counter()
    for row in rows:
        status = row.get("status") or "unknown"
        counts[status] += 1
        if status != "ok":
            rule = row.get("rule") or rule_of(row.get("reason"), status)
            collected.rows.append({**row, "status": status, "rule": rule, "shard": shard})
    collected.statuses.update(counts)
    collected.shards.append((shard, len(collected.items) - kept_before, counts))


ROW_COLUMNS = ("image", "key · shard", "status", "rule", "reason", "source", "caption")


def _row_item(row: dict, output: Path, thumb_size: int, source_thumbnails: bool) -> str:
    """One rejected or failed parquet row as a table row, with a thumbnail of a local source."""
    thumb, missing = None, "no image bytes"
    local = _local_path(row.get("source")) if source_thumbnails else None
    if local is not None:
        name = f"{THUMBS}/{_safe(row['shard'])}/{_safe(row.get('key') or '_')}.source.jpg"
        try:
            thumb = _save(_open_scaled(local.read_bytes(), thumb_size, upright=True), output, name)
        except (OSError, codecs.DecodeError):
            missing = "source unreadable"
    status = row["status"]
    cells = [
        _figure("source", thumb, missing, title=row.get("source") or ""),
        f'<span class="key">{_esc(row.get("key") or "")}</span><br>'
        f'<span class="muted small">{_esc(row["shard"])}</span>',
        f'<span class="badge {_esc(status)}">{_esc(status)}</span>',
        f'<span class="mono small">{_esc(row["rule"])}</span>',
        _esc(row.get("reason") or ""),
        f'<span class="mono small">{_esc(row.get("source") or "")}</span>',
        _esc(row.get("caption") or ""),
    ]
    return '<tr class="row">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _rows_table(rows: list[str]) -> str:
    if not rows:
        return '<p class="muted">no rows</p>'
    head = "".join(f"<th>{_esc(name)}</th>" for name in ROW_COLUMNS)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _status_table(statuses: Counter, links: dict[str, str]) -> str:
    total = sum(statuses.values())
    ordered = sorted(statuses.items(), key=lambda item: ((STATUS_ORDER + (item[0],)).index(item[0]), item[0]))
    return _table(
        ["status", "rows", "share"],
        [
            [_link(links[s], s) if s in links else _esc(s), str(n), f"{n / total:.1%}" if total else ""]
            for s, n in ordered
        ],
        numeric=frozenset({1, 2}),
    )


def _write_rejected(
    output: Path, collected: _Collected, title: str, page_size: int, thumb_size: int, source_thumbnails: bool
) -> tuple[list[str], dict[str, str]]:
    """``rejected.html`` and the pages per status and per rule; returns (pages, status → link)."""
    rows = collected.rows
    rendered = [_row_item(row, output, thumb_size, source_thumbnails) for row in rows]
    back = ("rejected.html", "◂ rejected summary")
    pages: list[str] = []
    taken: set[str] = set()

    def write(kind: str, value: str, what: str) -> str:
        slug = base = _safe(value)[:40]
        suffix = 1
        while slug in taken:  # two values with the same file-name form
            suffix += 1
            slug = f"{base}-{suffix}"
        taken.add(slug)
        selected = [html_row for row, html_row in zip(rows, rendered, strict=True) if row[kind] == value]
        pages.extend(
            _write_pages(
                output, selected, prefix=f"{kind}-{slug}", page_size=page_size, title=f"{what} · {title}",
                what=what, home=back, wrap=_rows_table,
            )
        )  # fmt: skip
        return page_name(f"{kind}-{slug}", 1)

    statuses = Counter(row["status"] for row in rows)
    rules = Counter(row["rule"] for row in rows)
    status_links = {status: write("status", status, f"{status} rows") for status in sorted(statuses)}
    rule_links = {rule: write("rule", rule, f"rows of rule {rule}") for rule, _ in rules.most_common()}
    by_rule: dict[str, Counter] = {}
    for row in rows:
        by_rule.setdefault(row["rule"], Counter())[row["status"]] += 1
    rule_table = _table(
        ["rule", "rows", "by status"],
        [
            [
                _link(rule_links[rule], rule),
                str(count),
                _esc(", ".join(f"{s} {n}" for s, n in sorted(by_rule[rule].items()))),
            ]
            for rule, count in rules.most_common()
        ],
        numeric=frozenset({1}),
    )
    reasons, examples = Counter(), {}
    for row in rows:
        kind = (row["status"], row["rule"], reason_template(row.get("reason") or ""))
        reasons[kind] += 1
        examples.setdefault(kind, row.get("reason") or "")
    reason_table = _table(
        ["status", "rule", "reason (numbers as N)", "rows", "example"],
        [
            [
                _esc(status),
                _esc(rule),
                _esc(template),
                str(n),
                f'<span class="small">{_esc(examples[status, rule, template])}</span>',
            ]
            for (status, rule, template), n in reasons.most_common(TOP_REASONS)
        ],
        numeric=frozenset({3}),
    )
    body = (
        _nav("rejected", 1, 1, None, ("index.html", "◂ index"))
        + f'<div class="summary"><div><h2>Rows per status</h2>{_status_table(collected.statuses, status_links)}</div>'
        + (
            f"<div><h2>Rows per rule</h2>{rule_table}</div></div>"
            f"<h2>Most frequent reasons (top {TOP_REASONS})</h2>{reason_table}"
            if rows
            else '</div><p class="muted">no row was rejected or failed</p>'
        )
    )
    subtitle = f"{len(rows)} of {sum(collected.statuses.values())} rows not kept"
    (output / "rejected.html").write_text(_document(f"rejected · {title}", subtitle, body), encoding="utf-8")
    return [*pages, "rejected.html"], status_links


def _index_summary(collected: _Collected, status_links: dict[str, str], shards_root: str) -> str:
    annotators = _table(
        ["modality", "annotator", "version", "weights", "samples"],
        [
            [_esc(m), _esc(a), _esc(v), f'<span class="small">{_esc(w)}</span>', str(n)]
            for (m, a, v, w), n in sorted(collected.annotators.items())
        ],
        numeric=frozenset({4}),
    )
    shards = _table(
        ["shard", "kept", *STATUS_ORDER],
        [
            [_esc(name), str(kept), *(str(counts.get(s, 0)) for s in STATUS_ORDER)]
            for name, kept, counts in collected.shards
        ],
        numeric=frozenset({1, 2, 3, 4}),
    )
    not_kept = len(collected.rows)
    shard_list = (
        f"<details><summary>{len(collected.shards)} complete shard(s)</summary>{shards}</details>"
        if collected.shards
        else f'<p class="problem">no complete shards (no *_stats.json marker) under {_esc(shards_root)}</p>'
    )
    return (
        f'<div class="summary"><div><h2>Rows per status</h2>{_status_table(collected.statuses, status_links)}'
        f"<p>{_link('rejected.html', f'What was thrown away, and why ({not_kept} rows) ›')}</p></div>"
        "<div><h2>Annotators</h2>"
        + (annotators if collected.annotators else '<p class="muted">no kept samples</p>')
        + f"</div></div>{shard_list}<h2>Kept samples</h2>"
    )


def shard_gallery(
    shards_root: str,
    output_dir: str,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    storage_options: dict | None = None,
    source_thumbnails: bool = True,
) -> Path:
    """Write a static HTML gallery of the complete shards under ``shards_root`` (any fsspec
    URL) into the local folder ``output_dir``; returns the path of its ``index.html``.

    Kept samples: photo, pose overlay, depth, normal, mask, caption and metadata. Rejected and
    failed parquet rows: ``rejected.html`` (counts per status and per rule, frequent reasons)
    and paginated pages per status and per rule. ``source_thumbnails``: show a rejected row's
    source image when it is a local file (remote sources are never fetched).
    """
    from shards.reader import complete_shard_urls

    _check_sizes(page_size, thumb_size)
    storage_options = storage_options or {}
    urls = complete_shard_urls(shards_root, storage_options)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    _clean_previous(output)

    collected = _collect(urls, output, thumb_size, storage_options)
    title = f"shards · {shards_root}"
    pages, status_links = _write_rejected(output, collected, shards_root, page_size, thumb_size, source_thumbnails)
    pages += _write_pages(
        output, collected.items, prefix="samples", page_size=page_size, title=title, what="kept samples",
        first="index.html", first_head=_index_summary(collected, status_links, shards_root),
    )  # fmt: skip
    summary = {
        "kind": "shards",
        "root": shards_root,
        "shards": len(urls),
        "samples": len(collected.items),
        "rows": dict(collected.statuses),
        "rules": dict(Counter(row["rule"] for row in collected.rows)),
        "page_size": page_size,
        "pages": sorted(pages),
    }
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")
    return output / "index.html"


# ---------------------------------------------------------------------------------------------
# Generation gallery

IMAGE_ORDER = ("pose", "rgb", "depth", "normal", "refined", "reference")
ALWAYS_SHOWN = ("pose", "rgb", "depth", "normal")
_NOT_METRICS = ("skipped", "info", "time_s")


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
            raise ValueError(f"{samples} line {number} is not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{samples} line {number} is not a JSON object but {type(record).__name__}")
        records.append(record)
    metrics = run / "metrics.json"
    return (json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {}), records


def split_metrics(report: dict) -> tuple[dict, dict, dict]:
    """``metrics.json`` → ``(metrics, skipped, info)``. Metrics are under ``"metrics"`` or flat
    at the top level (numbers and nulls); a skipped metric appears in ``metrics`` as ``None``;
    ``info`` gathers ``info``, ``time_s`` and any other entry."""
    skipped = report.get("skipped") if isinstance(report.get("skipped"), dict) else {}
    if isinstance(report.get("metrics"), dict):
        metrics = dict(report["metrics"])
        rest = {k: v for k, v in report.items() if k not in ("metrics", "skipped", "info")}
    else:
        metrics = {
            k: v
            for k, v in report.items()
            if k not in _NOT_METRICS and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
        }
        rest = {k: v for k, v in report.items() if k not in metrics and k not in ("skipped", "info")}
    for name in skipped:
        metrics.setdefault(name, None)
    info = report.get("info") if isinstance(report.get("info"), dict) else {}
    return metrics, skipped, {**info, **rest}


def _metrics_html(report: dict, with_info: bool) -> str:
    metrics, skipped, info = split_metrics(report)
    if not metrics:
        return '<h2>Metrics</h2><p class="muted">no metrics.json in this run (yet)</p>'
    rows = [
        [
            f'<span class="mono">{_esc(name)}</span>',
            _value_html(value),
            f'<span class="muted small">{_esc(skipped.get(name, ""))}</span>',
        ]
        for name, value in metrics.items()
    ]
    table = _table(["metric", "value", "skipped because"], rows, numeric=frozenset({1}))
    return "<h2>Metrics</h2>" + table + (_details("run info", info) if with_info and info else "")


def _generation_item(index: int, record: dict, columns: list[str], run: Path, output: Path, thumb_size: int) -> str:
    images = record.get("images") if isinstance(record.get("images"), dict) else {}
    key = str(record.get("key", ""))
    figures = []
    for name in columns:
        relative = images.get(name)
        source = run / relative if relative else None
        if source is None or not source.is_file():
            figures.append(_figure(name, None, f"{name} missing" if relative else f"no {name}"))
            continue
        try:
            image = _open_scaled(source.read_bytes(), thumb_size)
        except (OSError, codecs.DecodeError):
            figures.append(_figure(name, None, f"{name} unreadable"))
            continue
        thumb_name = f"{THUMBS}/{index:06d}-{_safe(key)[:40]}.{_safe(name)}.{'png' if name == 'pose' else 'jpg'}"
        link = os.path.relpath(source.resolve(), output.resolve())
        figures.append(_figure(name, _save(image, output, thumb_name, link), title=str(relative)))
    prompt = str(record.get("prompt") or "")
    text = (
        f'<div class="text"><span class="key">{_esc(key)}</span> '
        f'<span class="muted small">#{index + 1} · seed {_esc(record.get("seed", "—"))}</span>'
        + (
            f'<div class="caption">{_esc(prompt)}</div>'
            if prompt
            else '<div class="caption muted">(empty prompt)</div>'
        )
        + f'<div class="small"><b>pose score</b><br>{_value_html(record.get("pose_score"))}</div>'
        + (_details("meta", record["meta"]) if record.get("meta") else "")
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
    _check_sizes(page_size, thumb_size)
    run = Path(run_dir)
    report, records = read_run(run_dir)
    output = Path(output_dir) if output_dir else run / "gallery"
    output.mkdir(parents=True, exist_ok=True)
    _clean_previous(output)

    present = {name for record in records if isinstance(record.get("images"), dict) for name in record["images"]}
    columns = [name for name in IMAGE_ORDER if name in ALWAYS_SHOWN or name in present]
    columns += sorted(present - set(IMAGE_ORDER))
    items = [_generation_item(i, record, columns, run, output, thumb_size) for i, record in enumerate(records)]
    pages = _write_pages(
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
