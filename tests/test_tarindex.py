"""The header parser against tarfile (the oracle) on the formats writers produce, and its damage reports."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from airflow_provider_mmprep.tarindex import UnsafeMemberName, index_tar, split_key

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



# --- the bulk paths (compiled walker; Python walk + numpy checks) against the general parser ----------

@pytest.fixture(scope="session")
def compiled_walker(tmp_path_factory: pytest.TempPathFactory):
    """The compiled walker: the one the package build made, else built here from ``_tarwalk.c`` (so these
    tests exercise it wherever a C compiler is); None only where it cannot be built."""
    from airflow_provider_mmprep import tarindex

    if tarindex._tarwalk is not None:
        return tarindex._tarwalk
    import importlib.machinery
    import importlib.util

    try:
        from setuptools import Distribution, Extension
        from setuptools.command.build_ext import build_ext
    except ImportError:
        return None
    source = Path(tarindex.__file__).with_name("_tarwalk.c")
    out = tmp_path_factory.mktemp("tarwalk")
    dist = Distribution({"ext_modules": [Extension("_tarwalk", [str(source)], extra_compile_args=["-O2"])]})
    command = build_ext(dist)
    command.build_lib, command.build_temp = str(out), str(out / "tmp")
    command.ensure_finalized()
    try:
        command.run()
    except Exception:  # no compiler or headers: the Python walk still runs every test
        return None
    built = next(out.glob("_tarwalk*.so"))
    loader = importlib.machinery.ExtensionFileLoader("_tarwalk", str(built))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_tarwalk", loader))
    loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, params=["compiled", "walk", "scan"])
def bulk_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, compiled_walker) -> str:
    """Every test runs with the compiled walker, and without it with the Python header-to-header walk
    alone and with the numpy block scan taking over early."""
    from airflow_provider_mmprep import tarindex

    if request.param == "compiled":
        if compiled_walker is None:
            pytest.skip("the compiled walker could not be built here (no C compiler or Python headers)")
        monkeypatch.setattr(tarindex, "_tarwalk", compiled_walker)
    else:
        monkeypatch.setattr(tarindex, "_tarwalk", None)
    if request.param == "walk":
        monkeypatch.setattr(tarindex, "DENSE_RECORD", 0)
    elif request.param == "scan":
        monkeypatch.setattr(tarindex, "DENSE_RECORD", 1 << 40)
        monkeypatch.setattr(tarindex, "PROBE", 2)
    return request.param


def index_pair(path: Path) -> tuple[object, object]:
    """(bulk, reference) results for one tar: the index's content, or the exception's type and text."""
    results = []
    for reference in (False, True):
        try:
            index = index_tar(path, reference=reference)
            results.append(([(s.key, s.members) for s in index.samples], index.problems, index.skipped_members))
        except UnsafeMemberName as exc:
            results.append((type(exc), str(exc)))
    return results[0], results[1]


PAX_FLOAT = "pax with float mtimes"  # img2dataset's shards: a pax header holding the mtime before every member


def mixed_tar(path: Path, fmt: int | str, count: int = 12) -> Path:
    """Samples as img2dataset writes them, plus what other writers add: folders, links, empty files,
    long and unicode names, ustar prefixes, metadata members; with PAX_FLOAT, pax mtime headers before
    every member, some with other records beside (ignored ones, an unreadable mtime)."""
    floats = fmt == PAX_FLOAT
    fmt = tarfile.PAX_FORMAT if floats else fmt
    with tarfile.open(path, "w", format=fmt, encoding="utf-8") as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i in range(count):
            for ext in ("jpg", "txt", "json"):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                data = bytes([65 + i % 26]) * ((i * 517 + len(ext) * 13) % 1500)  # some empty, some not aligned
                info.size = len(data)
                info.mtime = 1_700_000_000 + i + (0.25 if floats else 0)
                if floats and i % 4 == 1:
                    info.pax_headers = {"comment": "other records", "atime": "1.5"}
                if floats and i % 7 == 3 and ext == "txt":
                    info.mtime = 1_700_000_000  # an int: the pax mtime below is not overwritten
                    info.pax_headers = {"mtime": "not a time"}
                tar.addfile(info, io.BytesIO(data))
            if i % 5 == 2:
                for name in (("p" * 60 + "/") * 2 + f"{i}.jpg", "é/ünïcode✓.txt", "x" * 150 + ".jpg"):
                    if fmt == tarfile.USTAR_FORMAT and (len(name.encode()) > 100 and "/" not in name[-100:]):
                        continue
                    info = tarfile.TarInfo(name)
                    info.size = 3
                    tar.addfile(info, io.BytesIO(b"abc"))
                link = tarfile.TarInfo(f"link{i}.jpg")
                link.type = tarfile.SYMTYPE
                link.linkname = "000000001.jpg"
                tar.addfile(link)
        meta = tarfile.TarInfo("__meta__")
        meta.size = 2
        tar.addfile(meta, io.BytesIO(b"{}"))
    return path


FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, PAX_FLOAT]


@pytest.mark.parametrize("fmt", FORMATS)
def test_bulk_matches_general_parser_and_tarfile(tmp_path: Path, fmt: int) -> None:
    path = mixed_tar(tmp_path / "t.tar", fmt)
    bulk, reference = index_pair(path)
    assert bulk == reference and not bulk[1]
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size, int(m.mtime)) for m in tar.getmembers()
                    if m.isreg() and split_key(m.name) and m.name != "__meta__"]
    assert [(m.name, m.offset, m.size, m.mtime) for _, ms in bulk[0] for m in ms] == expected


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, PAX_FLOAT])
def test_bulk_matches_general_parser_on_a_file_not_in_the_page_cache(tmp_path: Path, fmt: int) -> None:
    """A cold file: the compiled walker asks for read-ahead where its reads are not cached (ADVISE_AHEAD in
    _tarwalk.c) and reads the same bytes."""
    path = mixed_tar(tmp_path / "t.tar", fmt, count=400)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # (where the file system keeps no page cache: warm)
    finally:
        os.close(fd)
    bulk, reference = index_pair(path)  # the bulk index first, on the cold file
    assert bulk == reference and not bulk[1]


def test_bulk_matches_general_parser_where_only_stretches_of_the_file_are_cached(tmp_path: Path) -> None:
    """An image shard of several MB with cold stretches between cached ones: the compiled walker checks
    the page cache once per MB (PROBE_STEP), reads plainly between, and still reads the same bytes."""
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(120):
            for ext, size in (("jpg", 40_000 + i * 97), ("txt", 60 + i), ("json", 700 + i * 3)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size, info.mtime = size, 1_700_000_000.5 + i
                tar.addfile(info, io.BytesIO(bytes([48 + i % 10]) * size))
    size = path.stat().st_size
    assert size > 4 << 20
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.pread(fd, size, 0)  # all cached, then three stretches dropped
        for start in (300_000, 1_900_000, size - 700_000):
            os.posix_fadvise(fd, start, 500_000, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    bulk, reference = index_pair(path)
    assert bulk == reference and not bulk[1] and len(bulk[0]) == 120


def test_a_file_whose_access_time_may_not_be_frozen_is_indexed_all_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers are read through O_NOATIME where the file's owner may; the kernel refuses the flag to
    anyone else (EPERM) though the file is readable: the index opens it plainly instead."""
    from airflow_provider_mmprep import tarindex

    path = mixed_tar(tmp_path / "t.tar", PAX_FLOAT)
    expected, _ = index_pair(path)
    real_open, refused = os.open, []

    def open_as_another_user(file: str | Path, flags: int, *args: int) -> int:
        if flags & getattr(os, "O_NOATIME", 0):
            refused.append(file)
            raise PermissionError(1, "Operation not permitted", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(tarindex.os, "open", open_as_another_user)
    bulk, reference = index_pair(path)
    assert bulk == reference == expected
    assert refused or not getattr(os, "O_NOATIME", 0) or tarindex._tarwalk is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_bulk_matches_general_parser_on_every_truncation(tmp_path: Path, fmt: int) -> None:
    source = mixed_tar(tmp_path / "t.tar", fmt, count=4).read_bytes()
    cut = tmp_path / "cut.tar"
    for keep in [0, 1, 511, 512, 513] + list(range(700, len(source), 337)):
        cut.write_bytes(source[:keep])
        bulk, reference = index_pair(cut)
        assert bulk == reference, keep
    assert "truncated" in " ".join(index_pair(cut)[0][1]) or keep > len(source) - 1024


def header_offsets(path: Path) -> list[int]:
    """Where every header block is: each member's chain start (pax, GNU long name) and its own header."""
    with tarfile.open(path) as tar:
        return sorted({at for m in tar.getmembers() for at in (m.offset, m.offset_data - 512)})


def rewrite(path: Path, at: int, start: int, value: bytes, fix_checksum: bool = True) -> None:
    """Overwrite bytes ``start..`` of the header at ``at``; recompute its checksum unless told not to."""
    data = bytearray(path.read_bytes())
    block = data[at:at + 512]
    block[start:start + len(value)] = value
    if fix_checksum:
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
    data[at:at + 512] = block
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bulk_matches_general_parser_on_corrupt_headers(tmp_path: Path, fmt: int) -> None:
    source = mixed_tar(tmp_path / "t.tar", fmt, count=4)
    path = tmp_path / "bad.tar"
    for at in header_offsets(source):
        path.write_bytes(source.read_bytes())
        rewrite(path, at, 0, b"\xff" * 4, fix_checksum=False)  # damage without a matching checksum
        bulk, reference = index_pair(path)
        assert bulk == reference and "bad checksum" in bulk[1][0], at


def test_bulk_takes_every_spelling_the_general_parser_takes(tmp_path: Path) -> None:
    """Fields written other than ``%011o\\0``/``%06o\\0 ``: the walk hands them to the general parser."""
    source = mixed_tar(tmp_path / "t.tar", tarfile.USTAR_FORMAT, count=3)
    heads = header_offsets(source)
    with tarfile.open(source) as tar:
        sizes = {m.offset: m.size for m in tar.getmembers()}
    assert sizes[heads[2]] % 8, "the 12th digit must matter"
    cases = {
        "7-digit checksum": lambda p, at: rewrite(p, at, 148, b"0000000\0", fix_checksum=False),
        "12-digit size": lambda p, at: rewrite(p, at, 124, b"%012o" % sizes[at]),
        "base-256 size": lambda p, at: rewrite(p, at, 124, b"\x80" + bytes(7) + (0).to_bytes(4, "big")),
        "spaced size": lambda p, at: rewrite(p, at, 124, b"          0 "),
        "short mtime": lambda p, at: rewrite(p, at, 136, b"1234\0\0\0\0\0\0\0\0"),
        "bad mtime": lambda p, at: rewrite(p, at, 136, b"zzzzzzzzzzz\0"),
        "inner NUL in name": lambda p, at: rewrite(p, at, 20, b"\0junk"),
        "signed checksum": lambda p, at: rewrite(p, at, 90, "ü".encode("latin-1")),
        "old V7 type": lambda p, at: rewrite(p, at, 156, b"\0"),
        "contiguous type": lambda p, at: rewrite(p, at, 156, b"7"),
        "ustar prefix": lambda p, at: rewrite(p, at, 345, b"pre/fix"),
        "trailing-slash name": lambda p, at: rewrite(p, at, 0, b"000000001.jpg/\0"),
        "unsafe name": lambda p, at: rewrite(p, at, 0, b"../000000001.jpg\0"),
        "absolute name": lambda p, at: rewrite(p, at, 0, b"/x/000000001.jpg\0"),
    }
    for label, damage in cases.items():
        for at in heads[1:4]:
            path = tmp_path / "case.tar"
            path.write_bytes(source.read_bytes())
            if label == "signed checksum":  # a high byte and a checksum summed over signed bytes
                rewrite(path, at, 90, b"\xfc")
                data = bytearray(path.read_bytes())
                block = data[at:at + 512]
                block[148:156] = b" " * 8
                signed = sum(b - 256 if b > 127 else b for b in block)
                block[148:156] = b"%06o\0 " % signed
                data[at:at + 512] = block
                path.write_bytes(bytes(data))
            else:
                damage(path, at)
            bulk, reference = index_pair(path)
            assert bulk == reference, (label, at)


def test_unsafe_name_after_a_bad_checksum_is_never_reached(tmp_path: Path) -> None:
    source = mixed_tar(tmp_path / "t.tar", tarfile.USTAR_FORMAT, count=3)
    heads = header_offsets(source)
    rewrite(source, heads[5], 0, b"../evil.jpg\0")
    rewrite(source, heads[3], 0, b"\xff", fix_checksum=False)
    bulk, reference = index_pair(source)
    assert bulk == reference and "bad checksum" in bulk[1][0]
    rewrite(source, heads[3], 0, b"\x30", fix_checksum=True)  # repaired: now the unsafe name is reached
    bulk, reference = index_pair(source)
    assert bulk == reference and bulk[0] is UnsafeMemberName and "evil.jpg" in bulk[1]


def test_bulk_batches_join_seamlessly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_mmprep import tarindex

    path = mixed_tar(tmp_path / "t.tar", tarfile.PAX_FORMAT, count=20)
    whole, reference = index_pair(path)
    monkeypatch.setattr(tarindex, "WALK_BATCH", 2)
    monkeypatch.setattr(tarindex, "COMPILED_BATCH", 2)
    assert index_pair(path) == (whole, reference)
    rewrite(path, header_offsets(path)[30], 0, b"\xff", fix_checksum=False)
    bulk, reference = index_pair(path)
    assert bulk == reference and bulk[1]


def test_random_header_damage_agrees_with_general_parser(tmp_path: Path) -> None:
    """Bytes flipped anywhere in headers: the bulk path reports exactly what the general parser does."""
    import random

    rng = random.Random(15)
    source = mixed_tar(tmp_path / "t.tar", tarfile.GNU_FORMAT, count=6)
    heads = header_offsets(source)
    original = source.read_bytes()
    path = tmp_path / "fuzz.tar"
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            data[rng.choice(heads) + rng.randrange(512)] = rng.choice([0, 32, 47, 46, 48, 55, 56, 255, rng.randrange(256)])
        path.write_bytes(bytes(data))
        bulk, reference = index_pair(path)
        assert bulk == reference


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_that_looks_like_headers_is_not_taken_for_them(tmp_path: Path, fmt: int) -> None:
    """Member data holding whole tars (headers at 512-byte boundaries, chaining to each other and even to
    the real next header): the chain is followed from the start, so none of them counts."""
    path = tmp_path / "t.tar"
    inner = (tmp_path / "inner.tar")
    mixed_tar(inner, tarfile.USTAR_FORMAT, count=3)
    payload = inner.read_bytes()
    fake = tarfile.TarInfo("fake.jpg")
    fake.size = 0  # a header whose successor is the very next block: the real header after this data
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT if fmt == PAX_FLOAT else fmt) as tar:
        for i, data in enumerate([payload, payload[:4096], fake.tobuf(tarfile.USTAR_FORMAT), payload[512:]]):
            info = tarfile.TarInfo(f"{i:03d}.tar")
            info.size = len(data)
            info.mtime = 1.5 if fmt == PAX_FLOAT else 1
            tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{i:03d}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"t"))
    bulk, reference = index_pair(path)
    assert bulk == reference and not bulk[1]
    assert [(m.name, m.size) for _, ms in bulk[0] for m in ms] == [
        (f"{i:03d}.{e}", n) for i, size in enumerate([len(payload), 4096, 512, len(payload) - 512])
        for e, n in (("tar", size), ("txt", 1))]


