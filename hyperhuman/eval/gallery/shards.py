"""The shard gallery: every kept sample of HumanVerse shards with all its modalities, and the
rows the annotation job did not keep, by status and by rule.

Written into one folder (:func:`shard_gallery`)::

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

A row's rule is the parquet's ``rule`` column (the filter that rejected it, or the kind of
failure: ``fetch``, ``decode``, ``transient``, ``caption``, ...); a row without one (an
annotator's exception, or shards written before the column existed) is grouped as
``STATUS (no rule)``. Reasons are never parsed for a rule.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from hyperhuman.eval.gallery.templates import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_THUMB_SIZE,
    SUMMARY_FILE,
    THUMBS,
    Thumb,
    check_sizes,
    clean_previous,
    details,
    document,
    escape,
    figure,
    link,
    nav,
    open_scaled,
    page_name,
    safe_name,
    save_thumb,
    table,
    write_pages,
)
from shards import codecs

TOP_REASONS = 30
STATUS_ORDER = ("ok", "rejected", "failed")

_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+(?:\.\d+)?")


def _people(count: int) -> str:
    return f"{count} {'person' if count == 1 else 'people'}"


def pose_overlay(photo: Image.Image, pose: dict) -> Image.Image:
    """The OpenPose-style skeleton (:func:`hyperhuman.skeleton.render_pose`) drawn over a dimmed
    ``photo`` of any size: keypoints are scaled from the pose's own ``width`` × ``height``, so
    the skeleton is drawn crisply at the photo's size."""
    from hyperhuman.skeleton import render_pose

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


def rule_of(row: dict, status: str) -> str:
    """The rule column of a rejected or failed row, or ``STATUS (no rule)``."""
    return row.get("rule") or f"{status} (no rule)"


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
    base = f"{THUMBS}/{safe_name(shard)}/{safe_name(key)}"
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
            return "", save_thumb(make(), output, name)
        except codecs.DecodeError as exc:
            problems.append(f"{member}: {exc}")
            return f"{label} undecodable", None

    photo = None
    if "jpg" in raw:
        try:
            photo = open_scaled(raw["jpg"], thumb_size)
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
        figure("photo", None if photo is None else save_thumb(photo, output, f"{base}.jpg"), "no photo"),
        figure(
            "pose · " + _people(people) if pose is not None else "pose",
            save_thumb(pose_overlay(photo, pose), output, f"{base}.pose.jpg") if pose and photo is not None else None,
            "no pose" if "pose.json" not in raw else "pose unavailable",
        ),
    ]
    for member, label, make, name in (
        ("depth.png", "depth", lambda: _depth_thumb(raw["depth.png"], depth_encoding, thumb_size), "depth.jpg"),
        ("normal.png", "normal", lambda: open_scaled(raw["normal.png"], thumb_size), "normal.jpg"),
        ("mask.png", "mask", lambda: open_scaled(raw["mask.png"], thumb_size, "L"), "mask.png"),
    ):
        missing, made = thumb(member, label, make, f"{base}.{name}")
        shown = f"depth · {depth_kind}" if label == "depth" and depth_kind else label
        figures.append(figure(shown, made, missing))

    caption = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else ""
    width, height = meta.get("width"), meta.get("height")
    facts = [f"{width}×{height}" if width and height else "", _people(people) if people is not None else ""]
    facts.append(f"jpg {len(raw['jpg']) / 1024:.0f} kB" if "jpg" in raw else "no jpg")
    provenance = "".join(
        f"<div>{escape(modality)}: {escape(entry.get('annotator', '?'))} "
        f'<span class="muted">{escape(entry.get("version", ""))}</span></div>'
        for modality, entry in sorted(annotations.items())
    )
    text = (
        f'<div class="text"><span class="key">{escape(key)}</span> <span class="muted small">{escape(shard)}</span>'
        + (
            f'<div class="caption">{escape(caption)}</div>'
            if caption
            else '<div class="caption muted">(no caption)</div>'
        )
        + f'<div class="small">{escape(" · ".join(fact for fact in facts if fact))}</div>'
        + f'<div class="small muted mono">{escape(meta.get("source", ""))}</div>'
        + f'<div class="small">{provenance}</div>'
        + "".join(f'<div class="problem">{escape(problem)}</div>' for problem in problems)
        + details("metadata", meta)
        + "</div>"
    )
    return f'<div class="item" id="{escape(key)}">{text}<div class="imgs">{"".join(figures)}</div></div>', annotators


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
            rule = rule_of(row, status)
            collected.rows.append({**row, "status": status, "rule": rule, "shard": shard})
    collected.statuses.update(counts)
    collected.shards.append((shard, len(collected.items) - kept_before, counts))


ROW_COLUMNS = ("image", "key · shard", "status", "rule", "reason", "source", "caption")


