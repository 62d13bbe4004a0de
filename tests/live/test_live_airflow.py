"""The DAGs on real Airflow services (PostgreSQL, api-server, scheduler, dag-processor, triggerer,
LocalExecutor), driven only through public interfaces: the REST API v2, the ``airflow`` and ``mmprep`` CLIs
and a headless browser on the UI. Scenario numbers follow issue 12. The services start once for the session
(the ``live`` fixture below); runs triggered here write under their own temporary output roots."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

if any(importlib.util.find_spec(m) is None for m in ("airflow", "torch", "diffusers", "psycopg2", "asyncpg")):
    pytest.skip("needs the airflow (with the postgres extra) and precache extras", allow_module_level=True)

from airflow_provider_mmprep.safepickle import safe_loads_plain  # noqa: E402
from airflow_provider_mmprep.testing.airflow_ui import AirflowUI, ui_available  # noqa: E402
from airflow_provider_mmprep.testing.live_airflow import (PASSWORD, USERNAME, LiveAirflow, free_port,  # noqa: E402
                                                          postgres_bindir)
from airflow_provider_mmprep.testing.pipeline import (LocalSources, local_sources,  # noqa: E402
                                                      write_tiny_precache_config)
from conftest import tree_bytes, tree_stamps  # noqa: E402

REPO_DAGS = Path(__file__).resolve().parents[2] / "dags"
DEMO_DAG = "mmprep_demo"
SCHEDULED_DAG = "mmprep_scheduled"
RESUME_DAG = "mmprep_resume"
K8S_DAG = "mmprep_k8s"
CONSUMER_DAG = "mmprep_wdinfo_consumer"
#: 103 reachable images and 5 dead links: counts that do not divide tar_chunk_size (25 in the demo, 30 below)
IMAGES, DEAD_LINKS = 103, 5

# A user's pipeline as NeMo ships it (download_num_processes: -1, one CPU per process), run every minute.
SCHEDULED_YAML = textwrap.dedent("""\
    run:
      name: mmprep_scheduled
      schedule: "* * * * *"
    dataset_repo_id: mmprep/demo-captions
    dataset_output_root: ${oc.env:MMPREP_SCHEDULED_ROOT}
    download_parquet:
      enable: True
      output_dir: ${..dataset_output_root}/parquet
      parquet_subpartitions: 3
      parquet_pattern: "*.parquet"
    download_images:
      enable: True
      parquet_pattern: ${..download_parquet.parquet_pattern}
      input_dir: ${..download_parquet.output_dir}
      output_dir: ${..dataset_output_root}/tarfiles_raw
      num_parquets_downloaded: ${..download_parquet.parquet_subpartitions}
      download_num_processes: -1
      download_num_threads: 64
      img2dataset_additional_arguments:
        encode_quality: 95
        resize_mode: no
      allow_private_addresses: true
    reorganize_tar:
      enable: True
      input_dir: ${..download_images.output_dir}
      output_dir: ${..dataset_output_root}/tarfiles_reorganized
      node_array_size: 2
      tar_chunk_size: 30
      file_ext_in_tar: [.jpg, .txt]
    precache_encodings:
      enable: False
    generate_wdinfo:
      enable: True
      input_dir: ${..reorganize_tar.output_dir}
      tar_chunk_size: ${..reorganize_tar.tar_chunk_size}
      file_ext_in_tar: [.jpg, .txt]
      output_wdinfo_path: ${..dataset_output_root}/wdinfo.pkl
    """)

# A training-side DAG that waits on the demo pipeline's wdinfo Asset and loads the file the event names.
CONSUMER_DAG_PY = textwrap.dedent('''\
    """Consumer of the mmprep_demo wdinfo Asset (an Airflow DAG file for the live tests)."""
    from airflow.sdk import Asset, dag, task


    @dag(dag_id="mmprep_wdinfo_consumer", schedule=[Asset(name="mmprep.mmprep_demo.wdinfo")], catchup=False)
    def consumer():
        @task
        def load(triggering_asset_events=None):
            from pathlib import Path

            from airflow_provider_mmprep.safepickle import safe_loads_plain

            events = [e for evs in triggering_asset_events.values() for e in evs]
            path = events[-1].extra["wdinfo_path"]
            info = safe_loads_plain(Path(path).read_bytes())
            return {"wdinfo_path": path, "total_key_count": info["total_key_count"],
                    "tar_files": len(info["tar_files"])}

        load()


    consumer()
    ''')


KUBECONFIG = textwrap.dedent("""\
    apiVersion: v1
    kind: Config
    clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}]
    users: [{name: nobody, user: {token: not-a-token}}]
    contexts: [{name: nowhere, context: {cluster: nowhere, user: nobody, namespace: default}}]
    current-context: nowhere
    """)


@pytest.fixture(scope="session")
def sources() -> Iterator[LocalSources]:
    with local_sources(images=IMAGES, failing=DEAD_LINKS, parquet_files=1, set_env=False) as found:
        yield found


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory, sources: LocalSources) -> Iterator[LiveAirflow]:
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server binaries missing (make test installs Debian's postgresql)")
    work = tmp_path_factory.mktemp("live")
    dags = work / "dags"
    dags.mkdir()
    shutil.copy(REPO_DAGS / "mmprep_dags.py", dags)
    shutil.copy(REPO_DAGS / "demo_multimodal.yaml", dags)
    (dags / "scheduled_pipeline.yaml").write_text(SCHEDULED_YAML)
    # the demo's pipeline under another DAG id, for the resume runs (`airflow tasks clear DAG` acts on all runs),
    # and with precache in GPU pods (runner: kubernetes): the kubeconfig below names a closed loopback port, so
    # pod creation fails the way it does when the cluster's API server cannot be reached
    demo = yaml.safe_load((REPO_DAGS / "demo_multimodal.yaml").read_text())
    (dags / "resume_pipeline.yaml").write_text(yaml.safe_dump({**demo, "run": {"name": RESUME_DAG}},
                                                              sort_keys=False))
    pods = {**demo, "run": {"name": K8S_DAG}, "precache_encodings": {**demo["precache_encodings"],
                                                                     "runner": "kubernetes"}}
    (dags / "pods_pipeline.yaml").write_text(yaml.safe_dump(pods, sort_keys=False))
    kubeconfig = work / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG.replace("{port}", str(free_port())))
    (dags / "wdinfo_consumer.py").write_text(CONSUMER_DAG_PY)
    env = {"HF_ENDPOINT": sources.hub.url, "HF_HOME": str(work / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "MMPREP_DEMO_ROOT": str(work / "demo-default-root"),
           "MMPREP_SCHEDULED_ROOT": str(work / "scheduled-root")}
    config = {"MMPREP__RETRIES": "1", "MMPREP__RETRY_DELAY_SECONDS": "1", "MMPREP__IN_CLUSTER": "False",
              "MMPREP__KUBE_CONFIG_FILE": str(kubeconfig), "MMPREP__WORKER_IMAGE": "mmprep-worker:test"}
    with LiveAirflow(work, dags, env=env, airflow_config=config) as services:
        yield services



STAGES = ["download_parquet", "download_images", "reorganize_tar", "precache_encodings", "generate_wdinfo"]
ARTIFACTS = Path(os.environ.get("MMPREP_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def _states(live: LiveAirflow, dag_id: str, run_id: str) -> dict[tuple[str, int], str | None]:
    return {key: ti["state"] for key, ti in live.task_instances(dag_id, run_id).items()}


def _tries(live: LiveAirflow, dag_id: str, run_id: str) -> dict[tuple[str, int], int]:
    return {key: ti["try_number"] for key, ti in live.task_instances(dag_id, run_id).items()}


def _wdinfo(root: Path) -> dict[str, Any]:
    return safe_loads_plain((root / "wdinfo.pkl").read_bytes())


# ---- 1. UI trigger with Params ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ui_run(live: LiveAirflow, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo DAG triggered from the UI's Params form (every stage, a fresh output root); the consumer
    of its wdinfo Asset is unpaused first (scenario 6)."""
    reason = ui_available()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ui-run")
    write_tiny_precache_config(root / "models")
    live.unpause(CONSUMER_DAG)
    with AirflowUI(live.base_url, USERNAME, PASSWORD) as ui:
        ui.login()
        run_id = ui.trigger(DEMO_DAG, {"dataset_output_root": str(root), "stages": STAGES})
        state = live.wait_run(DEMO_DAG, run_id)
        ui.open_run_grid(DEMO_DAG, run_id)
        grid = ui.screenshot(ARTIFACTS / "live-ui-run-grid.png")
        ui.driver.get(f"{live.base_url}/dags/{DEMO_DAG}/runs/{run_id}/tasks/precache_encodings/mapped")
        ui.element("table")
        time.sleep(1)
        mapped = ui.screenshot(ARTIFACTS / "live-ui-precache-mapped.png")
    return {"root": root, "run_id": run_id, "state": state, "screenshots": [grid, mapped]}