@pytest.mark.parametrize("batch", [2, 3, 1 << 15])
def test_grouping_edge_names_agree_with_general_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       batch: int) -> None:
    """Repeated and case-folded extensions, metadata, key-less names, folders as files: grouped as
    webdataset does, whatever the batch boundaries."""
    from airflow_provider_mmprep import tarindex

    monkeypatch.setattr(tarindex, "WALK_BATCH", batch)
    monkeypatch.setattr(tarindex, "COMPILED_BATCH", batch)
    names = ["a.jpg", "a.txt", "a.JPG", "a.txt", "b.jpg", "__meta__", "__x.y__", "c/__x.y__", "noext", "d.",
             ".hidden", "e/.f", "g.tar.gz", "g.txt", "g.txt", "h/i.j/k.l.m", "h/i.j/k.n", "dir/", "x.jpg",
             "x.json", "x.txt", "y.jpg", "y.json", "Y.txt", "y.TXT"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    bulk, reference = index_pair(path)
    assert bulk == reference
    assert [(key, [m.ext for m in members]) for key, members in bulk[0]] == [
        ("a", ["jpg", "txt"]), ("a", ["JPG", "txt"]), ("b", ["jpg"]), ("c/__x", ["y__"]), ("g", ["tar.gz", "txt"]),
        ("g", ["txt"]), ("h/i.j/k", ["l.m", "n"]), ("x", ["jpg", "json", "txt"]), ("y", ["jpg", "json"]),
        ("Y", ["txt"]), ("y", ["TXT"])]
    assert bulk[2] == 7  # __meta__, __x.y__, noext, d., .hidden, e/.f, dir/


def test_many_and_long_extensions_keep_their_own_spelling(tmp_path: Path) -> None:
    """The walker shares one string per extension spelling within a batch (a few slots, short ones only):
    more spellings than slots, long ones and case variants must each still come back as stored."""
    extensions = [f"e{i}" for i in range(12)] + ["a_very_long_extension_name.npy", "seg.png", "SEG.webp", "Jpg"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in range(30):
            for ext in extensions[sample % 5:] + extensions[:sample % 5]:  # the order changes between samples
                info = tarfile.TarInfo(f"{sample:04d}.{ext}")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
    bulk, reference = index_pair(path)
    assert bulk == reference
    assert [[m.ext for m in members] for _, members in bulk[0]][7] == extensions[2:] + extensions[:2]
    assert {m.ext for _, members in bulk[0] for m in members} == set(extensions)


def test_random_damage_to_pax_mtime_tars_agrees_with_general_parser(tmp_path: Path) -> None:
    """img2dataset's layout (a pax mtime header before every member), bytes flipped in any header block
    or pax record: the bulk path reports exactly what the general parser does."""
    import random

    rng = random.Random(16)
    source = mixed_tar(tmp_path / "t.tar", PAX_FLOAT, count=6)
    original = source.read_bytes()
    blocks = header_offsets(source)
    with tarfile.open(source) as tar:
        blocks += [m.offset + 512 for m in tar.getmembers() if m.offset_data - m.offset > 512]  # pax records
    path = tmp_path / "fuzz.tar"
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 2)):
            data[rng.choice(blocks) + rng.choice([rng.randrange(40), rng.randrange(512)])] = rng.choice(
                [0, 10, 32, 46, 48, 55, 56, 61, 120, 255, rng.randrange(256)])
        path.write_bytes(bytes(data))
        bulk, reference = index_pair(path)
        assert bulk == reference


