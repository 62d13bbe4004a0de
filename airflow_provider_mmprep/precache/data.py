"""Reading input shards for precaching: tar indexes, NeMo's image transform, and batches built in workers.

Batches are jobs over sample ranges of an input tar; a DataLoader worker indexes the tar from its headers
when it first needs it, reads just the members it needs, and batches come back in the order the sampler
issued them (map-style dataset), which lets the writer emit samples in input order without reordering.

An input tar may be a URL in object storage: it is then never copied whole to local disk. Its index comes
from the member offsets its manifest names (download_images and reorganize_tar record them), else from its
headers (read-ahead reads), and each batch fetches just its members' bytes as coalesced, concurrent ranged
reads (:meth:`..storage.Store.read_ranges`); the originals ``save_original_in_tar`` copies travel with the
batch to the writer as bytes.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .. import tario, tarindex
from ..manifest import read_manifest
from ..storage import is_url
from ..tarindex import Member, Sample

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")


def intact_samples(path: str | Path) -> list[Sample]:
    """Samples of an uncompressed tar in order, from its headers only (:func:`tarindex.index_tar`: the same
    grouping, unsafe-name refusal and damage detection as reorganize_tar and inspect), or DamagedTar: unlike
    ``index_tar``, which keeps a damaged tar's readable samples, precache must encode every sample it was
    given, so a damaged input fails instead of silently losing its tail. A URL's index comes from the
    member offsets its current manifest names when there are some, else from its headers."""
    index = _url_index(str(path)) if is_url(path) else tarindex.index_tar(path)
    if index.problems:
        raise tarindex.DamagedTar(f"{tario.name_of(path)} is damaged: {'; '.join(index.problems)}; redo the "
                                  "reorganize_tar output (or download shard) it came from")
    return index.samples


def _url_index(url: str) -> tarindex.TarIndex:
    """The index of a tar in object storage: from its manifest's member offsets (no read of the tar), else
    from its headers through read-ahead reads."""
    body = tario.read_manifest(url)
    record = tario.read_offsets(url, body) if body is not None else None
    if record is not None:
        index = tarindex.index_from_offsets(url, int(body["tar_size"]), record)
        if index is not None:
            return index
    return tario.index_tar(url)


def members_by_extension(sample: Sample) -> dict[str, Member]:
    """A sample's members by extension (unique: a repeated extension starts a new sample)."""
    return {member.ext: member for member in sample.members}


def resize_and_crop(image: Image.Image, size: int, crop: int) -> Image.Image:
    """NeMo's transform on PIL images (torchvision's Resize(size, bicubic, antialias) + CenterCrop(crop)):
    smallest side to ``size`` keeping the aspect ratio (long side truncated as torchvision does), then the
    centred ``crop``×``crop`` window. Pillow's bicubic resize is the antialiased one torchvision calls."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def decode_image(data: bytes, size: int, crop: int) -> np.ndarray:
    """Bytes → ``uint8 [3, crop, crop]`` RGB. Normalising to [-1, 1] happens on the device, so a quarter
    of the bytes cross the host→device copy."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image = resize_and_crop(image, size, crop)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def normalize_on_device(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 → [-1, 1]: ToTensor then Normalize(0.5, 0.5), computed as x / 127.5 - 1."""
    return images.to(dtype).div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class BatchJob:
    tar_index: int  # into the list of tars this process encodes
    start: int  # sample positions [start, stop) in that tar
    stop: int
    last_in_tar: bool  # the last job of its tar also takes any samples past ``stop``


@dataclass(frozen=True)
class InputSpec:
    """What workers prepare for one encoding: decoded images, or texts (tokenized when the encoder lets us)."""

    modality: str
    extension: str
    preprocess: Callable[[list[str]], Any] | None = None


def count_samples(tar: Path | str) -> int:
    """Samples in a shard: from the producing stage's manifest when there is a current one, else headers."""
    manifest = tario.read_manifest(tar) if is_url(tar) else read_manifest(tar)
    if manifest is not None and isinstance(manifest.get("sample_count"), int):
        return manifest["sample_count"]
    return len(intact_samples(tar))


def jobs_for(tar_index: int, count: int, batch_size: int) -> list[BatchJob]:
    """Batches never span tars, so each finished tar is closed as soon as its last batch is written."""
    if count <= 0:
        return [BatchJob(tar_index, 0, 0, True)]
    return [BatchJob(tar_index, start, min(start + batch_size, count), start + batch_size >= count)
            for start in range(0, count, batch_size)]


class JobSampler(torch.utils.data.Sampler):
    """Yields the batch jobs of each tar in turn, counting a tar's samples only when its turn comes, so a
    task with thousands of shards starts encoding at once and never holds every index in memory. The
    DataLoader hands the jobs to its workers and returns the batches in this order."""

    def __init__(self, tars: Sequence[Path], batch_size: int):
        self.tars, self.batch_size = list(tars), batch_size

    def __iter__(self) -> Iterator[BatchJob]:
        for tar_index, tar in enumerate(self.tars):
            yield from jobs_for(tar_index, count_samples(tar), self.batch_size)


