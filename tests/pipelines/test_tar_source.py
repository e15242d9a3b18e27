import contextlib
import io
import json
import tarfile

import fsspec
import pytest

from pipelines import tar_source
from pipelines.tar_source import TarSourceError, plan_keys, read_tar_partition, scan_tar, split_member

JPG = b"\xff\xd8fake-jpeg"  # this layer never decodes, so a few bytes stand for an image


def make_tar(path, members):
    """members: (name, bytes) in tar order."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def plan_and_read(*tars):
    """Scan, plan and read tars as the job does; rows per tar."""
    plans = plan_keys([scan_tar(tar) for tar in tars])
    return [read_tar_partition({"kind": "tar", "partition": i, **plan}) for i, plan in enumerate(plans)]


@pytest.mark.parametrize(
    "name, parts",
    [
        ("img.v2.jpg", ("img.v2", "jpg")),
        ("a/x.JPG", ("a/x", "jpg")),
        ("KEY.depth.png", ("KEY", "depth.png")),
        ("KEY.pose.json", ("KEY", "pose.json")),
        ("KEY.json", ("KEY", "json")),
        ("KEY.npy", None),
        (".jpg", None),
    ],
)
def test_split_member_takes_the_longest_known_suffix(name, parts):
    assert split_member(name) == parts


def test_dotted_stem_is_a_row_with_a_generated_key(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("img.v2.jpg", JPG), ("img.v2.txt", b" a man \n"), ("ok.jpg", JPG)])
    [rows] = plan_and_read(tar)
    assert [(row["key"], row["source"], row["caption"]) for row in rows] == [
        ("t000000s0000000", f"{tar}#img.v2", "a man"),
        ("ok", f"{tar}#ok", ""),
    ]
    assert rows[0]["data"] == JPG and rows[0]["problem"] is None


def test_same_name_in_two_folders_gives_two_rows(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("a/x.jpg", JPG), ("b/x.jpg", JPG + b"2")])
    [rows] = plan_and_read(tar)
    assert [row["source"] for row in rows] == [f"{tar}#a/x", f"{tar}#b/x"]
    assert [row["data"] for row in rows] == [JPG, JPG + b"2"]
    assert len({row["key"] for row in rows}) == 2


def test_key_with_a_space_is_rekeyed(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("my photo.jpg", JPG)])
    [[row]] = plan_and_read(tar)
    assert row["key"] == "t000000s0000000" and row["source"] == f"{tar}#my photo"


def test_duplicate_stem_across_tars_rekeys_both_and_keeps_the_rest(tmp_path):
    first = make_tar(tmp_path / "0.tar", [("dup.jpg", JPG), ("solo0.jpg", JPG)])
    second = make_tar(tmp_path / "1.tar", [("solo1.jpg", JPG), ("dup.jpg", JPG)])
    rows = plan_and_read(first, second)
    assert [[row["key"] for row in tar_rows] for tar_rows in rows] == [
        ["t000000s0000000", "solo0"],
        ["solo1", "t000001s0000001"],
    ]


def test_kept_stem_equal_to_a_generated_key_is_refused(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("bad name.jpg", JPG), ("t000000s0000000.jpg", JPG)])
    with pytest.raises(TarSourceError, match="'t000000s0000000'.*generated key of sample 'bad name'"):
        plan_keys([scan_tar(tar)])


def test_plan_is_deterministic(tmp_path):
    tars = [make_tar(tmp_path / f"{i}.tar", [("x y.jpg", JPG), (f"k{i}.jpg", JPG), ("d.jpg", JPG)]) for i in range(3)]
    plans = [plan_keys([scan_tar(tar) for tar in tars]) for _ in range(2)]
    assert plans[0] == plans[1]
    assert plans[0][2]["rekey"] == {"0": "t000002s0000000", "2": "t000002s0000002"}


def test_sample_without_image_is_a_no_image_row(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("only.txt", b"caption"), ("only.json", b"{}"), ("ok.jpg", JPG)])
    [rows] = plan_and_read(tar)
    assert len(rows) == 2
    assert rows[0]["data"] is None
    assert rows[0]["problem"] == ("no_image", f"sample 'only' in {tar} has no image member (members: txt, json)")


def test_non_utf8_caption_is_a_caption_problem(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("k.jpg", JPG), ("k.txt", b"caf\xe9")])
    [[row]] = plan_and_read(tar)
    assert row["problem"][0] == "caption" and "'k'" in row["problem"][1]


def test_our_own_shard_layout_keeps_its_keys(tmp_path):
    meta = {"source": "x", "key": "K1"}
    members = [
        ("K1.jpg", JPG),
        ("K1.txt", b"a woman"),
        ("K1.json", json.dumps(meta).encode()),
        ("K1.pose.json", b'{"people": []}'),
        ("K1.depth.png", b"\x89PNG-depth"),
    ]
    tar = make_tar(tmp_path / "shard-000000.tar", members)
    scan = scan_tar(tar)
    assert scan["stems"] == ["K1"] and scan["has_image"] == [True] and scan["ignored"] == 0
    [[row]] = plan_and_read(tar)
    assert (row["key"], row["data"], row["caption"]) == ("K1", JPG, "a woman")
    assert row["extra"] == json.dumps(meta, sort_keys=True)


def test_image_choice_prefers_jpg_and_json_must_be_an_object(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("k.png", b"png"), ("k.JPG", JPG), ("k.json", b"[1, 2]")])
    [[row]] = plan_and_read(tar)
    assert row["data"] == JPG and row["extra"] == "{}"


def test_non_contiguous_members_are_grouped(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("a.jpg", JPG), ("b.jpg", JPG), ("a.txt", b"late caption"), ("b.txt", b"b")])
    assert scan_tar(tar)["stems"] == ["a", "b"]
    [rows] = plan_and_read(tar)
    assert [(row["key"], row["caption"]) for row in rows] == [("a", "late caption"), ("b", "b")]


def test_unsafe_and_unknown_members_make_no_samples(tmp_path):
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as archive:
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        for name in ("../up.jpg", "x.npy", "ok.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"abc"))
    scan = scan_tar(str(tar))
    assert (scan["stems"], scan["ignored"], scan["unsafe"]) == (["ok"], 1, 2)
    [[row]] = plan_and_read(str(tar))
    assert row["key"] == "ok"


def test_tar_of_unknown_members_only_is_refused(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("x.npy", b"1"), ("y.npy", b"2")])
    with pytest.raises(TarSourceError, match=r"a.tar has no samples: 2 members have no known extension.*'x.npy'"):
        scan_tar(tar)


def test_truncated_garbage_or_missing_tar_fails_the_scan_in_one_line(tmp_path):
    whole = make_tar(tmp_path / "whole.tar", [(f"k{i}.jpg", bytes(3000)) for i in range(6)])
    data = open(whole, "rb").read()
    cut_in_data = tmp_path / "cut.tar"
    cut_in_data.write_bytes(data[: len(data) // 2])
    cut_at_boundary = tmp_path / "boundary.tar"
    cut_at_boundary.write_bytes(data[: 512 + 3072])  # first member exactly, no end marker
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all " * 100)
    for path in (cut_in_data, cut_at_boundary, garbage):
        with pytest.raises(TarSourceError, match="truncated") as caught:
            scan_tar(str(path))
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(TarSourceError, match="missing.tar does not exist"):
        scan_tar(str(tmp_path / "missing.tar"))


def test_tar_damaged_after_planning_gives_source_read_rows(tmp_path):
    tar = tmp_path / "a.tar"
    make_tar(tar, [(f"k{i}.jpg", bytes(3000)) for i in range(6)])
    [plan] = plan_keys([scan_tar(str(tar))])
    data = tar.read_bytes()
    tar.write_bytes(data[: 2 * (512 + 3072) + 1000])  # two whole samples, then a cut inside the third
    rows = read_tar_partition({"kind": "tar", "partition": 0, **plan})
    assert len(rows) == 6
    assert [row["problem"] is None for row in rows] == [True, True, False, False, False, False]
    assert all(row["problem"][0] == "source_read" and row["data"] is None for row in rows[2:])
    assert rows[2]["problem"][1].startswith(f"could not read 'k2' from {tar}: ReadError")
    keys = [row["key"] for row in rows]
    assert keys[:2] == ["k0", "k1"] and len(set(keys)) == 6


def test_tar_replaced_after_planning_gives_source_read_rows(tmp_path):
    tar = make_tar(tmp_path / "a.tar", [("a.jpg", JPG), ("b.jpg", JPG)])
    [plan] = plan_keys([scan_tar(tar)])
    make_tar(tmp_path / "a.tar", [("c.jpg", JPG), ("d.jpg", JPG), ("e.jpg", JPG)])
    rows = read_tar_partition({"kind": "tar", "partition": 0, **plan})
    assert len(rows) == 2
    assert all(row["problem"][0] == "source_read" and "changed since planning" in row["problem"][1] for row in rows)
    missing = read_tar_partition({"kind": "tar", "partition": 0, **plan, "url": str(tmp_path / "gone.tar")})
    assert [row["problem"][0] for row in missing] == ["source_read", "source_read"]


def test_scan_reads_headers_not_member_data(tmp_path, monkeypatch):
    tar = make_tar(tmp_path / "big.tar", [("big.jpg", bytes(20 << 20)), ("big.txt", b"caption")])
    read = []
    real_open = fsspec.open

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def read(self, size=-1):
            data = self.handle.read(size)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.handle, name)

    @contextlib.contextmanager
    def counting_open(url, mode="rb", **options):
        with real_open(url, mode, **options) as handle:
            yield Counting(handle)

    monkeypatch.setattr(tar_source.fsspec, "open", counting_open)
    scan = scan_tar(tar)
    assert scan["stems"] == ["big"] and scan["bytes"] > 20 << 20
    assert 0 < sum(read) < 1 << 20