def pax_record(text: str) -> bytes:
    """One well-formed pax record ``"<length> key=value\\n"`` (the length counts its own digits)."""
    body = f" {text}\n".encode()
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return b"%d" % length + body


@pytest.mark.parametrize("record", [b"11 mtime=95\n", b"12 mtime=95\n", b"13 mtime=9.5\n", b"7 a=b\n",
                                    b"13 mtime=1e3\n", b"14 size=99999\n", b"21 path=other/x.jpg\n"] + [
    pax_record(f"mtime={value}") for value in ("1733155380.9999999", "1733155380.4567213", "-5.5", "+3", "0.5",
                                               "99999999999999999999.5", "4294967296.25", "12.", ".75", "-0.9",
                                               "1" * 39, "1" * 45, "", "nan", " 7", "7_0")])
def test_pax_records_read_exactly_as_the_general_parser(tmp_path: Path, record: bytes) -> None:
    """Pax records the walk reads itself (a lone mtime) or hands over (length fields that lie, other keys)."""
    path = mixed_tar(tmp_path / "t.tar", PAX_FLOAT, count=3)
    with tarfile.open(path) as tar:
        first = next(m for m in tar.getmembers() if m.offset_data - m.offset > 512)
    data = bytearray(path.read_bytes())
    data[first.offset + 512:first.offset + 1024] = record.ljust(512, b"\0")
    path.write_bytes(bytes(data))
    rewrite(path, first.offset, 124, b"%011o\0" % len(record))
    bulk, reference = index_pair(path)
    assert bulk == reference


