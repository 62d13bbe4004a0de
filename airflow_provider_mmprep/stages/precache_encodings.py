"""precache_encodings: run frozen encoders over shards into NeMo-readable pickles (REFERENCE.md §2).

Input: the ``*.tar`` shards of ``input_dir`` (flat, as reorganize_tar writes them), sorted by name; task t
of T owns ``task_range(len(tars), t, T)``. Output: one tar per input tar with the same name in
``output_dir``, so the task count can change without invalidating finished work. Each sample becomes
``{key}.pickle`` (``dict[encoding key → numpy array]``) plus, when ``save_original_in_tar`` asks, its
original members copied byte for byte, in input order. A tar is written under a temporary name, renamed
when complete, then given a manifest (counts, encodings with shapes and dtypes, skipped samples, and a
fingerprint of the settings that shape the output); a rerun skips tars whose manifest matches.

The short last shard reorganize_tar marks ``.INCOMPLETE`` (an empty ``{j:05d}.tar.INCOMPLETE`` beside
it, or the shard renamed so) is left alone, as NeMo leaves it, because encoding it now would be redone
once more data completes it; with ``process_incomplete_tars: true`` (ours) it is encoded too and its
output is marked the same way, so generate_wdinfo still does not list it as full.

Inside a task every visible GPU is used, one spawned process per GPU; on CPU the task runs in-process.
torch, diffusers and transformers (the ``precache`` extra) are imported only when there is work to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .. import tario
from ..config import PipelineConfig, PrecacheConfig, PrecacheEncodingsConfig, ConfigError, load_precache_config
from ..fsutil import sorted_files, task_range
from ..manifest import (INCOMPLETE_SUFFIX, MANIFEST_SUFFIX, FinishedTar, TarOutputs,
                        tasks_without_output)
from ..storage import copy_file_into, is_url
from ..tarindex import DamagedTar, UnsafeMemberName
from . import StageError

log = logging.getLogger(__name__)

STAGE = "precache_encodings"
#: bump when the output format changes so older outputs are redone
FORMAT_VERSION = 1
#: With an output folder in object storage, outputs are written locally and uploaded in rounds of this many
#: tars per encoder process: local disk holds at most one round's outputs (inputs in object storage are read
#: with ranged reads, never copied whole; see docs/object-storage.md).
SPOOL_TARS_PER_DEVICE = 4

PathOrUrl = tario.PathOrUrl


def _url_input_tars(block: PrecacheEncodingsConfig) -> tuple[list[str], set[str]]:
    """:func:`input_tars` for an ``input_dir`` URL: one listing, sizes included."""
    store = tario.store(str(block.input_dir))
    sizes = store.file_sizes(recursive=False)
    tars = [n for n in sizes if n.endswith(".tar")]
    marked = [n for n in sizes if n.endswith(f".tar{INCOMPLETE_SUFFIX}")]
    markers = {n[: -len(INCOMPLETE_SUFFIX)] for n in marked if sizes[n] == 0}
    renamed = [n for n in marked if sizes[n] > 0]
    if not block.process_incomplete_tars:
        return [store.url(n) for n in sorted(tars) if n not in markers], set()
    return [store.url(n) for n in sorted(tars + renamed)], markers | set(renamed)


def input_tars(block: PrecacheEncodingsConfig) -> tuple[list[PathOrUrl], set[str]]:
    """The shards to encode, sorted by name, and the names of those that are short.

    A short last shard is marked ``.INCOMPLETE`` in one of two ways: an empty ``{name}.tar.INCOMPLETE``
    marker beside ``{name}.tar`` (what our reorganize_tar writes) or the shard itself renamed to
    ``{name}.tar.INCOMPLETE``. Either way it is left out unless ``process_incomplete_tars`` is set.
    """
    if is_url(block.input_dir):
        return _url_input_tars(block)  # type: ignore[return-value]
    listed = sorted_files(block.input_dir, "*.tar*")
    tars = [p for p in listed if p.name.endswith(".tar")]
    marked = [p for p in listed if p.name.endswith(f".tar{INCOMPLETE_SUFFIX}")]
    markers = {p.name[: -len(INCOMPLETE_SUFFIX)] for p in marked if p.stat().st_size == 0}
    renamed = [p for p in marked if p.stat().st_size > 0]
    short = markers | {p.name for p in renamed}
    if not block.process_incomplete_tars:
        return [t for t in tars if t.name not in markers], set()
    return sorted(tars + renamed, key=lambda p: p.name), short


def inputs_by_task(block: PrecacheEncodingsConfig, task_count: int) -> tuple[list[list[PathOrUrl]], set[str]]:
    """The input tars each of ``task_count`` tasks owns (index = task id) and the names of the short ones.

    The one place ownership is decided: run_task and the layout answers below (which the run report
    asks) use it, so nobody expects an output for a tar the task leaves out (the short ``.INCOMPLETE`` one,
    by default).
    """
    tars, short = input_tars(block)
    return [[tars[i] for i in task_range(len(tars), t, task_count)] for t in range(task_count)], short


def task_inputs(cfg: PipelineConfig, task_id: int, task_count: int) -> list[PathOrUrl]:
    """The input tars task ``task_id`` of ``task_count`` encodes."""
    return inputs_by_task(cfg.stage(STAGE), task_count)[0][task_id]


def expected_outputs(cfg: PipelineConfig, task_id: int, task_count: int) -> list[PathOrUrl]:
    """The output tars task ``task_id`` of ``task_count`` leaves: one per input, under the input's name."""
    output_dir = cfg.stage(STAGE).output_dir
    return [_output_of(output_dir, tar) for tar in task_inputs(cfg, task_id, task_count)]


