"""A partition's downloads run concurrently: a hanging URL costs one timeout × attempts, not the
partition the sum of them; the items equal the sequential ones, in input order; each URL keeps
its own timeout and retries; the pool is bounded and nothing outlives the partition."""

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from hyperhuman.config import ConfigError, load_config
from pipelines import fetch
from pipelines.filters import check_filters
from pipelines.job import check_job_config, fetch_rows

# One hanging URL costs timeout + backoff + timeout = 0.85 s with these settings.
OPTIONS = {"timeout_s": 0.4, "retries": 1, "backoff_s": 0.05, "max_bytes": 100_000}
HANG_COST_S = 0.85


def jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    color = ((37 * index) % 256, (91 * index) % 256, (13 * index) % 256)
    Image.new("RGB", (16, 12), color).save(buffer, format="JPEG")
    return buffer.getvalue()


class TimedServer(BaseHTTPRequestHandler):
    """``/img/N?ms=D``: image N after D ms; ``/hang/N``: no answer until the test ends;
    ``/flaky/N/K``: HTTP 503 for the first K requests, then image N; ``/404``. Counts requests
    per path and the most answered at once."""

    lock = threading.Lock()
    requests = Counter()
    in_flight = 0
    max_in_flight = 0
    release = threading.Event()

    def log_message(self, *args):
        pass

    def do_GET(self):
        cls = type(self)
        path, _, query = self.path.partition("?")
        with cls.lock:
            cls.requests[path] += 1
            seen = cls.requests[path]
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            parts = path.strip("/").split("/")
            if parts[0] == "img":
                time.sleep(int(query.removeprefix("ms=") or 0) / 1000)
                self.send(200, jpeg(int(parts[1])))
            elif parts[0] == "hang":
                cls.release.wait(10)
                self.send(200, jpeg(0))
            elif parts[0] == "flaky":
                self.send(503, b"busy") if seen <= int(parts[2]) else self.send(200, jpeg(int(parts[1])))
            else:
                self.send(404, b"gone")
        except OSError:  # the client timed out and hung up
            self.close_connection = True
        finally:
            with cls.lock:
                cls.in_flight -= 1

    def send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    @classmethod
    def reset(cls) -> None:
        with cls.lock:
            cls.requests.clear()
            cls.in_flight = cls.max_in_flight = 0


@pytest.fixture(scope="module")
def server():
    TimedServer.release.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), TimedServer)
    httpd.handle_error = lambda request, address: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    TimedServer.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server):
    TimedServer.reset()
    return server


def run_partition(rows: list[dict], **options) -> tuple[list[dict], float]:
    keyed = [{"key": f"{i:011d}", "caption": f"c{i}", "extra": "{}", "data": None, **r} for i, r in enumerate(rows)]
    filters = check_filters({"min_side": 1, "max_aspect": 100.0})
    started = time.perf_counter()
    items = fetch_rows(keyed, {**OPTIONS, **options}, filters)
    return items, time.perf_counter() - started


def url(source: str) -> dict:
    return {"kind": "url", "source": source}


def test_hanging_urls_cost_about_one_timeout_not_their_sum(base):
    rows = [url(f"{base}/hang/{i}") if i % 3 == 0 else url(f"{base}/img/{i}?ms=50") for i in range(18)]
    items, wall_s = run_partition(rows, concurrency=16)
    hanging = [item for item in items if "/hang/" in item["source"]]
    assert len(hanging) == 6  # sequentially ≥ 6 × 0.85 s = 5.1 s
    assert HANG_COST_S * 0.9 <= wall_s < 2.5, wall_s
    for item in hanging:
        assert item["status"] == "failed" and item["reason"].startswith("transient: ReadTimeout: "), item["reason"]
    assert all(item["status"] is None for item in items if "/img/" in item["source"])


