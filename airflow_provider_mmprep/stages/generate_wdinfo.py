"""generate_wdinfo: write ``wdinfo.pkl`` the way NeMo's webdataset loader reads it (REFERENCE.md §3).

``tar_files`` lists, sorted and relative to ``input_dir``, only the tars that hold exactly
``tar_chunk_size`` usable samples: NeMo's sequential sampler assumes every listed tar is full, so a short
tar (marked ``.INCOMPLETE`` by reorganize_tar, or simply counted short), an oversized or a damaged one is
left out and reported. ``total_key_count`` is the exact number of samples in the listed tars.

Counts come from the producing stage's manifests (no tar reads); a tar without a fresh manifest is
indexed from its headers, counting samples that have every extension of ``file_ext_in_tar``.
Extra keys (ignored by NeMo): ``tar_sample_counts`` for every tar seen, ``not_listed`` (tar → reason),
``dataset_root`` (absolute ``input_dir``, or its URL) and ``file_ext_in_tar``.

``input_dir`` and ``output_wdinfo_path`` may be URLs (``s3://…``): the tars are then listed with their sizes
in one listing, the manifests fetched concurrently, and a tar without one indexed through ranged reads;
``tar_files`` stay relative to the URL, as NeMo's loader joins them.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import tario
from ..config import PipelineConfig
from ..fsutil import atomic_write_bytes
from ..manifest import INCOMPLETE_SUFFIX, MANIFEST_SUFFIX, current_manifest_body, read_manifest
from ..progress import Progress
from ..safepickle import safe_loads_plain
from ..storage import Store, is_url
from ..tarindex import TarIndex, UnsafeMemberName, has_extensions, index_tar, index_tar_reader, normalize_extensions
from . import StageError, reorganize_tar

log = logging.getLogger(__name__)

STAGE = "generate_wdinfo"
EXAMPLES = 10


def list_tars(root: Path) -> tuple[list[str], set[str]]:
    """Relative paths of ``*.tar`` under ``root`` (hidden entries skipped), sorted, plus every file's
    relative path, so markers and manifests are found without one stat per tar."""
    tars: list[str] = []
    files: set[str] = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        prefix = os.path.relpath(folder, root).replace(os.sep, "/")
        prefix = "" if prefix == "." else prefix + "/"
        for name in names:
            if name.startswith("."):
                continue
            files.add(prefix + name)
            if name.endswith(".tar"):
                tars.append(prefix + name)
    tars.sort()
    return tars, files


def count_from_headers(path: Path | str, wanted: tuple[str, ...], store: Store | None = None,
                       size: int = 0) -> tuple[int, str | None]:
    """Usable samples in one tar and, if it cannot be listed as it is, why. With ``store`` (object
    storage), ``path`` is the tar's name in it and ``size`` its size."""
    try:
        if store is None:
            index: TarIndex = index_tar(path)
        else:
            with store.open_read(str(path), block_size=2**20) as handle:
                index = index_tar_reader(handle, size, store.url(str(path)))
    except UnsafeMemberName as exc:
        return 0, str(exc)
    usable = sum(1 for s in index.samples if has_extensions(s, wanted))
    if index.problems:
        return usable, "damaged: " + "; ".join(index.problems)
    if usable != len(index.samples):
        return usable, f"{len(index.samples) - usable} sample(s) lack one of {list(wanted)}"
    return usable, None


