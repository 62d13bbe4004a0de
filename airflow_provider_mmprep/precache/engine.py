"""One encoder process per device: DataLoader workers decode, the device encodes, a thread writes.

The loop only moves ready batches to the device (pinned memory, non-blocking), launches the encoders under
``torch.inference_mode()`` and queues non-blocking copies of the results back to pinned host memory; the
writer thread waits for those copies and does all serialisation, so on a GPU the next batch's kernels are
queued while the previous batch is still being copied and written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import nn

from .. import tario
from ..config import EncodingSpec, PrecacheConfig
from ..encoders import build_encoder
from ..procutil import die_with_parent
from ..progress import Progress
from .data import BatchDataset, InputSpec, JobSampler, normalize_on_device
from .writer import EncodedBatch, TarOutput, TarWriterThread

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PRECISION = {16: torch.float16, 32: torch.float32}


class EncoderOutputError(ValueError):
    """An encoder returned something the spec cannot store."""


def compute_dtype(spec: EncodingSpec, precache: PrecacheConfig, device: torch.device) -> torch.dtype:
    """The dtype an encoder computes in: the spec's, else the file's, else ``auto`` (see config)."""
    name = spec.compute_dtype or precache.compute_dtype
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    precision = str(precache.lightning.get("precision", 16)).lower()
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("32") or precision.startswith("64"):
        return torch.float32
    return torch.float16


def place_encoder(encoder: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move an encoder to the device and compute dtype; our built-ins may keep float32 (``mmprep_to``)."""
    if hasattr(encoder, "mmprep_to"):
        encoder = encoder.mmprep_to(device, dtype)
    elif isinstance(encoder, nn.Module):
        encoder = encoder.to(device=device, dtype=dtype)
    else:
        log.info("%s is not a torch module: left where its constructor put it", type(encoder).__name__)
    if isinstance(encoder, nn.Module):
        encoder.eval().requires_grad_(False)
    return encoder


