"""The one tar writer: member headers under a fixed-metadata policy, member data copied in the kernel.

Every tar a stage writes goes through :class:`TarWriter` (download_images' shards, reorganize_tar's
re-packed tars, precache_encodings' outputs; only the test fixtures, which imitate other producers, use
:mod:`tarfile`), so the header bytes and their metadata policy have one owner: :class:`MemberMetadata`
(mode, owner ids and names, the default mtime, and how a name that does not fit a ustar header is stored),
passed to the writer as a parameter the way webdataset's ``TarWriter`` takes
``user``/``group``/``mode``/``mtime``/``format``. Fixed metadata is what makes two runs over the same input
give byte-identical tars.

Headers are built directly for the common case (an ASCII name of at most 100 bytes, a size and mtime that
fit their octal fields): :mod:`tarfile`'s generic builder costs more than the rest of writing a
download sample. Anything else is built by :mod:`tarfile` itself, so the bytes are always exactly those
``tarfile`` writes for the same member in the same format (the tests hold both paths to it).

Member data can come from bytes in memory, from a range of another open file, or as whole member records
(header chain + data + padding) of another tar: a record is self-contained, so concatenating records and
ending with two zero blocks gives a valid tar. Ranges move with ``os.copy_file_range`` (in the kernel, no
user-space copy) when the file system allows it, else ``os.sendfile``, else ``pread``/``write``.
"""

from __future__ import annotations

import errno
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE  # tarfile pads archives to 10 KiB records, so do we
#: How a member whose name is longer than 100 bytes or not ASCII is stored: ``ustar`` splits it into the
#: header's prefix and name fields (at most 256 bytes, else ValueError), ``pax`` puts it in a pax record.
USTAR, PAX = "ustar", "pax"
_FORMATS = {USTAR: (tarfile.USTAR_FORMAT, "strict"), PAX: (tarfile.PAX_FORMAT, "surrogateescape")}
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
_OCTAL_11 = 8 ** 11  # the largest size or mtime a 12-byte octal field holds, plus one