def test_1_ui_trigger_with_params_runs_every_stage(live: LiveAirflow, ui_run: dict[str, Any]) -> None:
    root, run_id = ui_run["root"], ui_run["run_id"]
    assert ui_run["state"] == "success", _states(live, DEMO_DAG, run_id)
    run = live.api("GET", f"/dags/{DEMO_DAG}/dagRuns/{run_id}")
    assert run["conf"]["dataset_output_root"] == str(root) and run["conf"]["stages"] == STAGES
    tis = live.task_instances(DEMO_DAG, run_id)
    assert all(ti["state"] == "success" for ti in tis.values()), {k: t["state"] for k, t in tis.items()}
    labels = {task: sorted(ti["rendered_map_index"] for (t, _), ti in tis.items() if t == task)
              for task in ("download_images", "precache_encodings")}
    assert labels["download_images"] == ["part-00000", "part-00001"]
    assert labels["precache_encodings"] == [f"task {i}/4" for i in range(4)]
    wdinfo = _wdinfo(root)
    # 103 images in tars of 25: four full tars listed, the short fifth left out (NeMo's sampler needs full)
    assert (wdinfo["chunk_size"], len(wdinfo["tar_files"]), wdinfo["total_key_count"]) == (25, 4, 100)
    assert len(list((root / "tarfiles_precached").glob("*.tar"))) == 4
    page = (root / "report.html").read_text()
    assert run_id in page and f"{DEAD_LINKS}" in page
    assert all(path.stat().st_size > 10_000 for path in ui_run["screenshots"])


