"""The publishing spool's bound (download/pipeline.py): ``$MMPREP_SPOOL_SHARDS`` is read and checked, and
:class:`Publisher` hands out pieces while finished pieces' bytes plus open pieces' rows stay under it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from airflow_provider_mmprep.download import pipeline
from airflow_provider_mmprep.download.options import DownloadOptions
from airflow_provider_mmprep.download.reader import ShardJob


def test_spool_shards_defaults_to_one_and_refuses_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMPREP_SPOOL_SHARDS", raising=False)
    assert pipeline.spool_shards() == 1.0
    monkeypatch.setenv("MMPREP_SPOOL_SHARDS", "2.5")
    assert pipeline.spool_shards() == 2.5
    for bad in ("0", "-1", "many", "nan", "inf"):
        monkeypatch.setenv("MMPREP_SPOOL_SHARDS", bad)
        with pytest.raises(ValueError, match="MMPREP_SPOOL_SHARDS"):
            pipeline.spool_shards()


def test_room_counts_finished_bytes_and_open_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One process, 8 rows per shard, one row per piece: 8 rows may be out; a finished piece then counts by
    its bytes (at the mean bytes per row); its upload frees the room and wakes the feeder."""
    monkeypatch.delenv("MMPREP_SPOOL_SHARDS", raising=False)
    options = DownloadOptions(number_sample_per_shard=8, publish_to="memory://unused")
    woken: list[bool] = []
    publisher = pipeline.Publisher(options, 1, lambda: woken.append(True))
    try:
        urls = [f"http://example.invalid/{i}" for i in range(8)]
        job = ShardJob(shard_id=0, keys=[f"{i:09d}" for i in range(8)], urls=urls, captions=None)
        pieces = []
        for number in range(8):
            path = tmp_path / f"piece{number}"
            path.write_bytes(b"x" * 1000)
            pieces.append(pipeline.Piece(job, number, range(number, number + 1), path))
        for piece in pieces[:7]:
            assert publisher.room()
            publisher.handed_out(piece)
        assert publisher.room() and publisher.spooled_rows() == 7
        publisher.handed_out(pieces[7])
        assert not publisher.room()
        publisher.finished(pieces[0])  # 1000 bytes per row so far: the same 8 rows
        assert not publisher.room() and publisher.bound_bytes() == 8000
        publisher._uploaded(0, 0)
        assert woken and publisher.room() and publisher.spooled_rows() == 7
    finally:
        publisher.abort()


def test_a_failed_upload_leaves_pieces_being_written_and_its_error_reaches_the_downloader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard's upload fails after its first piece while its second is still being written: the second
    piece's file stays (removing it under its writer made the download fail with a missing file instead of
    the upload's error, as a CI run once did), finishing it raises the upload's error, and ``abort`` then
    removes every piece of the shard from the spool."""
    from airflow_provider_mmprep.download import shard as shard_module

    def failing_piece_members(path: Path, offset: int) -> tuple[list, int]:
        raise OSError(f"injected upload failure at {path.name}")

    monkeypatch.setattr(shard_module, "piece_members", failing_piece_members)
    options = DownloadOptions(number_sample_per_shard=2, publish_to=f"memory://mmprep-fail-{tmp_path.name}/out")
    publisher = pipeline.Publisher(options, 1)
    try:
        job = ShardJob(shard_id=0, keys=["000000000", "000000001"], urls=["http://example.invalid/0"] * 2,
                       captions=None)
        paths = [tmp_path / "piece0", tmp_path / "piece1"]
        paths[0].write_bytes(b"\0" * 1024)
        with open(paths[1], "wb") as being_written:
            being_written.write(b"\0" * 512)
            shard = pipeline._Shard(job, paths)
            pieces = [pipeline.Piece(job, number, range(number, number + 1), paths[number]) for number in (0, 1)]
            publisher.submit(shard)
            for piece in pieces:
                publisher.handed_out(piece)
            publisher.finished(pieces[0])
            shard.add(0, [])
            deadline = time.monotonic() + 30
            while publisher.error is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert isinstance(publisher.error, OSError)
            assert paths[1].exists()  # its writer still holds it
            being_written.write(b"\0" * 512)
        with pytest.raises(OSError, match="injected upload failure at piece0"):
            publisher.finished(pieces[1])
        with pytest.raises(OSError, match="injected upload failure"):
            publisher.room()
    finally:
        publisher.abort()
    assert not paths[0].exists() and not paths[1].exists()
