"""Index WebDataset tars from their headers alone: samples, member byte ranges, damage.

An uncompressed tar keeps each member's data contiguous after its 512-byte header, so knowing every
member's data offset and size is enough to re-pack samples by copying byte ranges (reorganize_tar), to
count samples (generate_wdinfo) and to describe a folder (``mmprep inspect``) without reading any data.

Samples follow webdataset's rules (REFERENCE.md §5): key = path up to the first dot of the basename,
extension = the rest; consecutive members with the same key form one sample, and a repeated extension
starts a new sample (that is how webdataset itself splits them). Top-level ``__name__`` members are
metadata and non-regular members (folders, links) are skipped, as webdataset does.

Damage is reported, not raised: a truncated or corrupt tail ends the index at the last member whose
header and data are intact, and :attr:`TarIndex.problems` says what was lost. Member names that are
absolute or climb out with ``..`` raise :class:`UnsafeMemberName` because no consumer should ever see them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

BLOCK = 512


class UnsafeMemberName(ValueError):
    """A member path that is absolute or contains ``..``: refused wherever it is found."""


class DamagedTar(ValueError):
    """Raised by consumers that need a whole tar (precache) when :attr:`TarIndex.problems` is not empty."""


@dataclass(frozen=True, slots=True)
class Member:
    name: str  # path inside the tar, as stored
    ext: str  # webdataset extension (text after the first dot of the basename), as stored
    offset: int  # byte offset of the data in the tar file
    size: int
    header_offset: int  # where the member's header chain (pax / GNU long-name blocks, header) starts
    mtime: int = 0  # seconds, as stored (pax ``mtime`` truncated); precache gives its outputs the same

    @property
    def end(self) -> int:
        """Offset just past the member's data padding: the next member's header chain starts here."""
        return self.offset + -(-self.size // BLOCK) * BLOCK


@dataclass(slots=True)
class Sample:
    key: str
    members: list[Member]

    @property
    def extensions(self) -> list[str]:
        return [m.ext for m in self.members]


@dataclass
class TarIndex:
    path: Path
    file_size: int
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # damage found; empty for a clean tar
    skipped_members: int = 0  # non-regular, metadata or key-less members, as webdataset skips them

    @property
    def damaged(self) -> bool:
        return bool(self.problems)


def split_key(name: str) -> tuple[str, str] | None:
    """webdataset's key/extension split: ``"d/a.seg.jpg"`` → ``("d/a", "seg.jpg")``; None without a dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1:]


def check_member_name(name: str, tar_path: str | Path) -> None:
    if name.startswith("/") or ".." in name.split("/"):
        raise UnsafeMemberName(f"{tar_path}: member {name!r} is absolute or contains '..'; refusing this tar")


def _is_metadata(name: str) -> bool:
    return "/" not in name and name.startswith("__") and name.endswith("__")


_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular, contiguous file
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # hard/sym link, char/block device, folder, fifo
_SKIP_DATA = (b"g", b"K")  # pax global header, GNU long link name: nothing a sample needs


