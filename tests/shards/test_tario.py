import io
import tarfile

import pytest

from shards import tario


def make_tar(path, entries):
    """entries: (name, bytes) for files, (name, ('symlink', target)) for links."""
    with tarfile.open(path, "w") as archive:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))


@pytest.mark.parametrize(
    "bad, match",
    [("../outside.txt", "escapes"), ("a/../../outside.txt", "escapes"), ("/tmp/abs.txt", "absolute")],
)
def test_extract_refuses_escaping_members_and_writes_nothing_outside(tmp_path, bad, match):
    tar = tmp_path / "evil.tar"
    make_tar(tar, [("ok.txt", b"fine"), (bad, b"evil")])
    target = tmp_path / "target"
    with pytest.raises(tario.UnsafeMemberError, match=match):
        tario.extract(tar, target)
    assert not (tmp_path / "outside.txt").exists()
    assert [p.name for p in tmp_path.rglob("*.txt")] == ["ok.txt"]


def test_links_are_refused(tmp_path):
    tar = tmp_path / "link.tar"
    make_tar(tar, [("k.jpg", ("symlink", "/etc/passwd"))])
    with pytest.raises(tario.UnsafeMemberError, match="is a link"):
        tario.extract(tar, tmp_path / "target")


def test_group_samples_rejects_split_keys():
    members = [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"3")]
    with pytest.raises(tario.NonContiguousKeyError, match="'a'"):
        list(tario.group_samples(members))
    grouped = list(tario.group_samples([("a.jpg", b"1"), ("a.depth.png", b"2"), ("b.jpg", b"3")]))
    assert [sorted(s) for s in grouped] == [["__key__", "__url__", "depth.png", "jpg"], ["__key__", "__url__", "jpg"]]
