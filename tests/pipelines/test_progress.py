from pipelines.progress import StatsScanner
from shards import ShardWriter
from shards.testing import make_sample


def test_scanner_counts_only_partitions_committed_after_it_started(tmp_path):
    with ShardWriter(str(tmp_path), 0) as writer:
        writer.write(make_sample("old"))
    scanner = StatsScanner(str(tmp_path))
    assert scanner.scan() == {}
    with ShardWriter(str(tmp_path), 1, max_samples=1) as writer:
        writer.write(make_sample("a"))
        writer.write(make_sample("b"))
        writer.reject("c", "no person found")
        assert scanner.scan() == {}  # part 0 is in place, but the partition is not committed yet
    assert scanner.scan() == {"ok": 2, "rejected": 1, "failed": 0}
    assert scanner.scan() == {"ok": 2, "rejected": 1, "failed": 0}  # each record counted once
    with ShardWriter(str(tmp_path), 1) as writer:  # a rewrite: its rows are written again
        writer.reject("a", "gone")
    assert scanner.scan() == {"ok": 2, "rejected": 2, "failed": 0}
