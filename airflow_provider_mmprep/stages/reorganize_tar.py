"""reorganize_tar: re-pack uneven download shards into tars of exactly ``tar_chunk_size`` samples.

One global plan (:class:`SampleOrder`), built from tar headers only, orders every usable sample of every
input tar (tars sorted by path relative to ``input_dir``, samples in stored order). Output tar ``j`` holds samples
``[j*C, (j+1)*C)`` of that order and is named ``{j:05d}.tar`` in one flat ``output_dir``; the last one
may be short and is then marked the NeMo way, with an empty ``{j:05d}.tar.INCOMPLETE`` file beside it
(NeMo's generate_wdinfo and ours skip such tars). Tasks split the *output* tars with
:func:`fsutil.task_range`, so any ``node_array_size`` yields the same bytes. With several tasks, each places
the inputs by their manifests' sample counts and reads the headers of only the inputs feeding its own
outputs (:func:`order_task_samples`), so T tasks do not read every header T times. Where inputs have no
manifests (img2dataset's), every task needs every input's count before it knows its outputs: it takes
them from records other tasks left (:mod:`..input_counts`) or reads them (and records them); meanwhile it
writes the full outputs it has indexed and probably owns to temporaries, renamed once ownership is
certain (:func:`write_early_output`), so its copying overlaps the reading of later inputs.

Member records (headers and data) are copied verbatim as byte ranges (:mod:`..tarwriter`), never decoded. Each
output is written under a temporary name, renamed, and then described by a manifest holding a digest of
its plan; a rerun skips outputs whose manifest matches and rewrites the rest.

A usable sample has every extension of ``file_ext_in_tar``; only those members are copied (as NeMo
does). Samples missing one are counted and reported; duplicate keys are reported (and kept: shards of
different parts legitimately restart their key numbering); damaged tars contribute their readable
samples, are reported, and fail the task only with ``strict: true``.

``input_dir`` and ``output_dir`` may be URLs (``s3://…``, issue 17) through :mod:`..tario`: inputs are listed
in one listing, their manifests read concurrently, headers (where no offsets sidecar says them) through
read-ahead reads, member records fetched as coalesced ranged reads (at most ``RANGE_BATCH`` bytes held per
writing thread) and each output streamed as one multipart upload whose completion is the commit; the
bytes are those of a local run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from .. import fsutil, input_counts, tario
from ..storage import is_url
from ..manifest import (INCOMPLETE_SUFFIX, MANIFEST_SUFFIX, FinishedTar, TarOutputs,
                        tasks_without_output)
from ..progress import Progress
from ..tarindex import (ManifestContradicted, Member, SampleCounts, TarIndex, UnsafeMemberName, count_samples,
                        covers_extensions, find_tars, gc_paused, index_from_offsets, index_tar, is_cached,
                        member_offsets, normalize_extensions, prefetch)
from ..tarwriter import BLOCK, RECORD, TarWriter, record_extent
from . import StageError

if TYPE_CHECKING:  # run from a resolved config, a task never imports the config layer (pydantic)
    from ..config import PipelineConfig

log = logging.getLogger(__name__)

STAGE = "reorganize_tar"
EXAMPLES = 10  # how many examples of each problem a summary lists
PREFETCH_AHEAD = 4  # input tars whose reading is requested ahead of the indexing
RANGE_BATCH = 32 * 2**20  # object storage: member bytes per batch of ranged reads (two held per writing thread)


class PlacedSample(NamedTuple):
    """A usable sample's place in the global order: its input tar, key and the members to copy (a tuple:
    one is made per sample, and tuples are the cheapest to make)."""

    tar: int  # index into SampleOrder.inputs
    key: str
    members: list[Member]


@dataclass
class SampleOrder:
    """The global order of usable samples (the reorganize plan; not :func:`..plan.build_plan`'s stage plan),
    cut into output tars of ``chunk_size``, with what indexing found wrong on the way."""

    input_dir: Path
    inputs: list[Path]
    chunk_size: int
    samples: list[PlacedSample] = field(default_factory=list)
    missing_members: int = 0
    missing_examples: list[str] = field(default_factory=list)
    duplicate_keys: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    damaged: dict[str, list[str]] = field(default_factory=dict)  # input (relative) -> problems
    skipped_members: int = 0
    members_not_copied: int = 0  # members of usable samples whose extension is not in file_ext_in_tar
    # A task's plan may hold only a window of the global order: ``samples`` then starts at global position
    # ``first_sample`` and ``total_samples`` counts every usable sample of every input.
    first_sample: int = 0
    total_samples: int | None = None
    indexed_tars: int = 0  # inputs whose headers were read (or whose counts were taken from a record)
    counted_from_records: int = 0  # inputs counted by another task (:mod:`..input_counts`), not read here
    input_sizes: dict[int, int] = field(default_factory=dict)  # bytes of each input samples are taken from

    @property
    def total(self) -> int:
        return len(self.samples) if self.total_samples is None else self.total_samples

    @property
    def output_count(self) -> int:
        return -(-self.total // self.chunk_size)

    @property
    def short_count(self) -> int:
        return self.total % self.chunk_size

    def rel(self, tar: int) -> str:
        return tario.relative(self.inputs[tar], self.input_dir)

    def chunk(self, j: int) -> list[PlacedSample]:
        start = j * self.chunk_size - self.first_sample
        stop = min((j + 1) * self.chunk_size, self.total) - self.first_sample
        if start < 0 or stop > len(self.samples):
            raise ValueError(f"output {j} is outside this plan's window of the global order")
        return self.samples[start:stop]

    def digest(self, j: int) -> str:
        """Fingerprint of what output ``j`` must contain: a rerun over changed inputs never skips it."""
        rels: dict[int, str] = {}
        parts = []
        for sample in self.chunk(j):
            rel = rels.get(sample.tar)
            if rel is None:
                rel = rels[sample.tar] = self.rel(sample.tar)
            parts.append(rel)
            parts.extend([f"\0{name}\0{head}\0{offset}\0{size}\n"  # Member unpacked: no attribute lookups
                          for name, _, offset, size, head, _ in sample.members])
        return hashlib.sha256("".join(parts).encode()).hexdigest()


def _inputs(input_dir: Path, exclude: Path | None) -> list[Path]:
    if is_url(input_dir):  # output_dir inside input_dir: never read our own outputs back
        inside = str(exclude).rstrip("/") + "/" if exclude is not None else None
        return [p for p in tario.find_tars(input_dir) if inside is None or not str(p).startswith(inside)]  # type: ignore[misc]
    inputs = find_tars(input_dir)
    if exclude is not None and not is_url(exclude) and exclude.resolve().is_relative_to(input_dir.resolve()):
        skip = exclude.resolve()  # output_dir inside input_dir: never read our own outputs back
        inputs = [p for p in inputs if not p.resolve().is_relative_to(skip)]
    return inputs


_UNREAD: Any = object()


def _index(path: Path, body: dict[str, Any] | None = _UNREAD) -> TarIndex:
    """The input's index: from the ``member_offsets`` its manifest names when it has them (no header is
    read), else from its headers. ``body`` is the manifest when the caller has read it already."""
    if body is _UNREAD:
        body = tario.read_manifest(path)
    try:
        record = tario.read_offsets(path, body) if body is not None else None
        if record is not None:
            index = index_from_offsets(path, int(body["tar_size"]), record)  # type: ignore[index]
            if index is not None:
                if len(index.samples) != body["sample_count"]:
                    raise ManifestContradicted(f"{path}: its manifest's member_offsets hold {len(index.samples)} "
                                               f"sample(s) but its sample_count says {body['sample_count']}")
                return index
        return tario.index_tar(path) if is_url(path) else index_tar(path)
    except UnsafeMemberName as exc:
        raise StageError(f"{STAGE}.input_dir: {exc}") from None
    except ManifestContradicted as exc:
        raise StageError(f"{STAGE}.input_dir: {exc}. Redo the shard that wrote it (or delete "
                         f"{tario.name_of(path)}{MANIFEST_SUFFIX}), then rerun every {STAGE} task") from None


def _add_tar(plan: SampleOrder, tar_no: int, index: TarIndex, wanted: tuple[str, ...],
             seen_keys: set[str], keep: bool = True) -> int:
    """Report one indexed input's problems and, with ``keep``, append its usable samples to the plan;
    returns how many usable samples it has."""
    rel = plan.rel(tar_no)
    plan.indexed_tars += 1
    plan.input_sizes[tar_no] = index.file_size
    if index.problems:
        plan.damaged[rel] = index.problems
    plan.skipped_members += index.skipped_members
    usable = not_copied = 0
    # Samples of one tar mostly share one list of extensions: decide once per list which members to copy
    # (None: the sample is not usable; True: all of them), not once per sample.
    choices: dict[tuple[str, ...], list[int] | bool | None] = {}
    append, new, planned = plan.samples.append, tuple.__new__, PlacedSample
    for sample in index.samples:
        members = sample.members
        exts = tuple([m[1] for m in members])  # Member.ext
        choice = choices.get(exts, False)
        if choice is False:
            picked = _members_to_copy(exts, wanted)
            choice = None if picked is None else True if len(picked) == len(exts) else picked
            choices[exts] = choice
        if choice is None:
            plan.missing_members += 1
            if len(plan.missing_examples) < EXAMPLES:
                plan.missing_examples.append(f"{rel}:{sample.key} has {sorted(sample.extensions)}")
            continue
        key = sample.key
        seen = len(seen_keys)
        seen_keys.add(key)
        if len(seen_keys) == seen:  # seen before
            plan.duplicate_keys += 1
            if len(plan.duplicate_examples) < EXAMPLES:
                plan.duplicate_examples.append(f"{rel}:{key}")
        if choice is not True:
            not_copied += len(members) - len(choice)
            members = [members[i] for i in choice]
        if keep:
            append(new(planned, (tar_no, key, members)))
        usable += 1
    plan.members_not_copied += not_copied
    return usable


def _members_to_copy(exts: tuple[str, ...], wanted: tuple[str, ...]) -> list[int] | None:
    """For a sample whose members have the extensions ``exts`` (in order): the positions of the members to
    copy (those with a wanted extension), or None when the sample is not usable (it lacks a wanted one:
    :func:`.tarindex.covers_extensions`). The one rule behind every count and copy of this stage."""
    if not covers_extensions(exts, wanted):
        return None
    return [i for i, ext in enumerate(exts) if ext.lower() in wanted]


def _wanted_choices(signatures: list[tuple[str, ...]], wanted: tuple[str, ...]) -> list[int | None]:
    """Per extension list: None when a sample with it is not usable, else how many of its members are
    not copied (:func:`_members_to_copy`)."""
    choices: list[int | None] = []
    for exts in signatures:
        picked = _members_to_copy(exts, wanted)
        choices.append(None if picked is None else len(exts) - len(picked))
    return choices


def _add_counts(plan: SampleOrder, tar_no: int, counts: SampleCounts, wanted: tuple[str, ...],
                seen_keys: set[str]) -> int:
    """:func:`_add_tar` without ``keep``, for an input read by :func:`count_samples` (intact, so no damage
    to report): the same missing-member, duplicate-key and member counts and examples, from its keys and
    extension lists; returns how many usable samples it has."""
    rel = plan.rel(tar_no)
    plan.indexed_tars += 1
    plan.skipped_members += counts.skipped_members
    choices = _wanted_choices(counts.signatures, wanted)
    keys, kinds = counts.keys, counts.kinds
    per_kind = [kinds.count(kind) for kind in range(len(choices))]
    if None not in choices:
        usable_keys = keys
        plan.members_not_copied += sum(c * n for c, n in zip(choices, per_kind))  # type: ignore[operator]
    else:
        usable_keys = []
        for key, kind in zip(keys, kinds):
            choice = choices[kind]
            if choice is None:
                plan.missing_members += 1
                if len(plan.missing_examples) < EXAMPLES:
                    plan.missing_examples.append(f"{rel}:{key} has {sorted(counts.signatures[kind])}")
                continue
            plan.members_not_copied += choice
            usable_keys.append(key)
    fresh = set(usable_keys)
    if len(fresh) == len(usable_keys) and seen_keys.isdisjoint(fresh):
        seen_keys |= fresh
    else:  # some key repeats: count and list them in order, as _add_tar does
        for key in usable_keys:
            seen = len(seen_keys)
            seen_keys.add(key)
            if len(seen_keys) == seen:
                plan.duplicate_keys += 1
                if len(plan.duplicate_examples) < EXAMPLES:
                    plan.duplicate_examples.append(f"{rel}:{key}")
    return len(usable_keys)


def _indexed_in_turn(paths: list[Path], bodies: list[dict[str, Any] | None] | None = None) -> Iterator[TarIndex]:
    """The inputs' indexes in order, each made in a thread while the caller uses the one before (adds
    its samples, copies from it), so a task's wall time tends to the larger of indexing and copying, not
    their sum. The thread also asks the kernel to read ahead ``PREFETCH_AHEAD`` inputs (the copy reads
    every byte anyway, and the call's cost grows with the file even when it is cached)."""
    def index(at: int) -> TarIndex:
        for later in paths[0 if at == 0 else at + PREFETCH_AHEAD:at + PREFETCH_AHEAD + 1]:
            if not is_url(later):
                prefetch(later)
        return _index(paths[at]) if bodies is None else _index(paths[at], bodies[at])

    with ThreadPoolExecutor(max_workers=1) as ahead:
        pending = ahead.submit(index, 0) if paths else None
        for at in range(len(paths)):
            done = pending.result()  # type: ignore[union-attr]
            if at + 1 < len(paths):
                pending = ahead.submit(index, at + 1)
            yield done


def order_samples(input_dir: Path, chunk_size: int, file_ext_in_tar: list[str],
                  on_tar_indexed: Callable[[SampleOrder], None] | None = None,
                  exclude: Path | None = None) -> SampleOrder:
    """Index every input tar's headers and order their usable samples; raises StageError on unsafe names.

    ``on_tar_indexed(plan)`` runs after each input tar is added, so a caller can start writing chunks that
    are already complete while later tars are still being indexed.
    """
    wanted = normalize_extensions(file_ext_in_tar)
    plan = SampleOrder(input_dir, _inputs(input_dir, exclude), chunk_size)
    seen_keys: set[str] = set()
    progress = Progress(f"{STAGE}: indexing input tars", len(plan.inputs), unit="tars", logger=log)
    for tar_no, index in enumerate(_indexed_in_turn(plan.inputs)):
        _add_tar(plan, tar_no, index, wanted, seen_keys)
        progress.advance()
        if on_tar_indexed is not None:
            on_tar_indexed(plan)
    progress.finish()
    return plan


def _usable_count(index: TarIndex | SampleCounts, wanted: tuple[str, ...]) -> int:
    """How many of the input's samples have every wanted extension (decided once per list of extensions)."""
    if isinstance(index, SampleCounts):
        choices = _wanted_choices(index.signatures, wanted)
        return sum(index.kinds.count(kind) for kind, choice in enumerate(choices) if choice is not None)
    usable: dict[tuple[str, ...], bool] = {}
    count = 0
    for sample in index.samples:
        exts = tuple([m[1] for m in sample.members])  # Member.ext
        ok = usable.get(exts)
        if ok is None:
            ok = usable[exts] = _members_to_copy(exts, wanted) is not None
        count += ok
    return count


def counted_by_manifest(body: dict[str, Any] | None, wanted: tuple[str, ...]) -> int | None:
    """The input's usable sample count from its producer's (current) manifest, or None when the tar must
    be read.

    Only a manifest that lists ``every_sample_has`` (download_images and reorganize_tar write it)
    covering every wanted extension says how many samples are usable without reading a header.
    """
    if body is None:
        return None
    every = body.get("every_sample_has")
    if not isinstance(every, list) or not set(wanted) <= {str(e).lower() for e in every}:
        return None
    return int(body["sample_count"])


def _likely_feeding(sizes: list[int], task_id: int, task_count: int) -> set[int]:
    """The local inputs (of these byte ``sizes``) that probably feed task ``task_id``'s outputs (its share
    of the outputs is about that share of the bytes): they are indexed in full at once instead of counted
    first and indexed again. Only a guess: the plan is the same whatever it says."""
    low, high = sum(sizes) * task_id / task_count, sum(sizes) * (task_id + 1) / task_count
    likely, start = set(), 0
    for t, size in enumerate(sizes):
        if start < high and start + size > low:
            likely.add(t)
        start += size
    return likely


class _EarlyWindow:
    """The provisional window of early outputs (:func:`order_task_samples`): the inputs a task indexes in
    full, from the first such, in order, while they are contiguous; grown as each input is counted."""

    def __init__(self, plan: SampleOrder, sizes: list[int], wanted: tuple[str, ...], task_id: int,
                 task_count: int, on_early_outputs: Callable[[SampleOrder, list[int]], None]):
        self.plan, self.wanted, self.task_id, self.task_count = plan, wanted, task_id, task_count
        self.on_early_outputs = on_early_outputs
        self.seen_keys: set[str] = set()
        self.counted_samples = self.counted_bytes = 0
        self.uncounted_bytes = sum(sizes)
        self.sizes = sizes
        self.begun = self.ended = False
        self.next_output = 0  # outputs below it were offered (or passed over) already

    def add(self, tar_no: int, index: TarIndex | SampleCounts, count: int) -> None:
        """Input ``tar_no`` has just been counted (``count`` usable samples) by ``index``; offer the full
        outputs now in the window that are probably this task's (each once)."""
        if self.ended:
            return
        first = self.counted_samples
        self.counted_samples += count
        self.counted_bytes += self.sizes[tar_no]
        self.uncounted_bytes -= self.sizes[tar_no]
        if not isinstance(index, TarIndex):
            self.ended = self.begun  # only counted: the window cannot grow past it
            return
        plan = self.plan
        if not self.begun:
            self.begun, plan.first_sample = True, first
        _add_tar(plan, tar_no, index, self.wanted, self.seen_keys)
        plan.total_samples = self.counted_samples  # chunk() of a full output needs no more
        if not self.counted_samples:
            return
        estimate = self.counted_samples + round(self.uncounted_bytes * self.counted_samples / self.counted_bytes)
        guessed = fsutil.task_range(-(-estimate // plan.chunk_size), self.task_id, self.task_count)
        low = max(guessed.start, -(-plan.first_sample // plan.chunk_size), self.next_output)
        high = min(guessed.stop, (plan.first_sample + len(plan.samples)) // plan.chunk_size)
        if low < high:
            self.next_output = high
            self.on_early_outputs(plan, list(range(low, high)))


def order_task_samples(input_dir: Path, chunk_size: int, file_ext_in_tar: list[str], task_id: int,
                       task_count: int, exclude: Path | None = None,
                       on_tar_indexed: Callable[[SampleOrder], None] | None = None,
                       on_early_outputs: Callable[[SampleOrder, list[int]], None] | None = None,
                       records: Path | None = None) -> SampleOrder:
    """The window of the global plan that task ``task_id`` of ``task_count`` writes.

    Inputs whose manifests give their usable counts are placed in the global order without being read;
    only the inputs feeding this task's outputs (and those without such a manifest) have their headers
    read. So T tasks read every header about once in all, not T times, and the outputs are byte-identical
    to a single task's. Problems (missing members, duplicate keys, damage) are reported for the inputs
    this task read. A manifest count that its tar's headers contradict fails the task: other tasks have
    placed their samples by it. ``on_tar_indexed(plan)`` runs after each input is added, as in
    :func:`order_samples`, with ``total_samples`` and ``first_sample`` already known.

    Until every input is counted, the total (and so which outputs are this task's) is not known. Where the
    inputs have no manifests, ``on_early_outputs(early, outputs)`` is called while counting goes on, with
    a provisional window ``early`` of the global order (the inputs this task indexes in full, from the
    first, as far as they are contiguous and counted) and the full outputs it holds that are probably this
    task's (by an estimate of the total from the bytes counted so far): their bytes are already certain,
    only their owner is a guess. So a task can copy while the disk still delivers later inputs.

    With ``records`` (a local folder, :mod:`..input_counts`), each local input without a manifest that a
    task reads has its counts recorded, and a task takes an input's count from its record where another
    task (or an earlier run) left one. Where the inputs it copies from are in the page cache, a task reads
    those first (the other tasks start with theirs: their records are then probably written when it comes
    to them); from the disk, in input order, which tasks sharing a machine then read once between them.
    """
    wanted = normalize_extensions(file_ext_in_tar)
    inputs = _inputs(input_dir, exclude)
    plan = SampleOrder(input_dir, inputs, chunk_size)
    bodies = tario.read_manifests(inputs)  # type: ignore[arg-type]
    manifest_counts = [counted_by_manifest(body, wanted) for body in bodies]
    # Inputs without a usable manifest are read to count them: where nothing says otherwise (no manifest,
    # a local intact tar), by the count-only walk (or from another task's record), and in full only if
    # they feed this task's outputs.
    unlisted: dict[int, TarIndex | SampleCounts] = {}
    counts: list[int | None] = list(manifest_counts)
    # Local inputs some of which must be read: their sizes guide the guess and the early outputs' estimate.
    stats = ([os.stat(path) for path in inputs]
             if None in manifest_counts and not any(is_url(p) for p in inputs[:1]) else [])
    sizes = [stat.st_size for stat in stats]
    likely = _likely_feeding(sizes, task_id, task_count) if sizes else set()
    if not stats:
        records = None
    from_records: set[int] = set()
    # The provisional window of early outputs: only where every input is read here, in order.
    early = None
    if on_early_outputs is not None and likely and all(c is None for c in manifest_counts):
        early = _EarlyWindow(SampleOrder(input_dir, inputs, chunk_size), sizes, wanted, task_id, task_count,
                             on_early_outputs)
    offered = 0  # inputs below it are in the early window's hands (it takes them in order)
    to_count = [t for t, count in enumerate(manifest_counts) if count is None]
    reading = to_count
    if records is not None and all(is_cached(inputs[t], sizes[t]) for t in likely):
        # Cached inputs cost no disk time in any order: first the inputs this task copies from, as the
        # other tasks start with theirs, so by the time it comes to those their records are probably
        # written. From the disk, all tasks read in input order instead: on one machine each input is
        # then read once for all of them, sequentially, and copying starts while later inputs are read.
        reading = sorted(likely.intersection(to_count)) + [t for t in to_count if t not in likely]
    for tar_no in reading:
        path, body = inputs[tar_no], bodies[tar_no]
        held: TarIndex | SampleCounts | None = None
        if tar_no not in likely and body is None and not is_url(path):
            if records is not None:
                held = input_counts.load(records, plan.rel(tar_no), stats[tar_no])
                if held is not None:
                    from_records.add(tar_no)
            if held is None:
                held = count_samples(path)
                if held is not None and records is not None:
                    input_counts.save(records, plan.rel(tar_no), stats[tar_no], held)
        if held is None:
            held = _index(path, body)
            if records is not None and body is None and not input_counts.is_recorded(records, plan.rel(tar_no),
                                                                                stats[tar_no]):
                recorded = input_counts.counts_of_index(held)
                if recorded is not None:
                    input_counts.save(records, plan.rel(tar_no), stats[tar_no], recorded)
        unlisted[tar_no] = held
        counts[tar_no] = _usable_count(held, wanted)
        if early is not None:
            while offered < len(inputs) and counts[offered] is not None:
                early.add(offered, unlisted[offered], counts[offered])  # type: ignore[arg-type]
                offered += 1
    plan.counted_from_records = len(from_records)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    plan.total_samples = starts[-1]
    mine = fsutil.task_range(plan.output_count, task_id, task_count)
    low, high = mine.start * chunk_size, min(mine.stop * chunk_size, plan.total_samples)
    feeding = {t for t in range(len(inputs)) if starts[t] < high and starts[t + 1] > low}
    plan.first_sample = starts[min(feeding)] if feeding else low
    seen_keys: set[str] = set()
    order = sorted(feeding | unlisted.keys())  # global order, so the window stays contiguous
    to_read = [t for t in order if t not in unlisted or (t in feeding and isinstance(unlisted[t], SampleCounts))]
    fresh = _indexed_in_turn([inputs[t] for t in to_read], [bodies[t] for t in to_read])
    for tar_no in order:
        held = unlisted.pop(tar_no, None)
        if isinstance(held, SampleCounts) and tar_no not in feeding:
            usable = _add_counts(plan, tar_no, held, wanted, seen_keys)
        else:
            index = next(fresh) if held is None or isinstance(held, SampleCounts) else held
            usable = _add_tar(plan, tar_no, index, wanted, seen_keys, keep=tar_no in feeding)
        if isinstance(held, SampleCounts) and usable != counts[tar_no]:
            if tar_no in from_records:
                raise StageError(
                    f"{STAGE}.input_dir: {plan.rel(tar_no)} has {usable} usable sample(s) but its record "
                    f"{input_counts.record_path(records, plan.rel(tar_no))} says {counts[tar_no]}, and "  # type: ignore[arg-type]
                    f"other tasks may have placed their samples by it. Delete {records}, then rerun every "
                    f"{STAGE} task")
            raise StageError(
                f"{STAGE}.input_dir: {plan.rel(tar_no)} changed while this task read it ({counts[tar_no]} usable "
                f"sample(s) when counted, {usable} when indexed); rerun every {STAGE} task once nothing writes "
                f"to {input_dir}")
        if manifest_counts[tar_no] is not None and usable != manifest_counts[tar_no]:
            raise StageError(
                f"{STAGE}.input_dir: {plan.rel(tar_no)} has {usable} usable sample(s) but its manifest says "
                f"{manifest_counts[tar_no]}, and the other tasks placed their samples by the manifest. Redo "
                f"the shard that wrote it (or delete {plan.rel(tar_no)}{MANIFEST_SUFFIX}), then rerun every "
                f"{STAGE} task")
        if on_tar_indexed is not None:
            on_tar_indexed(plan)
    return plan


def output_path(output_dir: Path, j: int) -> Path:
    return tario.join(output_dir, f"{j:05d}.tar")  # type: ignore[return-value]


def outputs_by_task(cfg: PipelineConfig, task_count: int) -> list[list[Path]] | None:
    """The output tars each of ``task_count`` tasks writes (index = task id), placed as
    :func:`order_task_samples` places them, from the inputs' manifests alone; None when an input's manifest
    does not say how many usable samples it holds (the headers would have to be read)."""
    block = cfg.stage(STAGE)
    input_dir, output_dir = (v if is_url(v) else Path(v) for v in (block.input_dir, block.output_dir))
    tario.set_storage_options(cfg.storage_options)
    if not tario.is_dir(input_dir):
        return None
    wanted = normalize_extensions(block.file_ext_in_tar)
    total = 0
    for body in tario.read_manifests(_inputs(input_dir, output_dir)):  # type: ignore[arg-type]
        count = counted_by_manifest(body, wanted)
        if count is None:
            return None
        total += count
    output_count = -(-total // block.tar_chunk_size)
    return [[output_path(output_dir, j) for j in fsutil.task_range(output_count, t, task_count)]
            for t in range(task_count)]


def expected_outputs(cfg: PipelineConfig, task_id: int, task_count: int) -> list[Path] | None:
    """The output tars task ``task_id`` of ``task_count`` writes, or None when only reading the inputs'
    headers would tell (see :func:`outputs_by_task`)."""
    by_task = outputs_by_task(cfg, task_count)
    return None if by_task is None else by_task[task_id]


def output_state(cfg: PipelineConfig, task_count: int | None = None) -> TarOutputs:
    """The output tars against what each of ``task_count`` tasks (default: the configured count) writes:
    a task has work left when one of its outputs is not finished. Where the inputs' manifests do not place
    the outputs, the tasks no output's manifest names (if any names one)."""
    block = cfg.stage(STAGE)
    task_count = block.task_selection.task_count if task_count is None else task_count
    tars, unlisted = tario.finished_tars(block.output_dir)
    marked = tario.marked_short(block.output_dir, tars)
    if not tars and not unlisted:
        return TarOutputs(tars, unlisted, {t: "no output tars" for t in range(task_count)}, marked)
    by_task = outputs_by_task(cfg, task_count)
    if by_task is None:
        return TarOutputs(tars, unlisted, tasks_without_output(tars, task_count), marked)
    done = {t.name for t in tars} | {t.name[: -len(INCOMPLETE_SUFFIX)] for t in tars}
    incomplete = {}
    for task, outputs in enumerate(by_task):
        missing = [tario.name_of(p) for p in outputs if tario.name_of(p) not in done]
        if missing:
            incomplete[task] = f"output {missing[0]} is not finished" + (
                f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    return TarOutputs(tars, unlisted, incomplete, marked)


def finished_outputs(cfg: PipelineConfig) -> tuple[list[FinishedTar], list[str]]:
    """The output tars with a current manifest, and the names of those without one (being written)."""
    return tario.finished_tars(cfg.stage(STAGE).output_dir)


def incomplete_tasks(cfg: PipelineConfig, task_count: int) -> dict[int, str]:
    """The tasks of ``task_count`` with an output not finished, each with why (see :func:`output_state`)."""
    return output_state(cfg, task_count).incomplete


def lone_short_tar_samples(cfg: PipelineConfig) -> int | None:
    """The usable sample count when the whole output is one short ``.INCOMPLETE`` tar (the dataset is
    smaller than ``tar_chunk_size``), else None."""
    folder = cfg.stage(STAGE).output_dir
    tario.set_storage_options(cfg.storage_options)
    tars = tario.file_names(folder, "*.tar")
    marked = tario.file_names(folder, "*.tar" + INCOMPLETE_SUFFIX)
    if len(marked) != 1 or len(tars) > 1 or (tars and tars[0] + INCOMPLETE_SUFFIX != marked[0]):
        return None
    body = tario.read_manifest(tario.join(folder, tars[0] if tars else marked[0]))
    return int(body["sample_count"]) if body is not None else None


def _is_complete(tar: Path, digest: str, short: bool) -> bool:
    body = tario.read_manifest(tar)
    if body is None or body.get("plan_digest") != digest:
        return False  # (in object storage, one request instead of three for an output not written yet)
    return tario.exists(f"{tar}{INCOMPLETE_SUFFIX}") == short


def record_runs(samples: list[PlacedSample]) -> list[tuple[int, int, int]]:
    """``(input tar, start, length)`` ranges covering the samples' member records, in order; records that
    are adjacent in their input merge into one range (one copy call)."""
    runs: list[tuple[int, int, int]] = []
    tar = start = end = -1
    for here, _, members in samples:
        for _, _, offset, size, head, _ in members:  # Member unpacked: no attribute lookups
            if here != tar or head != end:
                if tar >= 0:
                    runs.append((tar, start, end - start))
                tar, start = here, head
            end = offset + ((size + BLOCK - 1) & -BLOCK)  # Member.end
    if tar >= 0:
        runs.append((tar, start, end - start))
    return runs


def output_offsets(samples: list[PlacedSample]) -> dict[str, Any]:
    """The output tar's ``member_offsets``: its members' records lie one after another from byte 0."""
    names, heads, datas, sizes, mtimes = [], [], [], [], []
    position = 0
    for sample in samples:
        for name, _, offset, size, header_offset, mtime in sample.members:
            names.append(name)
            heads.append(position)
            datas.append(position + offset - header_offset)
            sizes.append(size)
            mtimes.append(mtime)
            position += offset - header_offset + ((size + 511) & -512)
    return member_offsets([], columns=(names, heads, datas, sizes, mtimes))


def _write_output_ranges(plan: SampleOrder, j: int, final: Path | str) -> int:
    """:func:`write_output` where an input or the output is in object storage: member records fetched as
    ranged reads (adjacent runs of one input in one batch of at most ``RANGE_BATCH`` bytes, coalesced and
    concurrent; the next batch is fetched while this one is written) and streamed to the output (a
    multipart upload there). The same bytes as the local path (:func:`.tarwriter.record_extent` included)."""
    # (input, [(start, end, zeros the input lacks after that range)]) in output order
    batches: list[tuple[int, list[tuple[int, int, int]]]] = []
    batch_bytes = position = 0
    for tar, start, length in record_runs(plan.chunk(j)):
        readable, missing = record_extent(start, length, plan.input_sizes.get(tar))
        if not batches or batches[-1][0] != tar or batch_bytes + length > RANGE_BATCH:
            batches.append((tar, []))
            batch_bytes = 0
        batches[-1][1].append((start, start + readable, missing))
        batch_bytes += length
        position += length

    def fetch(at: int) -> list[bytes]:
        tar, ranges = batches[at]
        return tario.read_ranges(plan.inputs[tar], [(start, end) for start, end, _ in ranges])

    with ThreadPoolExecutor(max_workers=1) as ahead, tario.open_write(final) as handle:
        pending = ahead.submit(fetch, 0) if batches else None
        for at in range(len(batches)):
            blobs = pending.result()  # type: ignore[union-attr]
            if at + 1 < len(batches):
                pending = ahead.submit(fetch, at + 1)
            for (_, _, missing), data in zip(batches[at][1], blobs):
                handle.write(data)
                if missing:
                    handle.write(bytes(missing))
        end = position + 2 * BLOCK  # the end-of-archive marker, padded to a whole record, as TarWriter
        tail = bytes(2 * BLOCK + (-end % RECORD))
        handle.write(tail)
    return position + len(tail)


def write_output(plan: SampleOrder, j: int, final: Path) -> int:
    """Write output tar ``j`` atomically; returns bytes written."""
    if is_url(final) or any(is_url(p) for p in plan.inputs[:1]):
        return _write_output_ranges(plan, j, final)
    with fsutil.atomic_path(final) as tmp:
        return _write_local(plan, j, tmp)


def _write_local(plan: SampleOrder, j: int, path: Path) -> int:
    """Output tar ``j`` of local inputs written to ``path`` (not atomically: callers write a temporary)."""
    sources: dict[int, int] = {}
    sizes: dict[int, int] = {}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        writer = TarWriter(fd)
        try:
            for tar, start, length in record_runs(plan.chunk(j)):
                src = sources.get(tar)
                if src is None:
                    src = sources[tar] = os.open(plan.inputs[tar], os.O_RDONLY)
                    sizes[tar] = os.fstat(src).st_size
                writer.add_records(src, start, length, sizes[tar])
            writer.close()
        finally:
            writer.close(end_archive=False)  # after an error: only release the file
            os.close(fd)
    finally:
        for src in sources.values():
            os.close(src)
    return writer.size


def _marker(final: Path | str) -> Path | str:
    return f"{final}{INCOMPLETE_SUFFIX}" if is_url(final) else final.with_name(final.name + INCOMPLETE_SUFFIX)


def _write_output_manifest(plan: SampleOrder, j: int, final: Path | str, digest: str, size: int,
                           short: bool) -> tuple[str, int, int]:
    """The manifest (and offsets sidecar) of output ``j``, once its tar is in place."""
    count = len(plan.chunk(j))
    extensions = sorted({m.ext for s in plan.chunk(j) for m in s.members})
    tario.write_manifest(final, count, tar_size=size if is_url(final) else None, plan_digest=digest,
                         chunk_size=plan.chunk_size, short=short,
                         extensions=extensions, every_sample_has=extensions,  # only usable samples are copied
                         member_offsets=output_offsets(plan.chunk(j)))
    return "written", count, size


def produce_output(plan: SampleOrder, output_dir: Path, j: int, short: bool) -> tuple[str, int, int]:
    """Make output ``j`` complete: ``("skipped", 0, 0)`` if it already is, else ``("written", samples, bytes)``."""
    final = output_path(output_dir, j)
    digest = plan.digest(j)
    if _is_complete(final, digest, short):
        return "skipped", 0, 0
    marker = _marker(final)
    if short:  # marker first: a reader never sees the short tar without it (an existing one is kept as is)
        if not tario.exists(marker):
            tario.touch(marker)
    else:
        tario.unlink(marker)
    size = write_output(plan, j, final)
    return _write_output_manifest(plan, j, final, digest, size, short)


class EarlyOutput(NamedTuple):
    """A full output written before its owner was known: a temporary beside its final name."""

    plan: SampleOrder  # the provisional window it was cut from (its bytes and digest are the final plan's)
    digest: str
    tmp: Path | None  # None: the output was already complete
    size: int


def write_early_output(plan: SampleOrder, output_dir: Path, j: int) -> EarlyOutput:
    """Full output ``j`` (local) written to this process's temporary for it, not renamed: whether it is
    this task's is known only once every input is counted (:func:`finish_early_output`)."""
    final = output_path(output_dir, j)
    digest = plan.digest(j)
    if _is_complete(final, digest, False):
        return EarlyOutput(plan, digest, None, 0)
    tmp = fsutil.temp_path_for(final)
    try:
        return EarlyOutput(plan, digest, tmp, _write_local(plan, j, tmp))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def finish_early_output(early: EarlyOutput, output_dir: Path, j: int, mine: bool) -> tuple[str, int, int]:
    """Rename an early output onto its final name if it is this task's (as :func:`produce_output` would
    have written it), else remove it."""
    if not mine or early.tmp is None:
        if early.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                early.tmp.unlink()
        return "skipped", 0, 0
    final = output_path(output_dir, j)
    tario.unlink(_marker(final))
    os.replace(early.tmp, final)
    return _write_output_manifest(early.plan, j, final, early.digest, early.size, False)


def write_threads(configured: int) -> int:
    """Threads that write output tars at once: the copy runs in the kernel without the GIL, so on a
    page-cache-warm node one thread per core goes that much faster; 0 means the CPU count (at most 8)."""
    return configured if configured > 0 else min(os.cpu_count() or 1, 8)


def run_task(cfg: PipelineConfig, task_id: int, task_count: int) -> dict[str, Any]:
    # The plan holds a tuple per sample and a list per sample's members, none in a cycle: collections would
    # only traverse them, more often the more there are (~5% of a task's CPU on 28,000 samples).
    with gc_paused():
        return _run_task(cfg, task_id, task_count)


def _run_task(cfg: PipelineConfig, task_id: int, task_count: int) -> dict[str, Any]:
    block = cfg.stage(STAGE)
    input_dir, output_dir = (v if is_url(v) else Path(v) for v in (block.input_dir, block.output_dir))
    if not tario.is_dir(input_dir):
        raise StageError(f"{STAGE}.input_dir: folder {input_dir} does not exist")
    if not block.file_ext_in_tar:
        raise StageError(f"{STAGE}.file_ext_in_tar: list at least one extension, e.g. [.jpg, .txt]")
    tario.makedirs(output_dir)
    if task_count == 1:  # sole writer of the folder: every temporary in it is a crashed run's
        tario.remove_leftovers(output_dir)
    pool = ThreadPoolExecutor(max_workers=write_threads(block.write_threads))
    futures: dict[int, Future[tuple[str, int, int]]] = {}
    early: dict[int, Future[EarlyOutput]] = {}  # full outputs written while the inputs were still counted
    cleaned: list[bool] = []  # our own leftover temporaries removed (several tasks)

    def write_early(window: SampleOrder, outputs: list[int]) -> None:
        for j in outputs:
            if j not in early:
                early[j] = pool.submit(write_early_output, window, output_dir, j)

    def remove_own_leftovers(mine: range) -> None:
        # Other tasks write beside us: only our outputs' leftovers, not the early outputs we are writing.
        keep = [fsutil.temp_path_for(output_path(output_dir, j)).name for j in early]
        tario.remove_leftovers(output_dir, [tario.name_of(output_path(output_dir, j)) for j in mine], keep)
        cleaned.append(True)

    def submit_ready_chunks(plan: SampleOrder) -> None:
        # Outputs whose samples are all indexed are written while indexing goes on (the copy runs in the
        # kernel, the indexing in Python: they overlap). Not with strict, which must see every input first.
        if plan.total_samples is None:  # one task, total not known yet: every full chunk is ours
            for j in range(len(futures), len(plan.samples) // plan.chunk_size):
                futures[j] = pool.submit(produce_output, plan, output_dir, j, False)
            return
        mine = fsutil.task_range(plan.output_count, task_id, task_count)
        if not cleaned:  # before our first write
            remove_own_leftovers(mine)
        reached = plan.first_sample + len(plan.samples)  # global position the window is indexed up to
        last = plan.output_count - 1
        for j in mine:
            if j not in futures and j not in early:
                if min((j + 1) * plan.chunk_size, plan.total) > reached:
                    break
                futures[j] = pool.submit(produce_output, plan, output_dir, j, j == last and plan.short_count > 0)

    try:
        if task_count > 1 and not block.strict:  # strict must see every input: only the full plan does
            plan = order_task_samples(input_dir, block.tar_chunk_size, block.file_ext_in_tar, task_id, task_count,
                                      exclude=output_dir, on_tar_indexed=submit_ready_chunks,
                                      on_early_outputs=None if is_url(output_dir) else write_early,
                                      records=None if is_url(output_dir) else input_counts.records_dir(output_dir))
        else:
            stream = task_count == 1 and not block.strict
            plan = order_samples(input_dir, block.tar_chunk_size, block.file_ext_in_tar,
                              submit_ready_chunks if stream else None, exclude=output_dir)
        if not plan.inputs:
            raise StageError(f"{STAGE}.input_dir: no .tar files found under {input_dir}")
        for rel, problems in plan.damaged.items():
            log.warning("%s: damaged input %s: %s (its readable samples are used)", STAGE, rel,
                        "; ".join(problems))
        if not plan.total and not plan.missing_members and not plan.damaged:
            raise StageError(f"{STAGE}.input_dir: the {len(plan.inputs)} tar(s) under {input_dir} hold no sample "
                             "at all: did every download fail? (download_images says why in its log, its "
                             "shards' *_stats.json and the run report)")
        if not plan.total:
            raise StageError(f"{STAGE}.file_ext_in_tar: no sample in the {len(plan.inputs)} tar(s) under "
                             f"{input_dir} has all of {block.file_ext_in_tar}"
                             + (f"; e.g. {plan.missing_examples[0]}" if plan.missing_examples else ""))
        if plan.damaged and block.strict:
            raise StageError(f"{STAGE}.strict: {len(plan.damaged)} damaged input tar(s): " + "; ".join(
                f"{rel}: {p[0]}" for rel, p in list(plan.damaged.items())[:EXAMPLES]))
        if plan.missing_members:
            log.warning("%s: %d sample(s) lack an extension of file_ext_in_tar %s and are left out, e.g. %s",
                        STAGE, plan.missing_members, block.file_ext_in_tar, plan.missing_examples[:3])
        if plan.duplicate_keys:
            log.warning("%s: %d sample(s) repeat a key seen earlier (kept), e.g. %s",
                        STAGE, plan.duplicate_keys, plan.duplicate_examples[:3])
        mine = fsutil.task_range(plan.output_count, task_id, task_count)
        if task_count > 1 and not cleaned:
            remove_own_leftovers(mine)
        last = plan.output_count - 1
        for j in mine:
            if j not in futures and j not in early:
                futures[j] = pool.submit(produce_output, plan, output_dir, j, j == last and plan.short_count > 0)
        for j in sorted(early.keys() - set(mine)):  # guessed wrong: another task's output
            try:
                finish_early_output(early.pop(j).result(), output_dir, j, mine=False)
            except OSError as exc:  # its owner writes it; nothing of ours is lost
                log.debug("%s: early output %d, not this task's, failed: %s", STAGE, j, exc)
        written = skipped = samples_written = bytes_written = 0
        progress = Progress(f"{STAGE}: task {task_id} writing tars", len(mine), unit="tars", logger=log)
        for j in mine:
            if j in early:
                outcome, count, size = finish_early_output(early[j].result(), output_dir, j, mine=True)
            else:
                outcome, count, size = futures[j].result()
            if outcome == "skipped":
                skipped += 1
            else:
                written += 1
                samples_written += count
                bytes_written += size
            progress.advance(bytes=bytes_written)
        progress.finish()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    summary: dict[str, Any] = {
        "input_tars": len(plan.inputs),
        "usable_samples": plan.total,
        "indexed_input_tars": plan.indexed_tars,  # the others were placed by their manifests' counts
        "input_counts_from_records": plan.counted_from_records,  # counted by another task (input_counts)
        "output_tars": plan.output_count,
        "chunk_size": plan.chunk_size,
        "task_outputs": (f"{tario.name_of(output_path(output_dir, mine[0]))}.."
                         f"{tario.name_of(output_path(output_dir, mine[-1]))}"
                         if mine else "none"),
        "written": written,
        "skipped_complete": skipped,
        "samples_written": samples_written,
        "bytes_written": bytes_written,
        "missing_members": plan.missing_members,
        "missing_examples": plan.missing_examples,
        "duplicate_keys": plan.duplicate_keys,
        "duplicate_examples": plan.duplicate_examples,
        "damaged_inputs": plan.damaged,
        "skipped_members": plan.skipped_members,
        "members_not_copied": plan.members_not_copied,
    }
    if plan.short_count:
        summary["short_tar"] = {"name": tario.name_of(output_path(output_dir, last)), "samples": plan.short_count}
        if last in mine:
            log.warning("%s: last tar %s holds %d of %d samples; marked %s%s", STAGE,
                        tario.name_of(output_path(output_dir, last)), plan.short_count, plan.chunk_size,
                        tario.name_of(output_path(output_dir, last)), INCOMPLETE_SUFFIX)
    stale = [name for name in tario.file_names(output_dir, "*.tar")
             if name[:-4].isdigit() and int(name[:-4]) >= plan.output_count]
    if stale:
        summary["stale_outputs"] = stale
        log.warning("%s: %s holds tars beyond this plan's %d outputs (from an earlier run?): %s",
                    STAGE, output_dir, plan.output_count, stale[:EXAMPLES])
    return summary