@dataclass(frozen=True)
class KeptSample:
    """What the writer needs of an encoded sample: its key, and where its originals lie in the input."""

    key: str
    mtime: int
    originals: tuple[tuple[str, Member], ...]
    #: the originals' bytes, for an input in object storage (a local input's are copied by the writer)
    original_data: tuple[bytes, ...] | None = None


class BatchDataset(torch.utils.data.Dataset):
    """Item = a :class:`BatchJob`, decoded and transformed (runs in DataLoader workers).

    A sample whose image will not decode, whose text is not UTF-8, or which lacks a needed member is left
    out of the batch and reported in ``bad`` with the reason; the writer records it in the manifest.
    """

    def __init__(self, tars: Sequence[Path | str], inputs: Sequence[InputSpec], image_size: int, crop_size: int,
                 originals: Sequence[str] = (), storage_options: dict[str, Any] | None = None):
        self.tars, self.inputs = list(tars), list(inputs)
        self.image_size, self.crop_size, self.originals = image_size, crop_size, tuple(originals)
        self.storage_options = storage_options  # for URL inputs, in whichever process reads them
        self._open: tuple[int, Any, list[Sample]] | None = None  # the input tar this worker has open

    def __len__(self) -> int:
        return len(self.tars)  # not the job count: jobs come from JobSampler

    def _tar(self, tar_index: int) -> tuple[Any, list[Sample]]:
        if self._open is None or self._open[0] != tar_index:
            if self._open is not None and self._open[1] is not None:
                self._open[1].close()
            path = self.tars[tar_index]
            if is_url(path):  # no handle: each batch's members are fetched as ranged reads
                tario.set_storage_options(self.storage_options)
                self._open = (tar_index, None, intact_samples(path))
            else:
                self._open = (tar_index, open(path, "rb"), intact_samples(path))
        return self._open[1], self._open[2]

    def _reader(self, tar_index: int, handle: Any, samples: list[Sample], exts: list[str]
                ) -> Callable[[Member], bytes]:
        """How this batch reads a member: seek and read in a local file; for a URL, the members of every
        extension wanted (and the originals) fetched for the whole batch at once, as ranged reads."""
        if handle is not None:
            def read(member: Member) -> bytes:
                handle.seek(member.offset)
                return handle.read(member.size)
            return read
        wanted = [m for sample in samples for m in sample.members if m.ext in exts]
        blobs = tario.read_ranges(self.tars[tar_index], [(m.offset, m.offset + m.size) for m in wanted])
        fetched = {m.offset: blob for m, blob in zip(wanted, blobs)}
        return lambda member: fetched[member.offset]

    def __getitem__(self, job: BatchJob) -> dict[str, Any]:
        handle, index = self._tar(job.tar_index)
        samples = index[job.start:] if job.last_in_tar else index[job.start:job.stop]
        image_exts = sorted({i.extension for i in self.inputs if i.modality == "image"})
        text_exts = sorted({i.extension for i in self.inputs if i.modality == "text"})
        read = self._reader(job.tar_index, handle, samples, [*image_exts, *text_exts, *self.originals])
        kept: list[KeptSample] = []
        bad: list[tuple[str, str]] = []
        images: dict[str, list[np.ndarray]] = {ext: [] for ext in image_exts}
        texts: dict[str, list[str]] = {ext: [] for ext in text_exts}
        for sample in samples:
            decoded_images, decoded_texts = {}, {}
            members = members_by_extension(sample)
            try:
                for ext in image_exts + text_exts:
                    if ext not in members:
                        raise LookupError(f"no .{ext} member")
                for ext in image_exts:
                    decoded_images[ext] = decode_image(read(members[ext]),
                                                       self.image_size, self.crop_size)
                for ext in text_exts:
                    decoded_texts[ext] = read(members[ext]).decode("utf-8")
            except Exception as exc:  # PIL raises many kinds; any of them means: skip this sample
                reason = _ADDRESS.sub("", f"{type(exc).__name__}: {exc}")  # deterministic manifests
                log.warning("%s: sample %s skipped: %s", tario.name_of(self.tars[job.tar_index]), sample.key, reason)
                bad.append((sample.key, reason))
                continue
            originals = tuple((ext, members[ext]) for ext in self.originals if ext in members)
            kept.append(KeptSample(sample.key, sample.members[0].mtime, originals,
                                   None if handle is not None else tuple(read(m) for _, m in originals)))
            for ext, array in decoded_images.items():
                images[ext].append(array)
            for ext, text in decoded_texts.items():
                texts[ext].append(text)
        batch_images = {ext: torch.from_numpy(np.stack(arrays)) if arrays else
                        torch.empty((0, 3, self.crop_size, self.crop_size), dtype=torch.uint8)
                        for ext, arrays in images.items()}
        prepared: dict[int, Any] = {}
        for number, spec in enumerate(self.inputs):
            if spec.modality == "text":
                strings = texts[spec.extension]
                prepared[number] = spec.preprocess(strings) if spec.preprocess and strings else strings
        return {"job": job, "kept": kept, "bad": bad, "images": batch_images, "texts": prepared}