def build_wdinfo(input_dir: Path | str, chunk_size: int, file_ext_in_tar: list[str],
                 storage_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict]:
    """The wdinfo dict and a stats dict (how counts were obtained)."""
    wanted = normalize_extensions(file_ext_in_tar)
    store = Store(input_dir, storage_options) if is_url(input_dir) else None
    remote_manifests: dict[str, bytes] = {}
    if store is None:
        tars, files = list_tars(Path(input_dir))
    else:
        sizes = store.file_sizes()
        files = set(sizes)
        tars = sorted(rel for rel in files if rel.endswith(".tar"))
        remote_manifests = store.read_many(rel + MANIFEST_SUFFIX for rel in tars if rel + MANIFEST_SUFFIX in files)
    root = os.fspath(input_dir)
    counts: dict[str, int] = {}
    not_listed: dict[str, str] = {}
    from_manifest = from_headers = 0
    progress = Progress(f"{STAGE}: counting samples", len(tars), unit="tars", logger=log)
    for rel in tars:
        path = os.path.join(root, rel)
        if store is not None:
            raw = remote_manifests.get(rel + MANIFEST_SUFFIX)
            body = current_manifest_body(raw, sizes[rel]) if raw is not None else None
        else:
            body = read_manifest(path) if rel + MANIFEST_SUFFIX in files else None
        reason: str | None = None
        if body is not None:
            from_manifest += 1
            count = int(body["sample_count"])
            if body.get("short"):
                reason = "marked short by its producer"
        else:
            from_headers += 1
            count, reason = count_from_headers(Path(path), wanted) if store is None else \
                count_from_headers(rel, wanted, store, sizes[rel])
        counts[rel] = count
        if rel + INCOMPLETE_SUFFIX in files:
            reason = f"marked {rel}{INCOMPLETE_SUFFIX}"
        elif reason is None and count != chunk_size:
            reason = f"holds {count} samples, not {chunk_size}"
        if reason is not None:
            not_listed[rel] = reason
        progress.advance()
    progress.finish()
    listed = [rel for rel in tars if rel not in not_listed]
    wdinfo = {
        "tar_files": listed,
        "chunk_size": chunk_size,
        "total_key_count": len(listed) * chunk_size,
        # ours; NeMo ignores extra keys
        "tar_sample_counts": counts,
        "not_listed": not_listed,
        "dataset_root": store.root if store is not None else str(Path(input_dir).resolve()),
        "file_ext_in_tar": list(file_ext_in_tar),
    }
    return wdinfo, {"counts_from_manifests": from_manifest, "counts_from_headers": from_headers}


#: The keys NeMo's loader reads from wdinfo.pkl.
NEMO_KEYS = frozenset({"tar_files", "chunk_size", "total_key_count"})


@dataclass
class WdinfoCheck:
    """What is at ``output_wdinfo_path``: the loaded dict, or why the task is not done (``problem``, short)
    and what was found (``detail``, a sentence)."""

    path: Path
    info: dict[str, Any] | None = None
    problem: str | None = None
    detail: str | None = None


def expected_outputs(cfg: PipelineConfig, task_id: int = 0, task_count: int = 1) -> list[Path]:
    """The one output of the one task: ``output_wdinfo_path`` (a URL string in object storage)."""
    path = cfg.stage(STAGE).output_wdinfo_path
    return [path if is_url(path) else Path(path)]


def check_output(cfg: PipelineConfig) -> WdinfoCheck:
    """Load the written wdinfo.pkl with an unpickler that admits no classes at all (a tampered file can't
    run code) and check it holds the keys NeMo reads."""
    path = expected_outputs(cfg)[0]
    if is_url(path):
        tario.set_storage_options(cfg.storage_options)
    if not tario.exists(path):
        return WdinfoCheck(path, problem="no wdinfo.pkl", detail=f"{path} not found (stage not run yet, or failed)")
    try:
        info = safe_loads_plain(tario.read_bytes(path))
    except Exception as exc:
        return WdinfoCheck(path, problem="unreadable wdinfo.pkl", detail=f"{path} cannot be read: {exc}")
    if not isinstance(info, dict) or not NEMO_KEYS <= set(info):
        return WdinfoCheck(path, problem="wdinfo.pkl without the keys NeMo reads",
                           detail=f"{path} lacks tar_files/chunk_size/total_key_count")
    return WdinfoCheck(path, info)