# ---- 2. Bad Params --------------------------------------------------------------------------------------
def test_2_bad_params_fail_at_plan_naming_the_param_and_write_nothing(live: LiveAirflow, ui_run: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    root = tmp_path / "bad-params"  # precache's inputs and encoders are there: only the Params are wrong
    shutil.copytree(ui_run["root"] / "tarfiles_reorganized", root / "tarfiles_reorganized")
    shutil.copytree(ui_run["root"] / "models", root / "models")
    before = tree_stamps(root)
    # the schema can express a stage name: the trigger itself is refused (the UI shows the same 400)
    refused = live.api("POST", f"/dags/{DEMO_DAG}/dagRuns", expect=None,
                       json={"logical_date": None, "conf": {"dataset_output_root": str(root),
                                                            "stages": ["precache_encodings", "precache"]}})
    assert refused.status_code == 400 and "precache" in refused.text, refused.text
    runs = {value: live.trigger(DEMO_DAG, {"dataset_output_root": str(root), "precache_task_ids": value,
                                           "stages": ["precache_encodings"]})
            for value in ("abc", "5-2", "4")}
    for value, run_id in runs.items():
        assert live.wait_run(DEMO_DAG, run_id) == "failed"
        states = _states(live, DEMO_DAG, run_id)
        assert states[("plan", -1)] == "failed", states
        assert all(state != "success" for key, state in states.items() if key[0] != "report"), states
        log = live.task_log(DEMO_DAG, run_id, "plan")
        assert "precache_task_ids" in log and repr(value) in log, log[-3000:]
    assert tree_stamps(root) == before  # nothing written, nothing touched


# ---- 3. Scheduled runs -----------------------------------------------------------------------------------
def test_3_scheduled_runs_succeed_and_the_second_redoes_nothing(live: LiveAirflow, tmp_path: Path) -> None:
    root = Path(live.env["MMPREP_SCHEDULED_ROOT"])
    live.unpause(SCHEDULED_DAG)
    try:
        first = _wait_scheduled_run(live, after=set())
        assert live.wait_run(SCHEDULED_DAG, first) == "success", _states(live, SCHEDULED_DAG, first)
        before = tree_stamps(root)
        data = tree_bytes(root)
        info = _wdinfo(root)
        # 103 images, download_num_processes: -1, tars of 30: three full tars listed, the short fourth not
        assert (info["chunk_size"], len(info["tar_files"]), info["total_key_count"]) == (30, 3, 90)
        second = _wait_scheduled_run(live, after={first})
        assert live.wait_run(SCHEDULED_DAG, second) == "success", _states(live, SCHEDULED_DAG, second)
    finally:
        live.pause(SCHEDULED_DAG)
    after = tree_stamps(root)
    changed = sorted(k for k in before if after.get(k) != before[k] and not k.endswith("report.html"))
    assert not changed, changed  # every stage skipped its complete outputs
    assert {k: v for k, v in tree_bytes(root).items() if k != "report.html"} == \
        {k: v for k, v in data.items() if k != "report.html"}
    runs = live.runs(SCHEDULED_DAG)
    assert {r["run_type"] for r in runs if r["dag_run_id"] in (first, second)} == {"scheduled"}


def _wait_scheduled_run(live: LiveAirflow, after: set[str], timeout: float = 150) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [r["dag_run_id"] for r in live.runs(SCHEDULED_DAG)
                 if r["run_type"] == "scheduled" and r["dag_run_id"] not in after]
        if fresh:
            return sorted(fresh)[0]
        time.sleep(1)
    raise AssertionError(f"the scheduler created no run of {SCHEDULED_DAG} in {timeout} s\n{live.log_tails()}")


# ---- 4. Resume by clear, three ways ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def failed_runs(live: LiveAirflow, ui_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, dict[str, Any]]:
    """Three runs of the resume DAG over copies of the UI run's reorganized shards, each with the input tar
    of precache task 2 damaged (cut in half): precache task 2 fails, the rest succeeds. Triggered together,
    then the inputs are repaired; each test resumes one of them its own way."""
    clean = ui_run["root"]
    runs: dict[str, dict[str, Any]] = {}
    live.unpause(RESUME_DAG)
    for way in ("a", "b", "c"):
        root = tmp_path_factory.mktemp(f"resume-{way}")
        shutil.copytree(clean / "tarfiles_reorganized", root / "tarfiles_reorganized")
        shutil.copytree(clean / "models", root / "models")
        damaged = root / "tarfiles_reorganized" / "00002.tar"
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
        run_id = live.trigger(RESUME_DAG, {"dataset_output_root": str(root),
                                           "stages": ["precache_encodings", "generate_wdinfo"]})
        runs[way] = {"root": root, "run_id": run_id}
    for way, run in runs.items():
        run["state"] = live.wait_run(RESUME_DAG, run["run_id"])
        run["tries"] = _tries(live, RESUME_DAG, run["run_id"])
        run["states"] = _states(live, RESUME_DAG, run["run_id"])
        run["report"] = (run["root"] / "report.html").read_text() if (run["root"] / "report.html").is_file() \
            else ""
        run["wdinfo_before"] = (run["root"] / "wdinfo.pkl").exists()
        run["stamps"] = tree_stamps(run["root"] / "tarfiles_precached")
        shutil.copy2(clean / "tarfiles_reorganized" / "00002.tar", run["root"] / "tarfiles_reorganized")
    return runs


def _check_failed_then_resumed(live: LiveAirflow, run: dict[str, Any], clean_root: Path,
                               report_reruns: bool = True) -> None:
    """The run failed on precache task 2 only; after the clear it succeeded, only index 2 and what is
    downstream of it ran again, finished shards were not touched, and the outputs equal the clean run's.
    ``report_reruns``: the clear also reran the report teardown (not so with ``--only-failed``)."""
    assert run["state"] == "failed"
    states = run["states"]
    assert [states[("precache_encodings", i)] for i in range(4)] == ["success", "success", "failed", "success"]
    assert not run["wdinfo_before"]
    assert run["report"]  # the teardown wrote it although the run failed (what it says: the test below)

    # The UI's clear dialog closes before its request has landed: until it has, the run is still the failed
    # one, and waiting for it to end would return at once. Wait for the clear to show first.
    cleared = ("precache_encodings", 2)
    deadline = time.monotonic() + 120
    while live.run_state(RESUME_DAG, run["run_id"]) == "failed" \
            and _tries(live, RESUME_DAG, run["run_id"])[cleared] == run["tries"][cleared]:
        assert time.monotonic() < deadline, f"the clear of {cleared} never reached run {run['run_id']}"
        time.sleep(1)
    assert live.wait_run(RESUME_DAG, run["run_id"]) == "success", _states(live, RESUME_DAG, run["run_id"])
    tries = _tries(live, RESUME_DAG, run["run_id"])
    before = run["tries"]
    reran = sorted(key for key in tries if tries[key] != before.get(key))
    expected = [("generate_wdinfo", 0), ("plan_generate_wdinfo", -1), ("precache_encodings", 2)]
    assert reran == expected + ([("report", -1)] if report_reruns else []), reran
    out = run["root"] / "tarfiles_precached"
    after = tree_stamps(out)
    assert {k: v for k, v in after.items() if k in run["stamps"]} == run["stamps"]
    new = sorted(set(after) - set(run["stamps"]))
    assert new and all(name.startswith("00002.") for name in new), new
    assert tree_bytes(out) == tree_bytes(clean_root / "tarfiles_precached")
    ours, reference = _wdinfo(run["root"]), _wdinfo(clean_root)
    assert {k: ours[k] for k in ("tar_files", "chunk_size", "total_key_count")} == \
        {k: reference[k] for k in ("tar_files", "chunk_size", "total_key_count")}
    if report_reruns:
        assert "No failed or missing tasks found." in (run["root"] / "report.html").read_text()


def test_4_the_failed_runs_report_names_the_failed_task_and_how_to_resume_it(
        failed_runs: dict[str, dict[str, Any]]) -> None:
    for run in failed_runs.values():
        assert "--stage precache_encodings --task-id 2 --task-count 4" in run["report"], run["root"]
        assert f"mmprep clear {RESUME_DAG} {run['run_id']} --stage precache_encodings --task-ids 2" in run["report"]


def test_4a_resume_by_mmprep_clear(live: LiveAirflow, ui_run: dict[str, Any],
                                   failed_runs: dict[str, dict[str, Any]]) -> None:
    run = failed_runs["a"]
    result = subprocess.run(
        [sys.executable, "-m", "airflow_provider_mmprep.cli", "clear", RESUME_DAG, run["run_id"],
         "--stage", "precache_encodings", "--task-ids", "2", "--api-url", live.base_url, "--username", USERNAME],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "AIRFLOW_API_PASSWORD": PASSWORD, "PYTHONPATH": str(Path.cwd())})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "precache_encodings map indices 2" in result.stdout
    _check_failed_then_resumed(live, run, ui_run["root"])


