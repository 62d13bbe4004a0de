"""download_images' engine: one event loop and one connection pool per worker process for the whole task.

Why: fetching one piece of one shard at a time, with a fresh loop per piece, left all of a process's fetch
slots idle while the last, slowest URLs of its piece ran into their deadline (4x the clean run time when
10% of URLs misbehave). Here URLs flow to the fetch slots across piece and shard boundaries, a shard is
finished (tar, parquet, manifest, stats) as soon as its last row is settled, and a request that has been
waiting for ``STALL_SECONDS`` (at most a quarter of the deadline) gives up its fetch slot ("demoted") so new work can start. A demoted request
keeps its socket: it still counts against ``max_connections_per_host`` (the fetcher's per-host slots), so new
work goes to other hosts, and against a hard cap on open requests.

Output does not depend on timing: a piece writes its samples in key order (``shard._OrderedSampleWriter``)
and a shard is its pieces joined in order, so tars are byte-identical whatever the process count and
whichever URLs were slow.

Bounds per worker process (documented in docs/download_images.md):

- transfers started and not yet demoted: ``threads``;
- open requests, demoted ones included: :func:`socket_cap` = ``SOCKETS_PER_SLOT`` x ``threads``, at most a
  quarter of the file-descriptor limit;
- finished samples waiting for an earlier, slower one: ``shard.MEMORY_CAP_BYTES`` over all open pieces,
  then a spill file on disk;
- bodies waiting for decode: ``threads``;
- open pieces: ``MAX_OPEN_PIECES`` (two files each); ``PUBLISH_OPEN_PIECES`` when publishing (pieces of
  1/8 shard: the same rows open as a local run's).

Writing to object storage (``options.publish_to``), every shard is cut into ``MAX_OPEN_PIECES`` pieces and
uploaded by a :class:`Publisher` (``UPLOAD_THREADS`` shards at once, each its pieces in order) straight from
its pieces, each as soon as it is finished and next in its shard, while downloads go on. Local disk is
bounded by what is spooled: a piece is handed out only while the finished pieces waiting for their upload
(their bytes) plus the rows of open pieces (at the mean bytes per row seen so far) stay under
``spool_shards()`` shards per worker process (default one; ``$MMPREP_SPOOL_SHARDS``; docs/object-storage.md).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator

from . import shard as shard_module
from .fetcher import Fetcher
from .options import DownloadOptions
from .reader import ShardJob
from .resizer import ImageRejected, process_image
from .shard import (FAILED_DOWNLOAD, FAILED_RESIZE, SUCCESS, MemoryBudget, Outcome, OrderedSampleWriter,
                    finish_shard, piece_path, publish_pieces, split_rows)
from ..fsutil import TMP_MARKER
from ..procutil import die_with_parent
from ..tarwriter import TarWriter

#: A request still unanswered after this long (or a quarter of ``timeout``, if shorter) stops holding a fetch
#: slot; it keeps its socket.
STALL_SECONDS = 1.0
#: Open requests per fetch slot, demoted ones included: the hard cap on sockets is this times ``threads``.
SOCKETS_PER_SLOT = 4
#: Pieces a worker keeps open at once (one being dispatched, the others waiting for their stragglers).
MAX_OPEN_PIECES = 8
#: The same when publishing, where a piece is 1/``MAX_OPEN_PIECES`` of a shard: as many rows open for
#: stragglers as a local run's ``MAX_OPEN_PIECES`` whole-shard pieces (local disk is bounded by the spool).
PUBLISH_OPEN_PIECES = MAX_OPEN_PIECES * MAX_OPEN_PIECES
#: Shards a :class:`Publisher` uploads at once: each an open multipart upload with one part buffer
#: (``storage.PART_SIZE``), so its memory is this many part buffers.
UPLOAD_THREADS = 4
#: Default bound on a publishing task's spool, in shards per worker process (``$MMPREP_SPOOL_SHARDS``).
SPOOL_SHARDS = 1.0


def spool_shards() -> float:
    """Shards' worth of rows per worker process the spool may hold: ``$MMPREP_SPOOL_SHARDS`` (> 0), else
    ``SPOOL_SHARDS``."""
    text = os.environ.get("MMPREP_SPOOL_SHARDS", "").strip()
    if not text:
        return SPOOL_SHARDS
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"$MMPREP_SPOOL_SHARDS must be a positive number of shards, not {text!r}")
    return value


def socket_cap(threads: int) -> int:
    """The most requests a worker process keeps open, demoted ones included."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = 1 << 20
    except (ImportError, ValueError, OSError):  # pragma: no cover - not Linux
        soft = 1024
    return max(threads, min(SOCKETS_PER_SLOT * threads, soft // 4))


@dataclass
class Piece:
    """Rows ``rows`` of ``job``, written as tar members (no end-of-archive marker) to ``path``."""

    job: ShardJob
    number: int  # position of this piece in its shard
    rows: range
    path: Path


class _OpenPiece:
    """A piece being downloaded: its tar piece, spill file and the outcomes settled so far."""

    def __init__(self, piece: Piece, options: DownloadOptions, budget: MemoryBudget):
        self.piece = piece
        self.spill_path = piece.path.with_name(piece.path.name.replace(TMP_MARKER, f".spill{TMP_MARKER}"))
        self.spill = open(self.spill_path, "wb+")
        self.tar = TarWriter(piece.path)
        self.writer = OrderedSampleWriter(self.tar, self.spill, piece.job, options, budget)
        self.writer.next_index = piece.rows.start
        self.outcomes: dict[int, Outcome] = {}

    @property
    def complete(self) -> bool:
        return len(self.outcomes) == len(self.piece.rows)

    def settle(self, index: int, outcome: Outcome, data: bytes | None) -> None:
        self.outcomes[index] = outcome
        self.writer.accept(index, outcome, data)

    def close(self) -> list[Outcome]:
        self.tar.close(end_archive=False)
        self.spill.close()
        self.spill_path.unlink(missing_ok=True)
        return [self.outcomes[i] for i in self.piece.rows]

    def discard(self) -> None:
        for closing in (lambda: self.tar.close(end_archive=False), self.spill.close):
            try:
                closing()
            except OSError:
                pass
        self.spill_path.unlink(missing_ok=True)
        self.piece.path.unlink(missing_ok=True)


async def pump(options: DownloadOptions, next_piece: Callable[[], Awaitable[Piece | None]],
               piece_done: Callable[[Piece, list[Outcome]], None],
               on_done: Callable[[bool], None] | None = None) -> None:
    """Download every piece ``next_piece`` hands out (until it returns None) on one loop and one session.

    ``piece_done`` gets each piece, closed, with its outcomes in row order, as soon as its last row settles.
    A local error (a full disk while writing) stops the pump and propagates; open pieces are removed.
    """
    loop = asyncio.get_running_loop()
    sockets_cap = socket_cap(options.threads)
    stall_after = min(STALL_SECONDS, options.timeout / 4)
    active = asyncio.Semaphore(options.threads)
    sockets = asyncio.Semaphore(sockets_cap)
    waiting_bodies = asyncio.Semaphore(max(1, options.threads))
    piece_slots = asyncio.Semaphore(PUBLISH_OPEN_PIECES if options.publish_to else MAX_OPEN_PIECES)
    budget = MemoryBudget(shard_module.MEMORY_CAP_BYTES)
    executor = ThreadPoolExecutor(options.image_threads, thread_name_prefix="mmprep-image")
    open_pieces: list[_OpenPiece] = []
    tasks: set[asyncio.Task] = set()
    errors: list[BaseException] = []

    def settle(state: _OpenPiece, index: int, outcome: Outcome, data: bytes | None) -> None:
        state.settle(index, outcome, data)
        if on_done is not None:
            on_done(outcome.status == SUCCESS)
        if state.complete:
            open_pieces.remove(state)
            outcomes = state.close()
            piece_slots.release()
            piece_done(state.piece, outcomes)

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]

    async def fetch(fetcher: Fetcher, state: _OpenPiece, index: int, url: str) -> None:
        demoted = False

        def demote() -> None:  # only waiting: let a new transfer take the slot; the socket stays counted
            nonlocal demoted
            demoted = True
            active.release()

        timer = loop.call_later(stall_after, demote)
        body = None
        try:
            result = await fetcher.fetch(url)
            body = result.body
            if body:  # backpressure: the slot is held until decode can take the body
                await waiting_bodies.acquire()
        finally:
            timer.cancel()
            if not demoted:
                active.release()
            sockets.release()
        if body is None:
            settle(state, index, Outcome(FAILED_DOWNLOAD, result.error, result.transient), None)
            return
        if not body:
            settle(state, index, Outcome(FAILED_DOWNLOAD, "empty body"), None)
            return
        data = None
        try:
            image = await loop.run_in_executor(executor, process_image, body, options)
        except ImageRejected as exc:
            outcome = Outcome(FAILED_RESIZE, str(exc))
        except Exception as exc:  # noqa: BLE001 - a Pillow bug on one image must not end the task
            outcome = Outcome(FAILED_RESIZE, f"image processing error: {type(exc).__name__}: {exc}"[:200])
        else:
            data = image.data
            outcome = Outcome(SUCCESS, None, False, image.width, image.height, image.original_width,
                              image.original_height, image.hash)
        finally:
            waiting_bodies.release()
        settle(state, index, outcome, data)

    try:
        async with Fetcher(options, concurrency=sockets_cap) as fetcher:
            while not errors:
                await piece_slots.acquire()
                piece = await next_piece()
                if piece is None:
                    break
                state = _OpenPiece(piece, options, budget)
                open_pieces.append(state)
                if not piece.rows:
                    open_pieces.remove(state)
                    piece_slots.release()
                    piece_done(piece, state.close())
                    continue
                for index in piece.rows:
                    url = piece.job.urls[index]
                    if not url:
                        settle(state, index, Outcome(FAILED_DOWNLOAD, "empty URL"), None)
                        continue
                    await sockets.acquire()
                    await active.acquire()
                    if errors:
                        active.release()
                        sockets.release()
                        break
                    task = asyncio.ensure_future(fetch(fetcher, state, index, url))
                    tasks.add(task)
                    task.add_done_callback(finished)
            while tasks and not errors:
                await asyncio.wait(list(tasks), return_when=asyncio.FIRST_EXCEPTION)
        if errors:
            raise errors[0]
    except BaseException:
        for task in list(tasks):
            task.cancel()
        for state in open_pieces:
            state.discard()
        raise
    finally:
        executor.shutdown(wait=True)


#: Young-generation threshold of the cyclic GC while a pump runs (Python's default is 700).
GC_YOUNG_THRESHOLD = 20_000


def run_loop(coroutine: Any) -> Any:
    """Run ``coroutine`` on a fresh loop (uvloop where installed) with the cyclic GC tuned for the download.

    Every request allocates short-lived containers (futures, tasks, header lists, body chunks, outcomes,
    tar member names), which at the default threshold triggers a young collection every few requests and a full
    one, walking every object the imports created, every few hundred: several percent of the CPU per image.
    Freezing what exists at start (modules, classes: never garbage) and a larger young threshold keep that
    down; reference counting still frees almost everything at once, and the few cycles (exception
    tracebacks) wait at most ``GC_YOUNG_THRESHOLD`` allocations, a bounded amount of memory."""
    thresholds = gc.get_threshold()
    gc.freeze()  # no collection first: a full one over the start-up heap costs ~0.07 CPU-s per worker
    gc.set_threshold(GC_YOUNG_THRESHOLD, *thresholds[1:])
    try:
        try:
            import uvloop  # optional: a faster event loop where installed
        except ImportError:
            return asyncio.run(coroutine)
        return uvloop.run(coroutine)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


class Publisher:
    """Uploads shards (:func:`.shard.publish_pieces`) in ``UPLOAD_THREADS`` threads of its own, each shard's
    pieces in order as soon as each is finished and next in its shard, shards independently of one another
    (taken in the order they were handed out), so neither downloading nor a later shard waits for a slow
    piece of an earlier shard.

    It also bounds the spool: :meth:`room` says whether another piece may be handed out, i.e. whether the
    bytes of finished pieces waiting for their upload plus the rows of open pieces (at the mean bytes per
    row of the pieces finished so far) stay under :attr:`bound_rows` rows = ``spool_shards()`` x processes x
    rows per shard. ``wake`` is called (from an upload thread) whenever an upload frees room."""

    def __init__(self, options: DownloadOptions, processes: int, wake: Callable[[], None] = lambda: None):
        self.options = options
        self.bound_rows = max(1.0, spool_shards() * processes * options.number_sample_per_shard)
        self.results: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.wake = wake
        self._open_rows = 0  # rows of pieces handed out and not finished
        self._waiting_bytes = 0  # finished pieces not yet uploaded
        self._sizes: dict[tuple[int, int], int] = {}
        self._seen_rows = self._seen_bytes = 0  # every finished piece: the mean bytes per row
        self._unpublished: dict[int, _Shard] = {}  # submitted, not uploaded: abort removes their pieces
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._queue: queue.Queue[_Shard | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"mmprep-publish-{i}", daemon=True)
                         for i in range(UPLOAD_THREADS)]
        for thread in self._threads:
            thread.start()

    def handed_out(self, piece: Piece) -> None:
        with self._lock:
            self._open_rows += len(piece.rows)

    def finished(self, piece: Piece) -> None:
        """``piece`` is complete on disk (call before its upload may take it; raises an upload's error)."""
        self._raise_if_failed()
        size = piece.path.stat().st_size
        with self._lock:
            self._open_rows -= len(piece.rows)
            self._waiting_bytes += size
            self._sizes[(piece.job.shard_id, piece.number)] = size
            self._seen_rows += len(piece.rows)
            self._seen_bytes += size

    def _uploaded(self, shard_id: int, number: int) -> None:
        with self._lock:
            self._waiting_bytes -= self._sizes.pop((shard_id, number), 0)
        self.wake()

    def _row_bytes(self) -> float:
        """The mean bytes per row of the pieces finished so far (0.0 before the first); hold ``_lock``."""
        return self._seen_bytes / self._seen_rows if self._seen_rows else 0.0

    def spooled_rows(self) -> float:
        """What the spool holds or will hold for the pieces handed out, in rows at the mean size."""
        with self._lock:
            mean = self._row_bytes()
            return self._open_rows + (self._waiting_bytes / mean if mean else 0.0)

    def bound_bytes(self) -> float:
        """The bound in bytes at the mean bytes per row seen so far (0 before a piece has finished)."""
        with self._lock:
            return self.bound_rows * self._row_bytes()

    def room(self) -> bool:
        """Whether another piece may be handed out (raises an upload's error, if any)."""
        self._raise_if_failed()
        return self.spooled_rows() < self.bound_rows

    def submit(self, shard: "_Shard") -> None:
        """Upload ``shard`` (after those submitted before it have begun), its pieces as they finish."""
        self._raise_if_failed()
        with self._lock:
            self._unpublished[shard.job.shard_id] = shard
        self._queue.put(shard)

    def close(self) -> list[dict[str, Any]]:
        """Wait for every submitted shard's upload; the stats of each (in shard order), or the first error."""
        self._stop_threads()
        self._raise_if_failed()
        return sorted(self.results, key=lambda stats: stats["shard"])

    def abort(self) -> None:
        """Stop: uploads in progress are abandoned (no object appears), shards not begun are dropped, and the
        pieces of every shard not uploaded are removed from the spool (call once the downloads have stopped
        handing pieces back; a worker still writing one keeps an unlinked file until it is killed)."""
        self.wake = lambda: None  # the caller is failing: nobody waits for room
        self._stopping.set()
        self._stop_threads()
        for shard in self._unpublished.values():
            for path in shard.paths:
                path.unlink(missing_ok=True)

    def _stop_threads(self) -> None:
        for thread in self._threads:
            if thread.is_alive():
                self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            shard = self._queue.get()
            if shard is None:
                return
            if self.error is not None or self._stopping.is_set():
                continue
            shard_id = shard.job.shard_id
            try:
                stats = publish_pieces(shard.job, self.options, shard.paths, shard.start,
                                       str(self.options.publish_to), shard.joined,
                                       lambda number, shard=shard: shard.wait(number, self._stopping),
                                       lambda number, shard_id=shard_id: self._uploaded(shard_id, number))
                with self._lock:
                    self.results.append(stats)
                    del self._unpublished[shard_id]
            except BaseException as exc:  # noqa: BLE001 - handed to the downloading side, which fails the task
                if self.error is None:
                    self.error = exc
                self._stopping.set()  # the other uploads stop too
                self.wake()