def test_items_equal_the_sequential_ones_in_input_order(base, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(jpeg(99))
    rows = [url(f"{base}/img/{i}?ms={(12 - i) * 10}") for i in range(12)]  # the last ones answer first
    rows[3:3] = [url(f"{base}/404"), url(f"{base}/hang/1"), url(f"{base}/flaky/7/1"), url("http://[::1")]
    rows += [
        {"kind": "file", "source": str(tmp_path / "photo.jpg")},
        {"kind": "bytes", "source": "t#k", "data": jpeg(5)},
    ]
    sequential, sequential_s = run_partition(rows, concurrency=1)
    TimedServer.reset()
    concurrent, concurrent_s = run_partition(rows, concurrency=8)
    assert [item["key"] for item in concurrent] == [f"{i:011d}" for i in range(len(rows))]
    assert len(concurrent) == len(sequential)
    for one, other in zip(sequential, concurrent, strict=True):
        assert {k: v for k, v in one.items() if k != "decoded"} == {k: v for k, v in other.items() if k != "decoded"}
        if one["status"] is None:
            assert one["decoded"]["sha256"] == other["decoded"]["sha256"]
            np.testing.assert_array_equal(one["decoded"]["rgb"], other["decoded"]["rgb"])
    statuses = [item["status"] for item in concurrent]
    assert statuses.count(None) == 15 and statuses.count("failed") == 3
    assert concurrent_s < sequential_s


def test_retries_and_timeouts_apply_per_url(base):
    rows = [url(f"{base}/flaky/1/1"), url(f"{base}/flaky/2/2"), url(f"{base}/hang/1"), url(f"{base}/hang/2")]
    rows += [url(f"{base}/img/{i}") for i in range(8)]
    items, _ = run_partition(rows, concurrency=12)
    assert items[0]["status"] is None  # failed once, retried once
    assert items[1]["status"] == "failed" and items[1]["reason"] == "transient: HTTP 503"
    assert all("Read timed out. (read timeout=0.4)" in item["reason"] for item in items[2:4])
    attempts = OPTIONS["retries"] + 1
    assert TimedServer.requests["/flaky/1/1"] == 2 and TimedServer.requests["/flaky/2/2"] == attempts
    assert TimedServer.requests["/hang/1"] == TimedServer.requests["/hang/2"] == attempts
    assert all(TimedServer.requests[f"/img/{i}"] == 1 for i in range(8))


def test_the_pool_is_bounded_by_concurrency(base):
    items, wall_s = run_partition([url(f"{base}/img/{i}?ms=150") for i in range(9)], concurrency=3)
    assert all(item["status"] is None for item in items)
    assert TimedServer.max_in_flight == 3
    assert wall_s < 9 * 0.15


def test_nothing_outlives_the_partition(base, monkeypatch):
    made, closed = [], []

    def tracked_session():
        session = new_session()
        made.append(session)
        close = session.close
        session.close = lambda: (closed.append(session), close())[1]
        return session

    new_session = fetch.new_session
    monkeypatch.setattr(fetch, "new_session", tracked_session)
    run_partition([url(f"{base}/img/{i}?ms=20") for i in range(10)] + [url(f"{base}/hang/3")], concurrency=4)
    assert 1 <= len(made) <= 4 and sorted(map(id, closed)) == sorted(map(id, made))
    assert not [t for t in threading.enumerate() if t.name.startswith("hyperhuman-fetch")]

    # A consumer that stops early: what has not started is dropped, the rest finishes, all closed.
    made.clear(), closed.clear(), TimedServer.reset()
    reads = fetch.read_many([url(f"{base}/img/{i}?ms=100") for i in range(12)], {**OPTIONS, "concurrency": 2})
    next(reads)
    reads.close()
    assert sorted(map(id, closed)) == sorted(map(id, made))
    assert not [t for t in threading.enumerate() if t.name.startswith("hyperhuman-fetch")]
    assert sum(TimedServer.requests[f"/img/{i}"] for i in range(12)) < 12


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("concurrency", 0, "fetch.concurrency must be a positive integer, got 0"),
        ("concurrency", -4, "fetch.concurrency must be a positive integer"),
        ("concurrency", 1.5, "fetch.concurrency must be a positive integer, got 1.5"),
        ("concurrency", "16", "fetch.concurrency must be a positive integer, got '16'"),
        ("concurrency", True, "fetch.concurrency must be a positive integer, got True"),
        ("concurrency", None, "fetch.concurrency must be a positive integer, got None"),
        ("retries", -1, "fetch.retries must be an integer ≥ 0"),
        ("max_bytes", 0, "fetch.max_bytes must be a positive integer"),
        ("timeout_s", 0, "fetch.timeout_s must be a number > 0"),
        ("timeout_s", float("inf"), "fetch.timeout_s must be a number > 0"),
        ("backoff_s", -0.5, "fetch.backoff_s must be a number ≥ 0"),
        ("concurency", 8, r"unknown .*concurency"),
    ],
)
def test_fetch_options_are_checked_at_start(key, value, message):
    with pytest.raises(ConfigError, match=message):
        fetch.check_fetch({key: value})
    config = load_config("annotate/offline")
    config["fetch"][key] = value
    with pytest.raises(ConfigError, match=message):
        check_job_config(config)


@pytest.mark.parametrize("name", ["annotate/offline", "annotate/full"])
def test_the_shipped_configs_set_a_concurrency(name):
    options = fetch.check_fetch(load_config(name)["fetch"])
    assert options["concurrency"] >= 8
    assert fetch.check_fetch({})["concurrency"] == fetch.DEFAULT_FETCH["concurrency"] == 16
