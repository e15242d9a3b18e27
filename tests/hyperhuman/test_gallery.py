"""Static HTML galleries: pagination, relative links to files that exist, escaping, rejected-row
pages per status and rule, the eval-run gallery, and a real headless Chromium opening the pages
from disk (every image loads, the page is not blank)."""

import io
import json
import re
import urllib.parse
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperhuman.eval.gallery import generation_gallery, shard_gallery
from hyperhuman.eval.gallery.run import split_metrics
from hyperhuman.eval.gallery.shards import rule_of
from hyperhuman.eval.gallery.templates import format_number, page_numbers, paginate
from pipelines.filters import DEFAULT_FILTERS, image_rule, people_rule
from shards.testing import make_sample
from shards.writer import ShardWriter

from .browser import CHECK_IMAGES_JS, chromium, find_chromium, open_page

KEPT = 250
EVIL_CAPTION = '<script>alert("caption")</script> & <b>bold</b>'


class Links(HTMLParser):
    """Every src/href of a page, the <script> tags and whether any external resource is named."""

    def __init__(self):
        super().__init__()
        self.targets: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.scripts: list[dict] = []
        self.rels: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name in ("src", "href"):
            if name in attributes:
                self.targets.append((tag, name, attributes[name]))
        if tag == "script":
            self.scripts.append(attributes)
        if tag == "a" and attributes.get("rel") in ("prev", "next"):
            self.rels[attributes["rel"]] = attributes["href"]


def parse(page: Path) -> Links:
    links = Links()
    links.feed(page.read_text(encoding="utf-8"))
    return links


def filter_reasons() -> dict[str, str]:
    """Reasons worded by the real filters (pipelines/filters.py), by rule."""
    mask = np.zeros((10, 10), np.uint8)
    person = {"keypoints": np.zeros((17, 3))}
    reasons = {
        "min_side": image_rule(np.zeros((100, 80, 3), np.uint8), DEFAULT_FILTERS),
        "max_aspect": image_rule(np.zeros((200, 900, 3), np.uint8), DEFAULT_FILTERS),
        "min_people": people_rule({"people": []}, mask, DEFAULT_FILTERS),
        "max_people": people_rule({"people": [person] * 4}, mask, DEFAULT_FILTERS),
        "min_person_area": people_rule({"people": [person]}, mask, DEFAULT_FILTERS),
    }
    assert all(rule == found[0] for rule, found in reasons.items())
    return {rule: found[1] for rule, found in reasons.items()}


