"""The demo DAG run by Airflow (``dag.test()`` on SQLite, every stage ``runner: local``) against a loopback
image host and Hugging Face–compatible endpoint with tiny encoders; then a Params run that reuses its
reorganized shards, and the GPU pod's command run locally. One full run is shared by the module. Resuming by
clearing is tested on real services, through public interfaces only, in tests/live/."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import importlib.util  # noqa: E402

# find_spec, not importorskip: airflow must not be imported before airflow_home() sets AIRFLOW_HOME
if any(importlib.util.find_spec(m.split(".")[0]) is None for m in ("airflow", "torch", "diffusers")):
    pytest.skip("needs the airflow/kubernetes/precache extras", allow_module_level=True)

from airflow_provider_mmprep.testing.airflow_env import DAGS_FOLDER, airflow_home  # noqa: E402

airflow_home(migrate=True)

from airflow_provider_mmprep.task_ids import instance_kwargs  # noqa: E402
from airflow_provider_mmprep.testing.pipeline import local_sources, write_tiny_precache_config  # noqa: E402
from conftest import tree_bytes  # noqa: E402

DAG_ID = "mmprep_demo"
IMAGES = 100  # tar_chunk_size 25 in the demo YAML: 4 reorganized tars, one per precache task


def _task_instances(run_id: str) -> list[Any]:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    with settings.Session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=DAG_ID, run_id=run_id).all()
        session.expunge_all()
    return tis


def _dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def _copy_inputs(clean: Path, root: Path) -> Path:
    """A fresh data root holding the clean run's reorganized shards and encoders (precache's inputs)."""
    shutil.copytree(clean / "tarfiles_reorganized", root / "tarfiles_reorganized")
    shutil.copytree(clean / "models", root / "models")
    return root


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("demo")
    os.environ["MMPREP_DEMO_ROOT"] = str(root)
    write_tiny_precache_config(root / "models")
    dag = _dag()
    with local_sources(images=IMAGES, parquet_files=1):
        run = dag.test()
    return {"root": root, "run_id": run.run_id, "state": str(run.state), "dag": dag}


def test_every_stage_runs_labels_instances_and_writes_wdinfo(clean_run: dict[str, Any]) -> None:
    assert clean_run["state"].endswith("success")
    tis = _task_instances(clean_run["run_id"])
    by_task: dict[str, list[Any]] = {}
    for ti in tis:
        by_task.setdefault(ti.task_id, []).append(ti)
    for stage in ("download_parquet", "download_images", "reorganize_tar", "precache_encodings",
                  "generate_wdinfo"):
        assert by_task[stage] and all(str(ti.state).endswith("success") for ti in by_task[stage]), stage
    # download_parquet split the one file into 2 parts: download_images fanned out over those 2
    assert sorted(ti.rendered_map_index for ti in by_task["download_images"]) == ["part-00000", "part-00001"]
    assert sorted(ti.rendered_map_index for ti in by_task["precache_encodings"]) == [
        f"task {i}/4" for i in range(4)]
    wdinfo = pickle.loads((clean_run["root"] / "wdinfo.pkl").read_bytes())
    assert wdinfo["total_key_count"] == IMAGES and wdinfo["chunk_size"] == 25
    assert len(wdinfo["tar_files"]) == 4
    # the final teardown task writes the run report beside wdinfo.pkl
    assert str(by_task["report"][0].state).endswith("success")
    page = (clean_run["root"] / "report.html").read_text()
    assert clean_run["run_id"] in page and "No failed or missing tasks found." in page


def test_stage_instances_leave_their_summary_in_the_log_not_in_xcom(clean_run: dict[str, Any]) -> None:
    """At a 1,024-way fan-out an XCom push is one more execution-API call per instance (bench_fanout); the
    plan tasks' XComs are what the DAG maps over and must stay."""
    from airflow import settings
    from airflow.models.xcom import XComModel

    with settings.Session() as session:
        pushed = {row.task_id for row in session.query(XComModel).filter(XComModel.run_id == clean_run["run_id"])}
    assert {"plan", "plan_precache_encodings"} <= pushed
    assert not pushed & {"download_parquet", "download_images", "reorganize_tar", "precache_encodings",
                         "generate_wdinfo"}


def test_after_a_clean_run_every_stage_says_nothing_is_left_and_the_demo_counts_its_tars(
        clean_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_mmprep.config import load_config
    from airflow_provider_mmprep.demo import count_tars
    from airflow_provider_mmprep.plan import plan_stage
    from airflow_provider_mmprep.stages import get_stage_runner

    monkeypatch.setenv("MMPREP_DEMO_ROOT", str(clean_run["root"]))
    cfg = load_config(DAGS_FOLDER / "demo_multimodal.yaml")
    for stage in cfg.enabled_stages:
        module = sys.modules[get_stage_runner(stage).__module__]
        assert module.incomplete_tasks(cfg, plan_stage(cfg, stage).task_count) == {}, stage
    root = clean_run["root"]
    assert count_tars(cfg, "download_images") == (len(list((root / "tarfiles_raw").glob("*/*.tar"))), IMAGES)
    assert count_tars(cfg, "reorganize_tar") == (4, IMAGES)
    assert count_tars(cfg, "precache_encodings") == (4, IMAGES)


def test_wdinfo_asset_event_recorded(clean_run: dict[str, Any]) -> None:
    from airflow import settings
    from airflow.models.asset import AssetEvent, AssetModel

    with settings.Session() as session:
        events = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetModel.name == f"mmprep.{DAG_ID}.wdinfo",
                          AssetEvent.source_run_id == clean_run["run_id"]).all())
        extras = [dict(e.extra or {}) for e in events]
    assert len(extras) == 1
    assert extras[0]["wdinfo_path"] == str(clean_run["root"] / "wdinfo.pkl")


def test_params_task_ids_run_only_those_and_pod_command_matches(clean_run: dict[str, Any],
                                                                tmp_path: Path) -> None:
    root = _copy_inputs(clean_run["root"], tmp_path / "params")
    run = clean_run["dag"].test(run_conf={"dataset_output_root": str(root), "stages": ["precache_encodings"],
                                          "precache_task_ids": "1-2"})
    assert str(run.state).endswith("success")
    labels = sorted(ti.rendered_map_index for ti in _task_instances(run.run_id)
                    if ti.task_id == "precache_encodings")
    assert labels == ["task 1/4", "task 2/4"]
    clean = tree_bytes(clean_run["root"] / "tarfiles_precached")
    written = tree_bytes(root / "tarfiles_precached")
    assert written and set(written) < set(clean)
    assert {name.split(".")[0] for name in written} == {"00001", "00002"}
    assert all(clean[name] == data for name, data in written.items())

    # The GPU pod's command (as the DAG renders it for runner: kubernetes), run here on CPU for task 1.
    pod_root = tmp_path / "pod"
    arguments = instance_kwargs("kubernetes", "precache_encodings", str(DAGS_FOLDER / "demo_multimodal.yaml"),
                                [f"dataset_output_root={root}",
                                 f"precache_encodings.output_dir={pod_root}"], 1, 4)["arguments"]
    result = subprocess.run([sys.executable, "-m", "airflow_provider_mmprep.cli", *arguments],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert result.returncode == 0, result.stderr[-2000:]
    from_pod = tree_bytes(pod_root)
    assert from_pod and {n.split(".")[0] for n in from_pod} == {"00001"}
    assert all(written[name] == data for name, data in from_pod.items())
