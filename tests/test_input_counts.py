"""Input counts recorded once for every reorganize_tar task (input_counts): the records themselves, and
tasks on img2dataset-style shards (no manifests) that read them instead of the headers of inputs they do
not copy from."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import pytest

from airflow_provider_mmprep import input_counts, tarindex
from airflow_provider_mmprep.stages import StageError
from airflow_provider_mmprep.stages import reorganize_tar as stage
from airflow_provider_mmprep.tarindex import count_samples, index_tar
from airflow_provider_mmprep.testing.shards import download_style_samples, write_tar

from test_reorganize_tar import digests, make_cfg, run_all, temporaries  # (tests/ is on the path)

pytestmark = pytest.mark.skipif(tarindex._tarwalk is None, reason="the compiled walker is not built")

REL = "part-000/00003.tar"


def shards(raw: Path, counts: list[int], seed: int = 5) -> list[Path]:
    rng = random.Random(seed)
    return [write_tar(raw / f"{shard:05d}.tar", download_style_samples(shard, count, rng, (3_000, 5_000)))
            for shard, count in enumerate(counts)]


def test_a_record_gives_back_the_counts_of_the_input_as_it_was_recorded(tmp_path: Path) -> None:
    tar = shards(tmp_path / "raw", [9])[0]
    counts, stat = count_samples(tar), tar.stat()
    assert counts is not None and counts == input_counts.counts_of_index(index_tar(tar))
    folder = tmp_path / "records"
    input_counts.save(folder, REL, stat, counts)
    assert input_counts.load(folder, REL, stat) == counts
    assert input_counts.load(folder, "part-000/00004.tar", stat) is None  # another input's
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten, same size
    assert input_counts.load(folder, REL, tar.stat()) is None
    with open(tar, "ab") as grown:
        grown.write(bytes(10240))
    assert input_counts.load(folder, REL, tar.stat()) is None
    assert not temporaries(folder)


@pytest.mark.parametrize("damage", [
    lambda body: body.update(kinds=base64.b64encode(base64.b64decode(body["kinds"])[:-1]).decode()),
    lambda body: body.update(kinds=base64.b64encode(bytes([7]) * len(body["keys"])).decode()),  # no kind 7
    lambda body: body.update(keys=[1] * len(body["keys"])),
    lambda body: body.update(skipped_members=-1),
    lambda body: body.update(version=body["version"] + 1),
    lambda body: body.update(signatures="jpg"),
    lambda body: body.pop("keys"),
])
def test_a_damaged_record_is_not_used(tmp_path: Path, damage: Callable[[dict[str, Any]], None]) -> None:
    tar = shards(tmp_path / "raw", [6])[0]
    folder, stat = tmp_path / "records", tar.stat()
    input_counts.save(folder, REL, stat, count_samples(tar))  # type: ignore[arg-type]
    record = input_counts.record_path(folder, REL)
    body = json.loads(record.read_bytes())
    damage(body)
    record.write_text(json.dumps(body))
    assert input_counts.load(folder, REL, stat) is None
    record.write_text(json.dumps(body)[:-9])  # cut short
    assert input_counts.load(folder, REL, stat) is None


def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The inputs whose headers the stage reads (in full or count-only), by name, in order."""
    seen: list[str] = []
    real_index, real_count = stage._index, stage.count_samples

    def index(path, *args):
        seen.append(Path(path).name)
        return real_index(path, *args)

    def count(path):
        seen.append(Path(path).name)
        return real_count(path)

    monkeypatch.setattr(stage, "_index", index)
    monkeypatch.setattr(stage, "count_samples", count)
    return seen


def test_tasks_read_the_headers_of_only_the_inputs_they_copy_from_once_one_task_recorded_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six inputs of 8 samples, 12 outputs of 4: each of 3 tasks copies from two inputs. The first task
    reads all six (nobody recorded them yet); the later ones take the others' counts from its records."""
    raw = tmp_path / "raw"
    shards(raw, [8] * 6)
    run_all(make_cfg(raw, tmp_path / "reference", 4), 1)
    out = tmp_path / "out"
    seen = reads(monkeypatch)
    first = stage.run_task(make_cfg(raw, out, 4), 0, 3)
    assert sorted(set(seen)) == [f"{s:05d}.tar" for s in range(6)] and first["input_counts_from_records"] == 0
    assert len(list((out / input_counts.RECORDS_DIR).glob("*.json"))) == 6
    for task, copied_from in ((1, ["00002.tar", "00003.tar"]), (2, ["00004.tar", "00005.tar"])):
        seen.clear()
        summary = stage.run_task(make_cfg(raw, out, 4), task, 3)
        assert sorted(set(seen)) == copied_from
        assert summary["input_counts_from_records"] == 4 and summary["usable_samples"] == 48
    assert digests(out) == digests(tmp_path / "reference")
    assert not temporaries(out)
    records = {p.name: p.stat().st_mtime_ns for p in (out / input_counts.RECORDS_DIR).iterdir()}
    stage.run_task(make_cfg(raw, out, 4), 1, 3)  # a rerun: its own inputs' records stay as they are
    assert {p.name: p.stat().st_mtime_ns for p in (out / input_counts.RECORDS_DIR).iterdir()} == records


