"""Write tars by copying whole member records (header blocks + data + padding) out of other tars.

A member's record in an uncompressed tar is self-contained: its header chain (pax / GNU long-name blocks
and the ustar header), then its data padded to 512 bytes. Concatenating records and ending with two zero
blocks gives a valid tar, and records that were adjacent in the source are copied in a single call. So
re-packing is a handful of in-kernel copies per output tar, with nothing decoded or rebuilt: the output's
bytes depend only on the input bytes and the plan (any task count gives identical files).

Data moves with ``os.copy_file_range`` (in the kernel, no user-space copy) when the file system allows
it, else ``os.sendfile``, else ``pread``/``write``.
"""

from __future__ import annotations

import errno
import os
import tarfile

BLOCK = 512
RECORD = tarfile.RECORDSIZE  # tarfile pads archives to 10 KiB records, so do we
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


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


class RangeTarWriter:
    """Append byte ranges of open tar files to ``out_fd``; :meth:`close` writes the end-of-archive."""

    def __init__(self, out_fd: int):
        self.fd = out_fd
        self.position = 0

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.position += len(data)

    def add_records(self, src_fd: int, start: int, length: int) -> None:
        """Copy ``length`` bytes at ``start`` of ``src_fd``: whole member records, block aligned."""
        if start % BLOCK or length % BLOCK:
            raise ValueError(f"member records are 512-byte aligned; got {start}+{length}")
        copy_range(src_fd, self.fd, start, length)
        self.position += length

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks) and pad to a whole record, like tarfile."""
        end = self.position + 2 * BLOCK
        self._write(bytes(2 * BLOCK + (-end % RECORD)))
