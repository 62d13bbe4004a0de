"""One set of real Airflow services for the whole test session (``airflow_provider_mmprep.testing.live_airflow``):
PostgreSQL, api-server, scheduler, dag-processor, triggerer with LocalExecutor, this repo's DAG loader and
the YAMLs under test in a private dags folder, the demo's loopback image host and Hugging Face endpoint as
data. When a test here fails, the services' log tails are attached to its report."""

from __future__ import annotations

import importlib.util
import shutil
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

if any(importlib.util.find_spec(m) is None for m in ("airflow", "torch", "diffusers", "psycopg2", "asyncpg")):
    pytest.skip("needs the airflow (with the postgres extra) and precache extras", allow_module_level=True)

from airflow_provider_mmprep.testing.live_airflow import LiveAirflow, free_port, postgres_bindir  # noqa: E402
from airflow_provider_mmprep.testing.pipeline import LocalSources, local_sources  # noqa: E402

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[Any]:
    """A failing live test carries the services' log tails in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "live" in getattr(item, "fixturenames", ()):
        services = item.funcargs.get("live") if hasattr(item, "funcargs") else None
        if isinstance(services, LiveAirflow):
            report.sections.append(("live Airflow service logs (tails)", services.log_tails()))