# (c) before (b): `airflow tasks clear --only-failed DAG` clears every failed run of the DAG, (c)'s too
def test_4c_resume_by_clearing_the_mapped_instance_in_the_ui(live: LiveAirflow, ui_run: dict[str, Any],
                                                             failed_runs: dict[str, dict[str, Any]]) -> None:
    run = failed_runs["c"]
    with AirflowUI(live.base_url, USERNAME, PASSWORD) as ui:
        ui.login()
        ui.clear_mapped_instance(RESUME_DAG, run["run_id"], "precache_encodings", 2)
    _check_failed_then_resumed(live, run, ui_run["root"])


def test_4b_resume_by_airflow_tasks_clear(live: LiveAirflow, ui_run: dict[str, Any],
                                          failed_runs: dict[str, dict[str, Any]]) -> None:
    run = failed_runs["b"]
    # --downstream: without it generate_wdinfo stays upstream_failed and the run fails again (docs say so)
    live.airflow("tasks", "clear", "-t", "precache_encodings", "--downstream", "--only-failed", "-y", RESUME_DAG)
    # --only-failed leaves the (successful) report teardown alone: report.html is refreshed by `mmprep report`
    _check_failed_then_resumed(live, run, ui_run["root"], report_reruns=False)


# ---- 6. Data-aware downstream ---------------------------------------------------------------------------
def test_6_wdinfo_asset_event_triggers_the_consumer_dag(live: LiveAirflow, ui_run: dict[str, Any]) -> None:
    root = ui_run["root"]
    events = [e for e in live.asset_events() if e["source_dag_id"] == DEMO_DAG
              and e["source_run_id"] == ui_run["run_id"]]
    assert len(events) == 1 and events[0]["extra"]["wdinfo_path"] == str(root / "wdinfo.pkl"), events
    deadline = time.monotonic() + 300
    while not (runs := [r for r in live.runs(CONSUMER_DAG) if r["run_type"] == "asset_triggered"]):
        assert time.monotonic() < deadline, f"{CONSUMER_DAG} never ran\n{live.log_tails()}"
        time.sleep(1)
    run_id = runs[0]["dag_run_id"]
    assert live.wait_run(CONSUMER_DAG, run_id) == "success", _states(live, CONSUMER_DAG, run_id)
    value = live.api("GET", f"/dags/{CONSUMER_DAG}/dagRuns/{run_id}/taskInstances/load/xcomEntries/return_value",
                     params={"deserialize": "true"})["value"]
    assert value == {"wdinfo_path": str(root / "wdinfo.pkl"), "total_key_count": _wdinfo(root)["total_key_count"],
                     "tar_files": 4}


