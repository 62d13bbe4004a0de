"""reorganize_tar on real tars: global order, exact chunks, task-count independence, damage, crash and rerun."""

from __future__ import annotations

import hashlib
import json
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import pytest
import webdataset as wds

from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, PipelineConfig, load_config
from airflow_provider_mmprep.manifest import read_manifest, read_offsets
from airflow_provider_mmprep.stages import StageError, reorganize_tar
from airflow_provider_mmprep.stages.reorganize_tar import run_task
from airflow_provider_mmprep.testing.shards import download_style_samples, make_download_output, write_tar

NEMO_YAML = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"
REPO = Path(__file__).resolve().parents[1]


def make_cfg(raw: Path, out: Path, chunk: int, *extra: str) -> PipelineConfig:
    return load_config(NEMO_YAML, ["dataset_repo_id=org/data", f"dataset_output_root={out.parent}",
                                   f"reorganize_tar.input_dir={raw}", f"reorganize_tar.output_dir={out}",
                                   f"reorganize_tar.tar_chunk_size={chunk}", *extra], load_precache=False)


def run_all(cfg: PipelineConfig, task_count: int) -> list[dict]:
    return [run_task(cfg, task_id, task_count) for task_id in range(task_count)]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def digests(folder: Path) -> dict[str, str]:
    """Digests of the folder's files, manifests left out (and the subfolder where tasks record input counts)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and not p.name.endswith(".manifest.json")}


def temporaries(folder: Path) -> list[str]:
    """Work in progress left anywhere under ``folder`` (records of input counts included)."""
    return [p.name for p in folder.rglob("*") if p.name.endswith(".mmprep-tmp")]


def sample(key: str, *exts: str, tag: str = "") -> tuple[str, dict[str, bytes]]:
    return key, {ext: f"{tag}{key}.{ext}".encode() * 3 for ext in exts}


@pytest.fixture
def uneven(tmp_path: Path) -> Path:
    """Two parts, uneven shards, one sample without .txt, keys repeated across parts, an empty shard."""
    raw = tmp_path / "raw"
    write_tar(raw / "part-a" / "00000.tar", [sample("000000000", "jpg", "txt", "json"),
                                             sample("000000001", "jpg", "json"),  # no caption
                                             sample("000000002", "txt", "jpg", "json")])
    write_tar(raw / "part-a" / "00001.tar", [sample(f"00001000{i}", "jpg", "txt", "json") for i in range(5)])
    write_tar(raw / "part-a" / "00002.tar", [])
    write_tar(raw / "part-b" / "00000.tar", [sample("000000000", "jpg", "txt", tag="b"),
                                             sample("000000002", "jpg", "txt", tag="b")])
    (raw / "part-a" / "00000.parquet").write_bytes(b"PAR1 not a tar")  # download sidecars are ignored
    (raw / "part-a" / "00000_stats.json").write_text("{}")
    return raw


def test_uneven_inputs_become_exact_chunks_in_global_order(uneven: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_task(make_cfg(uneven, out, 3), 0, 1)

    expected_keys = ["000000000", "000000002", *[f"00001000{i}" for i in range(5)], "000000000", "000000002"]
    assert summary["usable_samples"] == 9 and summary["output_tars"] == 3
    assert summary["missing_members"] == 1 and "part-a/00000.tar:000000001" in summary["missing_examples"][0]
    assert summary["duplicate_keys"] == 2
    assert summary["duplicate_examples"] == ["part-b/00000.tar:000000000", "part-b/00000.tar:000000002"]
    assert "short_tar" not in summary  # 9 = 3 x 3
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]

    names = [name for tar in sorted(out.glob("*.tar")) for name, _ in tar_members(tar)]
    keys = [n.split(".")[0] for n in names[::2]]
    assert keys == expected_keys
    # only file_ext_in_tar members are copied, adjacent, in stored order; data byte-identical
    first = tar_members(out / "00000.tar")
    assert first == [("000000000.jpg", b"000000000.jpg" * 3), ("000000000.txt", b"000000000.txt" * 3),
                     ("000000002.txt", b"000000002.txt" * 3), ("000000002.jpg", b"000000002.jpg" * 3),
                     ("000010000.jpg", b"000010000.jpg" * 3), ("000010000.txt", b"000010000.txt" * 3)]
    assert tar_members(out / "00002.tar")[-1] == ("000000002.txt", b"b000000002.txt" * 3)
    for tar in out.glob("*.tar"):
        assert read_manifest(tar)["sample_count"] == 3


def test_short_last_tar_is_marked_and_webdataset_reads_every_sample(tmp_path: Path) -> None:
    CHUNK = 8
    raw = tmp_path / "raw"
    make_download_output(raw, parts=2, shards_per_part=3, samples_per_shard=(4, 17), seed=3)
    out = tmp_path / "out"
    summary = run_task(make_cfg(raw, out, CHUNK, "reorganize_tar.file_ext_in_tar=[.jpg,.txt,.json]"), 0, 1)
    total = summary["usable_samples"]
    assert total % CHUNK, "fixture must not divide evenly"
    last = f"{total // CHUNK:05d}.tar"
    assert summary["short_tar"] == {"name": last, "samples": total % CHUNK}
    assert (out / f"{last}.INCOMPLETE").exists() and read_manifest(out / last)["short"] is True
    assert not any((out / f"{j:05d}.tar.INCOMPLETE").exists() for j in range(total // CHUNK))

    source = {}
    for tar in sorted(raw.rglob("*.tar")):
        for name, data in tar_members(tar):
            source.setdefault(name, []).append(data)
    shards = [str(p) for p in sorted(out.glob("*.tar"))]
    seen = 0
    for tar in shards:
        in_tar = list(wds.WebDataset(tar, shardshuffle=False))
        assert len(in_tar) == (CHUNK if not tar.endswith(last) else total % CHUNK)
        for item in in_tar:
            assert set(item) >= {"jpg", "txt", "json", "__key__"}
            assert item["jpg"] in source[item["__key__"] + ".jpg"]
            seen += 1
    assert seen == total == sum(len(v) for k, v in source.items() if k.endswith(".jpg"))


def test_task_counts_1_2_7_give_identical_bytes(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_download_output(raw, parts=2, shards_per_part=4, samples_per_shard=(3, 11), seed=5)
    results = {}
    for tasks in (1, 2, 7):
        out = tmp_path / f"out{tasks}"
        summaries = run_all(make_cfg(raw, out, 5), tasks)
        assert sum(s["samples_written"] for s in summaries) == summaries[0]["usable_samples"]
        results[tasks] = digests(out)
    assert len(results[1]) > 7  # more outputs than the largest task count, incl. the marker
    assert results[1] == results[2] == results[7]


def test_rerun_skips_complete_outputs_and_rewrites_changed_ones(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_download_output(raw, parts=1, shards_per_part=3, samples_per_shard=(5, 9), seed=1)
    out = tmp_path / "out"
    cfg = make_cfg(raw, out, 4)
    first = run_task(cfg, 0, 1)
    before = digests(out)
    again = run_task(cfg, 0, 1)
    assert again["written"] == 0 and again["skipped_complete"] == first["written"]
    assert digests(out) == before
    # replace the last input shard: outputs fed by it are rewritten, earlier ones are kept
    last = sorted(raw.rglob("*.tar"))[-1]
    write_tar(last, [sample(f"9{i:08d}", "jpg", "txt") for i in range(6)])
    changed = run_task(cfg, 0, 1)
    assert 0 < changed["written"] < changed["output_tars"]
    assert [n for n, _ in tar_members(out / sorted(p.name for p in out.glob("*.tar"))[-1])][-1].startswith("9")


def truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def test_truncated_and_corrupt_inputs_use_readable_samples_and_report(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    good = write_tar(raw / "00000.tar", [sample(f"00000000{i}", "jpg", "txt") for i in range(4)])
    cut = write_tar(raw / "00001.tar", [sample(f"00000100{i}", "jpg", "txt") for i in range(4)])
    bad = write_tar(raw / "00002.tar", [sample(f"00000200{i}", "jpg", "txt") for i in range(4)])
    with tarfile.open(cut) as tar:
        third_txt = [m for m in tar.getmembers() if m.name == "000001002.txt"][0]
    truncate(cut, third_txt.offset_data + 3)  # inside the 3rd sample's caption
    with tarfile.open(bad) as tar:
        header_at = [m for m in tar.getmembers() if m.name == "000002001.jpg"][0].offset
    with open(bad, "r+b") as handle:  # garbage over the 2nd sample's header
        handle.seek(header_at)
        handle.write(b"\xff" * 512)
    out = tmp_path / "out"
    summary = run_task(make_cfg(raw, out, 3), 0, 1)
    assert set(summary["damaged_inputs"]) == {"00001.tar", "00002.tar"}
    assert "truncated" in summary["damaged_inputs"]["00001.tar"][0]
    assert "corrupt" in summary["damaged_inputs"]["00002.tar"][0]
    # 4 from the good tar, 2 whole + 1 partial (dropped: no .txt) from the cut one, 1 from the corrupt one
    assert summary["usable_samples"] == 7 and summary["missing_members"] == 1
    keys = [n for tar in sorted(out.glob("*.tar")) for n, _ in tar_members(tar)][::2]
    assert [k.split(".")[0] for k in keys] == [f"00000000{i}" for i in range(4)] + [
        "000001000", "000001001", "000002000"]
    assert good.exists()

    strict_out = tmp_path / "strict"
    with pytest.raises(StageError, match=r"reorganize_tar\.strict: 2 damaged input tar\(s\): 00001.tar"):
        run_task(make_cfg(raw, strict_out, 3, "reorganize_tar.strict=true"), 0, 1)
    assert not list(strict_out.glob("*.tar")) if strict_out.exists() else True


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_and_unicode_names_keep_their_extended_headers(tmp_path: Path, fmt: int) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    keys = ["d" * 150 + "/k0", "é✓/k1", "k2"]
    with tarfile.open(raw / "00000.tar", "w", format=fmt, encoding="utf-8") as tar:
        for key in keys:
            for ext in ("jpg", "txt", "json"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                data = f"{key}.{ext}".encode() * 50
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    run_task(make_cfg(raw, out, 2), 0, 1)
    members = [m for tar in sorted(out.glob("*.tar")) for m in tar_members(tar)]
    assert members == [(f"{k}.{e}", f"{k}.{e}".encode() * 50) for k in keys for e in ("jpg", "txt")]


@pytest.mark.parametrize("name", ["../escape.jpg", "/etc/passwd.jpg", "a/../../b.jpg"])
def test_unsafe_member_names_are_refused(tmp_path: Path, name: str) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "00000.tar", "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(StageError, match=r"reorganize_tar\.input_dir: .*00000\.tar: member .* absolute or contains"):
        run_task(make_cfg(raw, tmp_path / "out", 2), 0, 1)


def test_no_usable_sample_names_file_ext_in_tar(uneven: Path, tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"reorganize_tar\.file_ext_in_tar: no sample .* has all of \['\.png'\]"):
        run_task(make_cfg(uneven, tmp_path / "out", 2, "reorganize_tar.file_ext_in_tar=[.png]"), 0, 1)


def test_missing_input_folder_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"reorganize_tar\.input_dir: folder .* does not exist"):
        run_task(make_cfg(tmp_path / "nope", tmp_path / "out", 2), 0, 1)


KILLER = textwrap.dedent("""\
    import os, signal, sys
    from airflow_provider_mmprep.config import load_config
    from airflow_provider_mmprep.stages import reorganize_tar
    from airflow_provider_mmprep import tarwriter
    cfg = load_config(sys.argv[1], sys.argv[3:], load_precache=False)
    calls = 0
    real = tarwriter.TarWriter.add_records
    def add_records(self, *args):
        global calls
        calls += 1
        if calls == int(sys.argv[2]):  # die in the middle of an output tar, like a preempted pod
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args)
    tarwriter.TarWriter.add_records = add_records
    reorganize_tar.run_task(cfg, 0, 1)