def download_here(jobs: Iterable[ShardJob], options: DownloadOptions, out_dir: Path,
                  on_done: Callable[[bool], None] | None = None) -> list[dict[str, Any]]:
    """Download every job in this process, finishing each shard as it completes: in one piece written in
    place locally, or (``options.publish_to``) in ``MAX_OPEN_PIECES`` pieces uploaded by a :class:`Publisher`."""
    job_iter = iter(jobs)
    shards: dict[int, _Shard] = {}
    results: list[dict[str, Any]] = []
    room_event: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def wake() -> None:  # from an upload thread: room may have been freed
        if room_event:
            loop, event = room_event[0]
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has ended
                pass

    publisher = Publisher(options, 1, wake) if options.publish_to else None
    pieces_per_shard = MAX_OPEN_PIECES if publisher else 1
    waiting: list[Piece] = []

    async def next_piece() -> Piece | None:
        if publisher is not None:
            if not room_event:
                room_event.append((asyncio.get_running_loop(), asyncio.Event()))
            event = room_event[0][1]
            while True:  # downloads in flight go on meanwhile; an upload or a finished piece wakes us
                event.clear()
                if publisher.room():
                    break
                await event.wait()
        if not waiting:
            job = next(job_iter, None)
            if job is None:
                return None
            ranges = split_rows(len(job), pieces_per_shard)
            paths = [piece_path(out_dir, job.shard_id, i) for i in range(len(ranges))]
            shards[job.shard_id] = _Shard(job, paths)
            if publisher is not None:
                publisher.submit(shards[job.shard_id])
            waiting.extend(Piece(job, number, rows, paths[number]) for number, rows in enumerate(ranges))
        piece = waiting.pop(0)
        if publisher is not None:
            publisher.handed_out(piece)
        return piece

    def piece_done(piece: Piece, outcomes: list[Outcome]) -> None:
        shard = shards[piece.job.shard_id]
        if publisher is not None:
            publisher.finished(piece)
            if room_event:
                room_event[0][1].set()
        if shard.add(piece.number, outcomes):
            del shards[piece.job.shard_id]
            if publisher is None:  # else its upload has its pieces already
                results.append(finish_shard(shard.job, options, out_dir, shard.joined(), shard.paths, shard.start))

    try:
        run_loop(pump(options, next_piece, piece_done, on_done))
        if publisher is not None:
            results += publisher.close()
    except BaseException:
        if publisher is not None:
            publisher.abort()
        raise
    finally:
        for shard in shards.values():
            for path in shard.paths:
                path.unlink(missing_ok=True)
    return results