def _row_item(row: dict, output: Path, thumb_size: int, source_thumbnails: bool) -> str:
    """One rejected or failed parquet row as a table row, with a thumbnail of a local source."""
    thumb, missing = None, "no image bytes"
    local = _local_path(row.get("source")) if source_thumbnails else None
    if local is not None:
        name = f"{THUMBS}/{safe_name(row['shard'])}/{safe_name(row.get('key') or '_')}.source.jpg"
        try:
            thumb = save_thumb(open_scaled(local.read_bytes(), thumb_size, upright=True), output, name)
        except (OSError, codecs.DecodeError):
            missing = "source unreadable"
    status = row["status"]
    cells = [
        figure("source", thumb, missing, title=row.get("source") or ""),
        f'<span class="key">{escape(row.get("key") or "")}</span><br>'
        f'<span class="muted small">{escape(row["shard"])}</span>',
        f'<span class="badge {escape(status)}">{escape(status)}</span>',
        f'<span class="mono small">{escape(row["rule"])}</span>',
        escape(row.get("reason") or ""),
        f'<span class="mono small">{escape(row.get("source") or "")}</span>',
        escape(row.get("caption") or ""),
    ]
    return '<tr class="row">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _rows_table(rows: list[str]) -> str:
    if not rows:
        return '<p class="muted">no rows</p>'
    head = "".join(f"<th>{escape(name)}</th>" for name in ROW_COLUMNS)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _status_table(statuses: Counter, links: dict[str, str]) -> str:
    total = sum(statuses.values())
    ordered = sorted(statuses.items(), key=lambda item: ((STATUS_ORDER + (item[0],)).index(item[0]), item[0]))
    return table(
        ["status", "rows", "share"],
        [
            [link(links[s], s) if s in links else escape(s), str(n), f"{n / total:.1%}" if total else ""]
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
        slug = base = safe_name(value)[:40]
        suffix = 1
        while slug in taken:  # two values with the same file-name form
            suffix += 1
            slug = f"{base}-{suffix}"
        taken.add(slug)
        selected = [html_row for row, html_row in zip(rows, rendered, strict=True) if row[kind] == value]
        pages.extend(
            write_pages(
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
    rule_table = table(
        ["rule", "rows", "by status"],
        [
            [
                link(rule_links[rule], rule),
                str(count),
                escape(", ".join(f"{s} {n}" for s, n in sorted(by_rule[rule].items()))),
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
    reason_table = table(
        ["status", "rule", "reason (numbers as N)", "rows", "example"],
        [
            [
                escape(status),
                escape(rule),
                escape(template),
                str(n),
                f'<span class="small">{escape(examples[status, rule, template])}</span>',
            ]
            for (status, rule, template), n in reasons.most_common(TOP_REASONS)
        ],
        numeric=frozenset({3}),
    )
    body = (
        nav("rejected", 1, 1, None, ("index.html", "◂ index"))
        + f'<div class="summary"><div><h2>Rows per status</h2>{_status_table(collected.statuses, status_links)}</div>'
        + (
            f"<div><h2>Rows per rule</h2>{rule_table}</div></div>"
            f"<h2>Most frequent reasons (top {TOP_REASONS})</h2>{reason_table}"
            if rows
            else '</div><p class="muted">no row was rejected or failed</p>'
        )
    )
    subtitle = f"{len(rows)} of {sum(collected.statuses.values())} rows not kept"
    (output / "rejected.html").write_text(document(f"rejected · {title}", subtitle, body), encoding="utf-8")
    return [*pages, "rejected.html"], status_links


def _index_summary(collected: _Collected, status_links: dict[str, str], shards_root: str) -> str:
    annotators = table(
        ["modality", "annotator", "version", "weights", "samples"],
        [
            [escape(m), escape(a), escape(v), f'<span class="small">{escape(w)}</span>', str(n)]
            for (m, a, v, w), n in sorted(collected.annotators.items())
        ],
        numeric=frozenset({4}),
    )
    shards = table(
        ["shard", "kept", *STATUS_ORDER],
        [
            [escape(name), str(kept), *(str(counts.get(s, 0)) for s in STATUS_ORDER)]
            for name, kept, counts in collected.shards
        ],
        numeric=frozenset({1, 2, 3, 4}),
    )
    not_kept = len(collected.rows)
    shard_list = (
        f"<details><summary>{len(collected.shards)} complete shard(s)</summary>{shards}</details>"
        if collected.shards
        else f'<p class="problem">no complete shards (no commit record) under {escape(shards_root)}</p>'
    )
    return (
        f'<div class="summary"><div><h2>Rows per status</h2>{_status_table(collected.statuses, status_links)}'
        f"<p>{link('rejected.html', f'What was thrown away, and why ({not_kept} rows) ›')}</p></div>"
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

    check_sizes(page_size, thumb_size)
    storage_options = storage_options or {}
    urls = complete_shard_urls(shards_root, storage_options)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    clean_previous(output)

    collected = _collect(urls, output, thumb_size, storage_options)
    title = f"shards · {shards_root}"
    pages, status_links = _write_rejected(output, collected, shards_root, page_size, thumb_size, source_thumbnails)
    pages += write_pages(
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