""")


def test_kill_mid_task_then_rerun_equals_uninterrupted_run(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_download_output(raw, parts=2, shards_per_part=2, samples_per_shard=(6, 12), seed=9)
    reference = tmp_path / "reference"
    run_task(make_cfg(raw, reference, 4), 0, 1)

    out = tmp_path / "out"
    overrides = ["dataset_repo_id=org/data", f"dataset_output_root={tmp_path}", f"reorganize_tar.input_dir={raw}",
                 f"reorganize_tar.output_dir={out}", "reorganize_tar.tar_chunk_size=4",
                 "reorganize_tar.write_threads=1"]
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # one copy per sample (.jpg and .txt adjacent, .json left out), 4 per tar: call 10 is in the 3rd tar
    proc = subprocess.run([sys.executable, str(script), str(NEMO_YAML), "10", *overrides], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers and all(".mmprep-tmp" in n for n in leftovers)

    rerun = run_task(make_cfg(raw, out, 4), 0, 1)
    assert rerun["skipped_complete"] == 2 and rerun["written"] == rerun["output_tars"] - 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert digests(out) == digests(reference)


def test_a_task_removes_only_its_own_leftover_temporaries(tmp_path: Path) -> None:
    """Tasks share output_dir while they run: one must not delete another's work in progress."""
    raw = tmp_path / "raw"
    make_download_output(raw, parts=1, shards_per_part=2, samples_per_shard=(8, 8), seed=4)
    out = tmp_path / "out"
    out.mkdir()
    ours, theirs = out / ".00000.tar.999999.mmprep-tmp", out / ".00003.tar.999998.mmprep-tmp"
    our_manifest = out / ".00001.tar.manifest.json.999999.mmprep-tmp"
    for leftover in (ours, theirs, our_manifest):
        leftover.write_bytes(b"partial")
    summary = run_task(make_cfg(raw, out, 4), 0, 2)  # 4 outputs: task 0 owns 00000 and 00001
    assert summary["task_outputs"] == "00000.tar..00001.tar"
    assert not ours.exists() and not our_manifest.exists() and theirs.exists()


