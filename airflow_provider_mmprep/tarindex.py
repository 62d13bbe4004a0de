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

Speed (issue 15): headers are found by walking a memory map with the compiled walker
(``_tarwalk.c``, :func:`_members_compiled`), or where it is not built, in Python and checked in bulk with
numpy (:func:`_members`, :mod:`.tarbulk`); anything but plain ustar (and pax mtime records) goes to the
general parser (:func:`_parse_chain`), which writes every message and which the tests hold both to. A tar whose manifest names
``member_offsets`` (:func:`member_offsets`) is indexed from them without reading it
(:func:`index_from_offsets`).
"""

from __future__ import annotations

import gc
import mmap
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import compress, repeat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple

try:  # the compiled header walker (setup.py builds it; optional: without it the Python walk does the same)
    from . import _tarwalk
except ImportError:  # pragma: no cover - depends on the build
    _tarwalk = None

BLOCK = 512


class UnsafeMemberName(ValueError):
    """A member path that is absolute or contains ``..``: refused wherever it is found."""


class DamagedTar(ValueError):
    """Raised by consumers that need a whole tar (precache) when :attr:`TarIndex.problems` is not empty."""


class Member(NamedTuple):
    """One regular member (a tuple: millions are made per task, and tuples are the cheapest to make)."""

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


def _parse_chain(read: Callable[[int, int], bytes], file_size: int, problems: list[str],
                 offset: int = 0) -> Iterator[tuple[str, int, int, int, bool, int]]:
    """Yield ``(name, header chain offset, data offset, size, regular, mtime)`` for members whose header and
    data lie in the file, parsing one header at a time from ``offset`` (``read(offset, n)`` gives bytes).

    The general parser: ustar, GNU long names and base-256 numbers, pax ``path``/``size``/``mtime``, every
    check and message. :func:`_members` runs it only where its bulk path meets a header that is not plain
    ustar, and the tests hold the bulk path to it (and both to :mod:`tarfile`).
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    chain_start: int | None = None  # first extended header block belonging to the next member
    while True:
        block = read(offset, BLOCK)
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
                    pax.update(_pax_records(read(data_at, size)))
                except ValueError:
                    problems.append(f"corrupt pax header at byte {offset}; the rest is unreadable")
                    return
            elif kind == b"L":
                long_name = _decode(read(data_at, size))
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


def _members_reference(path: Path, file_size: int, problems: list[str]) -> Iterator[Batch]:
    """The general parser over the whole file, one ``pread`` per header: the bulk path's oracle in tests."""
    if file_size == 0:
        problems.append("empty file")
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, header_at, data_at, size, regular, mtime in _parse_chain(
                lambda at, n: os.pread(fd, n, at), file_size, problems):
            yield Batch([name], [header_at], [data_at], [size], [regular], [mtime])
    finally:
        os.close(fd)


class Batch(NamedTuple):
    """Members as columns, in stored order, and for batches of simple names their grouping, vectorised."""

    names: list[str]
    heads: list[int]  # header chain offsets
    datas: list[int]  # data offsets
    sizes: list[int]
    regular: list[bool]
    mtimes: list[int]
    layout: "Layout | None" = None
    suspect: bool = True  # a name may be absolute or hold "..": check each (False: none can be)


class Layout(NamedTuple):
    """How a batch's members group into samples, worked out over all of them at once (:func:`_layout`)."""

    keep: list[bool]  # regular, not metadata, has a key and an extension
    dots: list[int]  # where each kept name's extension starts, less one
    starts: list[int]  # positions among the kept members where a sample starts; the first always does
    groups: "list[list[Member]] | None" = None  # each sample's members, made already (by the compiled walker)
    keys: list[str] | None = None  # the key of the sample at each of ``starts`` (with ``groups``)
    samples: "list[Sample] | None" = None  # those samples made already (by the compiled walker)
WALK_BATCH = 1 << 15  # headers gathered and checked at once (32,768 headers: 16 MiB of header copies)
PROBE = 64  # headers walked first, to measure how densely headers lie
#: Mean member record (header + data) below which scanning every block beats walking header to header:
#: the scan reads one cache line of every 512-byte block (and maps every page), the walk costs ~1 µs of
#: Python per header, so it wins for image shards (records of tens of KB) and loses for small members.
DENSE_RECORD = 16 * 1024


