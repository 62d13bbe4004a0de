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
- open pieces: ``MAX_OPEN_PIECES`` (two files each).

Writing to object storage (``options.publish_to``), every shard is cut into ``MAX_OPEN_PIECES`` pieces and
uploaded by a :class:`Publisher` thread straight from its pieces, each as soon as it is finished, while
downloads go on; pieces handed out and not yet uploaded (open, or finished and waiting for the upload) are
capped at ``MAX_OPEN_PIECES`` x processes: local disk holds at most one shard's rows per worker process
(docs/object-storage.md).
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
    piece_slots = asyncio.Semaphore(MAX_OPEN_PIECES)
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
    """Uploads shards (:func:`.shard.publish_pieces`) in a thread of its own, one at a time in the order they
    were handed out, each piece as soon as it is finished, so downloading never waits for an upload and the
    last shard's upload ends soon after its last piece; counts the pieces handed out and not yet uploaded,
    so callers hold back new pieces beyond :attr:`limit` (local disk stays bounded)."""

    def __init__(self, options: DownloadOptions, processes: int):
        self.options = options
        self.limit = MAX_OPEN_PIECES * processes  # one shard's rows per process: open or waiting for upload
        self.results: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._outstanding = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._queue: queue.Queue[_Shard | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mmprep-publish", daemon=True)
        self._thread.start()

    def handed_out(self, count: int = 1) -> None:
        with self._lock:
            self._outstanding += count

    def _uploaded(self, _number: int) -> None:
        with self._lock:
            self._outstanding -= 1

    @property
    def room(self) -> bool:
        """Whether another piece may be handed out (raises the uploader's error, if any)."""
        self._raise_if_failed()
        return self._outstanding < self.limit

    def submit(self, shard: "_Shard") -> None:
        """Upload ``shard`` after those submitted before it, its pieces as they finish."""
        self._raise_if_failed()
        self._queue.put(shard)

    def close(self) -> list[dict[str, Any]]:
        """Wait for every submitted shard's upload; the stats of each, or the first upload error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()
        return self.results

    def abort(self) -> None:
        """Stop: the upload in progress is abandoned (no object appears), shards not begun are dropped."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join()

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
            try:
                self.results.append(publish_pieces(shard.job, self.options, shard.paths, shard.start,
                                                   str(self.options.publish_to), shard.joined,
                                                   lambda number, shard=shard: shard.wait(number, self._stopping),
                                                   self._uploaded))
            except BaseException as exc:  # noqa: BLE001 - handed to the downloading side, which fails the task
                self.error = exc


def download_here(jobs: Iterable[ShardJob], options: DownloadOptions, out_dir: Path,
                  on_done: Callable[[bool], None] | None = None) -> list[dict[str, Any]]:
    """Download every job in this process, finishing each shard as it completes: in one piece written in
    place locally, or (``options.publish_to``) in ``MAX_OPEN_PIECES`` pieces uploaded by a :class:`Publisher`."""
    job_iter = iter(jobs)
    shards: dict[int, _Shard] = {}
    results: list[dict[str, Any]] = []
    publisher = Publisher(options, 1) if options.publish_to else None
    pieces_per_shard = MAX_OPEN_PIECES if publisher else 1
    waiting: list[Piece] = []

    async def next_piece() -> Piece | None:
        if publisher is not None:
            while not publisher.room:  # downloads in flight go on meanwhile
                await asyncio.sleep(0.01)
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
        if publisher is not None:
            publisher.handed_out()
        return waiting.pop(0)

    def piece_done(piece: Piece, outcomes: list[Outcome]) -> None:
        shard = shards[piece.job.shard_id]
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
    publisher = Publisher(options, processes) if options.publish_to else None
    if publisher is not None:
        pieces_per_shard = max(pieces_per_shard, MAX_OPEN_PIECES)
    # fork: workers start at once and, unlike spawn, never re-import the caller's ``__main__``. Nothing here
    # holds a lock or a socket at that point: the event loop and sessions are created inside each worker.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    piece_queue = context.Queue(maxsize=processes)
    result_queue = context.Queue()
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
            held_back = False
            while not fed_all:
                if waiting is not None and publisher is not None and not publisher.room:
                    held_back = True  # local disk: wait for an upload to finish
                    break
                try:
                    piece_queue.put_nowait(waiting)
                except queue.Full:
                    break
                if waiting is not None and publisher is not None:
                    publisher.handed_out()
                try:
                    waiting = next(feed)
                except StopIteration:
                    fed_all = True
            try:
                message = result_queue.get(timeout=0.02 if held_back else 0.5)
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
            _kind, shard_id, number, outcomes = message
            shard = shards[shard_id]
            if shard.add(number, outcomes):
                del shards[shard_id]
                if publisher is None:  # else uploaded in a thread, piece by piece: this loop keeps feeding
                    results.append(finish_shard(shard.job, options, out_dir, shard.joined(), shard.paths,
                                                shard.start))
            progress(done.value, ok.value)
        if publisher is not None:
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
