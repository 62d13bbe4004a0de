"""The header parser against tarfile (the oracle) on the formats writers produce, and its damage reports."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from airflow_provider_mmprep.tarindex import index_tar, split_key

NAMES = ["000000001.jpg", "000000001.txt", "dir/sub/0002.seg.jpg", "dir/sub/0002.json",
         "x" * 120 + "/long.jpg", "é/ünïcode✓.txt", "y" * 99 + ".jpg"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt, encoding="utf-8") as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(NAMES):
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name[-100:]:
                continue
            info = tarfile.TarInfo(name)
            data = bytes([i]) * (i * 700 + 1)
            info.size = len(data)
            info.mtime = 1_700_000_000 + i * 3601 + (0.5 if fmt == tarfile.PAX_FORMAT else 0)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "000000001.jpg"
        tar.addfile(link)
        meta = tarfile.TarInfo("__meta__")
        meta.size = 2
        tar.addfile(meta, io.BytesIO(b"{}"))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size, int(m.mtime)) for m in tar.getmembers()
                    if m.isreg() and split_key(m.name) and m.name != "__meta__"]
    index = index_tar(path)
    got = [(m.name, m.offset, m.size, m.mtime) for s in index.samples for m in s.members]
    assert got == expected and not index.problems
    assert index.skipped_members == 3  # folder, symlink, metadata
    assert [s.key for s in index.samples][:2] == ["000000001", "dir/sub/0002"]
    assert index.samples[1].extensions == ["seg.jpg", "json"]


def test_split_key_follows_webdataset() -> None:
    assert split_key("a/b.c/d.seg.jpg") == ("a/b.c/d", "seg.jpg")
    assert split_key("noext") is None and split_key("dir/.hidden") is None