def test_output_dir_inside_input_dir_is_not_read_back(uneven: Path) -> None:
    out = uneven / "reorganized"
    first = run_task(make_cfg(uneven, out, 3), 0, 1)
    again = run_task(make_cfg(uneven, out, 3), 0, 1)
    assert again["input_tars"] == first["input_tars"] == 4 and again["skipped_complete"] == 3


def test_with_download_manifests_each_task_reads_only_the_inputs_feeding_its_outputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw"
    tars = make_download_output(raw, parts=3, shards_per_part=4, samples_per_shard=(3, 11), seed=7,
                                manifests=True, member_offsets=False)
    run_all(make_cfg(raw, tmp_path / "reference", 5, "reorganize_tar.strict=true"), 2)  # strict: full plan
    reference = digests(tmp_path / "reference")

    import airflow_provider_mmprep.stages.reorganize_tar as stage
    read: list[Path] = []
    real_index_tar = stage.index_tar
    monkeypatch.setattr(stage, "index_tar", lambda path: read.append(Path(path)) or real_index_tar(path))
    for tasks in (2, 7):
        read.clear()
        out = tmp_path / f"out{tasks}"
        summaries = run_all(make_cfg(raw, out, 5), tasks)
        assert digests(out) == reference
        assert sum(s["samples_written"] for s in summaries) == summaries[0]["usable_samples"]
        # every input read about once in all: at most one extra read per boundary between tasks
        assert len(read) <= len(tars) + tasks - 1
        assert sum(s["indexed_input_tars"] for s in summaries) == len(read)
        assert set(read) == set(tars)