@pytest.mark.parametrize("names, expected", [
    ([f"k.e{i}" for i in range(12)] + [f"m.e{i}" for i in range(10)] + ["m.E3", "m.e11", "n.a", "n.b"],
     [("k", 12), ("m", 10), ("m", 2), ("n", 2)]),  # runs longer than 8: extensions sorted per run
    (["o.a", "o.b", "p.a", "p.b", "p.A", "p.c", "q.a"], [("o", 2), ("p", 2), ("p", 2), ("q", 1)]),  # 2 apart
])
def test_long_samples_with_and_without_a_repeated_extension(tmp_path: Path, names: list[str],
                                                            expected: list[tuple[str, int]]) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    bulk, reference = index_pair(path)
    assert bulk == reference
    assert [(key, len(members)) for key, members in bulk[0]] == expected


@pytest.mark.parametrize("comment", [400, 1000, 3000])
def test_long_pax_records_before_members(tmp_path: Path, comment: int) -> None:
    """Pax records longer than a block (ignored keys beside the mtime): the walk reads past them."""
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(6):
            for ext in ("jpg", "txt"):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size, info.mtime = 700 * i + 1, 1_700_000_000.5 + i
                info.pax_headers = {"comment": "c" * (comment * (i % 3))}
                tar.addfile(info, io.BytesIO(b"d" * info.size))
    bulk, reference = index_pair(path)
    assert bulk == reference and not bulk[1] and len(bulk[0]) == 6
    with tarfile.open(path) as tar:
        assert [(m.name, m.offset, m.offset_data, int(m.mtime)) for m in tar.getmembers()] == [
            (m.name, m.header_offset, m.offset, m.mtime) for _, ms in bulk[0] for m in ms]