def call_encoder(encoder: Any, batch: Any) -> Any:
    """NeMo's contract: ``encode`` when the class has one, else ``__call__``."""
    encode = getattr(encoder, "encode", None)
    return encode(batch) if callable(encode) else encoder(batch)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "latent_dist"):  # diffusers AutoencoderKLOutput
        value = value.latent_dist
    parameters = getattr(value, "parameters", None)
    if isinstance(parameters, torch.Tensor):  # a Gaussian distribution: mean and logvar on channels
        return parameters
    hidden = getattr(value, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise EncoderOutputError(f"encoder returned {type(value).__name__}, not a tensor")


def interpret_output(output: Any, spec: EncodingSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(encoded, mask or None)`` per the spec. A tuple is recognised by type, never by ``len(out) == 2``
    (a batch of two tensors has length 2 too)."""
    wants_mask = spec.modality == "text" and not spec.store_pad_tokens
    if isinstance(output, tuple):
        if wants_mask:
            if len(output) < 2:
                raise EncoderOutputError("store_pad_tokens is false: expected (encoded, mask)")
            return _as_tensor(output[0]), _as_tensor(output[1])
        return _as_tensor(output[0]), None
    if wants_mask:
        raise EncoderOutputError(f"store_pad_tokens is false but the encoder returned "
                                 f"{type(output).__name__}, not a tuple (encoded, mask)")
    return _as_tensor(output), None


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return tensor.contiguous()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def encode_tars(outputs: Sequence[TarOutput], precache: PrecacheConfig, device_name: str,
                label: str = "precache") -> dict[str, Any]:
    """Encode every tar of ``outputs`` on one device; returns counts. Finished tars are renamed into place
    as they complete, so an interruption loses at most the tars in progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizer use
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed image size: pick the fastest convolution kernels once
    started = time.monotonic()
    encoders = []
    for number, spec in enumerate(precache.encodings):
        try:
            encoder = build_encoder(spec.encoder_config.cls, spec.encoder_config.kwargs,
                                    precache.allowed_encoder_modules)
        except Exception as exc:
            raise EncoderOutputError(f"encodings.{number}.encoder_config: cannot build "
                                     f"{spec.encoder_config.cls}: {exc}") from exc
        dtype = compute_dtype(spec, precache, device)
        encoders.append((number, spec, place_encoder(encoder, device, dtype), dtype))
    inputs = [InputSpec(spec.modality, spec.extension,
                        getattr(encoder, "text_preprocessor", None) if spec.modality == "text" else None)
              for _, spec, encoder, _ in encoders]
    originals = sorted({tuple(o.originals) for o in outputs})
    dataset = BatchDataset([o.source for o in outputs], inputs, precache.image_size, precache.crop_size,
                           originals[0] if originals else (), tario.get_storage_options())
    workers = precache.dataloader_num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=JobSampler(dataset.tars, precache.batch_size_per_GPU),
        num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
        persistent_workers=False)
    done: list[dict[str, Any]] = []
    progress = Progress(f"{label} {device_name}", None, unit="samples")
    writer = TarWriterThread(outputs, done.append)
    encoded_count = 0
    pipeline_started = time.monotonic()  # models are built: from here on it is the steady-state pipeline
    try:
        for batch in loader:
            job = batch["job"]
            arrays: dict[str, torch.Tensor] = {}
            masks: dict[str, torch.Tensor] = {}
            if batch["kept"]:
                with torch.inference_mode():
                    on_device: dict[str, torch.Tensor] = {}
                    normalised: dict[tuple[str, torch.dtype], torch.Tensor] = {}
                    for number, spec, encoder, dtype in encoders:
                        if spec.modality == "image":
                            ext = spec.extension
                            if ext not in on_device:
                                on_device[ext] = batch["images"][ext].to(device, non_blocking=True)
                            if (ext, dtype) not in normalised:
                                normalised[(ext, dtype)] = normalize_on_device(on_device[ext], dtype)
                            output = call_encoder(encoder, normalised[(ext, dtype)])
                        else:
                            output = call_encoder(encoder, _to_device(batch["texts"][number], device))
                        try:
                            encoded, mask = interpret_output(output, spec)
                        except EncoderOutputError as exc:
                            raise EncoderOutputError(f"encodings.{number} ({spec.key}): {exc}") from None
                        arrays[spec.key] = _to_host(encoded.to(_PRECISION[spec.precision]))
                        if mask is not None:
                            masks[spec.key] = _to_host(mask)
                ready = None
                if device.type == "cuda":
                    ready = torch.cuda.Event()
                    ready.record()
            else:
                ready = None
            writer.put(EncodedBatch(job.tar_index, job.last_in_tar, list(batch["kept"]),
                                    [tuple(b) for b in batch["bad"]], arrays, masks, ready))
            encoded_count += len(batch["kept"])
            progress.advance(len(batch["kept"]) + len(batch["bad"]), tars=f"{len(done)}/{len(outputs)}")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    progress.finish()
    seconds = time.monotonic() - started
    return {"device": device_name, "tars": done, "samples": encoded_count,
            "skipped": sum(t["skipped"] for t in done), "seconds": round(seconds, 3),
            "pipeline_seconds": round(time.monotonic() - pipeline_started, 3)}


def _child_main(index: int, device_name: str, outputs: list[TarOutput], precache: PrecacheConfig,
                results: Any, parent: int, storage_options: dict[str, Any] | None = None) -> None:
    """Entry point of a spawned per-device process: results (or the error) go back on ``results``. A task
    killed outright (SIGKILL) must not leave it encoding behind it: it dies with ``parent``."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s [{device_name}] %(name)s: %(message)s")
    die_with_parent(parent)
    tario.set_storage_options(storage_options)  # a spawned process: the task's options for URL inputs
    try:
        results.put((index, "ok", encode_tars(outputs, precache, device_name)))
    except BaseException as exc:
        results.put((index, "error", f"{device_name}: {type(exc).__name__}: {exc}"))
        raise


def encode_in_processes(assignments: Sequence[tuple[str, list[TarOutput]]],
                        precache: PrecacheConfig) -> list[dict[str, Any]]:
    """One spawned process per (device, tars) pair; waits for all and raises if any failed."""
    import torch.multiprocessing as mp
    context = mp.get_context("spawn")  # never fork a process that may hold a CUDA context
    results = context.Queue()
    processes = []
    for index, (device_name, outputs) in enumerate(assignments):
        process = context.Process(target=_child_main,
                                  args=(index, device_name, outputs, precache, results, os.getpid(),
                                        tario.get_storage_options()),
                                  name=f"mmprep-precache-{device_name}-{index}")  # not daemonic: it
        # needs DataLoader worker children of its own
        process.start()
        processes.append(process)
    reports: dict[int, tuple[str, Any]] = {}
    try:
        _collect(processes, results, reports)
    except BaseException:  # interrupted (SIGTERM/Ctrl-C): stop the encoders too
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise
    for process in processes:
        process.join()
    errors = [payload for status, payload in reports.values() if status == "error"]
    errors += [f"{p.name} exited with code {p.exitcode} without reporting"
               for i, p in enumerate(processes) if i not in reports]
    if errors:
        raise RuntimeError("; ".join(errors))
    return [payload for _, (status, payload) in sorted(reports.items())]


def _collect(processes: list[Any], results: Any, reports: dict[int, tuple[str, Any]]) -> None:
    import queue

    while len(reports) < len(processes):
        try:
            index, status, payload = results.get(timeout=1.0)
            reports[index] = (status, payload)
        except queue.Empty:
            if all(p.exitcode is not None for p in processes):
                try:  # a last report may still be in the pipe
                    index, status, payload = results.get(timeout=2.0)
                    reports[index] = (status, payload)
                    continue
                except queue.Empty:
                    break