# pax keys that change what the general parser makes of a member (other keys it ignores)
_PAX_MEANINGFUL = ("path", "size", "GNU.sparse")

Pax = dict[int, tuple[int, "int | None"]]  # member index in a batch -> (pax header offset, pax mtime)


def _walk(mm: mmap.mmap, offset: int, file_size: int, limit: int) -> tuple[list[int], list[int], Pax, int]:
    """Follow the chain of plain ustar regular-file headers from ``offset``: each header's size field gives
    the next header's offset, so this walk is sequential; it reads two bytes and one size field per header
    and leaves every other check to :func:`.tarbulk.check_batch`, over all the headers at once. A pax header
    before a member is taken when it says nothing but ``mtime`` (and keys the general parser ignores).

    Stops (returning where) at the first header it cannot take at face value: an end-of-archive or empty
    name, another type flag (GNU long names, links, folders…), a pax header with a path, size or sparse
    map, a size field that is not 11 octal digits and a terminator (base-256, 12 digits), or data running
    past the end of the file; the general parser takes over there, so every case keeps its exact handling
    and message.
    """
    heads: list[int] = []
    sizes: list[int] = []
    paxes: Pax = {}
    last = file_size - BLOCK
    append_head, append_size = heads.append, sizes.append
    while offset <= last and len(heads) < limit:
        head = offset
        if mm[head + 156] == 120:  # "x": a pax header for the member that follows
            if mm[head + 135] not in (0, 32):
                break
            try:
                length = int(mm[head + 124:head + 135], 8)
            except ValueError:
                break
            if length < 0 or head + BLOCK + length > file_size:
                break
            data = mm[head + BLOCK:head + BLOCK + length]
            prefix = b"%d mtime=" % length  # one record, whose length field is right, holding the mtime
            value: str | bytes | None = data[len(prefix):-1]
            if not (data.startswith(prefix) and data[-1:] == b"\n" and value.isascii()):  # type: ignore[union-attr]
                try:
                    records = _pax_records(data)
                except ValueError:
                    break
                if any(key.startswith(_PAX_MEANINGFUL) for key in records):
                    break
                value = records.get("mtime")
            try:
                pax_mtime = None if value is None else int(float(value))
            except ValueError:
                pax_mtime = 0  # as the general parser: a damaged time field loses nothing
            head += BLOCK + ((length + 511) & ~511)
            if head > last:
                break
            paxes[len(heads)] = (offset, pax_mtime)
        if mm[head] == 0 or mm[head + 156] not in (48, 0) or mm[head + 135] not in (0, 32):
            paxes.pop(len(heads), None)
            break
        try:
            size = int(mm[head + 124:head + 135], 8)
        except ValueError:
            paxes.pop(len(heads), None)
            break
        if size < 0 or head + BLOCK + size > file_size:
            paxes.pop(len(heads), None)
            break
        append_head(head)
        append_size(size)
        offset = head + BLOCK + ((size + 511) & ~511)
    return heads, sizes, paxes, offset