def _output_of(output_dir: str | Path, tar: PathOrUrl) -> PathOrUrl:
    return tario.join(output_dir if is_url(output_dir) else Path(output_dir), tario.name_of(tar))


def only_short_input(block: PrecacheEncodingsConfig) -> str | None:
    """The name of the short tar when it is all ``input_dir`` holds and it is left out (nothing to
    encode: the dataset is smaller than ``tar_chunk_size``), else None."""
    if input_tars(block)[0]:
        return None
    left_out = tario.file_names(block.input_dir, f"*.tar{INCOMPLETE_SUFFIX}")
    return left_out[0][: -len(INCOMPLETE_SUFFIX)] if left_out else None


def output_state(cfg: PipelineConfig, task_count: int | None = None) -> TarOutputs:
    """The output tars against the inputs each of ``task_count`` tasks (default: the configured count)
    owns. A finished tar whose manifest names no task gets the task that owns its input. A task has work
    left when an input it owns lacks a finished output; with the inputs gone (cleaned up), the tasks no
    output's manifest names, if any names one. Nothing to do when the input is only the short tar."""
    block = cfg.stage(STAGE)
    task_count = block.task_selection.task_count if task_count is None else task_count
    owned, _ = inputs_by_task(block, task_count)
    short_only = None if any(owned) else only_short_input(block)
    found, unlisted = tario.finished_tars(block.output_dir)
    owner = {tario.name_of(tar): task for task, tars_of in enumerate(owned) for tar in tars_of}
    tars = [t._replace(task_id=owner.get(t.name)) if t.task_id is None else t for t in found]
    marked = tario.marked_short(block.output_dir, tars)
    if short_only is not None:
        return TarOutputs(tars, unlisted, {}, marked, nothing_to_do=f"only the short tar {short_only}")
    if not tars and not unlisted:
        incomplete = {t: "no output tars" for t in range(task_count) if owned[t] or not any(owned)}
    elif not any(owned):
        incomplete = tasks_without_output(tars, task_count)
    else:
        done = {t.name for t in tars}
        incomplete = {}
        for task, tars_of in enumerate(owned):
            missing = [tario.name_of(tar) for tar in tars_of if tario.name_of(tar) not in done]
            if missing:
                incomplete[task] = f"input {missing[0]} has no finished output tar"
    return TarOutputs(tars, unlisted, incomplete, marked)


