"""download_parquet into s3:// (a real S3 server) from a loopback hub: the same bytes as the local run, split
parts included; reruns fetch nothing; no spool files left behind."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_mmprep.config import load_config
from airflow_provider_mmprep.stages import run_stage_task
from airflow_provider_mmprep.storage import Store
from airflow_provider_mmprep.testing.s3_server import SeaweedS3

REPO = "org/captions"


def _parquet(rows: int, offset: int, row_group_size: int) -> bytes:
    ids = range(offset, offset + rows)
    table = pa.table({"URL": [f"http://127.0.0.1:1/img/{i}.jpg" for i in ids],
                      "TEXT": [f"caption {i} é ✓" for i in ids], "similarity": pa.array([i / 7 for i in ids])})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


FILES = {"data/train-00000.parquet": _parquet(2500, 0, 300), "data/train-00001.parquet": _parquet(1001, 2500, 1000),
         "README.md": b"# card"}


def _cfg(nemo_config, root: Path, output_dir: str, parts: int):
    return load_config(nemo_config(), [f"dataset_repo_id={REPO}", f"dataset_output_root={root}",
                                       f"download_parquet.output_dir={output_dir}",
                                       f"download_parquet.parquet_subpartitions={parts}",
                                       "download_parquet.parquet_pattern=data/*.parquet",
                                       "download_images.enable=false", "reorganize_tar.enable=false",
                                       "precache_encodings.enable=false", "generate_wdinfo.enable=false"])


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".mmprep" not in p.parts and ".cache" not in p.parts}


@pytest.mark.parametrize("parts", [1, 3])
def test_parts_in_s3_equal_the_local_run_and_reruns_fetch_nothing(
        parts: int, nemo_config, use_hub, s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    use_hub.hub.add_repo(REPO, FILES)
    local_out = tmp_path / "local-parquet"
    local_summary = run_stage_task(_cfg(nemo_config, tmp_path, str(local_out), parts), "download_parquet", 0, 1)
    expected = _local_files(local_out)
    assert len(expected) == 2 * parts

    spool = tmp_path / "spool"
    monkeypatch.setenv("MMPREP_SPOOL_DIR", str(spool))
    url = f"s3://{s3_bucket}/ds/parquet"
    cfg = _cfg(nemo_config, tmp_path, url, parts)
    sent = use_hub.hub.bytes_sent
    summary = run_stage_task(cfg, "download_parquet", 0, 1)
    assert summary == local_summary
    assert use_hub.hub.bytes_sent - sent == sum(len(FILES[f]) for f in FILES if f.startswith("data/"))
    store = Store(url)
    assert store.list_files(recursive=True) == sorted(expected)
    for rel, data in expected.items():
        assert store.read_bytes(rel) == data, rel
    if parts > 1:  # the split records sit under the hidden state folder, as locally
        assert store.exists(".mmprep/split/data/train-00000.parquet.json")
    assert not any(p.is_file() for p in spool.rglob("*"))  # local disk: nothing left

    sent = use_hub.hub.bytes_sent
    again = run_stage_task(cfg, "download_parquet", 0, 1)
    assert use_hub.hub.bytes_sent == sent and again["fetched_or_verified"] == 0
    for rel, data in expected.items():
        assert store.read_bytes(rel) == data


def test_a_lost_part_is_rewritten_alone(nemo_config, use_hub, s3_env: SeaweedS3, s3_bucket: str,
                                        tmp_path: Path) -> None:
    use_hub.hub.add_repo(REPO, FILES)
    url = f"s3://{s3_bucket}/ds/parquet"
    cfg = _cfg(nemo_config, tmp_path, url, 3)
    run_stage_task(cfg, "download_parquet", 0, 1)
    store = Store(url)
    lost = "data/train-00001_part001-of-003.parquet"
    before = store.read_bytes(lost)
    untouched = store.fs.info(store._p("data/train-00001_part000-of-003.parquet"))["LastModified"]
    store.remove(lost)
    summary = run_stage_task(cfg, "download_parquet", 0, 1)
    assert summary["fetched_or_verified"] == 1 and store.read_bytes(lost) == before
    assert store.fs.info(store._p("data/train-00001_part000-of-003.parquet"))["LastModified"] == untouched
