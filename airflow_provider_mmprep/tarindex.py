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
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

BLOCK = 512


class UnsafeMemberName(ValueError):
    """A member path that is absolute or contains ``..``: refused wherever it is found."""


@dataclass(frozen=True, slots=True)
class Member:
    name: str  # path inside the tar, as stored
    ext: str  # webdataset extension (text after the first dot of the basename), as stored
    offset: int  # byte offset of the data in the tar file
    size: int


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
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise UnsafeMemberName(f"{tar_path}: member {name!r} is absolute or contains '..'; refusing this tar")


def _is_metadata(name: str) -> bool:
    return "/" not in name and name.startswith("__") and name.endswith("__")


def _members(path: Path, file_size: int, problems: list[str]) -> Iterator[tuple[tarfile.TarInfo, bool]]:
    """Yield ``(header, regular)`` for members whose header and data lie within the file; note damage."""
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.ReadError as exc:
        if file_size > 0:
            problems.append(f"unreadable first header: {exc}")
        else:
            problems.append("empty file")
        return
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, ValueError, UnicodeDecodeError) as exc:
                problems.append(f"corrupt header at byte {tar.offset}: {exc}; later members lost")
                return
            if info is None:
                break
            if info.offset_data + info.size > file_size:
                problems.append(f"member {info.name!r} truncated: needs bytes up to "
                                f"{info.offset_data + info.size}, file has {file_size}")
                return
            yield info, info.isreg()
        # tarfile stops quietly at a bad header after the first one; tell that apart from a clean end.
        end = tar.offset
        if end < file_size:
            with open(path, "rb") as handle:
                handle.seek(end)
                block = handle.read(BLOCK)
            if len(block) == BLOCK and block.count(0) != BLOCK:
                problems.append(f"corrupt or truncated header at byte {end}; the rest of the file "
                                f"({file_size - end} bytes) is unreadable")
            elif len(block) < BLOCK:
                problems.append(f"truncated header at byte {end}")


def index_tar(path: str | Path) -> TarIndex:
    """Index one tar from its headers. Raises :class:`UnsafeMemberName`; records all other damage."""
    path = Path(path)
    file_size = os.stat(path).st_size
    index = TarIndex(path=path, file_size=file_size)
    current: Sample | None = None
    seen_ext: set[str] = set()
    for info, regular in _members(path, file_size, index.problems):
        name = info.name
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
        current.members.append(Member(name, ext, info.offset_data, info.size))
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
