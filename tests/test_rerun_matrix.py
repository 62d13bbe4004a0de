"""Resuming is rerunning: over configs shaped like users' (NeMo's ``download_num_processes: -1``, sample
counts that do not divide by ``tar_chunk_size``, URLs failing for good and for a while, ``retry_failed``
on and off, one and two tasks per stage, datasets smaller than a download shard or than a tar), the whole
pipeline is run, then run again, then each stage alone, then the report. The later runs must exit as the
first did, rewrite nothing (bytes and mtimes of every output), and the report must list nothing to redo.
Then one output of each stage is deleted and the pipeline rerun: exactly that output comes back,
byte-identical.

Everything is local and tiny (procedural 32×24 JPEGs on a loopback host, a loopback hub, random-weight
encoders at 32 px), so the matrix stays part of ``make test``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from airflow_provider_mmprep.cli import main
from airflow_provider_mmprep.testing import sample_data
from airflow_provider_mmprep.testing.hf_endpoint import FakeHub, HubServer
from airflow_provider_mmprep.testing.image_host import ImageHost

pytest.importorskip("torch")

REPO_ID = "mmprep/matrix"
STAGES = ("download_parquet", "download_images", "reorganize_tar", "precache_encodings", "generate_wdinfo")
#: huggingface_hub's bookkeeping beside downloaded files (not a pipeline output), and the report itself
NOT_OUTPUTS = (".cache",)


@dataclass(frozen=True)
class Case:
    name: str
    images: int  # good URLs
    permanent: int = 2  # URLs answering 404
    transient: int = 2  # URLs answering 503 once, then an image
    files: int = 1  # parquet files in the dataset repo
    subpartitions: int = 1
    processes: int = -1
    threads: int = 8
    retry_failed: bool = False
    per_shard: int = 10  # number_sample_per_shard
    chunk: int = 8  # tar_chunk_size
    tasks: int = 1  # node_array_size of reorganize_tar and precache_encodings
    exit_code: int = 0  # of every full run (1: the dataset cannot fill one tar)
    stage_exit: dict[str, int] = field(default_factory=dict)


CASES = [
    # NeMo's defaults: all CPUs, 64 threads, no retry; 37 samples do not divide into tars of 8
    Case("nemo-defaults", images=33, threads=64),
    # one process, retry_failed recovers the transient failures into a retry shard; two tasks everywhere
    Case("retry-two-tasks", images=33, files=2, processes=1, retry_failed=True, tasks=2),
    # a part smaller than one download shard, split into two sub-partitions, two processes per task
    Case("small-shards-split", images=17, subpartitions=2, retry_failed=True, per_shard=100, chunk=5, tasks=2),
    # fewer samples than tar_chunk_size: every run fails at generate_wdinfo, saying why, and changes nothing
    Case("smaller-than-one-tar", images=4, permanent=1, transient=0, chunk=50, exit_code=1,
         stage_exit={"generate_wdinfo": 1}),
]


@pytest.fixture(scope="module")
def precache_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from airflow_provider_mmprep.testing.pipeline import write_tiny_precache_config

    return write_tiny_precache_config(tmp_path_factory.mktemp("models"), image_size=32, batch_size=8)


@pytest.fixture
def sources(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
            tmp_path: Path) -> Iterator[tuple[Case, str]]:
    case: Case = request.param
    with ImageHost() as host:
        urls = sample_data.add_images(host, case.images, size=(32, 24), distinct=8)
        urls += [host.url(f"/fault/404/{i}") for i in range(case.permanent)]
        urls += [host.url(f"/fault/flaky/{i}?fail=1&code=503") for i in range(case.transient)]
        # faults spread through the list, so they land in different shards and parts
        ordered = [u for pair in zip(urls[: len(urls) // 2], urls[len(urls) // 2:]) for u in pair]
        ordered += urls[2 * (len(urls) // 2):]
        files = {}
        per_file = -(-len(ordered) // case.files)
        for number in range(case.files):
            chunk = ordered[number * per_file:(number + 1) * per_file]
            written = sample_data.write_url_parquet(tmp_path / "upload" / f"{number}.parquet", chunk)
            files[f"data/train-{number:05d}.parquet"] = written.read_bytes()
        fake = FakeHub()
        fake.add_repo(REPO_ID, files)
        with HubServer(fake) as hub:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            yield case, hub.url


def write_config(case: Case, root: Path, precache_yaml: Path) -> Path:
    body = {
        "run": {"name": "matrix"},
        "dataset_repo_id": REPO_ID,
        "dataset_output_root": str(root),
        "download_parquet": {"enable": True, "output_dir": "${..dataset_output_root}/parquet",
                             "parquet_subpartitions": case.subpartitions, "parquet_pattern": "*.parquet"},
        "download_images": {"enable": True, "parquet_pattern": "${..download_parquet.parquet_pattern}",
                            "input_dir": "${..download_parquet.output_dir}",
                            "output_dir": "${..dataset_output_root}/tarfiles_raw",
                            "download_num_processes": case.processes, "download_num_threads": case.threads,
                            "allow_private_addresses": True, "retry_failed": case.retry_failed,
                            "img2dataset_additional_arguments": {"number_sample_per_shard": case.per_shard,
                                                                 "timeout": 5, "resize_mode": False}},
        "reorganize_tar": {"enable": True, "input_dir": "${..download_images.output_dir}",
                           "output_dir": "${..dataset_output_root}/tarfiles_reorganized",
                           "node_array_size": case.tasks, "tar_chunk_size": case.chunk,
                           "file_ext_in_tar": [".jpg", ".txt"]},
        "precache_encodings": {"enable": True, "input_dir": "${..reorganize_tar.output_dir}",
                               "output_dir": "${..dataset_output_root}/tarfiles_precached",
                               "tar_chunk_size": "${..reorganize_tar.tar_chunk_size}",
                               "node_array_size": case.tasks, "precache_config_path": str(precache_yaml),
                               "runner": "local"},
        "generate_wdinfo": {"enable": True, "input_dir": "${..precache_encodings.output_dir}",
                            "tar_chunk_size": "${..precache_encodings.tar_chunk_size}",
                            "file_ext_in_tar": [".pickle"],
                            "output_wdinfo_path": "${..dataset_output_root}/wdinfo.pkl"},
    }
    path = root.parent / f"{case.name}.yaml"
    OmegaConf.save(OmegaConf.create(body), path)
    return path


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every output file under ``root``: relative path → (sha256, mtime in ns)."""
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in NOT_OUTPUTS]
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel == "report.html":
                continue
            files[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return files


def changes(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> dict[str, str]:
    out = {}
    for rel in sorted(before.keys() | after.keys()):
        if rel not in after:
            out[rel] = "deleted"
        elif rel not in before:
            out[rel] = "added"
        elif before[rel][0] != after[rel][0]:
            out[rel] = "bytes changed"
        elif before[rel][1] != after[rel][1]:
            out[rel] = "rewritten (mtime)"
    return out


def shard_without_transient_failure(root: Path) -> Path:
    """A download tar whose shard has no transient failure: redoing it gets the same answers."""
    for parquet in sorted((root / "tarfiles_raw").glob("*/*.parquet")):
        table = pq.read_table(parquet, columns=["retryable"])
        tar = parquet.with_suffix(".tar")
        stats = json.loads(parquet.with_name(parquet.stem + "_stats.json").read_text())
        if not any(table.column("retryable").to_pylist()) and not stats["retry_round"] and tar.is_file():
            return tar
    raise AssertionError("every shard holds a transient failure")


@pytest.mark.parametrize("sources", CASES, ids=[c.name for c in CASES], indirect=True)
def test_rerun_is_a_no_op_and_a_lost_output_comes_back_identical(sources, tmp_path: Path, precache_yaml: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    case, _ = sources
    root = tmp_path / "dataset"
    config = str(write_config(case, root, precache_yaml))

    assert main(["run", config, "-q"]) == case.exit_code, capsys.readouterr().err
    first = snapshot(root)
    assert any(rel.startswith("tarfiles_reorganized/") for rel in first)
    if case.exit_code:
        assert "generate_wdinfo.tar_chunk_size: no full tar" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["run", config]) == case.exit_code
    assert changes(first, snapshot(root)) == {}, "the second full run rewrote outputs"
    summary = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())  # one line per stage
    assert list(summary) == list(STAGES)
    assert "shards: 0 downloaded," in summary["download_images"] and ", 0 redone;" in summary["download_images"]
    assert f"-> {root / 'tarfiles_raw'}" in summary["download_images"]
    assert "tars: 0 written" in summary["reorganize_tar"]
    assert "tars: 0 encoded" in summary["precache_encodings"]
    if case.exit_code:
        assert summary["generate_wdinfo"].startswith("1 of 1 task(s) FAILED (0); no task finished")
    else:
        assert summary["generate_wdinfo"].startswith("1 task(s) ok; ")
    for stage in STAGES:
        assert main(["run", config, "-q", "--stage", stage]) == case.stage_exit.get(stage, 0), stage
        assert changes(first, snapshot(root)) == {}, f"rerunning {stage} alone rewrote outputs"

    capsys.readouterr()
    assert main(["report", config, "-q"]) == 0
    page = (root / "report.html").read_text()
    if case.exit_code:
        assert "1 task(s) to redo: 0" in page and page.count("task(s) to redo") == 1  # generate_wdinfo only
        assert "--stage generate_wdinfo" in page
    else:
        assert "No failed or missing tasks found." in page and "task(s) to redo" not in page
    assert changes(first, snapshot(root)) == {}

    # Lose one output of each stage; the rerun brings back exactly those, byte-identical.
    lost = {
        "download_parquet": sorted((root / "parquet").rglob("*.parquet"))[-1],
        "download_images": shard_without_transient_failure(root),
        "reorganize_tar": sorted((root / "tarfiles_reorganized").glob("*.tar"))[0],
        "precache_encodings": next(iter(sorted((root / "tarfiles_precached").glob("*.tar"))), None),
        "generate_wdinfo": root / "wdinfo.pkl" if not case.exit_code else None,
    }
    for path in lost.values():
        if path is not None:
            path.unlink()
    assert main(["run", config, "-q"]) == case.exit_code
    back = changes(first, snapshot(root))
    # a redone download shard rewrites its _stats.json too (it records the download's times)
    # (a tar comes back with its manifest; a redone download shard rewrites its parquet, and its
    # _stats.json records the new download's times)
    expected = {}
    for path in (p for p in lost.values() if p is not None):
        expected[path.relative_to(root).as_posix()] = "rewritten (mtime)"
        if path.suffix == ".tar":
            expected[path.relative_to(root).as_posix() + ".manifest.json"] = "rewritten (mtime)"
            if path.with_name(path.name + ".offsets.json").exists():  # download's and reorganize's sidecar
                expected[path.relative_to(root).as_posix() + ".offsets.json"] = "rewritten (mtime)"
    shard = lost["download_images"]
    expected[shard.with_suffix(".parquet").relative_to(root).as_posix()] = "rewritten (mtime)"
    expected[shard.with_name(shard.stem + "_stats.json").relative_to(root).as_posix()] = "bytes changed"
    assert back == expected