def test_the_stage_says_which_outputs_each_task_writes_and_which_tasks_have_work_left(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    tars = make_download_output(raw, parts=3, shards_per_part=4, samples_per_shard=(3, 11), seed=7,
                                manifests=True, member_offsets=False)
    cfg = make_cfg(raw, out, 5)
    assert reorganize_tar.incomplete_tasks(cfg, 3) == {t: "no output tars" for t in range(3)}
    summaries = run_all(cfg, 3)
    expected = [reorganize_tar.expected_outputs(cfg, t, 3) for t in range(3)]
    # placed from the inputs' manifests alone, exactly as the tasks placed them
    assert [p for outputs in expected for p in outputs] == sorted(out.glob("*.tar"))
    assert [s["task_outputs"] for s in summaries] == [f"{o[0].name}..{o[-1].name}" for o in expected]
    assert reorganize_tar.incomplete_tasks(cfg, 3) == {}
    lost = expected[1][1]
    lost.with_name(lost.name + ".manifest.json").unlink()  # written, but its manifest never was
    assert reorganize_tar.incomplete_tasks(cfg, 3) == {1: f"output {lost.name} is not finished"}
    (tars[0].parent / (tars[0].name + ".manifest.json")).unlink()  # an input without manifest: unknown
    assert reorganize_tar.expected_outputs(cfg, 1, 3) is None
    assert reorganize_tar.incomplete_tasks(cfg, 3) == {}  # and these manifests name no task


def test_inputs_without_a_usable_manifest_are_counted_from_their_headers(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    tars = make_download_output(raw, parts=2, shards_per_part=4, samples_per_shard=(3, 11), seed=8,
                                manifests=True)
    run_all(make_cfg(raw, tmp_path / "reference", 4), 1)
    (tars[1].parent / (tars[1].name + ".manifest.json")).unlink()  # no manifest
    tars[5].with_name(tars[5].name + ".manifest.json").write_text(  # stale: written for another tar size
        json.dumps({"sample_count": 999, "tar_size": 1, "every_sample_has": ["jpg", "json", "txt"]}))
    summaries = run_all(make_cfg(raw, tmp_path / "out", 4), 3)
    assert digests(tmp_path / "out") == digests(tmp_path / "reference")
    assert all(s["indexed_input_tars"] >= 2 for s in summaries)  # every task counts the two unlisted ones


def test_a_manifest_its_tar_contradicts_fails_the_task_that_reads_it(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    tars = make_download_output(raw, parts=1, shards_per_part=4, samples_per_shard=(5, 5), seed=9,
                                manifests=True, member_offsets=False)
    manifest = tars[0].with_name(tars[0].name + ".manifest.json")
    body = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**body, "sample_count": 6}))  # current (same tar size) but wrong
    with pytest.raises(StageError, match=r"part-000/00000.tar has 5 usable sample\(s\) but its manifest says 6"):
        run_task(make_cfg(raw, tmp_path / "out", 5), 0, 2)


