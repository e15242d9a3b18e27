"""Bad inputs — image bytes, URL values, server responses, rows — become reasons, good ones become
upright RGB: never an exception."""

import io
import re
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from pipelines.fetch import decode


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
JPEG = encode(RGB, "JPEG")

BAD = {
    "zero bytes": b"",
    "truncated jpeg": JPEG[: len(JPEG) // 2],
    "jpeg header only": JPEG[:20],
    "html named .jpg": b"<!doctype html><html><body>404</body></html>",
    "json": b'{"error": "not found"}',
    "random bytes": bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)),
    "decompression bomb (header)": png_header_only(100_000, 100_000),
    "bomb below PIL's limit": png_header_only(10_000, 8_000),
    "gzip bytes": zlib.compress(JPEG),
}


@pytest.mark.parametrize("data", list(BAD.values()), ids=list(BAD))
def test_bad_inputs_become_reasons(data):
    decoded, reason = decode(data)
    assert decoded is None and isinstance(reason, str) and reason


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encode(RGB, "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("P", (30, 20), color) for color in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


GOOD = {
    "rgb jpeg (kept byte-exact)": (JPEG, (40, 60)),
    "exif rotated jpeg": (exif_rotated(), (60, 40)),
    "cmyk jpeg": (encode(RGB.convert("CMYK"), "JPEG"), (40, 60)),
    "grayscale png": (encode(RGB.convert("L"), "PNG"), (40, 60)),
    "16-bit png": (encode(Image.fromarray(np.full((40, 60), 40000, np.uint16)), "PNG"), (40, 60)),
    "palette png with transparency": (encode(RGB.convert("P"), "PNG", transparency=0), (40, 60)),
    "rgba png": (encode(RGB.convert("RGBA"), "PNG"), (40, 60)),
    "animated gif (first frame)": (animated_gif(), (20, 30)),
    "webp": (encode(RGB, "WEBP"), (40, 60)),
    "bmp": (encode(RGB, "BMP"), (40, 60)),
    "tiff": (encode(RGB, "TIFF"), (40, 60)),
    "1x1": (encode(Image.new("RGB", (1, 1)), "PNG"), (1, 1)),
    "10000x1": (encode(Image.new("RGB", (10000, 1)), "PNG"), (1, 10000)),
}


@pytest.mark.parametrize("data, shape", list(GOOD.values()), ids=list(GOOD))
def test_decodable_inputs_become_upright_rgb(data, shape):
    decoded, reason = decode(data)
    assert reason is None
    assert decoded["rgb"].dtype == np.uint8 and decoded["rgb"].shape == (*shape, 3)
    assert len(decoded["sha256"]) == 64


def test_plain_jpeg_bytes_are_kept_and_rotated_ones_are_not():
    assert decode(JPEG)[0]["image_bytes"] == JPEG
    assert decode(exif_rotated())[0]["image_bytes"] is None


def test_min_side():
    decoded, reason = decode(encode(Image.new("RGB", (10000, 1)), "PNG"), min_side=2)
    assert decoded is None and "10000x1" in reason


# ---------------------------------------------------------------------------------------------
# No input value raises out of fetch/decode: hostile URLs, hostile servers, odd rows.

FAST = {"timeout_s": 0.5, "retries": 1, "backoff_s": 0.01, "max_bytes": 100_000, "concurrency": 4}
HOSTILE_URLS = {  # value → what the reason must say
    "unterminated IPv6 host": ("http://[::1", r"^malformed URL .*Invalid IPv6 URL"),
    "unterminated IPv6 with credentials": ("http://user:pass@[::1/x.jpg", r"^malformed URL .*Invalid IPv6 URL"),
    "IPv6 zone, unterminated": ("http://[fe80::1%25eth0/", r"^malformed URL .*Invalid IPv6 URL"),
    "brackets around a name": ("http://[not-ipv6]/x.jpg", r"^malformed URL .*not-ipv6"),
    "port out of range": ("http://[::1]:99999/x.jpg", r"^malformed URL .*Port out of range"),
    "port 65536": ("http://127.0.0.1:65536/x.jpg", r"^malformed URL .*Port out of range"),
    "negative port": ("http://127.0.0.1:-1/x.jpg", r"^malformed URL .*Port could not be cast"),
    "port not a number": ("http://127.0.0.1:abc/x.jpg", r"^malformed URL .*Port could not be cast"),
    "port 0": ("http://127.0.0.1:0/x.jpg", r"^malformed URL .*port 0"),
    "no host": ("http://", r"^malformed URL .*no host"),
    "no host, a path": ("http:///x.jpg", r"^malformed URL .*no host"),
    "https, no host": ("https://", r"^malformed URL .*no host"),
    "scheme and path only": ("http:127.0.0.1", r"^malformed URL .*no host"),
    "percent in the host": ("http://%zz/x.jpg", r"^malformed URL \(InvalidURL"),
    "empty labels": ("http://a..b/x.jpg", r"^malformed URL.*label empty"),
    "only dots": ("http://.../x.jpg", r"^malformed URL \(InvalidURL.*invalid label"),
    "label longer than 63": ("http://" + "a" * 300 + ".com/x.jpg", r"^malformed URL"),
    "not IDNA": ("http://\u2603.invalid/x.jpg", r"^malformed URL \(InvalidURL.*IDNA"),
    "NUL byte": ("http://127.0.0.1/\x00.jpg", r"^malformed URL .*control characters"),
    "header injection": ("http://127.0.0.1/a\r\nX-Injected: 1", r"^malformed URL .*control characters"),
    "tab in the host": ("http://127.\t0.0.1/", r"^malformed URL .*control characters"),
    "empty string": ("", r"^URL is empty$"),
    "blanks": ("   ", r"^URL is empty$"),
    "None": (None, r"^URL is NoneType, not a string$"),
    "an int": (42, r"^URL is int, not a string$"),
    "a float NaN": (float("nan"), r"^URL is float, not a string$"),
    "bytes": (b"http://127.0.0.1/x.jpg", r"^URL is bytes, not a string$"),
    "a list": (["http://127.0.0.1/x.jpg"], r"^URL is list, not a string$"),
    "'None' from a CSV": ("None", r"^unsupported URL scheme '\(none\)'"),
    "scheme-relative": ("//127.0.0.1/x.jpg", r"^unsupported URL scheme '\(none\)'"),
    "data URL": ("data:image/png;base64,iVBORw0KGgo=", r"^unsupported URL scheme 'data'"),
    "javascript": ("javascript:alert(1)", r"^unsupported URL scheme 'javascript'"),
    "file": ("file:///etc/passwd", r"^unsupported URL scheme 'file'"),
    "gopher": ("gopher://127.0.0.1/x.jpg", r"^unsupported URL scheme 'gopher'"),
    "upper-case scheme, bad host": ("HTTP://[::1", r"^malformed URL .*Invalid IPv6 URL"),
    "s3 (not fetched over http)": ("s3://bucket/x.jpg", r"^unsupported URL scheme 's3'"),
}


def fetch_items(rows: list[dict], **options) -> list[dict]:
    from pipelines.filters import check_filters
    from pipelines.job import fetch_rows

    keyed = [{"key": f"{i:011d}", "caption": "", "extra": "{}", "data": None, **row} for i, row in enumerate(rows)]
    return fetch_rows(keyed, {**FAST, **options}, check_filters({"min_side": 1, "max_aspect": 100.0}))


@pytest.mark.parametrize("url, expected", list(HOSTILE_URLS.values()), ids=list(HOSTILE_URLS))
def test_hostile_url_values_become_failed_rows_with_their_reason(url, expected):
    (item,) = fetch_items([{"kind": "url", "source": url}])
    assert item["status"] == "failed" and item["rule"] == "fetch"
    assert re.search(expected, item["reason"]), item["reason"]
    assert len(item["reason"]) < 600 and "Traceback" not in item["reason"]


def test_all_hostile_urls_in_one_partition_keep_their_order():
    urls = [url for url, _ in HOSTILE_URLS.values()]
    items = fetch_items([{"kind": "url", "source": url} for url in urls], concurrency=8)
    assert [item["key"] for item in items] == [f"{i:011d}" for i in range(len(urls))]
    for item, (_, expected) in zip(items, HOSTILE_URLS.values(), strict=True):
        assert item["status"] == "failed" and re.search(expected, item["reason"]), item["reason"]


class HostileServer(BaseHTTPRequestHandler):
    """Responses a web crawl meets: redirects to other schemes, lying headers, broken framing."""

    image = b""
    endless = threading.Event()  # set at teardown: stops the endless bodies

    def log_message(self, *args):
        pass

    def raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.close_connection = True

    def head(self, status: int, *headers: tuple[str, str]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def do_GET(self):
        try:
            self.respond()
        except OSError:  # the client gave up on a body: what these endpoints provoke
            self.close_connection = True

    def respond(self):
        path = self.path
        if path == "/good.jpg":
            self.head(200, ("Content-Length", str(len(self.image))))
            self.wfile.write(self.image)
        elif path.startswith("/redirect-to/"):
            self.head(302, ("Location", REDIRECTS[path.removeprefix("/redirect-to/")]), ("Content-Length", "0"))
        elif path == "/redirect-without-location":
            self.head(302, ("Content-Length", "0"))
        elif path == "/redirect-with-endless-body":  # requests' own Session would read it all
            self.head(302, ("Location", "/good.jpg"))
            while not self.endless.is_set():
                self.wfile.write(b"x" * 65536)
        elif path == "/huge-content-length":
            self.head(200, ("Content-Length", str(10**15)))
            self.wfile.write(self.image)
        elif path == "/content-length-5000-digits":
            self.raw(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n" + self.image)
        elif path == "/conflicting-content-lengths":
            self.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 7\r\n\r\n12345")
        elif path == "/endless-chunked":
            self.head(200, ("Transfer-Encoding", "chunked"))
            while not self.endless.is_set():
                self.wfile.write(b"10000\r\n" + b"\xff" * 65536 + b"\r\n")
        elif path == "/bad-chunk":
            self.raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        elif path == "/gzip-that-is-not":
            self.head(200, ("Content-Encoding", "gzip"), ("Content-Length", "20"))
            self.wfile.write(b"definitely not gzip!")
        elif path == "/garbage-status-line":
            self.raw(b"HELLO THERE\r\n\r\n")
        elif path == "/status-999":
            self.raw(b"HTTP/1.1 999 Whatever\r\nContent-Length: 0\r\n\r\n")
        elif path == "/close-without-answer":
            self.close_connection = True
        elif path == "/150-headers":
            self.raw(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n")
        elif path == "/70k-header":
            self.raw(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n")
        elif path == "/empty":
            self.head(200, ("Content-Length", "0"))
        elif path == "/html.jpg":
            self.head(200, ("Content-Length", "13"))
            self.wfile.write(b"<html></html>")
        elif path == "/bomb.png":
            bomb = png_header_only(100_000, 100_000)
            self.head(200, ("Content-Length", str(len(bomb))))
            self.wfile.write(bomb)


REDIRECTS = {
    "ftp": "ftp://127.0.0.1/x.jpg",
    "file": "file:///etc/passwd",
    "data": "data:image/png;base64,iVBORw0KGgo=",
    "unterminated-ipv6": "http://[::1",
    "bad-port": "http://127.0.0.1:99999/x.jpg",
    "no-host": "http://:80/x.jpg",
    "control-characters": "/x\x01y",
}
HOSTILE_RESPONSES = {
    "/redirect-to/ftp": r"^redirect to 'ftp://127.0.0.1/x.jpg' refused: unsupported URL scheme 'ftp'",
    "/redirect-to/file": r"^redirect to 'file:///etc/passwd' refused: unsupported URL scheme 'file'",
    "/redirect-to/data": r"^redirect to 'data:.*' refused: unsupported URL scheme 'data'",
    "/redirect-to/unterminated-ipv6": r"^redirect to a malformed URL 'http://\[::1': Invalid IPv6 URL",
    "/redirect-to/bad-port": r"^redirect to .* refused: malformed URL .*Port out of range",
    "/redirect-to/no-host": r"^redirect to 'http://:80/x.jpg' refused: malformed URL .*: no host",
    "/redirect-to/control-characters": r"^redirect to .* refused: malformed URL .*control characters",
    "/redirect-without-location": r"^HTTP 302 without a redirect target$",
    "/huge-content-length": r"^body larger than max_bytes=100000$",
    "/content-length-5000-digits": r"^body larger than max_bytes=100000$",
    "/conflicting-content-lengths": r"^InvalidHeader: Content-Length contained multiple unmatching values",
    "/endless-chunked": r"^body larger than max_bytes=100000$",
    "/bad-chunk": r"^transient: ChunkedEncodingError",
    "/gzip-that-is-not": r"^ContentDecodingError",
    "/garbage-status-line": r"^transient: ConnectionError.*BadStatusLine",
    "/status-999": r"^transient: HTTP 999$",
    "/close-without-answer": r"^transient: ConnectionError.*RemoteDisconnected",
    "/150-headers": r"^transient: ConnectionError.*more than 100 headers",
    "/70k-header": r"^transient: ConnectionError.*(LineTooLong|line too long)",
    "/empty": r"^empty body$",
    "/html.jpg": r"^not a readable image",
    "/bomb.png": r"refusing to decode",
}


@pytest.fixture(scope="module")
def hostile_server():
    HostileServer.image = JPEG
    HostileServer.endless.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), HostileServer)
    server.handle_error = lambda request, address: None  # a client that hung up is expected here
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    HostileServer.endless.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path, expected", list(HOSTILE_RESPONSES.items()), ids=list(HOSTILE_RESPONSES))
def test_hostile_responses_become_failed_rows_with_their_reason(hostile_server, path, expected):
    (item,) = fetch_items([{"kind": "url", "source": hostile_server + path}])
    assert item["status"] == "failed" and item["rule"] in ("fetch", "decode", "transient")
    assert re.search(expected, item["reason"]), item["reason"]


def test_a_redirect_body_is_never_read_and_the_target_is_fetched(hostile_server):
    started = time.monotonic()
    (item,) = fetch_items([{"kind": "url", "source": hostile_server + "/redirect-with-endless-body"}])
    assert item["status"] is None and item["decoded"]["sha256"] == decode(JPEG)[0]["sha256"]
    assert time.monotonic() - started < 5


ODD_ROWS = {
    "unknown kind": ({"kind": "carrier-pigeon", "source": "x"}, r"^unknown input kind 'carrier-pigeon'"),
    "no kind": ({"source": "x"}, r"^unknown input kind None"),
    "file without a path": ({"kind": "file", "source": None}, r"^file path is NoneType"),
    "file, empty path": ({"kind": "file", "source": ""}, r"^file path is str ''"),
    "file, unknown protocol": ({"kind": "file", "source": "nope://x.jpg"}, r"^cannot read nope://x.jpg: .*nope"),
    "file that does not exist": ({"kind": "file", "source": "/nonexistent/x.jpg"}, r"^cannot read /nonexistent"),
    "bytes: None": ({"kind": "bytes", "source": "t#k", "data": None}, r"^empty body$"),
    "bytes: a str": ({"kind": "bytes", "source": "t#k", "data": "not bytes"}, r"^image data is str, not bytes$"),
    "bytes: an int": ({"kind": "bytes", "source": "t#k", "data": 12}, r"^image data is int, not bytes$"),
}


@pytest.mark.parametrize("row, expected", list(ODD_ROWS.values()), ids=list(ODD_ROWS))
def test_odd_rows_become_failed_rows_with_their_reason(row, expected):
    (item,) = fetch_items([row])
    assert item["status"] == "failed" and re.search(expected, item["reason"]), item["reason"]


def test_a_folder_path_is_a_reason(tmp_path):
    (item,) = fetch_items([{"kind": "file", "source": str(tmp_path)}])
    assert item["status"] == "failed" and item["reason"].startswith(f"cannot read {tmp_path}")


@pytest.mark.parametrize("data", [bytearray(JPEG), memoryview(JPEG)], ids=["bytearray", "memoryview"])
def test_bytes_like_data_decodes(data):
    decoded, reason = decode(data)
    assert reason is None and decoded["image_bytes"] == JPEG


# Running out of memory is a resource error (transient, retried by --retry-failed), never "corrupt".


def _raise_memory_error(*args, **kwargs):
    raise MemoryError


@pytest.mark.parametrize(
    "target", ["PIL.Image.open", "PIL.ImageOps.exif_transpose", "PIL.Image.Image.convert"], ids=str
)
def test_out_of_memory_while_decoding_is_a_resource_error(monkeypatch, target):
    monkeypatch.setattr(target, _raise_memory_error)
    decoded, reason = decode(JPEG)
    assert decoded is None and reason.startswith("transient: out of memory while decoding")
    assert "corrupt" not in reason and "not a readable image" not in reason


def test_out_of_memory_while_downloading_or_reading_is_a_resource_error(monkeypatch, hostile_server, tmp_path):
    from pipelines import fetch

    monkeypatch.setattr(fetch, "_read_body", _raise_memory_error)
    data, reason = fetch.download(hostile_server + "/good.jpg", FAST)
    assert data is None and reason.startswith("transient: out of memory while downloading")
    (tmp_path / "x.jpg").write_bytes(JPEG)
    monkeypatch.setattr(fetch.fsspec, "open", _raise_memory_error)
    data, reason = fetch.read_bytes({"kind": "file", "source": str(tmp_path / "x.jpg")}, FAST)
    assert data is None and reason.startswith("transient: out of memory reading")
