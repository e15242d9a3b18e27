"""The building blocks of the static HTML galleries: page template and CSS, escaping, tables,
figures, pagination and thumbnails.

Pages are plain HTML files with inline CSS (and three lines of inline JS: ← / → turn pages) that
reference thumbnails written beside them by relative paths, so ``index.html`` opens from disk
in any browser, with no server and nothing fetched from the network. Items are paginated
(``page_size`` per page, prev/next links and a page index on every page): 10,000 samples make
100 light pages, not one giant one. Page 1 of the items is ``index.html`` itself, under a summary.
Each gallery records what it wrote in ``gallery.json``, so a rerun into the same folder removes
the previous pages first.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from hyperhuman.config import ConfigError
from shards import codecs

DEFAULT_PAGE_SIZE = 100
DEFAULT_THUMB_SIZE = 256
SUMMARY_FILE = "gallery.json"
THUMBS = "thumbs"

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


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def href(relative: str) -> str:
    """A relative path as an attribute value: POSIX separators, percent-encoded, escaped."""
    return escape(urllib.parse.quote(relative.replace(os.sep, "/")))


def link(relative: str, text: str, rel: str = "", css: str = "") -> str:
    attributes = (f' rel="{rel}"' if rel else "") + (f' class="{css}"' if css else "")
    return f'<a href="{href(relative)}"{attributes}>{escape(text)}</a>'


def document(title: str, subtitle: str, body: str, layout: str = "") -> str:
    """A complete page; ``layout="square"`` sizes image cells for square generations."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n"
        + (f'<body class="{escape(layout)}">' if layout else "<body>")
        + f'<header><h1>{escape(title)}</h1><span class="sub">{escape(subtitle)}</span></header>\n'
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


def value_html(value) -> str:
    if value is None:
        return '<span class="null">—</span>'
    if isinstance(value, dict):
        return "<br>".join(f'<span class="mono">{escape(k)}</span> {value_html(v)}' for k, v in value.items())
    return escape(format_number(value))


def table(header: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    """``rows`` hold HTML (already escaped); columns in ``numeric`` are right-aligned."""

    def cell(tag: str, index: int, content: str) -> str:
        return f'<{tag} class="num">{content}</{tag}>' if index in numeric else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", i, escape(name)) for i, name in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def details(label: str, content) -> str:
    text = json.dumps(content, indent=1, sort_keys=True, default=str)
    return f"<details><summary>{escape(label)}</summary><pre>{escape(text)}</pre></details>"


@dataclass
class Thumb:
    """A thumbnail written under the gallery folder (``path`` relative to it)."""

    path: str
    width: int
    height: int
    link: str | None = None  # the full image, relative to the gallery folder, when there is one


def figure(label: str, thumb: Thumb | None, missing: str = "missing", title: str = "") -> str:
    caption = f'<figcaption title="{escape(label)}">{escape(label)}</figcaption>'
    if thumb is None:
        return f'<figure><div class="missing">{escape(missing)}</div>{caption}</figure>'
    img = (
        f'<img src="{href(thumb.path)}" width="{thumb.width}" height="{thumb.height}" alt="{escape(label)}" '
        f'title="{escape(title or label)}" loading="lazy" decoding="async">'
    )
    return f'<figure><a href="{href(thumb.link or thumb.path)}">{img}</a>{caption}</figure>'


# ---------------------------------------------------------------------------------------------
# Pagination


def page_name(prefix: str, number: int, first: str | None = None) -> str:
    """File name of page ``number`` (1-based); page 1 is ``first`` when given (e.g. index.html)."""
    return first if number == 1 and first else f"{prefix}-{number:04d}.html"


def paginate(items: list, page_size: int) -> list[list]:
    """Consecutive chunks of at most ``page_size`` items (one empty page when there are none)."""
    if page_size < 1:
        raise ConfigError(f"page_size must be ≥ 1, got {page_size}")
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


def nav(prefix: str, current: int, total: int, first: str | None, home: tuple[str, str] | None) -> str:
    parts = [link(home[0], home[1], css="home")] if home else []
    if total > 1:
        if current > 1:
            parts.append(link(page_name(prefix, current - 1, first), "‹ prev", rel="prev"))
        for number in page_numbers(current, total):
            if number is None:
                parts.append('<span class="muted">…</span>')
            elif number == current:
                parts.append(f'<span class="page current">{number}</span>')
            else:
                parts.append(link(page_name(prefix, number, first), str(number)))
        if current < total:
            parts.append(link(page_name(prefix, current + 1, first), "next ›", rel="next"))
    parts.append(f'<span class="of">page {current} of {total}</span>')
    return '<nav class="pages">' + "".join(parts) + "</nav>"


def write_pages(
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
        navigation = nav(prefix, number, len(pages), first, home)
        top = first_head if number == 1 and first_head is not None else head
        page = document(title, span, top + navigation + wrap(chunk) + navigation, layout)
        (output / name).write_text(page, encoding="utf-8")
        names.append(name)
    return names


def clean_previous(output: Path) -> None:
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


def check_sizes(page_size: int, thumb_size: int) -> None:
    if page_size < 1:
        raise ConfigError(f"page_size must be ≥ 1, got {page_size}")
    if thumb_size < 16:
        raise ConfigError(f"thumb_size must be ≥ 16 pixels, got {thumb_size}")


# ---------------------------------------------------------------------------------------------
# Thumbnails


def safe_name(name: str) -> str:
    """A file-name-safe form of a key or shard name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:80] or "_"


def save_thumb(image: Image.Image, output: Path, relative: str, link: str | None = None) -> Thumb:
    path = output / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if relative.endswith(".png"):
        image.save(path, format="PNG", compress_level=6)
    else:
        image.convert("RGB").save(path, format="JPEG", quality=85)
    return Thumb(relative, image.width, image.height, link)


def open_scaled(data: bytes, size: int, mode: str = "RGB", upright: bool = False) -> Image.Image:
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
