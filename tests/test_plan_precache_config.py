"""plan_run checks the precache YAML only when precache runs in this run and in the Airflow worker (found by
the live runs: a download-only run and a pod-runner run failed at plan on a precache file they never use)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from airflow_provider_mmprep.config import ConfigError
from airflow_provider_mmprep.task_mapping import plan_run, read_dag_spec

MISSING = "precache_config_path: /nonexistent/precache.yaml"


def _spec(nemo_config: Callable[..., Path], tmp_path: Path, runner: str = "local"):  # noqa: ANN202
    precache = "precache_config_path: ${launcher_scripts_path}/conf/data_preparation/multimodal/precache_sd.yaml"
    path = nemo_config({precache: f"{MISSING}\n  runner: {runner}", "dataset_repo_id: ???": "dataset_repo_id: o/n",
                        "dataset_output_root: ???": f"dataset_output_root: {tmp_path / 'out'}"})
    (tmp_path / "out" / "tarfiles_precached").mkdir(parents=True)
    return read_dag_spec(path)


def test_a_run_without_precache_does_not_need_its_config(nemo_config: Callable[..., Path], tmp_path: Path) -> None:
    planned = plan_run(_spec(nemo_config, tmp_path), {"stages": ["generate_wdinfo"]}, limit=1024)
    assert planned["stages"] == ["generate_wdinfo"] and planned["precache_encodings"] == []


def test_a_run_with_local_precache_checks_its_config(nemo_config: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precache_encodings.precache_config_path"):
        plan_run(_spec(nemo_config, tmp_path), {"stages": ["precache_encodings", "generate_wdinfo"]}, limit=1024)


def test_precache_in_pods_reads_its_config_in_the_pod(nemo_config: Callable[..., Path], tmp_path: Path) -> None:
    spec = _spec(nemo_config, tmp_path, runner="kubernetes")
    planned = plan_run(spec, {"stages": ["generate_wdinfo"]}, limit=1024)
    assert planned["precache_encodings"] == []
    planned = plan_run(spec, {"stages": ["precache_encodings", "generate_wdinfo"]}, limit=1024)
    assert "precache_encodings" in planned