# --- several worker processes -------------------------------------------------------------------------------

_done_counter: Any = None
_ok_counter: Any = None


def _count_in_worker(success: bool) -> None:
    with _done_counter.get_lock():
        _done_counter.value += 1
    if success:
        with _ok_counter.get_lock():
            _ok_counter.value += 1


def _worker(pieces: Any, results: Any, done: Any, ok: Any, options: DownloadOptions, parent: int) -> None:
    """A worker process: pump the pieces the parent queues until it queues None; report each finished piece.

    It ends when the task process ``parent`` dies (even by SIGKILL), instead of living on as an orphan that
    keeps downloading into files the rerun has already discarded."""
    global _done_counter, _ok_counter
    _done_counter, _ok_counter = done, ok
    die_with_parent(parent)

    async def next_piece() -> Piece | None:
        return await asyncio.get_running_loop().run_in_executor(None, pieces.get)

    def piece_done(piece: Piece, outcomes: list[Outcome]) -> None:
        results.put(("piece", piece.job.shard_id, piece.number, outcomes))

    try:
        run_loop(pump(options, next_piece, piece_done, _count_in_worker))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which fails the task
        try:
            results.put(("error", exc))
        except Exception:  # noqa: BLE001 - not picklable: send its text
            results.put(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        return
    results.put(("finished",))


class _Shard:
    """A shard whose pieces are out being downloaded."""

    def __init__(self, job: ShardJob, paths: list[Path]):
        self.job, self.paths, self.start = job, paths, time.time()
        self.outcomes: list[list[Outcome] | None] = [None] * len(paths)
        self.left = len(paths)
        self._finished = [threading.Event() for _ in paths]

    def add(self, number: int, outcomes: list[Outcome]) -> bool:
        """Record piece ``number``'s outcomes (its file is complete); True once every piece is back."""
        self.outcomes[number] = outcomes
        self.left -= 1
        self._finished[number].set()
        return self.left == 0

    def wait(self, number: int, stopping: threading.Event) -> None:
        """Block until piece ``number`` is finished (for the uploader); raise if ``stopping`` is set first."""
        while not self._finished[number].wait(0.1):
            if stopping.is_set():
                raise RuntimeError("download stopped")

    def joined(self) -> list[Outcome]:
        return [o for piece_outcomes in self.outcomes for o in piece_outcomes or []]


def download_in_processes(jobs: Iterable[ShardJob], options: DownloadOptions, out_dir: Path,
                          pieces_per_shard: int, progress: Callable[[int, int], None]) -> list[dict[str, Any]]:
    """Download every job with ``options.processes`` long-lived worker processes.

    Each shard is cut into ``pieces_per_shard`` contiguous pieces; pieces go through one queue to whichever
    worker has room, about one waiting per worker, and a shard is finished here once all its pieces are back.
    """
    processes = options.processes
    # fork: workers start at once and, unlike spawn, never re-import the caller's ``__main__``. Nothing here
    # holds a lock or a socket at that point: the event loop and sessions are created inside each worker.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    piece_queue = context.Queue(maxsize=processes)
    result_queue = context.Queue()
    # an upload that frees room in the spool wakes the loop below (no polling while held back)
    publisher = Publisher(options, processes, lambda: result_queue.put(("room",))) if options.publish_to else None
    if publisher is not None:
        pieces_per_shard = max(pieces_per_shard, MAX_OPEN_PIECES)
    done, ok = context.Value("q", 0), context.Value("q", 0)
    workers = [context.Process(target=_worker, args=(piece_queue, result_queue, done, ok, options, os.getpid()),
                               daemon=True) for _ in range(processes)]
    for worker in workers:
        worker.start()
    shards: dict[int, _Shard] = {}
    results: list[dict[str, Any]] = []

    def pieces() -> Iterator[Piece | None]:
        for job in jobs:
            ranges = split_rows(len(job), pieces_per_shard)
            paths = [piece_path(out_dir, job.shard_id, i) for i in range(len(ranges))]
            shards[job.shard_id] = _Shard(job, paths)
            if publisher is not None:
                publisher.submit(shards[job.shard_id])
            for number, rows in enumerate(ranges):
                yield Piece(job, number, rows, paths[number])
        for _ in range(processes):
            yield None  # one stop sign per worker

    finished_workers = 0
    try:
        feed = pieces()
        waiting = next(feed, None)
        fed_all = False
        while finished_workers < processes:
            while not fed_all:
                if waiting is not None and publisher is not None and not publisher.room():
                    break  # local disk: an upload that frees room wakes us ("room")
                try:
                    piece_queue.put_nowait(waiting)
                except queue.Full:
                    break
                if waiting is not None and publisher is not None:
                    publisher.handed_out(waiting)
                try:
                    waiting = next(feed)
                except StopIteration:
                    fed_all = True
            try:
                message = result_queue.get(timeout=0.5)
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"download worker process {dead[0].pid} ended with exit code "
                                       f"{dead[0].exitcode}")
                progress(done.value, ok.value)
                continue
            if message[0] == "error":
                raise message[1]
            if message[0] == "finished":
                finished_workers += 1
                continue
            if message[0] == "room":
                continue
            _kind, shard_id, number, outcomes = message
            shard = shards[shard_id]
            if publisher is not None:
                publisher.finished(Piece(shard.job, number, range(len(outcomes)), shard.paths[number]))
            if shard.add(number, outcomes):
                del shards[shard_id]
                if publisher is None:  # else uploaded in a thread, piece by piece: this loop keeps feeding
                    results.append(finish_shard(shard.job, options, out_dir, shard.joined(), shard.paths,
                                                shard.start))
            progress(done.value, ok.value)
        if publisher is not None:
            publisher.wake = lambda: None  # nobody reads the queue any more: no message may stay in it
            results += publisher.close()
        progress(done.value, ok.value)
        return results
    except BaseException:
        if publisher is not None:
            publisher.abort()
        raise
    finally:
        for worker in workers:
            if worker.is_alive() and finished_workers < processes:
                worker.kill()
        for worker in workers:
            worker.join()
        for shard in shards.values():  # unfinished shards: remove their pieces (a rerun redoes them)
            for path in shard.paths:
                path.unlink(missing_ok=True)
