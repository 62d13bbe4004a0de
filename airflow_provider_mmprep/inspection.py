"""``mmprep inspect``: describe a shard folder or a ``wdinfo.pkl`` from tar headers, without trusting pickles.

For a folder: every ``*.tar`` (recursive), samples per tar and whether they are uniform, extensions present,
samples missing a member other samples have, keys repeated across tars, damage, short-tar markers and
manifests, and for ``.pickle`` members the keys, shapes and dtypes of the arrays (the first
``pickle_samples`` pickles per tar, loaded with :func:`safepickle.safe_loads`, never ``pickle.loads``).
For a ``wdinfo.pkl`` (loaded with :func:`safepickle.safe_loads_plain`): its fields, checked against the tars
it lists the way NeMo's loader uses them (paths joined to the dataset root, each holding ``chunk_size``).
Folders and wdinfo files may be URLs (``s3://…``; credentials from the storage client's environment): tars
are then listed with their sizes in one listing, indexed through read-ahead reads of their headers and their
pickles fetched as byte ranges.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from .manifest import INCOMPLETE_SUFFIX, MANIFEST_SUFFIX, current_manifest_body, read_manifest
from .safepickle import UnsafePickleError, describe_arrays, safe_loads, safe_loads_plain
from .storage import Store, is_url
from .tarindex import TarIndex, UnsafeMemberName, find_tars, index_tar, index_tar_reader


class _Tars:
    """The tars under one root, local or in object storage: what inspecting them needs, by relative name."""

    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None):
        self.store = Store(root, storage_options) if is_url(root) else None
        self.root = self.store.root if self.store is not None else str(root)
        self._sizes: dict[str, int] | None = None

    def sizes(self) -> dict[str, int]:
        if self._sizes is None:
            assert self.store is not None
            self._sizes = self.store.file_sizes()
        return self._sizes

    def list(self) -> list[str]:
        if self.store is None:
            return [p.relative_to(self.root).as_posix() for p in find_tars(self.root)]
        return sorted(rel for rel in self.sizes() if rel.endswith(".tar"))

    def exists(self, rel: str) -> bool:
        if self.store is None:
            return os.path.exists(os.path.join(self.root, rel))
        return self.store.is_file(rel)

    def index(self, rel: str) -> TarIndex:
        if self.store is None:
            return index_tar(os.path.join(self.root, rel))
        with self.store.open_read(rel, block_size=2**20) as handle:
            return index_tar_reader(handle, self.store.size(rel), self.store.url(rel))

    def manifest(self, rel: str) -> dict[str, Any] | None:
        if self.store is None:
            return read_manifest(os.path.join(self.root, rel))
        raw = self.store.read_many([rel + MANIFEST_SUFFIX]).get(rel + MANIFEST_SUFFIX)
        return None if raw is None else current_manifest_body(raw, self.sizes()[rel])

    def marked_incomplete(self, rel: str) -> bool:
        if self.store is None:
            return os.path.exists(os.path.join(self.root, rel + INCOMPLETE_SUFFIX))
        return rel + INCOMPLETE_SUFFIX in self.sizes()

    def read(self, rel: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        if self.store is None:
            return Store(self.root).read_ranges(rel, ranges)
        return self.store.read_ranges(rel, ranges)

EXAMPLES = 10


def _pickle_schema(index: TarIndex, limit: int, tars: _Tars | None = None, rel: str = "") -> dict[str, Any] | None:
    """Keys/shapes/dtypes of the first ``limit`` ``.pickle`` members; an ``error`` entry if one is refused."""
    members = [m for sample in index.samples for m in sample.members if m.ext.lower() == "pickle"][:limit]
    if tars is None:
        tars, rel = _Tars(os.path.dirname(index.path)), os.path.basename(index.path)
    blobs = tars.read(rel, [(m.offset, m.offset + m.size) for m in members]) if members else []
    seen = len(members)
    schemas: list[dict[str, Any]] = []
    for member, data in zip(members, blobs):
        try:
            schema = describe_arrays(safe_loads(data))
        except UnsafePickleError as exc:
            return {"error": f"{member.name}: {exc}"}
        if schema not in schemas:
            schemas.append(schema)
    if not seen:
        return None
    return schemas[0] if len(schemas) == 1 else {"variants": schemas}


def inspect_folder(folder: str | Path, pickle_samples: int = 1,
                   storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    source = _Tars(folder, storage_options)
    tars: list[dict[str, Any]] = []
    all_extensions: Counter[str] = Counter()
    per_tar_ext: list[tuple[dict[str, Any], list[frozenset[str]]]] = []
    key_home: dict[str, str] = {}
    duplicates: dict[str, list[str]] = {}
    problems: list[str] = []
    for rel in source.list():
        entry: dict[str, Any] = {"tar": rel}
        try:
            index = source.index(rel)
        except UnsafeMemberName as exc:
            entry.update(samples=0, problems=[str(exc)])
            problems.append(str(exc))
            tars.append(entry)
            continue
        ext_sets = [frozenset(m.ext.lower() for m in s.members) for s in index.samples]
        counts: Counter[str] = Counter(e for exts in ext_sets for e in exts)
        all_extensions.update(counts)
        entry.update(samples=len(index.samples), extensions=dict(sorted(counts.items())))
        if index.problems:
            entry["problems"] = index.problems
            problems.extend(f"{rel}: {p}" for p in index.problems)
        if index.skipped_members:
            entry["skipped_members"] = index.skipped_members
        manifest = source.manifest(rel)
        if manifest is not None:
            entry["manifest_sample_count"] = manifest.get("sample_count")
            if manifest.get("sample_count") != len(index.samples):
                problems.append(f"{rel}: manifest says {manifest.get('sample_count')} samples, "
                                f"headers show {len(index.samples)}")
        if source.marked_incomplete(rel):
            entry["marked_incomplete"] = True
        for sample in index.samples:
            home = key_home.setdefault(sample.key, rel)
            if home != rel:
                duplicates.setdefault(sample.key, [home])
                if rel not in duplicates[sample.key]:
                    duplicates[sample.key].append(rel)
        schema = _pickle_schema(index, pickle_samples, source, rel) if pickle_samples > 0 else None
        if schema is not None:
            entry["pickle"] = schema
            if "error" in schema:
                problems.append(f"{rel}: pickle refused: {schema['error']}")
        tars.append(entry)
        per_tar_ext.append((entry, ext_sets))

    union = frozenset(all_extensions)
    missing_total = 0
    for entry, ext_sets in per_tar_ext:
        missing: Counter[str] = Counter(e for exts in ext_sets for e in union - exts)
        incomplete = sum(1 for exts in ext_sets if exts != union)
        if missing:
            entry["missing_members"] = dict(sorted(missing.items()))
            entry["samples_missing_members"] = incomplete
        missing_total += incomplete

    full_counts = Counter(t["samples"] for t in tars if not t.get("marked_incomplete"))
    return {
        "kind": "folder",
        "path": source.root,
        "tar_count": len(tars),
        "total_samples": sum(t["samples"] for t in tars),
        "samples_per_tar": {
            "min": min((t["samples"] for t in tars), default=0),
            "max": max((t["samples"] for t in tars), default=0),
            "histogram": {str(k): v for k, v in sorted(full_counts.items())},
        },
        "uniform": len(full_counts) <= 1,
        "marked_incomplete": [t["tar"] for t in tars if t.get("marked_incomplete")],
        "extensions": dict(sorted(all_extensions.items())),
        "samples_missing_members": missing_total,
        "duplicate_keys_across_tars": {
            "count": len(duplicates),
            "examples": [{"key": k, "tars": v} for k, v in list(duplicates.items())[:EXAMPLES]],
        },
        "problems": problems,
        "tars": tars,
    }


def _read_file(path: str | Path, storage_options: dict[str, Any] | None) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    folder, _, name = str(path).rpartition("/")
    return Store(folder, storage_options).read_bytes(name)


def _parent(path: str | Path) -> str:
    return str(path).rpartition("/")[0] if is_url(path) else str(Path(path).parent)


def inspect_wdinfo(path: str | Path, root: str | Path | None = None, pickle_samples: int = 1,
                   storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    path = path if is_url(path) else Path(path)
    info = safe_loads_plain(_read_file(path, storage_options))
    problems: list[str] = []
    if not isinstance(info, dict):
        raise UnsafePickleError(f"{path}: expected a dict, got {type(info).__name__}")
    for key in ("tar_files", "chunk_size", "total_key_count"):
        if key not in info:
            problems.append(f"missing key {key!r} (NeMo's loader needs it)")
    tar_files = list(info.get("tar_files") or [])
    chunk = info.get("chunk_size")
    if root is None:
        candidates = [info.get("dataset_root"), _parent(path)]
        root = next((c for c in candidates if c and tar_files and _Tars(c, storage_options).exists(tar_files[0])),
                    info.get("dataset_root") or _parent(path))
    root = root if is_url(root) else Path(root)
    source = _Tars(root, storage_options)
    if tar_files != sorted(tar_files):
        problems.append("tar_files is not sorted")
    absolute = [t for t in tar_files if os.path.isabs(t)]
    if absolute:
        problems.append(f"{len(absolute)} tar path(s) are absolute, NeMo expects paths relative to the root")
    if isinstance(chunk, int) and info.get("total_key_count") != len(tar_files) * chunk:
        problems.append(f"total_key_count {info.get('total_key_count')} != {len(tar_files)} tars x {chunk}")
    checked: list[dict[str, Any]] = []
    for rel in tar_files:
        if not source.exists(rel):  # joined to the root as NeMo joins them
            problems.append(f"{rel}: listed but missing under {root}")
            continue
        try:
            index = source.index(rel)
        except UnsafeMemberName as exc:
            problems.append(str(exc))
            continue
        entry: dict[str, Any] = {"tar": rel, "samples": len(index.samples)}
        if len(index.samples) != chunk:
            problems.append(f"{rel}: holds {len(index.samples)} samples, wdinfo says chunk_size {chunk}")
        if index.problems:
            problems.extend(f"{rel}: {p}" for p in index.problems)
        if pickle_samples > 0:
            schema = _pickle_schema(index, pickle_samples, source, rel)
            if schema is not None:
                entry["pickle"] = schema
                if "error" in schema:
                    problems.append(f"{rel}: pickle refused: {schema['error']}")
        checked.append(entry)
    return {
        "kind": "wdinfo",
        "path": str(path),
        "root": str(root),
        "chunk_size": chunk,
        "total_key_count": info.get("total_key_count"),
        "tar_count": len(tar_files),
        "counted_samples": sum(e["samples"] for e in checked),
        "extra_keys": sorted(k for k in info if k not in ("tar_files", "chunk_size", "total_key_count")),
        "not_listed": info.get("not_listed", {}),
        "problems": problems,
        "tars": checked,
    }


def inspect_path(path: str | Path, root: str | Path | None = None, pickle_samples: int = 1,
                 storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    if is_url(path):
        folder, _, name = str(path).rstrip("/").rpartition("/")
        Store(path, storage_options).check()  # bucket and credentials, one line naming ``path``
        parent = Store(folder, storage_options)
        if name and parent.is_file(name):
            return inspect_wdinfo(path, root, pickle_samples, storage_options)
        if _Tars(path, storage_options).store.file_sizes():  # type: ignore[union-attr]
            return inspect_folder(path, pickle_samples, storage_options)
        raise FileNotFoundError(f"{path}: no such folder or wdinfo file")
    path = Path(path)
    if path.is_dir():
        return inspect_folder(path, pickle_samples)
    if path.is_file():
        return inspect_wdinfo(path, root, pickle_samples)
    raise FileNotFoundError(f"{path}: no such folder or wdinfo file")


def format_report(report: dict[str, Any], max_tars: int = 20) -> str:
    """A short human-readable rendering of :func:`inspect_path`'s result: at most ``max_tars`` per-tar lines
    (0: all), tars with missing members first, then how many more there are (``--json`` lists all)."""
    lines = []
    if report["kind"] == "wdinfo":
        lines.append(f"{report['path']}: wdinfo, {report['tar_count']} tars x chunk_size {report['chunk_size']}"
                     f" = total_key_count {report['total_key_count']} (root {report['root']})")
        lines.append(f"  samples counted in listed tars: {report['counted_samples']}")
        if report["not_listed"]:
            lines.append(f"  not listed (ours): {len(report['not_listed'])} tar(s)")
        schemas = {str(t["pickle"]) for t in report["tars"] if "pickle" in t}
    else:
        spt = report["samples_per_tar"]
        lines.append(f"{report['path']}: {report['tar_count']} tars, {report['total_samples']} samples; "
                     f"per tar min {spt['min']} max {spt['max']}; "
                     f"{'uniform' if report['uniform'] else 'NOT uniform'} "
                     f"(histogram {spt['histogram']})")
        if report["marked_incomplete"]:
            lines.append(f"  marked incomplete: {', '.join(report['marked_incomplete'])}")
        lines.append(f"  extensions: {', '.join(f'{e} ({n})' for e, n in report['extensions'].items()) or 'none'}")
        lines.append(f"  samples missing members: {report['samples_missing_members']}")
        dup = report["duplicate_keys_across_tars"]
        lines.append(f"  keys duplicated across tars: {dup['count']}"
                     + (f", e.g. {dup['examples'][0]['key']} in {dup['examples'][0]['tars']}" if dup["count"] else ""))
        tars = report["tars"]
        shown = tars if max_tars <= 0 or len(tars) <= max_tars else \
            sorted(tars, key=lambda t: not t.get("missing_members"))[:max_tars]
        for tar in sorted(shown, key=lambda t: t["tar"]):
            extra = " (incomplete)" if tar.get("marked_incomplete") else ""
            missing = f", missing {tar['missing_members']}" if tar.get("missing_members") else ""
            lines.append(f"    {tar['tar']}: {tar['samples']} samples{extra}{missing}")
        if len(shown) < len(tars):
            lines.append(f"    ... and {len(tars) - len(shown)} more tar(s) (--max-tars 0 or --json lists all)")
        schemas = {str(t["pickle"]) for t in report["tars"] if "pickle" in t}
    for schema in sorted(schemas):
        lines.append(f"  .pickle arrays: {schema}")
    lines.append(f"  problems: {len(report['problems'])}")
    lines.extend(f"    {p}" for p in report["problems"][:50])
    return "\n".join(lines)
