"""Small file-system helpers every stage shares: atomic writes, sorted listings, task slicing."""

from __future__ import annotations

import contextlib
import fnmatch
import os
from pathlib import Path
from typing import Iterable, Iterator

TMP_MARKER = ".mmprep-tmp"


def temp_path_for(final: Path) -> Path:
    """A sibling name for work in progress: same folder (so rename is atomic), never matched as output."""
    return final.with_name(f".{final.name}.{os.getpid()}{TMP_MARKER}")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success fsync-free rename it onto ``final``, on error remove it.

    Readers therefore see either no file or the complete one, and a crashed task leaves only a
    dot-prefixed temporary file that the next run ignores and overwrites.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def remove_stale_temporaries(folder: str | Path, outputs: Iterable[str] | None = None,
                             keep: Iterable[str] = ()) -> int:
    """Delete leftovers of crashed writers in ``folder`` (not recursive); returns how many.

    With ``outputs`` (final file names), only the temporaries of those outputs and of their sidecars
    (``<output>.manifest.json`` …) go: other tasks may be writing beside us into the same folder.
    ``keep`` names temporaries this process wrote and still means to rename.
    """
    kept = set(keep)
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    owned = None if outputs is None else set(outputs)
    removed = 0
    for entry in os.scandir(folder):
        if not (entry.name.startswith(".") and entry.name.endswith(TMP_MARKER) and entry.is_file()) \
                or entry.name in kept:
            continue
        final = entry.name[1:-len(TMP_MARKER)].rsplit(".", 1)[0]  # ".{final}.{pid}{TMP_MARKER}"
        if owned is not None and final not in owned and not any(final.startswith(o + ".") for o in owned):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


def sorted_files(folder: str | Path, pattern: str = "*") -> list[Path]:
    """Regular files in ``folder`` whose name matches ``pattern``, sorted by name; temporaries excluded."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = [e.name for e in os.scandir(folder)
             if e.is_file() and not e.name.startswith(".") and fnmatch.fnmatch(e.name, pattern)]
    return [folder / name for name in sorted(names)]


def task_range(item_count: int, task_id: int, task_count: int) -> range:
    """The contiguous, balanced slice of ``item_count`` items that task ``task_id`` of ``task_count`` owns.

    Depends only on the three numbers, so reruns and other tasks agree on ownership without talking.
    """
    if task_count < 1 or not 0 <= task_id < task_count:
        raise ValueError(f"task id {task_id} is outside 0..{task_count - 1}")
    base, extra = divmod(item_count, task_count)
    start = task_id * base + min(task_id, extra)
    return range(start, start + base + (1 if task_id < extra else 0))
