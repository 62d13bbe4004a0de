"""The demo pipeline (dags/demo_multimodal.yaml) end to end with ``dataset_output_root: s3://…`` (a real S3
server), every stage run task by task as the DAG's instances run them (``run_stage_task``, what ``mmprep run
--stage`` calls), against the same loopback image host and hub endpoint as a local run: parquet parts,
shards, reorganized tars, encodings and wdinfo equal the local run's byte for byte (download stats apart from
their timings; wdinfo's tar paths are relative, its ``dataset_root`` the URL)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from airflow_provider_mmprep.config import PipelineConfig, load_config  # noqa: E402
from airflow_provider_mmprep.stages import (download_images, generate_wdinfo, precache_encodings,  # noqa: E402
                                            reorganize_tar, run_stage_task)
from airflow_provider_mmprep.storage import Store  # noqa: E402
from airflow_provider_mmprep.testing.pipeline import local_sources, write_tiny_precache_config  # noqa: E402
from airflow_provider_mmprep.testing.s3_server import SeaweedS3  # noqa: E402

DEMO_YAML = Path(__file__).resolve().parents[2] / "dags" / "demo_multimodal.yaml"
ORDER = ("download_parquet", "download_images", "reorganize_tar", "precache_encodings", "generate_wdinfo")
TIMINGS = ("duration", "start_time", "end_time")


def demo(root: str, precache_yaml: Path) -> PipelineConfig:
    return load_config(DEMO_YAML, [f"dataset_output_root={root}",
                                   f"precache_encodings.precache_config_path={precache_yaml}"])


def run_all(cfg: PipelineConfig) -> None:
    for stage in ORDER:
        if stage == "download_images":
            count = len(download_images.input_parts(cfg))
        elif stage in ("reorganize_tar", "precache_encodings"):
            count = cfg.stage(stage).task_selection.task_count
        else:
            count = 1
        for task_id in range(count):
            run_stage_task(cfg, stage, task_id, count)


def comparable(name: str, data: bytes) -> Any:
    if name.endswith("_stats.json"):
        return {k: v for k, v in json.loads(data).items() if k not in TIMINGS}
    return data


def test_demo_pipeline_on_s3_equals_the_local_run(tmp_path: Path, s3_env: SeaweedS3, s3_bucket: str) -> None:
    precache_yaml = write_tiny_precache_config(tmp_path / "models")
    local_root, url = tmp_path / "local", f"s3://{s3_bucket}/demo"
    with local_sources(images=60, parquet_files=1):
        run_all(demo(str(local_root), precache_yaml))
        run_all(demo(url, precache_yaml))

    local = {p.relative_to(local_root).as_posix(): comparable(p.name, p.read_bytes())
             for p in sorted(local_root.rglob("*")) if p.is_file() and not any(
                 part.startswith(".") for part in p.relative_to(local_root).parts)}
    store = Store(url)
    remote = {name: comparable(name, store.read_bytes(name)) for name in store.list_files(recursive=True)}
    local_info, remote_info = local.pop("wdinfo.pkl"), remote.pop("wdinfo.pkl")
    assert sorted(remote) == sorted(local)
    for folder in ("parquet/", "tarfiles_raw/", "tarfiles_reorganized/", "tarfiles_precached/"):
        assert any(n.startswith(folder) and n.endswith((".parquet", ".tar")) for n in local), folder
    assert remote == local  # every part, shard, manifest, offsets sidecar, reorganized and encoded tar

    local_info, remote_info = pickle.loads(local_info), pickle.loads(remote_info)
    assert local_info.pop("dataset_root") == str(local_root / "tarfiles_precached")
    assert remote_info.pop("dataset_root") == f"{url}/tarfiles_precached"
    assert remote_info == local_info and remote_info["tar_files"]  # tar paths relative to the root
    cfg = demo(url, precache_yaml)
    assert generate_wdinfo.check_output(cfg).problem is None  # readable through the stage's own reader
    modules = {"download_images": download_images, "reorganize_tar": reorganize_tar,
               "precache_encodings": precache_encodings, "generate_wdinfo": generate_wdinfo}
    for stage, module in modules.items():
        count = len(download_images.input_parts(cfg)) if stage == "download_images" else \
            cfg.stage(stage).task_selection.task_count if stage != "generate_wdinfo" else 1
        assert module.incomplete_tasks(cfg, count) == {}, stage  # the report's answers see the S3 outputs

    from airflow_provider_mmprep.report.facts import collect
    local_facts, local_download = collect(demo(str(local_root), precache_yaml))
    remote_facts, remote_download = collect(cfg)  # the run report's facts, read from S3
    for here, there in zip(local_facts, remote_facts, strict=True):
        assert there.incomplete == {} and there.task_count == here.task_count, there.name
        assert [t[:3] for t in there.tars] == [t[:3] for t in here.tars], there.name  # name, samples, bytes
        assert there.rows == here.rows, there.name
    assert remote_download.status_counts == local_download.status_counts