def _octal(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit of the first byte is set."""
    if field[:1] and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _octal(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = unsigned - 2 * (sum(b for b in block[:148] if b > 127) + sum(b for b in block[156:] if b > 127))
    return stored == signed  # some old writers summed signed bytes


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d key=value\n"`` records of a pax extended header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _decode(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _members(path: Path, file_size: int,
             problems: list[str]) -> Iterator[tuple[str, int, int, int, bool, int]]:
    """Yield ``(name, header chain offset, data offset, size, regular, mtime)`` for members whose header and
    data lie in the file.

    A direct header parser (ustar, GNU long names, pax ``path``/``size``) instead of :mod:`tarfile`:
    tarfile decodes every field of every header, which cost half of ``cat``'s time on a 325 MB shard set
    (benchmarks/bench_reorganize_tar.py); this reads only what sample grouping needs. The tests check it
    against tarfile on ustar, GNU and pax tars.
    """
    if file_size == 0:
        problems.append("empty file")
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        long_name: str | None = None
        pax: dict[str, str] = {}
        chain_start: int | None = None  # first extended header block belonging to the next member
        while True:
            block = os.pread(fd, BLOCK, offset)
            if len(block) < BLOCK:
                if block.count(0) != len(block) or offset == 0:
                    problems.append(f"truncated header at byte {offset}")
                return  # a missing end-of-archive marker loses nothing
            if block == _ZERO_BLOCK:
                return  # end-of-archive marker
            where = "first header" if offset == 0 else f"header at byte {offset}"
            if not _checksum_ok(block):
                problems.append(f"corrupt {where} (bad checksum); the rest of the file "
                                f"({file_size - offset} bytes) is unreadable")
                return
            kind = block[156:157]
            try:
                size = _octal(block[124:136])
            except ValueError:
                problems.append(f"corrupt {where} (bad size field); the rest is unreadable")
                return
            data_at = offset + BLOCK
            if kind == b"g":
                chain_start = None  # a global header belongs to no member
            elif chain_start is None and kind in (b"x", b"L", b"K"):
                chain_start = offset
            if kind in (b"x", b"L") or kind in _SKIP_DATA:
                if data_at + size > file_size:
                    problems.append(f"truncated extended header at byte {offset}")
                    return
                if kind == b"x":
                    try:
                        pax.update(_pax_records(os.pread(fd, size, data_at)))
                    except ValueError:
                        problems.append(f"corrupt pax header at byte {offset}; the rest is unreadable")
                        return
                elif kind == b"L":
                    long_name = _decode(os.pread(fd, size, data_at))
                offset = data_at + -(-size // BLOCK) * BLOCK
                continue
            name = _decode(block[0:100])
            if block[257:263] == b"ustar\0" and block[345:346] != b"\0":  # POSIX ustar name prefix
                name = _decode(block[345:500]) + "/" + name
            if long_name is not None:
                name = long_name
            if "path" in pax:
                name = pax["path"]
            if "size" in pax:
                size = int(pax["size"])
            try:
                mtime = int(float(pax["mtime"])) if "mtime" in pax else _octal(block[136:148])
            except ValueError:
                mtime = 0  # a damaged time field loses nothing a consumer needs
            sparse = kind == b"S" or any(k.startswith("GNU.sparse") for k in pax)
            header_at = offset if chain_start is None else chain_start
            long_name, pax, chain_start = None, {}, None
            regular = kind in _REGULAR and not sparse and not name.endswith("/")
            # like tarfile: links, folders and devices have no data blocks whatever their size field says
            has_data = kind in _REGULAR or kind == b"S" or kind not in _NO_DATA
            if not has_data:
                size = 0
            if data_at + size > file_size:
                problems.append(f"member {name!r} truncated: needs bytes up to {data_at + size}, "
                                f"file has {file_size}")
                return
            yield name, header_at, data_at, size, regular, mtime
            offset = data_at + -(-size // BLOCK) * BLOCK
    finally:
        os.close(fd)


def prefetch(path: str | Path) -> None:
    """Ask the kernel to start reading a whole file in the background (large sequential reads).

    For callers that will read the data anyway (reorganize_tar copies it): without this, reading one
    header per member from a cold cache becomes thousands of small synchronous reads.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def index_tar(path: str | Path) -> TarIndex:
    """Index one tar from its headers. Raises :class:`UnsafeMemberName`; records all other damage."""
    path = Path(path)
    file_size = os.stat(path).st_size
    index = TarIndex(path=path, file_size=file_size)
    current: Sample | None = None
    seen_ext: set[str] = set()
    for name, header_offset, data_offset, size, regular, mtime in _members(path, file_size, index.problems):
        check_member_name(name, path)
        if not regular or _is_metadata(name):
            index.skipped_members += 1
            continue
        parts = split_key(name)
        if parts is None:
            index.skipped_members += 1
            continue
        key, ext = parts
        lowered = ext.lower()
        if current is None or key != current.key or lowered in seen_ext:
            current = Sample(key, [])
            index.samples.append(current)
            seen_ext = set()
        seen_ext.add(lowered)
        current.members.append(Member(name, ext, data_offset, size, header_offset, mtime))
    return index


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """``[".jpg", "TXT"]`` → ``("jpg", "txt")``: config lists carry a leading dot, webdataset keys do not."""
    return tuple(e.lower().lstrip(".") for e in extensions)


def has_extensions(sample: Sample, wanted: tuple[str, ...]) -> bool:
    present = {m.ext.lower() for m in sample.members}
    return all(w in present for w in wanted)


def select_members(sample: Sample, wanted: tuple[str, ...]) -> list[Member]:
    """The sample's members whose extension is wanted, in stored order (they stay adjacent)."""
    return [m for m in sample.members if m.ext.lower() in wanted]


def find_tars(root: str | Path) -> list[Path]:
    """``*.tar`` files under ``root`` (recursive, hidden entries and temporaries skipped), sorted by
    relative path so every task and every rerun sees the same order."""
    root = Path(root)
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(".tar") and not name.startswith("."):
                found.append(name if rel_folder == "." else f"{rel_folder}/{name}".replace(os.sep, "/"))
    return [root / rel for rel in sorted(found)]
