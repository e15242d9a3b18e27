"""Live progress of an annotation job, read from what is actually committed: the shards' stats
markers. A background thread polls the output, so it works the same on a laptop and on a
cluster writing to S3, and it never counts a row that is not durably written."""

from __future__ import annotations

import json
import posixpath
import threading
from collections import Counter

import fsspec

from shards.writer import STATS_SUFFIX, STATUSES, _join


class StatsScanner:
    """Sums the counts of stats markers that appeared since it was created."""

    def __init__(self, output: str, storage_options: dict | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(output, **(storage_options or {}))
        self.seen = set(self._markers())
        self.counts: Counter = Counter()

    def _markers(self) -> list[str]:
        return [posixpath.basename(p) for p in self.fs.glob(_join(self.root, "*" + STATS_SUFFIX))]

    def scan(self) -> Counter:
        for name in self._markers():
            if name in self.seen:
                continue
            try:
                with self.fs.open(_join(self.root, name), "r") as handle:
                    self.counts.update(json.load(handle)["counts"])
                self.seen.add(name)
            except (OSError, json.JSONDecodeError, KeyError):
                continue  # replaced while we read it: picked up on the next scan
        return self.counts


class ProgressBar(threading.Thread):
    """A tqdm bar over the inputs to write, with ok / rejected / failed counts and images/s."""

    def __init__(self, output: str, total: int, storage_options: dict | None = None, interval_s: float = 2.0):
        super().__init__(daemon=True)
        self.scanner = StatsScanner(output, storage_options)
        self.total = total
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        from tqdm import tqdm

        with tqdm(total=self.total, unit="img", desc="annotate", dynamic_ncols=True) as bar:
            while True:
                stopping = self._stop_event.wait(self.interval_s)
                counts = self.scanner.scan()
                bar.update(sum(counts.values()) - bar.n)  # tqdm shows the images/s
                bar.set_postfix({status: counts.get(status, 0) for status in STATUSES})
                if stopping:
                    return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
