"""copy_range moves bytes in the kernel where it can and falls back cleanly where it cannot."""

from __future__ import annotations

import errno
import os
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