def finished_outputs(cfg: PipelineConfig, task_count: int | None = None) -> tuple[list[FinishedTar], list[str]]:
    """The output tars with a current manifest, each with its task, and the names of those without one."""
    state = output_state(cfg, task_count)
    return state.tars, state.unlisted


def incomplete_tasks(cfg: PipelineConfig, task_count: int) -> dict[int, str]:
    """The tasks of ``task_count`` that have work left, each with why (see :func:`output_state`)."""
    return output_state(cfg, task_count).incomplete


def output_fingerprint(precache: PrecacheConfig, source: PathOrUrl) -> str:
    """Hash of what determines a tar's output: encoders and their settings, transform, originals, input."""
    body = {
        "format": FORMAT_VERSION,
        "encodings": [spec.model_dump(mode="json", exclude={"compute_dtype"}) for spec in precache.encodings],
        "image_size": precache.image_size, "crop_size": precache.crop_size,
        "save_original_in_tar": precache.save_original_in_tar,
        "source": {"name": tario.name_of(source), "size": tario.size(source)},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def is_finished(final: PathOrUrl, fingerprint: str) -> bool:
    manifest = tario.read_manifest(final)
    return manifest is not None and manifest.get("precache_fingerprint") == fingerprint


def original_extensions(precache: PrecacheConfig) -> list[str]:
    """Extensions of the members ``save_original_in_tar`` copies, in modality order image then text."""
    extensions: list[str] = []
    for modality, default in (("image", "jpg"), ("text", "txt")):
        if modality in precache.save_original_in_tar:
            named = [s.extension for s in precache.encodings if s.modality == modality] or [default]
            extensions += [e for e in dict.fromkeys(named) if e not in extensions]
    return extensions


def plan_devices(precache: PrecacheConfig) -> list[str]:
    """Device per encoder process: every visible GPU (capped by ``lightning.devices`` when it is a
    number), or CPU; ``worker_processes`` (ours) overrides the count."""
    import torch

    cuda = torch.cuda.is_available()
    if precache.device == "cuda" and not cuda:
        raise StageError("precache.device: 'cuda' requested but no CUDA device is visible")
    if precache.device == "cpu" or not cuda:
        return ["cpu"] * (precache.worker_processes or 1)
    visible = torch.cuda.device_count()
    count = visible
    wanted = precache.lightning.get("devices")
    if isinstance(wanted, int) and wanted > 0:
        if wanted > visible:
            log.info("lightning.devices is %d but %d GPU(s) are visible: using %d", wanted, visible, visible)
        count = min(wanted, visible)
    if precache.worker_processes:
        count = precache.worker_processes
    return [f"cuda:{i % visible}" for i in range(count)]


def run_task(cfg: PipelineConfig, task_id: int, task_count: int) -> dict[str, Any]:
    block: PrecacheEncodingsConfig = cfg.stage(STAGE)
    precache = cfg.precache
    if precache is None:
        try:
            precache = load_precache_config(block.precache_config_path, key_prefix=f"{STAGE}.precache_config_path",
                                            storage_options=cfg.storage_options)
        except ConfigError as exc:
            raise StageError("; ".join(exc.problems)) from None
    tario.set_storage_options(cfg.storage_options)
    remote = is_url(block.input_dir) or is_url(block.output_dir)
    if not tario.is_dir(block.input_dir if is_url(block.input_dir) else Path(block.input_dir)):
        raise StageError(f"{STAGE}.input_dir: folder not found: {block.input_dir}")
    same = str(block.input_dir).rstrip("/") == str(block.output_dir).rstrip("/") if remote else \
        Path(block.output_dir).resolve() == Path(block.input_dir).resolve()
    if same:
        raise StageError(f"{STAGE}.output_dir: must differ from input_dir (outputs keep the input names)")
    started = time.monotonic()
    owned_by_task, short = inputs_by_task(block, task_count)
    owned = owned_by_task[task_id]
    tars = [tar for task in owned_by_task for tar in task]
    output_dir = block.output_dir if is_url(block.output_dir) else Path(block.output_dir)
    tario.makedirs(output_dir)
    finals = [_output_of(output_dir, tar) for tar in owned]
    # only our tars' leftovers (temporaries; on S3 unfinished multipart uploads)
    removed = tario.remove_leftovers(output_dir, [tario.name_of(final) for final in finals])
    if removed:
        log.info("removed %d leftover(s) of an interrupted run in %s", removed, output_dir)
    fingerprints = {tar: output_fingerprint(precache, tar) for tar in owned}
    pending = [tar for tar, final in zip(owned, finals) if not is_finished(final, fingerprints[tar])]
    summary: dict[str, Any] = {"input_tars": len(tars), "task_tars": len(owned),
                               "already_done": len(owned) - len(pending), "encoded_tars": 0, "samples": 0,
                               "skipped_samples": 0}
    if not tars:
        left_out = only_short_input(block)
        if left_out is None:
            raise StageError(f"{STAGE}.input_dir: no .tar files in {block.input_dir} (has reorganize_tar run?)")
        log.warning("%s: nothing to encode: %s holds only the short tar %s, with fewer samples than "
                    "tar_chunk_size %d (left out as NeMo does). Lower tar_chunk_size (reorganize_tar onwards) so "
                    "full tars exist, or set %s.process_incomplete_tars: true to encode it anyway",
                    STAGE, block.input_dir, left_out, block.tar_chunk_size, STAGE)
        summary["nothing_to_encode"] = "only a short .INCOMPLETE tar"
        return summary
    if not pending:
        if owned:
            log.info("%s: task %d/%d: all %d tar(s) already encoded", STAGE, task_id, task_count, len(owned))
        else:
            log.info("%s: task %d/%d: no tar to encode (%d tar(s) for %d tasks)", STAGE, task_id, task_count,
                     len(tars), task_count)
        return summary
    try:
        import torch  # noqa: F401  (the precache extra)
    except ImportError:
        raise StageError(f"{STAGE}: needs torch, diffusers and transformers: "
                         "pip install 'airflow-provider-mmprep[precache]'") from None
    from ..precache.writer import TarOutput

    extensions = original_extensions(precache)

    def output_for(tar: PathOrUrl, source: PathOrUrl, final: Path) -> TarOutput:
        name = tario.name_of(tar)
        return TarOutput(source, final, extensions,
                         {"precache_fingerprint": fingerprints[tar], "short": name in short,
                          "encoding_keys": [s.key for s in precache.encodings]},
                         marker=name in short and not name.endswith(INCOMPLETE_SUFFIX))

    devices = plan_devices(precache)[: len(pending)]
    log.info("%s: task %d/%d: %d tar(s) to encode (%d already done) on %s", STAGE, task_id, task_count,
             len(pending), summary["already_done"], ", ".join(devices))
    if not remote:
        results = _encode(block, [output_for(tar, Path(tar), Path(output_dir) / Path(tar).name) for tar in pending],
                          precache, devices)
    else:
        results = _encode_remote(block, pending, output_dir, output_for, precache, devices)
    seconds = time.monotonic() - started
    samples = sum(r["samples"] for r in results)
    summary.update(encoded_tars=sum(len(r["tars"]) for r in results), samples=samples,
                   skipped_samples=sum(r["skipped"] for r in results), devices=devices,
                   seconds=round(seconds, 3), samples_per_s=round(samples / seconds, 2) if seconds else None,
                   pipeline_seconds=max(r["pipeline_seconds"] for r in results))
    return summary


def _encode(block: PrecacheEncodingsConfig, outputs: Sequence[Any], precache: PrecacheConfig,
            devices: list[str]) -> list[dict[str, Any]]:
    """Encode ``outputs`` (local inputs and outputs) on ``devices``; errors as one-line stage errors."""
    from ..precache.engine import EncoderOutputError, encode_in_processes, encode_tars

    devices = devices[: len(outputs)]
    try:
        if len(devices) == 1:
            return [encode_tars(outputs, precache, devices[0])]
        # static round-robin: shards are equal-sized, so the devices finish together
        return encode_in_processes([(d, list(outputs[i::len(devices)])) for i, d in enumerate(devices)], precache)
    except EncoderOutputError as exc:
        raise StageError(f"{block.precache_config_path}: {exc}") from None
    except (DamagedTar, UnsafeMemberName) as exc:  # inputs are read by tarindex alone
        # a DataLoader worker's error arrives with the worker's traceback in its text: keep the last line
        reason = str(exc).strip().splitlines()[-1] if "Traceback" in str(exc) else str(exc)
        raise StageError(f"{STAGE}.input_dir: unreadable shard: {reason} (finished tars are kept)") from None
    except RuntimeError as exc:
        if "writer failed" not in str(exc) and len(devices) == 1:
            raise
        raise StageError(f"{STAGE}: {exc} (finished tars are kept; rerun the task to resume)") from None


def spool_folder(output_dir: str) -> Path:
    """The local folder a task writing to object storage spools its current round's outputs in
    (``$MMPREP_SPOOL_DIR`` or the temp folder), one per output folder and process."""
    root = os.environ.get("MMPREP_SPOOL_DIR") or tempfile.gettempdir()
    digest = hashlib.sha256(str(output_dir).encode()).hexdigest()[:16]
    return Path(root) / f"mmprep-precache-{digest}-{os.getpid()}"


def _publish(local: Path, output_dir: PathOrUrl) -> None:
    """Move one finished output (marker, tar, manifest) from the spool to ``output_dir``: the marker first
    (a reader never sees the short tar unmarked), the tar (multipart upload on S3, committed by its
    completion), the manifest last (a rerun trusts the tar only then)."""
    name = local.name
    marker = local.with_name(name + INCOMPLETE_SUFFIX)
    remote_marker = tario.join(output_dir, name + INCOMPLETE_SUFFIX)
    if marker.is_file():
        tario.touch(remote_marker)
    elif tario.exists(remote_marker) and tario.size(remote_marker) == 0:
        tario.unlink(remote_marker)  # the input was completed since an earlier run
    manifest = local.with_name(name + MANIFEST_SUFFIX)
    tario.unlink(tario.join(output_dir, manifest.name))  # a tar being redone stops counting as finished first
    with open(local, "rb", buffering=0) as source, tario.open_write(tario.join(output_dir, name)) as target:
        copy_file_into(target, source)
    with tario.open_write(tario.join(output_dir, manifest.name)) as target:
        target.write(manifest.read_bytes())
    for path in (local, marker, manifest):
        path.unlink(missing_ok=True)


def _encode_remote(block: PrecacheEncodingsConfig, pending: list[PathOrUrl], output_dir: PathOrUrl,
                   output_for: Any, precache: PrecacheConfig, devices: list[str]) -> list[dict[str, Any]]:
    """Encode tars whose input or output is in object storage. Inputs in object storage are read where they
    are (ranged reads of each batch's members: :mod:`..precache.data`), never copied whole. Outputs going to
    object storage are written to a local spool folder in rounds of ``SPOOL_TARS_PER_DEVICE`` tars per
    device and each published (then removed locally) before the next round. Local disk: one round's
    outputs."""
    if not is_url(output_dir):  # the writer puts each tar in place, as locally
        return _encode(block, [output_for(tar, tar, Path(output_dir) / tario.name_of(tar)) for tar in pending],
                       precache, devices)
    spool = spool_folder(str(output_dir))
    shutil.rmtree(spool, ignore_errors=True)
    results: list[dict[str, Any]] = []
    size = SPOOL_TARS_PER_DEVICE * len(devices)
    try:
        for first in range(0, len(pending), size):
            chunk = pending[first:first + size]
            (spool / "out").mkdir(parents=True, exist_ok=True)
            outputs = [output_for(tar, tar, spool / "out" / tario.name_of(tar)) for tar in chunk]
            round_results = _encode(block, outputs, precache, devices)
            for tar in chunk:
                _publish(spool / "out" / tario.name_of(tar), output_dir)
            results += round_results
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    return results