# --- tars from the writers users' shards come from, member for member with tarfile -------------------------

def tarfile_members(path: Path) -> list[tuple[str, int, int, int, int]]:
    """(name, chain offset, data offset, size, mtime) of the members an index keeps, by tarfile."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size, int(m.mtime)) for m in tar.getmembers()
                if m.isreg() and split_key(m.name) and not (m.name.startswith("__") and m.name.endswith("__"))]


def indexed_members(path: Path) -> list[tuple[str, int, int, int, int]]:
    bulk, reference = index_pair(path)
    assert bulk == reference and not bulk[1]
    return [(m.name, m.header_offset, m.offset, m.size, m.mtime) for _, ms in bulk[0] for m in ms]


@pytest.mark.parametrize("fmt", [None, "PAX_FORMAT", "GNU_FORMAT"])
def test_webdataset_tarwriter_shards_match_tarfile(tmp_path: Path, fmt: str | None) -> None:
    """img2dataset writes its shards with webdataset's TarWriter (its shards carry a pax header with a
    float mtime before every member: PAX_FORMAT); other tools keep the default or pass another format."""
    import webdataset

    path = tmp_path / "shard.tar"
    with open(path, "wb") as stream:
        writer = webdataset.TarWriter(stream, **({} if fmt is None else {"format": fmt}))
        for i in range(40):
            sample = {"__key__": f"{i:09d}", "jpg": bytes([i % 251]) * (i * 977 % 9000), "txt": f"caption {i}",
                      "json": {"key": f"{i:09d}", "status": "success"}}
            if i % 9 == 4:
                sample["txt"] = ""  # an empty member
            writer.write(sample)
        writer.close()
    got = indexed_members(path)
    assert got == tarfile_members(path) and len(got) == 120


def test_gnu_tar_archives_match_tarfile(tmp_path: Path) -> None:
    """The tar binary (GNU format): folders, long names (GNU 'L' records), empty files, a symlink."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    root = tmp_path / "src"
    for i in range(15):
        folder = root / ("deep/" + "d" * 90 + "/" if i % 4 == 0 else "flat")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{i:05d}" + ("_" + "n" * 120 if i % 5 == 1 else "")
        (folder / f"{stem}.jpg").write_bytes(b"j" * (i * 1531 % 7000))
        (folder / f"{stem}.txt").write_bytes(b"" if i % 3 == 0 else b"caption")
    (root / "flat" / "link.jpg").symlink_to("00001.jpg")
    path = tmp_path / "gnu.tar"
    subprocess.run(["tar", "--format=gnu", "--sort=name", "-cf", str(path), "-C", str(root), "."], check=True)
    got = indexed_members(path)
    assert got == tarfile_members(path) and len(got) == 30
    posix = tmp_path / "posix.tar"  # GNU tar's pax output: long names as pax path records
    subprocess.run(["tar", "--format=posix", "--sort=name", "-cf", str(posix), "-C", str(root), "."], check=True)
    got = indexed_members(posix)
    assert got == tarfile_members(posix) and len(got) == 30


