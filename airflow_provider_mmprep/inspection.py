"""``mmprep inspect``: describe a shard folder or a ``wdinfo.pkl`` from tar headers, without trusting pickles.

For a folder: every ``*.tar`` (recursive), samples per tar and whether they are uniform, extensions present,
samples missing a member other samples have, keys repeated across tars, damage, short-tar markers and
manifests, and for ``.pickle`` members the keys, shapes and dtypes of the arrays (the first
``pickle_samples`` pickles per tar, loaded with :func:`safepickle.safe_loads`, never ``pickle.loads``).
For a ``wdinfo.pkl`` (loaded with :func:`safepickle.safe_loads_plain`): its fields, checked against the tars
it lists the way NeMo's loader uses them (paths joined to the dataset root, each holding ``chunk_size``).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from .manifest import INCOMPLETE_SUFFIX, read_manifest
from .safepickle import UnsafePickleError, describe_arrays, safe_loads, safe_loads_plain
from .tarindex import TarIndex, UnsafeMemberName, find_tars, index_tar

EXAMPLES = 10


def _pickle_schema(index: TarIndex, limit: int) -> dict[str, Any] | None:
    """Keys/shapes/dtypes of the first ``limit`` ``.pickle`` members; an ``error`` entry if one is refused."""
    seen = 0
    schemas: list[dict[str, Any]] = []
    with open(index.path, "rb") as handle:
        for sample in index.samples:
            for member in sample.members:
                if member.ext.lower() != "pickle" or seen >= limit:
                    continue
                seen += 1
                data = os.pread(handle.fileno(), member.size, member.offset)
                try:
                    schema = describe_arrays(safe_loads(data))
                except UnsafePickleError as exc:
                    return {"error": f"{member.name}: {exc}"}
                if schema not in schemas:
                    schemas.append(schema)
    if not seen:
        return None
    return schemas[0] if len(schemas) == 1 else {"variants": schemas}


def inspect_folder(folder: str | Path, pickle_samples: int = 1) -> dict[str, Any]:
    folder = Path(folder)
    tars: list[dict[str, Any]] = []
    all_extensions: Counter[str] = Counter()
    per_tar_ext: list[tuple[dict[str, Any], list[frozenset[str]]]] = []
    key_home: dict[str, str] = {}
    duplicates: dict[str, list[str]] = {}
    problems: list[str] = []
    for path in find_tars(folder):
        rel = path.relative_to(folder).as_posix()
        entry: dict[str, Any] = {"tar": rel}
        try:
            index = index_tar(path)
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
        manifest = read_manifest(path)
        if manifest is not None:
            entry["manifest_sample_count"] = manifest.get("sample_count")
            if manifest.get("sample_count") != len(index.samples):
                problems.append(f"{rel}: manifest says {manifest.get('sample_count')} samples, "
                                f"headers show {len(index.samples)}")
        if path.with_name(path.name + INCOMPLETE_SUFFIX).exists():
            entry["marked_incomplete"] = True
        for sample in index.samples:
            home = key_home.setdefault(sample.key, rel)
            if home != rel:
                duplicates.setdefault(sample.key, [home])
                if rel not in duplicates[sample.key]:
                    duplicates[sample.key].append(rel)
        schema = _pickle_schema(index, pickle_samples) if pickle_samples > 0 else None
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
        "path": str(folder),
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


def inspect_wdinfo(path: str | Path, root: str | Path | None = None, pickle_samples: int = 1) -> dict[str, Any]:
    path = Path(path)
    info = safe_loads_plain(path.read_bytes())
    problems: list[str] = []
    if not isinstance(info, dict):
        raise UnsafePickleError(f"{path}: expected a dict, got {type(info).__name__}")
    for key in ("tar_files", "chunk_size", "total_key_count"):
        if key not in info:
            problems.append(f"missing key {key!r} (NeMo's loader needs it)")
    tar_files = list(info.get("tar_files") or [])
    chunk = info.get("chunk_size")
    if root is None:
        candidates = [info.get("dataset_root"), path.parent]
        root = next((Path(c) for c in candidates if c and tar_files and (Path(c) / tar_files[0]).exists()),
                    Path(info.get("dataset_root") or path.parent))
    root = Path(root)
    if tar_files != sorted(tar_files):
        problems.append("tar_files is not sorted")
    absolute = [t for t in tar_files if os.path.isabs(t)]
    if absolute:
        problems.append(f"{len(absolute)} tar path(s) are absolute, NeMo expects paths relative to the root")
    if isinstance(chunk, int) and info.get("total_key_count") != len(tar_files) * chunk:
        problems.append(f"total_key_count {info.get('total_key_count')} != {len(tar_files)} tars x {chunk}")
    checked: list[dict[str, Any]] = []
    for rel in tar_files:
        tar = Path(os.path.join(root, rel))  # as NeMo joins them
        if not tar.is_file():
            problems.append(f"{rel}: listed but missing under {root}")
            continue
        try:
            index = index_tar(tar)
        except UnsafeMemberName as exc:
            problems.append(str(exc))
            continue
        entry: dict[str, Any] = {"tar": rel, "samples": len(index.samples)}
        if len(index.samples) != chunk:
            problems.append(f"{rel}: holds {len(index.samples)} samples, wdinfo says chunk_size {chunk}")
        if index.problems:
            problems.extend(f"{rel}: {p}" for p in index.problems)
        if pickle_samples > 0:
            schema = _pickle_schema(index, pickle_samples)
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


def inspect_path(path: str | Path, root: str | Path | None = None, pickle_samples: int = 1) -> dict[str, Any]:
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