@dataclass(frozen=True)
class MemberMetadata:
    """The metadata every member of a tar gets (fixed, so reruns reproduce the bytes), and how long names
    are stored. ``mtime`` is the default; a writer's caller may give a member its own (precache keeps the
    input member's)."""

    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: int = 0
    long_names: str = USTAR
    _ids: bytes = field(init=False, repr=False, compare=False)
    _tail: bytes = field(init=False, repr=False, compare=False)
    _tail_sum: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.long_names not in _FORMATS:
            raise ValueError(f"long_names must be {USTAR!r} or {PAX!r}, not {self.long_names!r}")
        for owner in (self.uname, self.gname):
            if not owner.isascii() or len(owner) > 32:
                raise ValueError(f"owner names are ASCII of at most 32 characters, not {owner!r}")
        for number in (self.uid, self.gid):
            if not 0 <= number < 8 ** 7:
                raise ValueError(f"owner ids fit 7 octal digits; got {number}")
        tail = self._tarinfo("x", 0, 0).tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")[156:]
        object.__setattr__(self, "_ids", b"%07o\0%07o\0%07o\0" % (self.mode & 0o7777, self.uid, self.gid))
        # type, linkname, magic+version, uname, gname, devmajor, devminor, prefix, pad: the same for every
        # regular file with a name that fits
        object.__setattr__(self, "_tail", tail)
        object.__setattr__(self, "_tail_sum", sum(b" " * 8) + sum(tail))

    def _tarinfo(self, name: str, size: int, mtime: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, self.mode
        info.uid, info.gid, info.uname, info.gname = self.uid, self.gid, self.uname, self.gname
        return info

    def header(self, name: str, size: int, mtime: int | None = None) -> bytes:
        """The header block(s) of a regular file: exactly what :mod:`tarfile` writes for it in this policy's
        format, built directly when the name, size and mtime fit a plain ustar header."""
        mtime = self.mtime if mtime is None else mtime
        try:
            encoded = name.encode("ascii")
        except UnicodeEncodeError:
            encoded = b""
        if (not encoded or len(encoded) > 100 or not 0 <= size < _OCTAL_11 or type(mtime) is not int
                or not 0 <= mtime < _OCTAL_11):
            format_, errors = _FORMATS[self.long_names]
            return self._tarinfo(name, size, mtime).tobuf(format_, "utf-8", errors)
        head = encoded.ljust(100, b"\0") + self._ids + b"%011o\0%011o\0" % (size, mtime)
        return head + b"%06o\0 " % (sum(head) + self._tail_sum) + self._tail


#: The policy download_images and reorganize_tar's consumers rely on: mode 0644, uid/gid 0, no owner
#: names, mtime 0, ustar names.
FIXED = MemberMetadata()


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append ``length`` bytes at ``offset`` of ``src_fd`` to ``dst_fd`` (at its current position).

    In the kernel where the file system allows it (``copy_file_range``, then ``sendfile``), else through a
    buffer; raises if the source ends early (it changed while we copied).
    """
    method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
    done = 0
    while done < length:
        count = length - done
        try:
            if method == "copy_file_range":
                moved = os.copy_file_range(src_fd, dst_fd, count, offset + done)
            elif method == "sendfile":
                moved = os.sendfile(dst_fd, src_fd, offset + done, count)
            else:
                chunk = os.pread(src_fd, min(count, 1 << 20), offset + done)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst_fd, view):]
                moved = len(chunk)
        except OSError as exc:
            if exc.errno in _FALLBACK_ERRNOS and method != "pread":
                method = "sendfile" if method == "copy_file_range" else "pread"
                continue
            raise
        if moved == 0:
            raise OSError(errno.EIO, f"source ended {length - done} bytes early (file changed?)")
        done += moved


def record_extent(start: int, length: int, source_size: int | None) -> tuple[int, int]:
    """(bytes to copy from the source, zeros to write after them) for whole member records ``start`` ..
    ``start + length`` of a tar of ``source_size`` bytes: all of them, except where the source ends inside
    the zero padding after its last member's data (truncated there; the data is whole, so indexing kept the
    member): the missing zeros are then written, so the record is whole in the output. Any other shortfall is
    left to the copy, which fails on it."""
    if start % BLOCK or length % BLOCK:
        raise ValueError(f"member records are 512-byte aligned; got {start}+{length}")
    missing = 0 if source_size is None else start + length - source_size
    if 0 < missing < BLOCK:
        return length - missing, missing
    return length, 0


class TarWriter:
    """Write an uncompressed tar member by member, every header under ``metadata``.

    ``target`` is a path (created or truncated; with ``append``, opened read-write at its end, not
    O_APPEND: ``copy_file_range`` refuses O_APPEND targets) or a file descriptor open for writing, which
    the caller keeps and closes. :meth:`close` writes the end-of-archive marker unless told the file is a
    piece, to be concatenated with others.
    """

    def __init__(self, target: Path | str | int, metadata: MemberMetadata = FIXED, append: bool = False):
        if isinstance(target, int):
            self._file = open(target, "wb", closefd=False)  # noqa: SIM115 - closed by close()
        else:
            self._file = open(target, "r+b" if append else "wb")  # noqa: SIM115 - closed by close()
            if append:
                self._file.seek(0, os.SEEK_END)
        self._fd = self._file.fileno()
        self.metadata = metadata
        self.size = 0  # the file's size, once closed

    def add_bytes(self, name: str, data: bytes, mtime: int | None = None) -> None:
        """A member holding ``data``."""
        self._file.write(self.metadata.header(name, len(data), mtime) + data + bytes(-len(data) % BLOCK))

    def add_from(self, name: str, source_fd: int, offset: int, length: int, mtime: int | None = None) -> None:
        """A member holding ``length`` bytes at ``offset`` of ``source_fd``, copied in the kernel."""
        self._file.write(self.metadata.header(name, length, mtime))
        self.add_raw(source_fd, offset, length)
        self._file.write(bytes(-length % BLOCK))

    def add_records(self, source_fd: int, start: int, length: int, source_size: int | None = None) -> None:
        """Whole member records of another tar, verbatim (their headers are the source's, not rebuilt).

        With ``source_size``: a source that ends inside the zero padding after its last member's data
        (truncated there; the data is whole, so indexing kept the member) has the missing zeros written
        here, so the record is whole in the output."""
        readable, missing = record_extent(start, length, source_size)
        self.add_raw(source_fd, start, readable)
        if missing:
            self._file.write(bytes(missing))

    def append_file(self, path: Path) -> None:
        """Copy a piece (members without an end-of-archive marker) into this tar, kernel-side."""
        with open(path, "rb") as piece:
            self.add_raw(piece.fileno(), 0, os.fstat(piece.fileno()).st_size)

    def add_raw(self, source_fd: int, offset: int, length: int) -> None:
        """``length`` bytes at ``offset`` of ``source_fd``, as they are (the caller keeps the tar valid)."""
        self._file.flush()  # the kernel copy writes at the file descriptor's position
        copy_range(source_fd, self._fd, offset, length)

    def close(self, end_archive: bool = True) -> None:
        """Finish the file: the end-of-archive marker (two zero blocks) padded to a whole record, like
        tarfile; without ``end_archive`` it is a piece, to be concatenated with others. Closing twice is
        allowed (the second does nothing), so error paths can close whatever is open."""
        if self._file.closed:
            return
        try:
            if end_archive:
                self._file.write(bytes(2 * BLOCK))
                self._file.flush()
                self._file.write(bytes(-self._file.tell() % RECORD))
            self._file.flush()
            self.size = self._file.tell()
        finally:
            self._file.close()