# rule → (status, how many rows); sources: remote, local image, local garbage
REJECTIONS = {
    "min_side": ("rejected", 3),
    "max_aspect": ("rejected", 1),
    "min_people": ("rejected", 4),
    "max_people": ("rejected", 1),
    "min_person_area": ("rejected", 2),
    "http_error": ("failed", 2),
    "undecodable": ("failed", 1),
    "failed (no rule)": ("failed", 1),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery-shards")
    photo = root.parent / "source-photo.jpg"
    Image.fromarray(np.full((60, 90, 3), (30, 120, 200), np.uint8)).save(photo)
    garbage = root.parent / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    reasons = {**filter_reasons(), "http_error": "HTTP 404", "failed (no rule)": "something odd: code 12"}
    reasons["undecodable"] = "not a readable image (UnidentifiedImageError: cannot identify image file)"
    with ShardWriter(str(root), 0, max_samples=100) as writer:
        for index in range(130):
            sample = make_sample(f"a{index:03d}", height=12, width=16, seed=index, people=1 + index % 2)
            if index == 7:
                sample.caption = EVIL_CAPTION
            writer.write(sample)
        for rule, (status, count) in REJECTIONS.items():
            for index in range(count):
                source = f"http://127.0.0.1/{rule}/{index}.jpg"
                if rule == "min_side" and index == 0:
                    source = photo.as_uri()
                elif rule == "undecodable":
                    source = str(garbage)
                column = "" if rule == "failed (no rule)" else rule  # e.g. an annotator's exception
                key = f"r-{_key(rule)}-{index}"
                writer.reject(key, reasons[rule], status=status, rule=column, source=source, caption="c")
    with ShardWriter(str(root), 1, max_samples=100) as writer:
        for index in range(KEPT - 130):
            writer.write(make_sample(f"b{index:03d}", height=12, width=16, seed=1000 + index))
    return root


def _key(rule: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", rule)


@pytest.fixture(scope="module")
def gallery(shards, tmp_path_factory):
    return shard_gallery(str(shards), str(tmp_path_factory.mktemp("gallery") / "out"), thumb_size=32)


def items(page: Path) -> int:
    return page.read_text(encoding="utf-8").count('<div class="item"')


def table_rows(page: Path) -> int:
    return page.read_text(encoding="utf-8").count('<tr class="row">')


# ---------------------------------------------------------------------------------------------
# Pagination


def test_paginate_and_page_window():
    assert [len(chunk) for chunk in paginate(list(range(250)), 100)] == [100, 100, 50]
    assert paginate([], 10) == [[]]
    with pytest.raises(ValueError, match="page_size"):
        paginate([1], 0)
    assert page_numbers(1, 1) == [1]
    assert page_numbers(1, 3) == [1, 2, 3]
    assert page_numbers(50, 100) == [1, None, 47, 48, 49, 50, 51, 52, 53, None, 100]


def test_kept_samples_are_paginated_with_prev_next_links(gallery):
    out = gallery.parent
    summary = json.loads((out / "gallery.json").read_text())
    assert summary["samples"] == KEPT and summary["shards"] == 4
    pages = ["index.html", "samples-0002.html", "samples-0003.html"]
    assert [name for name in summary["pages"] if name == "index.html" or name.startswith("samples-")] == pages
    assert [items(out / name) for name in pages] == [100, 100, 50]
    assert not (out / "samples-0004.html").exists()
    assert parse(out / "index.html").rels == {"next": "samples-0002.html"}
    assert parse(out / "samples-0002.html").rels == {"prev": "index.html", "next": "samples-0003.html"}
    assert parse(out / "samples-0003.html").rels == {"prev": "samples-0002.html"}
    for name in pages:  # the page index on every page links every page
        targets = {value for _, _, value in parse(out / name).targets}
        assert set(pages) - {name} <= targets


def test_pages_link_only_relative_paths_to_files_that_exist(gallery):
    out = gallery.parent
    pages = sorted(out.glob("*.html"))
    assert len(pages) == len(json.loads((out / "gallery.json").read_text())["pages"])
    images = 0
    for page in pages:
        links = parse(page)
        for tag, _, value in links.targets:
            parsed = urllib.parse.urlparse(value)
            assert not parsed.scheme and not parsed.netloc, f"{page.name}: {value}"
            assert not value.startswith(("/", "\\")) and not re.search(r"https?:|file:|//", value), value
            target = (page.parent / urllib.parse.unquote(parsed.path)).resolve()
            assert target.is_file(), f"{page.name} links {value}, which does not exist"
            assert out.resolve() in target.parents
            images += tag == "img"
        assert all("src" not in script for script in links.scripts)  # inline only
        text = page.read_text(encoding="utf-8")
        assert "<link" not in text and "url(" not in text and "@import" not in text and "data:" not in text
    assert images >= KEPT * 5


def test_thumbnails_are_small_files_beside_the_pages(gallery):
    thumbs = list((gallery.parent / "thumbs").rglob("*.*"))
    assert {path.suffix for path in thumbs} == {".jpg", ".png"}
    for path in thumbs[:50]:
        with Image.open(path) as image:
            assert max(image.size) <= 32
    # photo, pose overlay, depth, normal, mask of every kept sample + 1 local rejected source
    assert len(thumbs) == KEPT * 5 + 1


def test_captions_are_escaped_and_only_our_script_runs(gallery):
    text = gallery.read_text(encoding="utf-8")
    assert html_escape(EVIL_CAPTION) in text
    assert "<script>alert" not in text and "<b>bold</b>" not in text
    for page in gallery.parent.glob("*.html"):
        assert len(parse(page).scripts) == 1


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


# ---------------------------------------------------------------------------------------------
# Rejected rows


def test_the_rule_is_the_rule_column_never_the_reasons_wording():
    assert rule_of({"rule": "min_side", "reason": "HTTP 404"}, "rejected") == "min_side"
    assert rule_of({"rule": "", "reason": "people found, fewer than 1"}, "rejected") == "rejected (no rule)"
    assert rule_of({"reason": "HTTP 404"}, "failed") == "failed (no rule)"  # shards from before the column


def test_rejected_summary_counts_per_status_and_rule(gallery):
    out = gallery.parent
    summary = json.loads((out / "gallery.json").read_text())
    expected_status = Counter()
    for status, count in REJECTIONS.values():
        expected_status[status] += count
    assert summary["rows"] == {"ok": KEPT, **expected_status}
    assert summary["rules"] == {rule: count for rule, (_, count) in REJECTIONS.items()}
    text = (out / "rejected.html").read_text(encoding="utf-8")
    for rule, (_, count) in REJECTIONS.items():
        assert re.search(rf">{re.escape(rule)}</a></td><td class=\"num\">{count}</td>", text), rule
    assert 'href="status-rejected-0001.html"' in text and 'href="status-failed-0001.html"' in text
    assert 'href="rejected.html"' in gallery.read_text(encoding="utf-8")


def test_rejected_rows_have_pages_per_status_and_rule(gallery):
    out = gallery.parent
    assert table_rows(out / "status-rejected-0001.html") == sum(n for s, n in REJECTIONS.values() if s == "rejected")
    assert table_rows(out / "status-failed-0001.html") == 4
    assert not (out / "status-ok-0001.html").exists()
    for rule, (_, count) in REJECTIONS.items():
        page = out / f"rule-{re.sub(r'[^A-Za-z0-9_-]+', '_', rule)}-0001.html"
        assert table_rows(page) == count, rule
    failed = (out / "status-failed-0001.html").read_text(encoding="utf-8")
    assert "HTTP 404" in failed and "http://127.0.0.1/http_error/0.jpg" in failed  # shown as text
    assert "source unreadable" in failed and "no image bytes" in failed
    # the one local, readable source got a thumbnail; remote sources are never fetched
    min_side = parse(out / "rule-min_side-0001.html")
    assert [value for tag, _, value in min_side.targets if tag == "img"] == [
        "thumbs/000000-0001/r-min-side-0.source.jpg"
    ]


def test_rejected_pages_paginate(shards, tmp_path):
    index = shard_gallery(str(shards), str(tmp_path / "small"), page_size=5, thumb_size=16)
    out = index.parent
    rejected = sum(n for s, n in REJECTIONS.values() if s == "rejected")
    pages = sorted(out.glob("status-rejected-*.html"))
    assert [table_rows(page) for page in pages] == [5, 5, rejected - 10]
    assert parse(pages[1]).rels == {"prev": "status-rejected-0001.html", "next": "status-rejected-0003.html"}
    assert len(list(out.glob("samples-*.html"))) == KEPT // 5 - 1
    # a rerun with other settings into the same folder leaves no stale page behind
    shard_gallery(str(shards), str(out), page_size=200, thumb_size=16)
    assert sorted(path.name for path in out.glob("samples-*.html")) == ["samples-0002.html"]
    assert sorted(path.name for path in out.glob("status-rejected-*.html")) == ["status-rejected-0001.html"]


def test_the_parquet_rule_column_names_the_rule_and_wording_is_never_parsed(tmp_path):
    reasons = filter_reasons()
    with ShardWriter(str(tmp_path / "in"), 0) as writer:
        writer.write(make_sample("k0", height=12, width=16))
        writer.reject("r0", reasons["min_people"], rule="min_people_custom", source="http://127.0.0.1/r0.jpg")
        writer.reject("r1", reasons["min_person_area"], rule="min_person_area", source="http://127.0.0.1/r1.jpg")
        writer.reject("r2", "HTTP 404", status="failed", rule="fetch", source="http://127.0.0.1/r2.jpg")
        writer.reject("r3", reasons["min_side"], status="failed", source="http://127.0.0.1/r3.jpg")  # no rule
    index = shard_gallery(str(tmp_path / "in"), str(tmp_path / "with-rules"), thumb_size=16)
    summary = json.loads((index.parent / "gallery.json").read_text())
    assert summary["rules"] == {"min_people_custom": 1, "min_person_area": 1, "fetch": 1, "failed (no rule)": 1}
    assert table_rows(index.parent / "rule-min_people_custom-0001.html") == 1


def test_gallery_of_memory_filesystem_shards_and_of_no_shards(tmp_path):
    import fsspec

    url = "memory://gallery-test"
    with ShardWriter(url, 0) as writer:
        writer.write(make_sample("m0", height=12, width=16))
        writer.reject("m1", "0 people found, fewer than 1", source="memory://gallery-test/in/m1.jpg")
    try:
        index = shard_gallery(url, str(tmp_path / "memory"), thumb_size=16)
    finally:
        fsspec.filesystem("memory").rm("/gallery-test", recursive=True)
    assert json.loads((index.parent / "gallery.json").read_text())["rows"] == {"ok": 1, "rejected": 1}
    assert items(index) == 1

    empty = shard_gallery(str(tmp_path / "nothing"), str(tmp_path / "empty"))
    assert "no complete shards" in empty.read_text(encoding="utf-8") and items(empty) == 0


def test_an_undecodable_member_is_shown_not_fatal(tmp_path):
    from shards.sample import encode_sample

    members = encode_sample(make_sample("bad", height=12, width=16))
    members["depth.png"] = b"not a png"
    del members["normal.png"]
    with ShardWriter(str(tmp_path / "in"), 0) as writer:
        writer.write_encoded("bad", members, source="synthetic://bad")
        writer.write(make_sample("good", height=12, width=16))
    index = shard_gallery(str(tmp_path / "in"), str(tmp_path / "out"), thumb_size=16)
    text = index.read_text(encoding="utf-8")
    assert items(index) == 2 and "depth undecodable" in text and "no normal" in text
    assert "depth.png: not a readable image" in text


# ---------------------------------------------------------------------------------------------
# Eval-run gallery


def tiny_png(path: Path, color, size=(24, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(color))
    pixels = np.clip(np.asarray(color) + rng.integers(-30, 30, (*size[::-1], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


METRICS = {
    "metrics": {"pose_ap": 0.123456789, "pose_ar": 0.5, "pose_ap50": None, "fid": None, "kid_x1000": None},
    "skipped": {"fid": "no Inception weights: set eval.inception=PATH", "kid_x1000": "no Inception weights"},
    "warnings": {"fid": "FID from 5 samples: biased"},
    "time_s": {"pose_s": 1.25},
    "info": {"model": "/runs/lsdm/pipeline", "samples": 5, "num_inference_steps": 2},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-run")
    records = []
    for index in range(5):
        key = f"k{index}"
        names = ["pose", "rgb", "depth", "normal"] + (["refined", "reference"] if index == 3 else [])
        images = {name: f"samples/{key}/{name}.png" for name in names}
        for offset, name in enumerate(names):
            if (index, name) != (2, "depth"):  # listed but missing on disk
                tiny_png(root / images[name], (40 * offset, 200 - 30 * offset, 90 + index * 20))
        if index == 4:
            del images["normal"]  # not even listed
        score = {"oks": [0.75, None], "mean_oks": 0.75, "detected": 1} if index else {"oks": 0.3333333, "ap": None}
        records.append(
            {
                "key": key,
                "prompt": "a <i>person</i> waving" if index == 1 else f"prompt {index}",
                "seed": 100 + index,
                "images": images,
                "pose_score": None if index == 2 else score,
                "meta": {"people": 1},
            }
        )
    (root / "samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (root / "metrics.json").write_text(json.dumps(METRICS))
    return root


def test_generation_gallery_defaults_to_run_gallery_with_metrics_and_samples(run):
    index = generation_gallery(str(run))
    assert index == run / "gallery" / "index.html"
    text = index.read_text(encoding="utf-8")
    assert ">0.1235<" in text and ">0.5<" in text  # 4 significant digits
    assert "no Inception weights: set eval.inception=PATH" in text
    assert "/runs/lsdm/pipeline" in text  # run info, collapsed
    assert "a &lt;i&gt;person&lt;/i&gt; waving" in text and "<i>person" not in text
    assert "seed 103" in text and "0.3333" in text and "[0.75, —]" in text
    assert '<span class="problem">FID from 5 samples: biased</span>' in text  # a metric's warning beside it
    assert "depth missing" in text and "no normal" in text
    assert items(index) == 5
    summary = json.loads((index.parent / "gallery.json").read_text())
    assert summary["columns"] == ["pose", "rgb", "depth", "normal", "refined", "reference"]
    links = parse(index)
    # each thumbnail links to its full image in the run folder, relatively
    assert "../samples/k3/reference.png" in {value for _, _, value in links.targets}
    for _, _, value in links.targets:
        assert not urllib.parse.urlparse(value).scheme and not value.startswith("/")
        assert (index.parent / urllib.parse.unquote(value)).is_file(), value


def test_generation_gallery_pages_repeat_the_metrics_table(run, tmp_path):
    index = generation_gallery(str(run), str(tmp_path / "g"), page_size=2, thumb_size=16)
    pages = [index, tmp_path / "g" / "samples-0002.html", tmp_path / "g" / "samples-0003.html"]
    assert [items(page) for page in pages] == [2, 2, 1]
    for page in pages:
        assert "<h2>Metrics</h2>" in page.read_text(encoding="utf-8")
    assert parse(pages[2]).rels == {"prev": "samples-0002.html"}


def test_metrics_json_layouts_and_number_format():
    flat = {"fid": 12.3456, "clip_score": None, "skipped": {"clip_score": "no CLIP"}, "info": {"n": 3}, "note": "x"}
    metrics, skipped, info = split_metrics(flat)
    assert metrics == {"fid": 12.3456, "clip_score": None} and skipped == {"clip_score": "no CLIP"}
    assert info == {"n": 3, "note": "x"}
    metrics, skipped, info = split_metrics(METRICS)
    assert metrics["fid"] is None and info["time_s"] == {"pose_s": 1.25} and info["samples"] == 5
    assert [format_number(v) for v in (0.000123456, 1234567.0, 3, None, True, [0.5, None])] == [
        "0.0001235", "1.235e+06", "3", "—", "true", "[0.5, —]",
    ]  # fmt: skip


def test_generation_gallery_refuses_a_folder_without_samples_and_bad_lines(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples.jsonl"):
        generation_gallery(str(tmp_path))
    (tmp_path / "samples.jsonl").write_text('{"key": "a"}\n\nnot json\n')
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        generation_gallery(str(tmp_path))
    (tmp_path / "samples.jsonl").write_text('{"key": "a", "prompt": "p"}\n')
    index = generation_gallery(str(tmp_path))  # no metrics.json yet, no images: placeholders
    assert "no metrics.json" in index.read_text(encoding="utf-8") and items(index) == 1


# ---------------------------------------------------------------------------------------------
# A real browser


def test_chromium_loads_every_image_from_disk(gallery, run, tmp_path):
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set HYPERHUMAN_CHROMIUM=/path/to/chrome)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (it is in the dev extra)")
    generated = generation_gallery(str(run), str(tmp_path / "generated"))
    pages = [gallery, gallery.parent / "samples-0003.html", gallery.parent / "rule-min_side-0001.html", generated]
    with chromium(executable) as browser:
        for page in pages:
            tab = open_page(browser, page.resolve().as_uri())
            report = tab.evaluate(CHECK_IMAGES_JS)
            assert report["images"] > 0 and report["broken"] == [], (page.name, report)
            assert all(url.startswith("file://") for url in tab.requested), (page.name, tab.requested)
            shot = np.asarray(Image.open(io.BytesIO(tab.screenshot())).convert("L"), dtype=np.float64)
            assert shot.shape == (900, 1280)
            assert shot.std() > 15, f"{page.name}: the screenshot looks blank (std {shot.std():.1f})"
            assert (np.abs(shot - np.median(shot)) > 40).mean() > 0.01, page.name
