"""The one tar writer: copy_range moves bytes in the kernel where it can and falls back cleanly where it
cannot; member headers are exactly tarfile's under each metadata policy; whole tars, pieces and copied
records come out as tarfile would write them."""

from __future__ import annotations

import errno
import io
import os
import tarfile
from pathlib import Path

import pytest

from airflow_provider_mmprep import tarwriter


def _refuse(code: int):
    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return refused


@pytest.mark.parametrize("refused", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copy_range_gives_the_same_bytes_on_every_path(tmp_path: Path, monkeypatch, refused) -> None:
    for name in refused:  # e.g. a file system across devices (EXDEV), or no sendfile to files (EINVAL)
        monkeypatch.setattr(os, name, _refuse(errno.EXDEV if name == "copy_file_range" else errno.EINVAL))
    source = tmp_path / "src"
    data = os.urandom(3 * (1 << 20) + 123)
    source.write_bytes(data)
    out = tmp_path / "out"
    with open(source, "rb") as src, open(out, "wb") as dst:
        dst.write(b"head")
        dst.flush()
        tarwriter.copy_range(src.fileno(), dst.fileno(), 1000, len(data) - 2000)
        tarwriter.copy_range(src.fileno(), dst.fileno(), 0, 10)
    assert out.read_bytes() == b"head" + data[1000:-1000] + data[:10]


def test_copy_range_refuses_a_source_that_ends_early(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(b"x" * 100)
    with open(source, "rb") as src, open(tmp_path / "out", "wb") as dst:
        with pytest.raises(OSError, match="source ended 50 bytes early"):
            tarwriter.copy_range(src.fileno(), dst.fileno(), 50, 100)


# --- member headers: one policy, exactly tarfile's bytes ---------------------------------------------------

LONG_DIR = "d" * 60 + "/"
HEADER_CASES = [  # (name, size, mtime): the fast path's and every fallback's
    ("000000001.jpg", 77_600, 0), ("000000001.txt", 0, 0), ("k.pickle", 12_345_678, 1_700_000_000),
    ("x" * 100, 5, 0), (LONG_DIR + "y" * 60 + ".jpg", 5, 0), ("ünïcode.jpg", 5, 0),
    ("z.bin", 8 ** 11, 0), ("z.bin", 3, 8 ** 11), ("z.bin", 3, -5), ("z" * 300 + ".pickle", 3, 7),
]
POLICIES = [tarwriter.FIXED, tarwriter.MemberMetadata(long_names=tarwriter.PAX),
            tarwriter.MemberMetadata(mode=0o444, uid=1000, gid=100, uname="bigdata", gname="users", mtime=42)]


def _tarinfo(policy: tarwriter.MemberMetadata, name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, policy.mode
    info.uid, info.gid, info.uname, info.gname = policy.uid, policy.gid, policy.uname, policy.gname
    return info


@pytest.mark.parametrize("policy", POLICIES, ids=["fixed-ustar", "fixed-pax", "owned"])
@pytest.mark.parametrize(("name", "size", "mtime"), HEADER_CASES)
def test_headers_are_the_bytes_tarfile_writes(policy, name: str, size: int, mtime: int) -> None:
    fmt = tarfile.PAX_FORMAT if policy.long_names == tarwriter.PAX else tarfile.USTAR_FORMAT
    errors = "surrogateescape" if fmt == tarfile.PAX_FORMAT else "strict"
    try:
        expected = _tarinfo(policy, name, size, mtime).tobuf(fmt, "utf-8", errors)
    except ValueError:  # ustar cannot hold it: neither can we
        with pytest.raises(ValueError):
            policy.header(name, size, mtime)
        return
    assert policy.header(name, size, mtime) == expected
    assert policy.header(name, size) == _tarinfo(policy, name, size, policy.mtime).tobuf(fmt, "utf-8", errors)


def test_a_policy_the_fast_headers_cannot_keep_is_refused() -> None:
    for bad in ({"uname": "ü"}, {"gname": "g" * 33}, {"uid": 8 ** 7}, {"long_names": "gnu"}):
        with pytest.raises(ValueError):
            tarwriter.MemberMetadata(**bad)


def _members(tmp_path: Path) -> tuple[Path, list[tuple[str, int, int, int]]]:
    """A source file and members (name, offset in it, size, mtime) with long, non-ASCII and empty ones."""
    source = tmp_path / "source.bin"
    data = os.urandom(50_000)
    source.write_bytes(data)
    return source, [("a.jpg", 0, 1000, 0), ("a.txt", 1000, 0, 5), (LONG_DIR + "b" * 70 + ".pickle", 3, 700, 1),
                    ("ç.json", 7, 513, 1_700_000_000), ("c.npy", 9000, 40_000, -1)]


@pytest.mark.parametrize("long_names", [tarwriter.USTAR, tarwriter.PAX])
def test_the_writer_writes_what_tarfile_writes(tmp_path: Path, long_names: str) -> None:
    """Members from memory and from another file's ranges: the same bytes as tarfile's (so precache's
    outputs are those its earlier tarfile-based writer made, and download's those of its ustar builder)."""
    source, members = _members(tmp_path)
    if long_names == tarwriter.USTAR:
        members = [m for m in members if m[3] >= 0]  # ustar has no negative times
    policy = tarwriter.MemberMetadata(long_names=long_names)
    data = source.read_bytes()
    fmt = tarfile.PAX_FORMAT if long_names == tarwriter.PAX else tarfile.USTAR_FORMAT
    reference = tmp_path / "reference.tar"
    with tarfile.open(reference, "w", format=fmt) as tar:
        for name, offset, size, mtime in members:
            tar.addfile(_tarinfo(policy, name, size, mtime), io.BytesIO(data[offset:offset + size]))
    out = tmp_path / "out.tar"
    writer = tarwriter.TarWriter(out, policy)
    with open(source, "rb") as src:
        for number, (name, offset, size, mtime) in enumerate(members):
            if number % 2:
                writer.add_from(name, src.fileno(), offset, size, mtime)
            else:
                writer.add_bytes(name, data[offset:offset + size], mtime)
    writer.close()
    writer.close()  # a second close does nothing
    assert out.read_bytes() == reference.read_bytes()
    assert writer.size == out.stat().st_size and writer.size % tarfile.RECORDSIZE == 0


def test_pieces_joined_and_records_copied_give_the_same_tar(tmp_path: Path) -> None:
    source, members = _members(tmp_path)
    members = [m for m in members if m[3] >= 0]
    data = source.read_bytes()
    whole = tmp_path / "whole.tar"
    writer = tarwriter.TarWriter(whole)
    for name, offset, size, mtime in members:
        writer.add_bytes(name, data[offset:offset + size], mtime)
    writer.close()

    pieces = [tmp_path / "p0", tmp_path / "p1"]
    for piece, part in zip(pieces, (members[:2], members[2:])):
        writer = tarwriter.TarWriter(piece)
        for name, offset, size, mtime in part:
            writer.add_bytes(name, data[offset:offset + size], mtime)
        writer.close(end_archive=False)
    joined = pieces[0]
    writer = tarwriter.TarWriter(joined, append=True)
    writer.append_file(pieces[1])
    writer.close()
    assert joined.read_bytes() == whole.read_bytes()

    with tarfile.open(whole) as tar:  # every member's record, re-packed in another order through a descriptor
        records = [(m.offset, m.offset_data + m.size + (-m.size % 512) - m.offset) for m in tar.getmembers()]
    repacked = tmp_path / "repacked.tar"
    fd = os.open(repacked, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = tarwriter.TarWriter(fd)
        with open(whole, "rb") as src:
            for start, length in reversed(records):
                writer.add_records(src.fileno(), start, length)
            with pytest.raises(ValueError, match="512-byte aligned"):
                writer.add_records(src.fileno(), 3, 512)
        writer.close()
    finally:
        os.close(fd)
    with tarfile.open(repacked) as tar:
        assert [(m.name, m.size, tar.extractfile(m).read()) for m in tar.getmembers()] == [
            (name, size, data[offset:offset + size]) for name, offset, size, _ in reversed(members)]
    assert writer.size == repacked.stat().st_size