def no_header_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way of reading a tar's headers fail the test."""
    import airflow_provider_mmprep.stages.reorganize_tar as stage
    from airflow_provider_mmprep import tarindex

    def refuse(*args, **kwargs):
        raise AssertionError(f"a header was read: {args[:1]}")

    for module, name in ((stage, "index_tar"), (tarindex, "index_tar"), (tarindex, "_members"),
                         (tarindex, "_members_reference")):
        monkeypatch.setattr(module, name, refuse)


def without_manifests(raw: Path, copy: Path) -> Path:
    import shutil

    shutil.copytree(raw, copy, ignore=shutil.ignore_patterns("*.manifest.json", "*.offsets.json"))
    return copy


@pytest.mark.parametrize("tasks", [1, 3])
def test_shards_with_member_offsets_are_reorganized_without_reading_a_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tasks: int) -> None:
    raw = tmp_path / "raw"
    make_download_output(raw, parts=2, shards_per_part=4, samples_per_shard=(3, 11), seed=11, manifests=True)
    run_all(make_cfg(without_manifests(raw, tmp_path / "bare"), tmp_path / "reference", 4), 1)  # from headers

    with monkeypatch.context() as patch:
        no_header_reads(patch)
        out = tmp_path / "out"
        summaries = run_all(make_cfg(raw, out, 4), tasks)
        assert digests(out) == digests(tmp_path / "reference")
        assert sum(s["samples_written"] for s in summaries) == summaries[0]["usable_samples"]
        # reorganize_tar's own outputs carry offsets too: re-chunking them reads no header either
        again = run_all(make_cfg(out, tmp_path / "again", 3), tasks)
        assert sum(s["samples_written"] for s in again) == summaries[0]["usable_samples"]
    run_all(make_cfg(without_manifests(out, tmp_path / "out_bare"), tmp_path / "again_ref", 3), 1)
    assert digests(tmp_path / "again") == digests(tmp_path / "again_ref")