def test_pax_long_names_and_empty_files_match_tarfile(tmp_path: Path) -> None:
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(30):
            for ext in ("jpg", "txt"):
                info = tarfile.TarInfo(("q" * 130 + "/" if i % 4 == 2 else "") + f"{i:04d}.{ext}")
                info.size = 0 if i % 6 == 0 else i * 333
                info.mtime = 1_700_000_000.75 + i
                tar.addfile(info, io.BytesIO(b"z" * info.size))
    got = indexed_members(path)
    assert got == tarfile_members(path) and len(got) == 60


@pytest.mark.parametrize("writer", ["tarwriter", "gnu"])
def test_damaged_writer_output_reports_what_the_general_parser_does(tmp_path: Path, writer: str) -> None:
    """Truncated anywhere and with a header corrupted: the same problems, word for word, naming the tar."""
    import subprocess

    import webdataset

    path = tmp_path / "w.tar"
    if writer == "tarwriter":
        with open(path, "wb") as stream:
            out = webdataset.TarWriter(stream, format="PAX_FORMAT")
            for i in range(6):
                out.write({"__key__": f"{i:05d}", "jpg": b"j" * (i * 700), "txt": "t"})
            out.close()
    else:
        root = tmp_path / "src"
        root.mkdir()
        for i in range(6):
            (root / (f"{i:05d}" + "_" * 110 + ".jpg")).write_bytes(b"j" * (i * 700))
            (root / f"{i:05d}.txt").write_bytes(b"t")
        subprocess.run(["tar", "--format=gnu", "--sort=name", "-cf", str(path), "-C", str(root), "."], check=True)
    source = path.read_bytes()
    cut = tmp_path / "cut.tar"
    for keep in range(0, len(source), 211):
        cut.write_bytes(source[:keep])
        bulk, reference = index_pair(cut)
        assert bulk == reference, keep
    for at in header_offsets(path):
        cut.write_bytes(source)
        rewrite(cut, at, 10, b"\xfe", fix_checksum=False)
        bulk, reference = index_pair(cut)
        assert bulk == reference and "bad checksum" in " ".join(bulk[1]), at
    cut.write_bytes(source)
    with tarfile.open(path) as tar:  # a member named in its own header (no long-name record)
        last = [m for m in tar.getmembers() if len(m.name) < 100][-1]
    rewrite(cut, last.offset_data - 512, 0, b"../up.jpg\0")
    bulk, reference = index_pair(cut)
    assert bulk == reference and bulk[0] is UnsafeMemberName and str(cut) in bulk[1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_index_from_offsets_matches_the_headers(tmp_path: Path, fmt: int | str) -> None:
    """A manifest's member_offsets give the index its headers give (grouped in C with the compiled walker,
    in Python without), on names that group in every way."""
    from airflow_provider_mmprep.tarindex import index_from_offsets, offsets_of

    path = mixed_tar(tmp_path / "t.tar", fmt, count=15)
    record = offsets_of(path)
    from_headers = index_tar(path)
    from_offsets = index_from_offsets(path, path.stat().st_size, record)
    assert [(s.key, s.members) for s in from_offsets.samples] == [(s.key, s.members) for s in from_headers.samples]
    names = ["a.jpg", "a.txt", "a.JPG", "b.jpg", "é.jpg", "é.txt", "c.d/e.f.g", "c.d/e.h"]
    tar = tmp_path / "names.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as out:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            out.addfile(info, io.BytesIO(b"x"))
    record = offsets_of(tar)
    assert [(s.key, s.members) for s in index_from_offsets(tar, tar.stat().st_size, record).samples] == [
        (s.key, s.members) for s in index_tar(tar).samples]
    assert [s.key for s in index_tar(tar).samples] == ["a", "a", "b", "é", "c.d/e"]