def listed_but_missing(cfg: PipelineConfig, info: dict[str, Any]) -> list[str]:
    """The tars ``tar_files`` lists that are found neither under ``input_dir`` nor beside the file."""
    input_dir, path = cfg.stage(STAGE).input_dir, expected_outputs(cfg)[0]
    roots = [input_dir, str(path).rpartition("/")[0] if is_url(path) else Path(path).parent]
    if any(is_url(root) for root in roots):
        tario.set_storage_options(cfg.storage_options)
    return [t for t in info["tar_files"] if not any(tario.exists(tario.join(root, t)) for root in roots)]


def incomplete_tasks(cfg: PipelineConfig, task_count: int = 1) -> dict[int, str]:
    """``{0: why}`` when wdinfo.pkl is missing, unreadable or lacks NeMo's keys, else ``{}``."""
    problem = check_output(cfg).problem
    return {0: problem} if problem else {}


def run_task(cfg: PipelineConfig, task_id: int, task_count: int) -> dict[str, Any]:
    block = cfg.stage(STAGE)
    input_dir = block.input_dir
    if is_url(input_dir):
        Store(input_dir, cfg.storage_options).check()  # credentials and bucket, one clear line
    elif not Path(input_dir).is_dir():
        raise StageError(f"{STAGE}.input_dir: folder {input_dir} does not exist")
    wdinfo, stats = build_wdinfo(input_dir, block.tar_chunk_size, block.file_ext_in_tar, cfg.storage_options)
    short = reorganize_tar.lone_short_tar_samples(cfg) if cfg.reorganize_tar is not None else None
    if not wdinfo["tar_files"] and short is not None:
        raise StageError(f"{STAGE}.tar_chunk_size: no full tar: the dataset has only {short} usable sample(s), "
                         f"fewer than tar_chunk_size {block.tar_chunk_size}, so the one short tar is marked "
                         f"{INCOMPLETE_SUFFIX} and NeMo's loader cannot use it. Lower tar_chunk_size (at most "
                         f"{short}) for reorganize_tar onwards and rerun them, or download more data")
    if not wdinfo["tar_sample_counts"]:
        raise StageError(f"{STAGE}.input_dir: no .tar files found under {input_dir}")
    if not wdinfo["tar_files"]:
        raise StageError(f"{STAGE}.tar_chunk_size: no tar under {input_dir} holds exactly "
                         f"{block.tar_chunk_size} samples; e.g. "
                         + "; ".join(f"{k}: {v}" for k, v in list(wdinfo["not_listed"].items())[:3]))
    body = pickle.dumps(wdinfo, protocol=4)
    if is_url(block.output_wdinfo_path):
        folder, _, name = str(block.output_wdinfo_path).rpartition("/")
        out = Store(folder, cfg.storage_options)
        unchanged = out.read_many([name]).get(name) == body
        if not unchanged:  # one PUT: the object appears whole or not at all
            out.write_bytes(name, body)
    else:
        target = Path(block.output_wdinfo_path)
        unchanged = target.is_file() and target.stat().st_size == len(body) and target.read_bytes() == body
        if not unchanged:  # a rerun over the same tars leaves the file (and its mtime) alone
            atomic_write_bytes(target, body)
    not_listed = wdinfo["not_listed"]
    for rel, reason in list(not_listed.items())[:EXAMPLES]:
        log.warning("%s: %s not listed: %s", STAGE, rel, reason)
    log.info("%s: wrote %s: %d tars x %d = %d samples", STAGE, block.output_wdinfo_path,
             len(wdinfo["tar_files"]), wdinfo["chunk_size"], wdinfo["total_key_count"])
    return {
        "wdinfo": str(block.output_wdinfo_path),
        "rewritten": not unchanged,
        "full_tars": len(wdinfo["tar_files"]),
        "chunk_size": wdinfo["chunk_size"],
        "total_key_count": wdinfo["total_key_count"],
        "not_listed_count": len(not_listed),
        "not_listed_samples": sum(wdinfo["tar_sample_counts"][rel] for rel in not_listed),
        "not_listed": dict(list(not_listed.items())[:EXAMPLES]),
        **stats,
    }
