"""The publishing spool's bound (download/pipeline.py): ``$MMPREP_SPOOL_SHARDS`` is read and checked, and
:class:`Publisher` hands out pieces while finished pieces' bytes plus open pieces' rows stay under it."""

from __future__ import annotations

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
