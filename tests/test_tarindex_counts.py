"""The count-only pass (tarindex.count_samples) against the full index on tars from real writers, and
reorganize_tar's reports and outputs with and without it."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset

from airflow_provider_mmprep import input_counts, tarindex
from airflow_provider_mmprep.stages import StageError, reorganize_tar
from airflow_provider_mmprep.tarindex import UnsafeMemberName, count_samples, index_tar
from airflow_provider_mmprep.testing.shards import write_tar

pytestmark = pytest.mark.skipif(tarindex._tarwalk is None, reason="the compiled walker is not built")


def agree(path: Path) -> bool:
    """count_samples is None or says what index_tar says (keys, extension lists, skipped members), and is
    None for any tar the full index finds damaged or refuses; True when it counted."""
    counted = count_samples(path)
    try:
        index = index_tar(path)
    except UnsafeMemberName:
        assert counted is None
        return False
    if counted is None:
        return False
    assert not index.problems
    assert counted.keys == [s.key for s in index.samples]
    assert [counted.signatures[k] for k in counted.kinds] == [tuple(m.ext for m in s.members) for s in index.samples]
    assert counted.skipped_members == index.skipped_members
    assert input_counts.counts_of_index(index) == counted  # what a task that indexed it records for others
    return True


def img2dataset_style(path: Path, count: int = 40) -> Path:
    """As img2dataset writes its shards (webdataset's TarWriter, a pax mtime header before every member)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        writer = webdataset.TarWriter(stream, format="PAX_FORMAT")
        for i in range(count):
            sample = {"__key__": f"{i:09d}", "jpg": bytes([i % 251]) * (i * 977 % 9000), "txt": f"caption {i}",
                      "json": {"key": f"{i:09d}"}}
            if i % 9 == 4:
                sample["txt"] = ""  # an empty member
            if i % 11 == 5:
                del sample["json"]  # a sample missing a member
            writer.write(sample)
        writer.close()
    return path


def test_counts_agree_on_img2dataset_style_shards(tmp_path: Path) -> None:
    assert agree(img2dataset_style(tmp_path / "shard.tar"))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_counts_agree_on_tarfile_formats_with_odd_samples(tmp_path: Path, fmt: int) -> None:
    """Repeated extensions (a new sample), upper-case extensions, metadata, key-less names, folders, long
    and unicode names, empty files: counted where the walk takes every member, else left to the index."""
    plain = tmp_path / "plain.tar"
    odd = tmp_path / "odd.tar"
    names = ["a/0001.jpg", "a/0001.TXT", "a/0001.txt", "a/0001.jpg", "__meta__", "noext", "a/.hidden",
             "a/0002.seg.jpg", "a/0002.JSON", "trailing.", "0003.jpg"]
    for path, extra in ((plain, []), (odd, ["q" * 130 + "/0004.jpg", "é/0005.txt", "dir/"])):
        with tarfile.open(path, "w", format=fmt) as tar:
            for i, name in enumerate(names + extra):
                info = tarfile.TarInfo(name.rstrip("/"))
                if name.endswith("/"):
                    info.type = tarfile.DIRTYPE
                info.size = 0 if i % 3 == 0 else i * 101
                tar.addfile(info, io.BytesIO(b"z" * info.size))
    assert agree(plain)
    agree(odd)


def test_counts_agree_on_gnu_tar_and_pax_long_names(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    root = tmp_path / "src"
    for i in range(12):
        folder = root / ("deep/" + "d" * 90 if i % 4 == 0 else "flat")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{i:05d}" + ("_" + "n" * 120 if i % 5 == 1 else "")
        (folder / f"{stem}.jpg").write_bytes(b"j" * (i * 1531 % 7000))
        (folder / f"{stem}.txt").write_bytes(b"" if i % 3 == 0 else b"caption")
    short = tmp_path / "short"
    (short / "flat").mkdir(parents=True)
    for i in range(12):
        (short / "flat" / f"{i:05d}.jpg").write_bytes(b"j" * (i * 1531 % 7000))
        (short / "flat" / f"{i:05d}.txt").write_bytes(b"" if i % 3 == 0 else b"caption")
    for fmt in ("gnu", "posix", "ustar"):
        for source, name in ((root, "long"), (short, "short")):
            if fmt == "ustar" and source is root:
                continue
            path = tmp_path / f"{fmt}-{name}.tar"
            subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-cf", str(path), "-C", str(source), "."],
                           check=True)
            agree(path)  # folder entries, long names: left to the full index
            files = sorted(str(p.relative_to(short)) for p in (short / "flat").iterdir())
            if name == "short" and fmt != "posix":  # files only, plain headers: the count pass decides
                subprocess.run(["tar", f"--format={fmt}", "-cf", str(path), "-C", str(short), *files], check=True)
                assert agree(path)


def test_damaged_and_unsafe_tars_are_left_to_the_full_index(tmp_path: Path) -> None:
    """Every truncation and every corrupt header: never counted differently from the full index, which
    writes the messages; an unsafe name is never counted (the index refuses it)."""
    source = img2dataset_style(tmp_path / "w.tar", count=6).read_bytes()
    cut = tmp_path / "cut.tar"
    for keep in range(0, len(source), 173):
        cut.write_bytes(source[:keep])
        agree(cut)
    with tarfile.open(tmp_path / "w.tar") as tar:
        heads = [m.offset for m in tar.getmembers()]
    for at in heads:
        damaged = bytearray(source)
        damaged[at + 10] ^= 0xFF
        cut.write_bytes(bytes(damaged))
        assert not agree(cut)
        assert index_tar(cut).problems
        assert input_counts.counts_of_index(index_tar(cut)) is None  # every task reads it, to report it
    unsafe = tmp_path / "unsafe.tar"
    write_tar(unsafe, [("ok", {"jpg": b"x"}), ("../up", {"jpg": b"y"})])
    assert count_samples(unsafe) is None
    with pytest.raises(UnsafeMemberName, match="unsafe.tar"):
        index_tar(unsafe)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert count_samples(empty) is None and index_tar(empty).problems == ["empty file"]


def run_tasks(raw: Path, out: Path, tasks: int, exts: str = "[.jpg,.txt]") -> list[dict]:
    from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, load_config

    yaml = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"
    cfg = load_config(yaml, ["dataset_repo_id=org/data", f"dataset_output_root={out.parent}",
                             f"reorganize_tar.input_dir={raw}", f"reorganize_tar.output_dir={out}",
                             "reorganize_tar.tar_chunk_size=4", f"reorganize_tar.file_ext_in_tar={exts}"],
                      load_precache=False)
    return [reorganize_tar.run_task(cfg, task, tasks) for task in range(tasks)]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """The folder's files: outputs, manifests and sidecars (not the subfolder of input counts)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("guess", [True, False])
@pytest.mark.parametrize("tasks", [2, 3, 5])
def test_reorganize_reports_and_outputs_are_the_same_with_the_count_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tasks: int, guess: bool) -> None:
    """Inputs without manifests (as img2dataset leaves them), with missing members, duplicate keys across
    inputs, upper-case and unwanted extensions, a damaged input: every task's summary and every output
    byte are those of the full index everywhere, whichever inputs a task guesses it feeds from."""
    if not guess:  # every input counted first, those feeding the task indexed again
        monkeypatch.setattr(reorganize_tar, "_likely_feeding", lambda sizes, task, tasks: set())
    raw = tmp_path / "raw"
    for shard in range(5):
        img2dataset_style(raw / f"{shard:05d}.tar", count=7 + shard * 3)
    write_tar(raw / "00005.tar", [("000000001", {"JPG": b"a", "txt": b"b", "json": b"c"}),
                                  ("x9", {"jpg": b"d"}), ("x10", {"jpg": b"e", "TXT": b"f"})])
    damaged = img2dataset_style(tmp_path / "d.tar", count=9)
    with tarfile.open(damaged) as tar:
        cut = tar.getmembers()[13].offset + 100  # within a header: "truncated header"
    (raw / "00006.tar").write_bytes(damaged.read_bytes()[:cut])
    counted = run_tasks(raw, tmp_path / "counted", tasks)
    monkeypatch.setattr(reorganize_tar, "count_samples", lambda path: None)
    indexed = run_tasks(raw, tmp_path / "indexed", tasks)
    assert counted == [{**s, "task_outputs": s["task_outputs"]} for s in indexed]
    assert folder_bytes(tmp_path / "counted").keys() == folder_bytes(tmp_path / "indexed").keys()
    assert [v for k, v in folder_bytes(tmp_path / "counted").items() if not k.endswith(".json")] == \
        [v for k, v in folder_bytes(tmp_path / "indexed").items() if not k.endswith(".json")]
    assert counted[0]["duplicate_keys"] and counted[0]["missing_members"] and counted[0]["damaged_inputs"]
    single = run_tasks(raw, tmp_path / "single", 1)
    assert [v for k, v in folder_bytes(tmp_path / "single").items() if not k.endswith(".json")] == \
        [v for k, v in folder_bytes(tmp_path / "counted").items() if not k.endswith(".json")]
    assert single[0]["usable_samples"] == counted[0]["usable_samples"]


def test_the_guess_of_the_inputs_a_task_feeds_from_follows_their_sizes(tmp_path: Path) -> None:
    inputs = []
    for shard, size in enumerate((100, 100, 300, 100, 400)):
        inputs.append(tmp_path / f"{shard}.tar")
        inputs[-1].write_bytes(bytes(size))
    sizes = [path.stat().st_size for path in inputs]
    assert [reorganize_tar._likely_feeding(sizes, task, 4) for task in range(4)] == [{0, 1, 2}, {2}, {3, 4}, {4}]


def test_an_input_that_changes_between_count_and_index_fails_the_task(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw"
    for shard in range(3):
        img2dataset_style(raw / f"{shard:05d}.tar", count=10)
    real = reorganize_tar.count_samples

    def one_less(path: Path):  # as if a sample were appended after the count
        counted = real(path)
        return counted._replace(keys=counted.keys[:-1], kinds=counted.kinds[:-1])

    monkeypatch.setattr(reorganize_tar, "count_samples", one_less)
    monkeypatch.setattr(reorganize_tar, "_likely_feeding", lambda sizes, task, tasks: set())
    with pytest.raises(StageError, match=r"00000\.tar changed while this task read it"):
        run_tasks(raw, tmp_path / "out", 2)


def test_samples_the_walker_makes_are_plain_samples(tmp_path: Path) -> None:
    """The compiled walker makes the Sample objects itself (no Python __init__ per sample): they are
    Samples like any other, equal to ones made in Python, and a later batch can still extend the last."""
    from airflow_provider_mmprep.tarindex import Sample

    index = index_tar(img2dataset_style(tmp_path / "shard.tar"))
    assert all(type(s) is Sample for s in index.samples)
    assert index.samples == [Sample(s.key, list(s.members)) for s in index.samples]
    index.samples[-1].members.append(index.samples[0].members[0])
    assert index.samples[-1].extensions[-1] == "jpg"


@pytest.mark.parametrize("tasks", [1, 2])
def test_an_input_truncated_inside_its_last_padding_is_reorganized_whole(tmp_path: Path, tasks: int) -> None:
    """Cut inside the zeros after its last member's data, a tar keeps that member (its data is whole):
    the output holds the member with its padding, as from the intact tar (the copy used to fail with
    "source ended N bytes early")."""
    intact = img2dataset_style(tmp_path / "intact" / "00000.tar", count=9)
    with tarfile.open(intact) as tar:
        member = next(m for m in tar.getmembers()[10:]
                      if m.name.endswith(".jpg") and m.size % 512 and m.size % 512 < 400)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "00000.tar").write_bytes(intact.read_bytes()[:member.offset_data + member.size + 10])
    cut = run_tasks(raw, tmp_path / "cut", tasks, exts="[.jpg]")
    whole = run_tasks(intact.parent, tmp_path / "whole", tasks, exts="[.jpg]")
    assert not cut[0]["damaged_inputs"]
    kept = [m.name for s in index_tar(raw / "00000.tar").samples for m in s.members if m.ext == "jpg"]
    assert kept[-1] == member.name
    out = sorted((tmp_path / "cut").glob("*.tar"))
    got = []
    for path in out:
        with tarfile.open(path) as tar:
            got += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(intact) as tar:
        assert got == [(name, tar.extractfile(name).read()) for name in kept]
    assert sum(s["samples_written"] for s in cut) == len(kept) < sum(s["samples_written"] for s in whole)