def _members(path: Path, file_size: int, problems: list[str]) -> Iterator[Batch]:
    """Yield the members whose header and data lie in the file, in batches of columns.

    Bulk path: the tar is memory-mapped; runs of plain ustar headers are walked (:func:`_walk`) and then
    checked together with numpy (:func:`.tarbulk.check_batch`), with no read call per header; any other header
    goes to the general parser (:func:`_parse_chain`) for one member, and the walk resumes after it. A
    direct parser instead of :mod:`tarfile`, which decodes every field of every header. The tests hold
    this to the general parser and to tarfile on ustar, GNU and pax tars, damaged and unsafe ones.
    """
    if file_size == 0:
        problems.append("empty file")
        return
    if _tarwalk is not None:
        yield from _members_compiled(path, file_size, problems)
        return
    try:
        with open(path, "rb") as handle:
            mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        yield from _members_reference(path, file_size, problems)
        return
    view = scan = None
    try:
        file_size = min(file_size, len(mm))

        def read(at: int, n: int) -> bytes:
            return mm[at:at + n]

        from .tarbulk import ChainScan, check_batch, np

        whole = len(mm) // BLOCK
        view = np.frombuffer(mm, dtype=np.uint8, count=whole * BLOCK).reshape(whole, BLOCK)
        offset = 0
        probed = False  # the first headers walked tell whether the scan pays (see DENSE_RECORD)
        while True:
            if scan is not None:
                found, offset = scan.chain(offset, WALK_BATCH)
                if len(found):
                    batch, corrupt = check_batch(scan.head[found], (scan.rows[found] * BLOCK).tolist(),
                                                  scan.sizes[found].tolist(), file_size, problems)
                    yield batch
                    if corrupt:
                        return
                    continue  # the chain may go on past ``limit``; else the walk starts where it ends
            start = offset
            heads, sizes, paxes, offset = _walk(mm, offset, file_size, WALK_BATCH if probed else PROBE)
            if heads:
                pax_blocks = view[np.asarray([at for at, _ in paxes.values()], dtype=np.int64) // BLOCK]
                batch, corrupt = check_batch(view[np.asarray(heads) // BLOCK], heads, sizes, file_size,
                                              problems, paxes, pax_blocks)
                yield batch
                if corrupt:
                    return
                if not probed:
                    probed = True
                    if (offset - start) / len(heads) < DENSE_RECORD:
                        scan = ChainScan(view, file_size)
                    continue
                if len(heads) == WALK_BATCH:
                    continue
            step = _general_member(read, file_size, problems, offset)
            if step is None:
                return  # end of archive, or damage (recorded in problems)
            batch, offset = step
            yield batch
    finally:
        del view, scan  # they export the map's buffer, which must be released before it closes
        mm.close()


def _general_member(read: Callable[[int, int], bytes], file_size: int, problems: list[str],
                    offset: int) -> tuple[Batch, int] | None:
    """One member at ``offset`` through the general parser, where a fast walk stopped (long names, pax,
    links, damage): its one-member batch and the offset after its data, or None at the end of the archive
    or on damage (recorded in ``problems``)."""
    chain = _parse_chain(read, file_size, problems, offset)
    member = next(chain, None)
    chain.close()
    if member is None:
        return None
    name, header_at, data_at, size, regular, mtime = member
    return Batch([name], [header_at], [data_at], [size], [regular], [mtime]), data_at + -(-size // BLOCK) * BLOCK


#: Members the compiled walker returns per call (columns of Python objects: ~10 MB at 65,536)
COMPILED_BATCH = 1 << 16


_NOATIME = getattr(os, "O_NOATIME", 0)  # Linux only


def _open_for_headers(path: str | Path) -> int:
    """A descriptor to read headers through, opened with ``O_NOATIME`` where the file's owner may: the
    walk makes one small read per sample, and the kernel would check the access time on every one."""
    if _NOATIME:
        try:
            return os.open(path, os.O_RDONLY | _NOATIME)
        except PermissionError:
            pass  # not the owner: the flag is refused, the file itself may well be readable
    return os.open(path, os.O_RDONLY)


def _members_compiled(path: Path, file_size: int, problems: list[str]) -> Iterator[Batch]:
    """:func:`_members` with the compiled walker (``_tarwalk.c``): it takes the plain ustar members (and
    pax mtime headers) at C speed, checksums included, reading headers with ``pread`` into small windows
    (no memory map: mapping a cached image shard costs the kernel more than the walk), and gives back
    columns, their grouping and the members made; where it stops, the general parser takes one member
    (writing any message) and the walk resumes after it."""
    fd = _open_for_headers(path)
    try:
        def read(at: int, n: int) -> bytes:
            return os.pread(fd, n, at)

        offset = 0
        while True:
            offset, full, names, heads, datas, sizes, regular, mtimes, layout, suspect = _tarwalk.walk(
                fd, offset, file_size, COMPILED_BATCH, Member, Sample)
            if names:
                yield Batch(names, heads, datas, sizes, regular, mtimes, None if layout is None else Layout(*layout),
                            suspect)
            if full:
                continue
            step = _general_member(read, file_size, problems, offset)
            if step is None:
                return  # end of archive, or damage (recorded in problems)
            batch, offset = step
            yield batch
    finally:
        os.close(fd)


class SampleCounts(NamedTuple):
    """A tar's samples as :func:`count_samples` reads them: keys and extension lists, no member objects."""

    keys: list[str]  # every sample's key, in stored order
    kinds: bytes  # per sample, its extension list's index into ``signatures``
    signatures: list[tuple[str, ...]]  # the extensions of a sample's members, as stored and in order
    skipped_members: int  # as :attr:`TarIndex.skipped_members`


def count_samples(path: str | Path) -> SampleCounts | None:
    """The samples of an intact local tar, walked by the compiled walker without a Python object per
    member (a fraction of :func:`index_tar`'s cost), grouped as :func:`index_tar` groups them. None where
    only the full index decides: no compiled walker, an empty or damaged file, a member the walk leaves to
    the general parser (long names, links...), a name that is not ASCII or may be unsafe. So a caller that
    gets None indexes the tar in full, which says what is wrong with the same messages."""
    if _tarwalk is None:
        return None
    fd = _open_for_headers(path)
    try:
        file_size = os.fstat(fd).st_size
        counted = _tarwalk.count(fd, file_size) if file_size else None
        if counted is None:
            return None
        stop, keys, kinds, signatures, skipped = counted
        problems: list[str] = []  # the walk must end at the end of the archive, intact
        if _general_member(lambda at, n: os.pread(fd, n, at), file_size, problems, stop) is not None or problems:
            return None
        return SampleCounts(keys, kinds, signatures, skipped)
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


#: Places per file where :func:`is_cached` asks the page cache
CACHE_PROBES = 8


def is_cached(path: str | Path, size: int) -> bool:
    """Whether a file's bytes are in the page cache, sampled at ``CACHE_PROBES`` places: a read with
    ``RWF_NOWAIT`` fails instead of waiting for the disk. False where the kernel cannot say (other
    systems, old kernels, file systems without it) or the file cannot be opened."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None or size <= 0:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        probe = bytearray(1)
        return all(os.preadv(fd, [probe], size * k // CACHE_PROBES, nowait) == 1 for k in range(CACHE_PROBES))
    except OSError:  # BlockingIOError (EAGAIN): not cached; EOPNOTSUPP: cannot say
        return False
    finally:
        os.close(fd)


def index_tar(path: str | Path, *, reference: bool = False) -> TarIndex:
    """Index one tar from its headers. Raises :class:`UnsafeMemberName`; records all other damage.

    ``reference=True`` uses the general one-header-at-a-time parser throughout (the tests' oracle).
    """
    path = Path(path)
    file_size = os.stat(path).st_size
    index = TarIndex(path=path, file_size=file_size)
    members = (_members_reference if reference else _members)(path, file_size, index.problems)
    with gc_paused():
        group_members(index, members)
    return index


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while an index is built: millions of acyclic objects (members, samples)
    that collections would only traverse (~10% of the time). Restores the collector as it was (nested
    pauses, such as reorganize_tar's around a whole task, keep it paused)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def group_members(index: TarIndex, batches: Iterable[Batch]) -> None:
    """Check member names and group members into samples (webdataset's rules), appending to ``index``."""
    samples = index.samples
    current: Sample | None = None
    seen_ext: set[str] = set()
    skipped = 0
    for batch in batches:
        names = batch.names
        if batch.suspect:
            text = "\n".join(names)
            if text.startswith("/") or "\n/" in text or ".." in text:  # rare: find which, in order
                for name in names:
                    check_member_name(name, index.path)
        layout = batch.layout
        general = len(names)  # rows before this one are grouped one at a time, the rest by the layout
        if layout is not None:
            general = 0
            if (layout.starts and current is not None
                    and names[layout.keep.index(True)][:layout.dots[0]] == current.key):
                # the batch continues the last sample: its first rows join it one at a time
                general = len(names) if len(layout.starts) < 2 else (
                    [i for i, k in enumerate(layout.keep) if k][layout.starts[1]])
        for name, header_offset, data_offset, size, regular, mtime in zip(
                names[:general], batch.heads[:general], batch.datas[:general], batch.sizes[:general],
                batch.regular[:general], batch.mtimes[:general]):
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if not regular or dot <= slash + 1 or dot == len(name) - 1 or (
                    slash < 0 and name.startswith("__") and name.endswith("__")):
                skipped += 1  # non-regular, key-less (see split_key) or metadata (see _is_metadata)
                continue
            key, ext = name[:dot], name[dot + 1:]
            lowered = ext.lower()
            if current is None or key != current.key or lowered in seen_ext:
                current = Sample(key, [])
                samples.append(current)
                seen_ext = set()
            seen_ext.add(lowered)
            current.members.append(Member(name, ext, data_offset, size, header_offset, mtime))
        if general == len(names):
            continue
        assert layout is not None
        skip_kept = sum(layout.keep[:general])
        keep = layout.keep[general:]
        if layout.groups is not None and layout.keys is not None:  # made by the compiled walker
            groups, keys = layout.groups, layout.keys
            made = layout.samples
            if skip_kept:  # the samples before the one at kept row skip_kept were grouped above
                first = layout.starts.index(skip_kept)
                groups, keys = groups[first:], keys[first:]
                made = None if made is None else made[first:]
            skipped += len(keep) - (len(layout.dots) - skip_kept)
            if not groups:
                continue
            samples.extend(map(Sample, keys, groups) if made is None else made)
            current = samples[-1]
            seen_ext = {m.ext.lower() for m in current.members}
            continue
        kept = list(compress(names[general:], keep))
        skipped += len(keep) - len(kept)
        if not kept:
            continue
        dots = layout.dots[skip_kept:]
        exts = [name[dot + 1:] for name, dot in zip(kept, dots)]
        members = list(map(tuple.__new__, repeat(Member), zip(
            kept, exts, compress(batch.datas[general:], keep), compress(batch.sizes[general:], keep),
            compress(batch.heads[general:], keep), compress(batch.mtimes[general:], keep))))
        bounds = [start - skip_kept for start in layout.starts if start >= skip_kept] + [len(kept)]
        samples.extend([Sample(kept[i][:dots[i]], members[i:j]) for i, j in zip(bounds, bounds[1:])])
        current = samples[-1]
        seen_ext = {m.ext.lower() for m in current.members}
    index.skipped_members += skipped


#: Version of the ``member_offsets`` record in manifests; readers ignore a record of another version.
MEMBER_OFFSETS_VERSION = 1


class ManifestContradicted(ValueError):
    """A manifest's ``member_offsets`` that cannot describe its tar: never trusted, never silently skipped."""


def member_offsets(members: list[Member], skipped: int = 0,
                   columns: tuple[list[str], list[int], list[int], list[int], list[int]] | None = None
                   ) -> dict[str, Any]:
    """What a manifest records so that consumers index the tar without reading its headers: every member
    :func:`index_tar` keeps, as columns (names, header chain and data offsets, sizes, mtimes; ``columns``
    gives them ready made), and how many members it skips."""
    if columns is None:
        columns = ([m.name for m in members], [m.header_offset for m in members], [m.offset for m in members],
                   [m.size for m in members], [m.mtime for m in members])
    names, heads, datas, sizes, mtimes = columns
    return {"version": MEMBER_OFFSETS_VERSION, "name": names, "header": heads, "data": datas, "size": sizes,
            "mtime": mtimes[0] if mtimes and mtimes.count(mtimes[0]) == len(mtimes) else mtimes,
            "skipped": skipped}


def offsets_of(path: str | Path) -> dict[str, Any]:
    """:func:`member_offsets` of a tar just written (read back from its headers, in the page cache)."""
    index = index_tar(path)
    return member_offsets([m for sample in index.samples for m in sample.members], index.skipped_members)


def index_from_offsets(path: str | Path, file_size: int, record: Any) -> TarIndex | None:
    """The tar's index from a manifest's ``member_offsets``, reading nothing from the tar; None when the
    record is of another version. Raises :class:`ManifestContradicted` when the record cannot describe a
    tar of ``file_size`` bytes (offsets off block boundaries, overlapping, past the end) and
    :class:`UnsafeMemberName` for a name no tar may hold."""
    path = Path(path)
    if not isinstance(record, dict) or record.get("version") != MEMBER_OFFSETS_VERSION:
        return None

    def contradicted(why: str) -> ManifestContradicted:
        return ManifestContradicted(f"{path}: its manifest's member_offsets contradict the tar ({why})")

    try:
        names, heads, datas, sizes = (list(record[k]) for k in ("name", "header", "data", "size"))
        mtime = record["mtime"]
        mtimes = list(mtime) if isinstance(mtime, list) else [int(mtime)] * len(names)
        skipped = int(record.get("skipped", 0))
    except (KeyError, TypeError, ValueError):
        raise contradicted("malformed record") from None
    if not len(names) == len(heads) == len(datas) == len(sizes) == len(mtimes):
        raise contradicted("columns of different lengths")
    if not all(isinstance(n, str) for n in names):
        raise contradicted("a member name that is not text")
    if not all(type(v) is int for column in (heads, datas, sizes, mtimes) for v in column):
        raise contradicted("non-integer offsets or sizes")
    if any(h % BLOCK or d % BLOCK or z < 0 or d - h < BLOCK for h, d, z in zip(heads, datas, sizes)):
        raise contradicted("offsets off 512-byte header boundaries")
    ends = [d + ((z + BLOCK - 1) & -BLOCK) for d, z in zip(datas, sizes)]
    if any(h < end for h, end in zip(heads[1:], ends)):
        raise contradicted("members overlap")
    if names and max(d + z for d, z in zip(datas, sizes)) > file_size:
        raise contradicted(f"members end past the tar's {file_size} bytes")
    if names and skipped == 0 and (heads[0] != 0 or any(h != end for h, end in zip(heads[1:], ends))):
        raise contradicted("members do not follow each other")
    index = TarIndex(path=path, file_size=file_size, skipped_members=0)
    layout = None
    if _tarwalk is not None:  # the grouping and the Member tuples in C, as for headers read
        grouped = _tarwalk.group(names, heads, datas, sizes, mtimes, Member, Sample)
        layout = None if grouped is None else Layout(*grouped)
    with gc_paused():
        group_members(index, [Batch(names, heads, datas, sizes, [True] * len(names), mtimes, layout)])
    if sum(len(s.members) for s in index.samples) != len(names) or index.skipped_members:
        raise contradicted("members without a key or extension")
    index.skipped_members = skipped
    return index


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """``[".jpg", "TXT"]`` → ``("jpg", "txt")``: config lists carry a leading dot, webdataset keys do not."""
    return tuple(e.lower().lstrip(".") for e in extensions)


def covers_extensions(extensions: Iterable[str], wanted: tuple[str, ...]) -> bool:
    """Whether members with these extensions (case-folded) include every wanted one: the rule for a usable
    sample, shared by :func:`has_extensions` and reorganize_tar's per-extension-list decisions."""
    present = {ext.lower() for ext in extensions}
    return all(w in present for w in wanted)


def has_extensions(sample: Sample, wanted: tuple[str, ...]) -> bool:
    return covers_extensions([m.ext for m in sample.members], wanted)


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


def index_tar_reader(handle: BinaryIO, file_size: int, label: str) -> TarIndex:
    """Index a tar read through a seekable binary reader (an object in object storage, where neither
    ``mmap`` nor ``pread`` exist): the general parser, one header read at a time (a read-ahead reader
    turns these into few requests). ``label`` (the URL) names the tar in messages."""
    index = TarIndex(path=label, file_size=file_size)  # type: ignore[arg-type]  # a URL is no Path

    def read(at: int, count: int) -> bytes:
        handle.seek(at)
        return handle.read(count)

    def batches() -> Iterator[Batch]:
        if file_size == 0:
            index.problems.append("empty file")
            return
        for name, header_at, data_at, size, regular, mtime in _parse_chain(read, file_size, index.problems):
            yield Batch([name], [header_at], [data_at], [size], [regular], [mtime])

    group_members(index, batches())
    return index