# ---- 7. KubernetesPodOperator stages on the live scheduler ------------------------------------------------
def test_7_pod_stage_without_a_cluster_fails_with_the_pod_error_and_still_labels_and_clears(
        live: LiveAirflow, ui_run: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "pods"  # no models/precache.yaml here: the pods have their own (plan must not need it)
    shutil.copytree(ui_run["root"] / "tarfiles_reorganized", root / "tarfiles_reorganized")
    # the pool GPU pods queue in ([mmprep] gpu_pool), created as docs/deploy.md says: without it Airflow
    # leaves the instances "scheduled" for ever (a scheduler warning only)
    live.airflow("pools", "set", "mmprep_gpu", "4", "GPU pods")
    live.unpause(K8S_DAG)
    run_id = live.trigger(K8S_DAG, {"dataset_output_root": str(root),
                                    "stages": ["precache_encodings", "generate_wdinfo"]})
    assert live.wait_run(K8S_DAG, run_id, timeout=300) == "failed"
    tis = live.task_instances(K8S_DAG, run_id)
    precache = {i: tis[("precache_encodings", i)] for i in range(4)}
    assert {ti["state"] for ti in precache.values()} == {"failed"}, tis
    assert sorted(ti["rendered_map_index"] for ti in precache.values()) == [f"task {i}/4" for i in range(4)]
    log = live.task_log(K8S_DAG, run_id, "precache_encodings", 1, precache[1]["try_number"])
    assert "Connection refused" in log or "Max retries exceeded" in log, log[-3000:]
    live.check_alive()  # the scheduler and the rest are still up
    health = live.api("GET", "/monitor/health")
    assert health["scheduler"]["status"] == "healthy", health

    result = subprocess.run(
        [sys.executable, "-m", "airflow_provider_mmprep.cli", "clear", K8S_DAG, run_id, "--stage",
         "precache_encodings", "--task-ids", "1", "--api-url", live.base_url, "--username", USERNAME],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "AIRFLOW_API_PASSWORD": PASSWORD, "PYTHONPATH": str(Path.cwd())})
    assert result.returncode == 0, result.stdout + result.stderr
    assert live.wait_run(K8S_DAG, run_id, timeout=300) == "failed"
    tries = _tries(live, K8S_DAG, run_id)
    assert tries[("precache_encodings", 1)] > precache[1]["try_number"]
    assert [tries[("precache_encodings", i)] for i in (0, 2, 3)] == \
        [precache[i]["try_number"] for i in (0, 2, 3)]
    assert not (root / "tarfiles_precached").exists() or not any((root / "tarfiles_precached").glob("*.tar"))