def test_recorded_offsets_match_the_tars(tmp_path: Path) -> None:
    from airflow_provider_mmprep.tarindex import index_from_offsets, index_tar

    raw = tmp_path / "raw"
    make_download_output(raw, parts=1, shards_per_part=3, samples_per_shard=(4, 9), seed=12, manifests=True)
    out = tmp_path / "out"
    run_task(make_cfg(raw, out, 5, "reorganize_tar.file_ext_in_tar=[.jpg,.txt]"), 0, 1)
    tars = sorted(raw.rglob("*.tar")) + sorted(out.glob("*.tar"))
    for tar in tars:
        body = read_manifest(tar)
        recorded = index_from_offsets(tar, tar.stat().st_size, read_offsets(tar, body))
        read = index_tar(tar)
        assert [(s.key, s.members) for s in recorded.samples] == [(s.key, s.members) for s in read.samples]
        assert body["member_offsets"] == {"version": 1, "file": tar.name + ".offsets.json"}
        assert len(recorded.samples) == body["sample_count"]
        with tarfile.open(tar) as t:  # and tarfile, the oracle, agrees on where each member's data is
            assert [(m.name, m.offset_data, m.size) for m in t.getmembers()] == [
                (m.name, m.offset, m.size) for s in recorded.samples for m in s.members]


def edit_offsets(tar: Path, **changes) -> None:
    sidecar = tar.with_name(tar.name + ".offsets.json")
    record = json.loads(sidecar.read_text())
    for key, change in changes.items():
        record[key] = change(record[key])
    sidecar.write_text(json.dumps(record))


@pytest.mark.parametrize("damage", ["past_end", "misaligned", "overlap", "count"])
@pytest.mark.parametrize("tasks", [1, 2])
def test_offsets_the_tar_contradicts_fail_the_task_naming_it(tmp_path: Path, damage: str, tasks: int) -> None:
    raw = tmp_path / "raw"
    tars = make_download_output(raw, parts=1, shards_per_part=3, samples_per_shard=(5, 5), seed=13,
                                manifests=True)
    size = tars[0].stat().st_size
    if damage == "past_end":  # a manifest written for a longer tar that still claims this tar's size
        edit_offsets(tars[0], size=lambda sizes: sizes[:-1] + [size])
    elif damage == "misaligned":
        edit_offsets(tars[0], header=lambda heads: [heads[0] + 100] + heads[1:],
                     data=lambda datas: [datas[0] + 100] + datas[1:])
    elif damage == "overlap":
        edit_offsets(tars[0], size=lambda sizes: [sizes[0] + 2048] + sizes[1:])
    else:
        manifest = tars[0].with_name(tars[0].name + ".manifest.json")
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "sample_count": 4}))
    with pytest.raises(StageError, match=r"reorganize_tar\.input_dir: .*part-000/00000\.tar"):
        run_all(make_cfg(raw, tmp_path / "out", 5), tasks)


