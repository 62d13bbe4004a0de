"""The writer thread: per-sample pickles into output tars, off the encoders' critical path.

It receives encoded batches in input order, waits for their device→host copies to land (a CUDA event, so
the encoding loop never blocks on them), pickles one ``dict[key → ndarray]`` per sample, copies the
original members when asked (a kernel-side copy), and finishes each tar atomically followed by its
manifest. Member headers come from :mod:`..tarwriter` under :data:`METADATA` (times from the input, no
owner names), so a rerun reproduces the same bytes.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..fsutil import temp_path_for
from ..manifest import INCOMPLETE_SUFFIX, write_manifest
from ..storage import is_url
from ..tario import name_of
from ..tarwriter import PAX, MemberMetadata, TarWriter
from .data import KeptSample, Member

log = logging.getLogger(__name__)

#: Pickle protocol 4: what NeMo's precache wrote (Python's default before 3.14), readable by any 3.8+.
PICKLE_PROTOCOL = 4


@dataclass
class EncodedBatch:
    tar_index: int
    last_in_tar: bool
    kept: list[KeptSample]  # the samples encoded, in input order
    bad: list[tuple[str, str]]  # (key, reason) of samples left out
    arrays: dict[str, Any]  # encoding key → host tensor [n, ...]
    masks: dict[str, Any]  # encoding key → host mask [n, L] (only rows with mask == 1 are stored)
    ready: Any = None  # a CUDA event to wait on before reading ``arrays``, or None


@dataclass
class TarOutput:
    source: Path | str  # a local path or a URL (read with ranged reads, never copied whole)
    final: Path
    originals: Sequence[str]  # extensions copied untouched
    manifest_fields: dict[str, Any] = field(default_factory=dict)
    marker: bool = False  # short: put an empty ``<tar>.INCOMPLETE`` beside it, as reorganize_tar does


#: Precache's member policy: the download's fixed metadata, but each member keeps its input sample's mtime
#: (passed per member) and a long or non-ASCII input key is stored in a pax record.
METADATA = MemberMetadata(long_names=PAX)


class _OpenTar:
    def __init__(self, output: TarOutput):
        self.output = output
        self.tmp = temp_path_for(output.final)
        self.tar = TarWriter(self.tmp, METADATA)
        local = not is_url(output.source)
        self.source = os.open(output.source, os.O_RDONLY) if output.originals and local else None
        self.written = 0
        self.skipped: list[dict[str, str]] = []
        self.encodings: dict[str, dict[str, Any]] = {}

    def add(self, name: str, data: bytes, mtime: int) -> None:
        self.tar.add_bytes(name, data, mtime)

    def copy_member(self, name: str, member: Member) -> None:
        self.tar.add_from(name, self.source, member.offset, member.size, member.mtime)

    def close(self) -> None:
        try:
            self.tar.close()
        finally:
            if self.source is not None:
                os.close(self.source)
                self.source = None

    def discard(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)


class TarWriterThread:
    """Consumes :class:`EncodedBatch` items; :meth:`put` blocks when ``depth`` batches are pending."""

    def __init__(self, outputs: Sequence[TarOutput], on_tar_done: Callable[[dict[str, Any]], None],
                 depth: int = 4):
        self.outputs = list(outputs)
        self.on_tar_done = on_tar_done
        self.queue: queue.Queue[EncodedBatch | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._current: _OpenTar | None = None
        self._thread = threading.Thread(target=self._run, name="mmprep-precache-writer", daemon=True)
        self._thread.start()

    def put(self, batch: EncodedBatch) -> None:
        self._offer(batch, self._healthy)

    def close(self) -> None:
        """Drain, stop, and re-raise the writer's error (if any) in the caller."""
        if self._thread.is_alive():
            self.put_end()
            self._thread.join()
        self._raise_if_failed()

    def put_end(self) -> None:
        self._offer(None, self._thread.is_alive)

    def _offer(self, item: EncodedBatch | None, keep_trying: Callable[[], bool]) -> None:
        """Block until the writer takes ``item``, asking ``keep_trying`` every 0.5 s while the queue is full
        (a dead writer never drains it)."""
        while keep_trying():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _healthy(self) -> bool:
        self._raise_if_failed()
        return True

    def abort(self) -> None:
        """Stop without finishing the open tar (its temporary file is removed)."""
        self.put_end()
        self._thread.join(timeout=30)
        if self._current is not None:
            self._current.discard()
            self._current = None

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"precache writer failed: {self.error}") from self.error

    def _run(self) -> None:
        try:
            while True:
                batch = self.queue.get()
                if batch is None:
                    return
                self._write(batch)
        except BaseException as exc:  # surfaced to the encoding loop by put()/close()
            self.error = exc
            if self._current is not None:
                self._current.discard()
                self._current = None
            while True:  # keep the producer from blocking on a full queue
                try:
                    if self.queue.get(timeout=0.5) is None:
                        return
                except queue.Empty:
                    continue

    def _write(self, batch: EncodedBatch) -> None:
        if self._current is None:
            self._current = _OpenTar(self.outputs[batch.tar_index])
        current = self._current
        if batch.ready is not None:
            batch.ready.synchronize()
        arrays = {key: tensor.numpy() for key, tensor in batch.arrays.items()}
        masks = {key: mask.numpy() for key, mask in batch.masks.items()}
        for row, sample in enumerate(batch.kept):
            record: dict[str, np.ndarray] = {}
            for key, array in arrays.items():
                value = array[row]
                if key in masks:
                    value = value[masks[key][row].astype(bool)]
                record[key] = np.ascontiguousarray(value)
            current.add(f"{sample.key}.pickle", pickle.dumps(record, protocol=PICKLE_PROTOCOL), sample.mtime)
            for number, (ext, member) in enumerate(sample.originals):
                if sample.original_data is not None:  # an input in object storage: the bytes came with it
                    current.add(f"{sample.key}.{ext}", sample.original_data[number], member.mtime)
                else:
                    current.copy_member(f"{sample.key}.{ext}", member)
            if current.written == 0:
                current.encodings = {key: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                     for key, v in record.items()}
                for key in masks:  # stored without pad rows: the first dimension varies per sample
                    current.encodings[key]["shape"][0] = None
                    current.encodings[key]["pad_tokens_stored"] = False
            current.written += 1
        current.skipped.extend({"key": key, "reason": reason} for key, reason in batch.bad)
        if batch.last_in_tar:
            self._finish(current)

    def _finish(self, current: _OpenTar) -> None:
        current.close()
        self._current = None
        output = current.output
        marker = output.final.with_name(output.final.name + INCOMPLETE_SUFFIX)
        if output.marker:  # marker first: a reader never sees the short tar unmarked
            marker.touch()
        elif marker.is_file() and marker.stat().st_size == 0:
            marker.unlink()  # the input was completed since an earlier run
        os.replace(current.tmp, output.final)
        fields = {"source_tar": name_of(output.source), "source_sample_count": current.written + len(current.skipped),
                  "encodings": current.encodings, "skipped_samples": current.skipped,
                  "extensions": ["pickle", *output.originals], **output.manifest_fields}
        write_manifest(output.final, current.written, **fields)
        if current.skipped:
            log.warning("%s: %d sample(s) skipped (recorded in its manifest)", output.final.name,
                        len(current.skipped))
        self.on_tar_done({"tar": output.final.name, "samples": current.written,
                          "skipped": len(current.skipped)})