# ---- 5. A killed worker ------------------------------------------------------------------------------------
def _task_pid(ti_id: str) -> int | None:
    """The process running the task's code: the child the LocalExecutor worker (titled with the task
    instance's id while it supervises it) forked for the task."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if f"LocalExecutor: {ti_id}" in title:
                    children = (proc / "task" / proc.name / "children").read_text().split()
                    return int(children[0]) if children else None
            except OSError:
                continue
    return None


def test_5_a_killed_download_worker_is_retried_and_the_outputs_equal_a_clean_run(
        live: LiveAirflow, ui_run: dict[str, Any], sources: Any, tmp_path: Path) -> None:
    root = tmp_path / "killed"
    sources.images.latency = (1.5, 2.5)  # each request takes seconds: the kill lands mid-download
    try:
        run_id = live.trigger(DEMO_DAG, {"dataset_output_root": str(root),
                                         "stages": ["download_parquet", "download_images"]})
        deadline = time.monotonic() + 300
        pid = None
        while pid is None:
            assert time.monotonic() < deadline, _states(live, DEMO_DAG, run_id)
            ti = live.task_instances(DEMO_DAG, run_id).get(("download_images", 0))
            if ti and ti["state"] == "running":
                pid = _task_pid(ti["id"])
            time.sleep(0.5)
        time.sleep(2)
        assert ti["try_number"] == 1 and live.task_instances(DEMO_DAG, run_id)[("download_images", 0)][
            "state"] == "running"
        os.kill(pid, signal.SIGKILL)
        sources.images.latency = (0.0, 0.0)
        assert live.wait_run(DEMO_DAG, run_id) == "success", _states(live, DEMO_DAG, run_id)
    finally:
        sources.images.latency = (0.0, 0.0)
    tries = _tries(live, DEMO_DAG, run_id)
    assert tries[("download_images", 0)] == 2 and tries[("download_images", 1)] == 1, tries
    raw, clean = root / "tarfiles_raw", ui_run["root"] / "tarfiles_raw"
    assert not [p for p in raw.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("."))
                and ".mmprep" not in p.parts]
    # every byte of the shards equals the clean run's; the stats files differ only in their timings
    ours, reference = tree_bytes(raw), tree_bytes(clean)
    assert set(ours) == set(reference)
    assert {k: v for k, v in ours.items() if not k.endswith("_stats.json")} == \
        {k: v for k, v in reference.items() if not k.endswith("_stats.json")}
    for name in (k for k in ours if k.endswith("_stats.json")):
        mine, theirs = json.loads(ours[name]), json.loads(reference[name])
        assert (mine["count"], mine["successes"]) == (theirs["count"], theirs["successes"]), name
