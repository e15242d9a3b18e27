"""Live progress of an annotation job, read from what is actually committed: the partitions'
commit records. A background thread polls the output, so it works the same on a laptop and on a
cluster writing to S3, and it never counts a row that is not durably written."""

from __future__ import annotations

import json
import posixpath
import threading
from collections import Counter

import fsspec

from shards.commit import RECORD_SUFFIX, join
from shards.writer import STATUSES

VERSION_FIELDS = ("ino", "mtime", "size", "ETag", "LastModified", "created")


class StatsScanner:
    """Sums the counts of commit records written since it was created (a record replaced by a
    rewrite counts once more: its rows were written again)."""

    def __init__(self, output: str, storage_options: dict | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(output, **(storage_options or {}))
        self.counts: Counter = Counter()
        self.seen: set[tuple[str, int]] = set()
        self.versions: dict[str, tuple] = {}  # record name → the listing's version of it last read
        self.scan()
        self.counts.clear()  # what was there before counts as done, not as progress

    def _changed(self) -> list[str]:
        """Records new or replaced since the last scan, judged from the listing alone (a record is
        replaced by a rename or a PUT, which changes its inode/mtime/ETag), so a poll reads only those."""
        changed = []
        self.fs.invalidate_cache(self.root)  # the workers write the records: a cached listing is stale
        for path, info in self.fs.glob(join(self.root, "*" + RECORD_SUFFIX), detail=True).items():
            name = posixpath.basename(path)
            version = tuple(str(info.get(key)) for key in VERSION_FIELDS)
            if self.versions.get(name) != version:
                changed.append(name)
                self.versions[name] = version
        return changed

    def scan(self) -> Counter:
        for name in self._changed():
            try:
                with self.fs.open(join(self.root, name), "r") as handle:
                    record = json.load(handle)
                seen = (name, int(record["generation"]))
                if seen not in self.seen:
                    self.counts.update(record["counts"])
                    self.seen.add(seen)
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
                self.versions.pop(name, None)  # replaced while we read it: read again on the next scan
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
