"""Write tars by copying byte ranges out of other tars: headers built here, data never decoded.

Headers carry fixed metadata (mode 0644, mtime 0, uid/gid 0, no owner names), so the bytes of an output
depend only on the member names and data: any task count and any rerun produce identical files.
Data moves with ``os.copy_file_range`` (in-kernel, no user-space copy) when the file system allows it,
else ``os.sendfile``, else ``pread``/``write``.
"""

from __future__ import annotations

import errno
import os
import tarfile

BLOCK = 512
RECORD = BLOCK * tarfile.RECORDSIZE // BLOCK  # tarfile pads archives to 10 KiB records, so do we
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


# The fixed fields of a ustar header as tarfile's PAX_FORMAT writes them for mode 0644, mtime 0, root.
_MODE, _IDS, _MTIME = b"0000644\0", b"0000000\0" * 2, b"00000000000\0"
_MAGIC_TO_END = b"0" + bytes(100) + b"ustar\x0000" + bytes(64 + 16 + 167)  # devmajor/minor empty
_MAX_OCTAL_SIZE = 8 ** 11 - 1


def member_header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular member, byte-identical to tarfile's for the same fields.

    Built directly for the common case (ASCII name of at most 100 bytes, size below 8 GiB): tarfile's
    general path cost as much as the data copy itself on 100 KB members. Anything else goes to tarfile,
    which adds a pax header.
    """
    encoded = name.encode("ascii", "replace")
    if len(encoded) <= 100 and size <= _MAX_OCTAL_SIZE and encoded.decode("ascii") == name:
        head = encoded.ljust(100, b"\0") + _MODE + _IDS + b"%011o\0" % size + _MTIME
        checksum = sum(head) + sum(_MAGIC_TO_END) + 8 * 32
        return head + b"%06o\0 " % checksum + _MAGIC_TO_END
    return _tarfile_header(name, size)


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


class RangeTarWriter:
    """Append members whose data is a byte range of an open file; call :meth:`close` to finish the tar."""

    def __init__(self, out_fd: int):
        self.fd = out_fd
        self.position = 0
        self._pending = b""  # padding of the previous member, written together with the next header
        self._method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.position += len(data)

    def add_range(self, name: str, src_fd: int, offset: int, size: int) -> None:
        self._write(self._pending + member_header(name, size))
        self._pending = b""
        self._copy(src_fd, offset, size)
        remainder = size % BLOCK
        if remainder:
            self._pending = bytes(BLOCK - remainder)

    def _copy(self, src_fd: int, offset: int, size: int) -> None:
        done = 0
        while done < size:
            count = size - done
            try:
                if self._method == "copy_file_range":
                    moved = os.copy_file_range(src_fd, self.fd, count, offset + done)
                elif self._method == "sendfile":
                    moved = os.sendfile(self.fd, src_fd, offset + done, count)
                else:
                    chunk = os.pread(src_fd, min(count, 1 << 20), offset + done)
                    moved = len(chunk)
                    if moved:
                        self._write(chunk)
                        self.position -= moved  # _write counted it; counted again below
            except OSError as exc:
                if exc.errno in _FALLBACK_ERRNOS and self._method != "pread":
                    self._method = "sendfile" if self._method == "copy_file_range" else "pread"
                    continue
                raise
            if moved == 0:
                raise OSError(errno.EIO, f"source ended {size - done} bytes early (file changed?)")
            done += moved
            self.position += moved

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks) and pad to a whole record, like tarfile."""
        tail = self._pending + bytes(2 * BLOCK)
        end = self.position + len(tail)
        tail += bytes(-end % RECORD)
        self._write(tail)
        self._pending = b""