def test_a_record_of_an_input_rewritten_since_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An input that changed after the records were written (another count, same name) is read again,
    recorded anew, and every task's outputs follow the new input."""
    raw = tmp_path / "raw"
    tars = shards(raw, [8] * 6)
    out = tmp_path / "out"
    run_all(make_cfg(raw, out, 4), 3)
    write_tar(tars[5], download_style_samples(5, 13, random.Random(9), (3_000, 5_000)))
    run_all(make_cfg(raw, tmp_path / "reference", 4), 1)
    seen = reads(monkeypatch)
    again = [stage.run_task(make_cfg(raw, out, 4), 0, 3)]
    assert "00005.tar" in seen and again[0]["input_counts_from_records"] >= 2  # 00003, 00004 at least
    assert input_counts.load(out / input_counts.RECORDS_DIR, "00005.tar", tars[5].stat()) == count_samples(tars[5])
    again += [stage.run_task(make_cfg(raw, out, 4), task, 3) for task in (1, 2)]
    assert [s["usable_samples"] for s in again] == [53] * 3
    assert digests(out) == digests(tmp_path / "reference")


def test_a_record_its_tar_contradicts_fails_the_task_that_copies_from_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw"
    shards(raw, [8] * 6)
    out = tmp_path / "out"
    stage.run_task(make_cfg(raw, out, 4), 0, 3)
    record = input_counts.record_path(out / input_counts.RECORDS_DIR, "00002.tar")
    body = json.loads(record.read_bytes())
    body["keys"].pop()
    body["kinds"] = base64.b64encode(base64.b64decode(body["kinds"])[:-1]).decode()
    record.write_text(json.dumps(body))
    # the task does not guess that it copies from 00002.tar, so it takes the count from the record first
    monkeypatch.setattr(stage, "_likely_feeding", lambda sizes, task, tasks: set())
    with pytest.raises(StageError, match=r"00002\.tar has 8 usable sample\(s\) but its record .*says 7.*Delete"):
        stage.run_task(make_cfg(raw, out, 4), 1, 3)


def file_system_of(path: Path) -> str:
    """The type of the file system holding ``path`` (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        where = fields[1].replace("\\040", " ")
        if str(path).startswith(where.rstrip("/") + "/") and len(where) > len(best):
            best, kind = where, fields[2]
    return kind


def test_a_file_is_cached_until_its_pages_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "input.tar"
    with open(path, "wb") as handle:
        handle.write(random.Random(1).randbytes(4 << 20))
        handle.flush()
        os.fsync(handle.fileno())  # clean pages: the advice below may drop them
    size = path.stat().st_size
    assert tarindex.is_cached(path, size)
    if file_system_of(path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{path.parent} is in memory: its pages cannot be dropped")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert not tarindex.is_cached(path, size)
    path.read_bytes()
    assert tarindex.is_cached(path, size)


@pytest.mark.parametrize("cached", [True, False])
def test_a_task_reads_its_own_inputs_first_only_where_they_are_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    """Cached: task 1 of 3 starts with the two inputs it copies from. From the disk: input order, as every
    other task reads them (tasks on one machine then read each input once between them). Same bytes."""
    raw = tmp_path / "raw"
    shards(raw, [8] * 6)
    run_all(make_cfg(raw, tmp_path / "reference", 4), 1)
    monkeypatch.setattr(stage, "is_cached", lambda path, size: cached)
    seen = reads(monkeypatch)
    out = tmp_path / "out"
    summaries = [stage.run_task(make_cfg(raw, out, 4), 1, 3)]
    names = [f"{s:05d}.tar" for s in range(6)]
    assert seen[:len(names)] == (names[2:4] + names[:2] + names[4:] if cached else names)
    summaries += [stage.run_task(make_cfg(raw, out, 4), task, 3) for task in (0, 2)]
    assert [s["input_counts_from_records"] for s in summaries] == [0, 4, 4]
    assert digests(out) == digests(tmp_path / "reference")
