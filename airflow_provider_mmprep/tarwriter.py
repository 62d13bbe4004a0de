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


class RangeTarWriter:
    """Append byte ranges of open tar files to ``out_fd``; :meth:`close` writes the end-of-archive."""

    def __init__(self, out_fd: int):
        self.fd = out_fd
        self.position = 0
        self._method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"

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
        done = 0
        while done < length:
            count = length - done
            try:
                if self._method == "copy_file_range":
                    moved = os.copy_file_range(src_fd, self.fd, count, start + done)
                elif self._method == "sendfile":
                    moved = os.sendfile(self.fd, src_fd, start + done, count)
                else:
                    chunk = os.pread(src_fd, min(count, 1 << 20), start + done)
                    moved = len(chunk)
                    if moved:
                        self._write(chunk)
                        self.position -= moved  # counted once, below
            except OSError as exc:
                if exc.errno in _FALLBACK_ERRNOS and self._method != "pread":
                    self._method = "sendfile" if self._method == "copy_file_range" else "pread"
                    continue
                raise
            if moved == 0:
                raise OSError(errno.EIO, f"source ended {length - done} bytes early (file changed?)")
            done += moved
            self.position += moved

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks) and pad to a whole record, like tarfile."""
        end = self.position + 2 * BLOCK
        self._write(bytes(2 * BLOCK + (-end % RECORD)))