def test_download_images_records_offsets_that_reorganize_uses(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_mmprep.stages import download_images
    from airflow_provider_mmprep.tarindex import index_from_offsets, index_tar
    from airflow_provider_mmprep.testing import sample_data
    from airflow_provider_mmprep.testing.image_host import ImageHost

    with ImageHost(latency=(0.0, 0.01), seed=3) as host:
        urls = sample_data.add_images(host, 23, size=(96, 64)) + [host.url("/fault/ok?missing=1") + "x"]
        sample_data.write_url_parquet(tmp_path / "in" / "part0.parquet", urls,
                                      captions=[f"caption {i}" for i in range(len(urls))])
        config = {"run": {"name": "t"}, "download_images": {
            "enable": True, "input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "raw"),
            "download_num_processes": 1, "download_num_threads": 4, "allow_private_addresses": True,
            "img2dataset_additional_arguments": {"number_sample_per_shard": 7, "timeout": 1.5}}}
        (tmp_path / "dl.yaml").write_text(json.dumps(config))
        download_images.run_task(load_config(tmp_path / "dl.yaml", load_precache=False), 0, 1)
    tars = sorted((tmp_path / "raw").rglob("*.tar"))
    assert len(tars) == 4
    for tar in tars:
        body = read_manifest(tar)
        recorded = index_from_offsets(tar, tar.stat().st_size, read_offsets(tar, body))
        assert [(s.key, s.members) for s in recorded.samples] == [(s.key, s.members) for s in index_tar(tar).samples]
        assert len(recorded.samples) == body["sample_count"] > 0
    run_task(make_cfg(without_manifests(tmp_path / "raw", tmp_path / "bare"), tmp_path / "reference", 5), 0, 1)
    no_header_reads(monkeypatch)
    run_task(make_cfg(tmp_path / "raw", tmp_path / "out", 5), 0, 1)
    assert digests(tmp_path / "out") == digests(tmp_path / "reference")


def hold_read_until_a_write(monkeypatch: pytest.MonkeyPatch, tar: Path, reader: str,
                            writer: str) -> tuple[threading.Event, list[bool]]:
    """Make the stage's ``reader`` wait (up to 20 s) on ``tar`` until a call of its ``writer`` has ended;
    returns the event a write sets and the list of waits (True: the write came in time)."""
    import airflow_provider_mmprep.stages.reorganize_tar as stage

    written = threading.Event()
    real_read, real_write = getattr(stage, reader), getattr(stage, writer)
    waited: list[bool] = []

    def read(path):
        if Path(path) == tar:
            waited.append(written.wait(20))
        return real_read(path)

    def write(*args):
        result = real_write(*args)
        written.set()
        return result

    monkeypatch.setattr(stage, reader, read)
    monkeypatch.setattr(stage, writer, write)
    return written, waited


@pytest.mark.parametrize("tasks", [1, 2])
def test_outputs_are_written_while_later_inputs_are_still_being_indexed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tasks: int) -> None:
    """Indexing the last input waits (up to 20 s) for an output to be written: only a task that writes
    while it indexes sees one in time."""
    raw = tmp_path / "raw"
    tars = make_download_output(raw, parts=1, shards_per_part=6, samples_per_shard=(8, 8), seed=14,
                                manifests=True, member_offsets=False)
    written, waited = hold_read_until_a_write(monkeypatch, tars[-1], "index_tar", "produce_output")
    run_task(make_cfg(raw, tmp_path / "out", 4), 0, tasks)  # task 0 of 2 owns outputs 0-5, fed by inputs 0-2
    if tasks == 1:
        assert waited == [True]
    else:  # task 0 does not read the last input at all: its inputs' manifests place it
        assert waited == [] and written.is_set()
        written.clear()
        run_task(make_cfg(raw, tmp_path / "out", 4), 1, tasks)
        assert waited == [True]


def test_tasks_without_manifests_write_outputs_while_later_inputs_are_still_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """img2dataset's shards: every task counts every input before it knows which outputs are its own. The
    count of the last input waits (up to 20 s) for an output of task 0 to be written: only a task that
    writes while it counts sees one in time."""
    raw = tmp_path / "raw"
    tars = make_download_output(raw, parts=1, shards_per_part=6, samples_per_shard=(8, 8), seed=15)
    run_all(make_cfg(raw, tmp_path / "reference", 4), 1)
    _, waited = hold_read_until_a_write(monkeypatch, tars[-1], "count_samples", "write_early_output")
    out = tmp_path / "out"
    summaries = run_all(make_cfg(raw, out, 4), 2)
    assert waited[0] is True  # task 0 (outputs 0-5, from inputs 0-2) had written before the last count
    assert [s["written"] for s in summaries] == [6, 6]
    assert digests(out) == digests(tmp_path / "reference")
    assert not temporaries(out)


def test_an_output_written_early_for_the_wrong_task_is_removed_and_its_owner_writes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner of an early output is guessed from the bytes counted so far: small samples first, large
    ones after, make task 0 guess a larger total than there is and write output 7, which is task 1's."""
    import airflow_provider_mmprep.stages.reorganize_tar as stage

    raw = tmp_path / "raw"
    rng = __import__("random").Random(3)
    write_tar(raw / "00000.tar", download_style_samples(0, 40, rng, (10, 20)))
    for shard in (1, 2, 3):
        write_tar(raw / f"{shard:05d}.tar", download_style_samples(shard, 10, rng, (40_000, 50_000)))
    run_all(make_cfg(raw, tmp_path / "reference", 5), 1)  # 70 samples: 14 outputs, task 0 of 2 owns 0-6
    finished: list[tuple[int, bool, bool]] = []
    real_finish = stage.finish_early_output

    def finish_early_output(early, output_dir, j, mine):
        finished.append((j, mine, early.tmp is not None))
        return real_finish(early, output_dir, j, mine)

    monkeypatch.setattr(stage, "finish_early_output", finish_early_output)
    out = tmp_path / "out"
    first = run_all(make_cfg(raw, out, 5), 2)
    assert (7, False, True) in finished  # written by task 0, then removed
    assert [s["task_outputs"] for s in first] == ["00000.tar..00006.tar", "00007.tar..00013.tar"]
    assert [s["written"] for s in first] == [7, 7]
    every_file = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}  # manifests, sidecars
    assert every_file == {p.name: p.read_bytes() for p in sorted((tmp_path / "reference").iterdir())}
    finished.clear()
    again = run_all(make_cfg(raw, out, 5), 2)  # a rerun: every output complete, early or not
    assert [(s["written"], s["skipped_complete"]) for s in again] == [(0, 7), (0, 7)]
    assert finished and not any(wrote for _, _, wrote in finished)
    assert digests(out) == digests(tmp_path / "reference")


