"""``run_loop`` tunes the cyclic GC for a download and restores it afterwards, even when the run fails."""

import gc

import pytest

from airflow_provider_mmprep.download.pipeline import GC_YOUNG_THRESHOLD, run_loop


def test_gc_tuned_during_the_run_and_restored_after() -> None:
    before = gc.get_threshold()
    seen = {}

    async def body() -> int:
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        return 7

    assert run_loop(body()) == 7
    assert seen["threshold"] == (GC_YOUNG_THRESHOLD, *before[1:])
    assert seen["frozen"] > 0  # what existed at start (modules, classes) is left out of collections
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_gc_restored_when_the_run_fails() -> None:
    before = gc.get_threshold()

    async def body() -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run_loop(body())
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