def test_a_task_on_shards_with_offsets_never_imports_numpy(tmp_path: Path) -> None:
    """numpy is for the Python walk's bulk checks; a pod whose inputs all carry offsets starts without it,
    and so does one that reads headers with the compiled walker."""
    raw = tmp_path / "raw"
    make_download_output(raw, parts=1, shards_per_part=3, samples_per_shard=(4, 9), seed=15, manifests=True)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"run": {"name": "t"}, "reorganize_tar": {
        "enable": True, "input_dir": str(raw), "output_dir": str(tmp_path / "out"), "tar_chunk_size": 4,
        "file_ext_in_tar": [".jpg", ".txt"]}}))
    script = ("import runpy, sys\nsys.argv = ['mmprep', 'run', sys.argv[1], '--stage', 'reorganize_tar']\n"
              "try:\n    runpy.run_module('airflow_provider_mmprep.cli', run_name='__main__')\n"
              "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
              "print('numpy' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-c", script, str(config)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "False" and len(list((tmp_path / "out").glob("*.tar"))) > 3
    from airflow_provider_mmprep import tarindex

    (raw / "part-000" / "00000.tar.manifest.json").unlink()  # one input to read: numpy only for the Python walk
    run = subprocess.run([sys.executable, "-c", script, str(config)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == str(tarindex._tarwalk is None)


def test_a_missing_or_stale_offsets_sidecar_means_reading_headers(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import airflow_provider_mmprep.stages.reorganize_tar as stage

    raw = tmp_path / "raw"
    tars = make_download_output(raw, parts=1, shards_per_part=3, samples_per_shard=(5, 8), seed=16, manifests=True)
    run_task(make_cfg(without_manifests(raw, tmp_path / "bare"), tmp_path / "reference", 4), 0, 1)
    tars[0].with_name(tars[0].name + ".offsets.json").unlink()
    sidecar = tars[1].with_name(tars[1].name + ".offsets.json")  # written for another version of the tar
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "tar_size": 512}))
    read: list[Path] = []
    real_index_tar = stage.index_tar
    monkeypatch.setattr(stage, "index_tar", lambda path: read.append(Path(path)) or real_index_tar(path))
    run_task(make_cfg(raw, tmp_path / "out", 4), 0, 1)
    assert read == tars[:2] and digests(tmp_path / "out") == digests(tmp_path / "reference")


def test_manifests_stay_small_beside_their_offsets_sidecar(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    tars = make_download_output(raw, parts=1, shards_per_part=2, samples_per_shard=(40, 40), seed=17,
                                manifests=True)
    out = tmp_path / "out"
    run_task(make_cfg(raw, out, 30), 0, 1)
    for tar in tars + sorted(out.glob("*.tar")):
        assert len(tar.with_name(tar.name + ".manifest.json").read_bytes()) < 600
        assert len(tar.with_name(tar.name + ".offsets.json").read_bytes()) > 1000


def test_inputs_without_any_sample_point_at_the_downloads(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "part0"
    raw.mkdir(parents=True)
    for shard in range(2):  # what download_images leaves when every URL of a part failed: empty tars
        with tarfile.open(raw / f"{shard:05d}.tar", "w"):
            pass
    with pytest.raises(StageError) as caught:
        run_task(make_cfg(tmp_path / "raw", tmp_path / "out", 2), 0, 1)
    assert str(caught.value).startswith(f"reorganize_tar.input_dir: the 2 tar(s) under {tmp_path / 'raw'} hold "
                                        "no sample at all: did every download fail?")
    assert "file_ext_in_tar" not in str(caught.value)
