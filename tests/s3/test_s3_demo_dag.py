"""The demo DAG run by Airflow (``dag.test()``) twice against the same loopback image host and hub: once on
local disk, once with ``dataset_output_root: s3://…`` (a real S3 server) as a run Param, its precache YAML
read from that URL too (``precache_config_path: ${..dataset_output_root}/models/precache.yaml``) and the S3
credentials coming only from an Airflow connection (``[mmprep] storage_conn_id``, defined as an
``AIRFLOW_CONN_*`` variable; no AWS variables). Every part, shard, manifest, reorganized and encoded tar and
wdinfo in the bucket equals the local run's byte for byte (download stats apart from their timings; wdinfo's
``dataset_root`` is the URL), and the run report lands beside wdinfo.pkl in the bucket."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import pytest

# find_spec, not importorskip: airflow must not be imported before airflow_home() sets AIRFLOW_HOME
if any(importlib.util.find_spec(m.split(".")[0]) is None for m in ("airflow", "torch", "diffusers")):
    pytest.skip("needs the airflow/kubernetes/precache extras", allow_module_level=True)

from airflow_provider_mmprep.testing.airflow_env import DAGS_FOLDER, airflow_home  # noqa: E402

airflow_home(migrate=True)

from airflow_provider_mmprep.storage import Store  # noqa: E402
from airflow_provider_mmprep.testing.pipeline import local_sources, write_tiny_precache_config  # noqa: E402
from airflow_provider_mmprep.testing.s3_server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3  # noqa: E402

DAG_ID = "mmprep_demo"
IMAGES = 60  # tar_chunk_size 25 in the demo YAML: 2 full reorganized tars and a short one
TIMINGS = ("duration", "start_time", "end_time")
CONN_ID = "mmprep_demo_s3"
#: what only the run writes, not the stages (the report names its run; the precache YAML and encoders are inputs)
NOT_COMPARED = ("report.html", "models/")


@pytest.fixture
def airflow_settings(tmp_path: Path, s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The demo's data root, the storage connection and ``[mmprep] storage_conn_id``; no AWS variables (the
    connection is the only way in); everything restored after (other modules parse the same DAG)."""
    import s3fs

    root = tmp_path / "local"
    values = {"MMPREP_DEMO_ROOT": str(root), "AIRFLOW__MMPREP__STORAGE_CONN_ID": CONN_ID,
              f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps({
                  "conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
                  "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": REGION}}),
              "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
              "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}
    removed = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_PROFILE")
    for key, value in values.items():
        monkeypatch.setenv(key, value)  # monkeypatch restores every variable after the test
    for key in removed:
        monkeypatch.delenv(key, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield root
    s3fs.S3FileSystem.clear_instance_cache()


def _dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def _failed_tasks(run_id: str) -> list[str]:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    with settings.Session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=DAG_ID, run_id=run_id).all()
        return sorted(f"{ti.task_id}[{ti.map_index}]: {ti.state}" for ti in tis
                      if not str(ti.state).endswith(("success", "skipped")))


def _comparable(name: str, data: bytes) -> Any:
    if name.endswith("_stats.json"):
        return {k: v for k, v in json.loads(data).items() if k not in TIMINGS}
    return data


def _compared(names: list[str]) -> list[str]:
    return [n for n in names if not n.startswith(NOT_COMPARED) and not any(p.startswith(".") for p in n.split("/"))]


def test_demo_dag_on_s3_with_a_connection_equals_the_local_run(airflow_settings: Path, s3_server: SeaweedS3,
                                                                s3_bucket: str, capfd: pytest.CaptureFixture[str]) -> None:
    local_root, url = airflow_settings, f"s3://{s3_bucket}/demo"
    precache_yaml = write_tiny_precache_config(local_root / "models")  # names the encoders' local folders
    admin = Store(url, s3_server.storage_options)
    admin.write_bytes("models/precache.yaml", precache_yaml.read_bytes())  # read by the DAG from the URL
    dag = _dag()
    with local_sources(images=IMAGES, parquet_files=1):
        local_run = dag.test()
        assert str(local_run.state).endswith("success"), _failed_tasks(local_run.run_id)
        s3_run = dag.test(run_conf={"dataset_output_root": url})
        assert str(s3_run.state).endswith("success"), _failed_tasks(s3_run.run_id)

    local_names = _compared(sorted(p.relative_to(local_root).as_posix() for p in local_root.rglob("*") if p.is_file()))
    local = {n: _comparable(n, (local_root / n).read_bytes()) for n in local_names}
    remote_names = admin.list_files(recursive=True)
    remote = {n: _comparable(n, admin.read_bytes(n)) for n in _compared(remote_names)}
    local_info, remote_info = pickle.loads(local.pop("wdinfo.pkl")), pickle.loads(remote.pop("wdinfo.pkl"))
    assert sorted(remote) == sorted(local)
    for folder in ("parquet/", "tarfiles_raw/", "tarfiles_reorganized/", "tarfiles_precached/"):
        assert any(n.startswith(folder) and n.endswith((".parquet", ".tar")) for n in local), folder
    assert remote == local  # every part, shard, manifest, offsets sidecar, reorganized and encoded tar
    assert local_info.pop("dataset_root") == str(local_root / "tarfiles_precached")
    assert remote_info.pop("dataset_root") == f"{url}/tarfiles_precached"
    assert remote_info == local_info and len(remote_info["tar_files"]) == 2  # tar paths relative to the root
    # the report teardown wrote report.html beside wdinfo.pkl, in the bucket (and no local folder "s3:")
    assert "report.html" in remote_names and (local_root / "report.html").is_file()
    assert s3_run.run_id in admin.read_bytes("report.html").decode()
    assert not Path("s3:").exists()

    # The same DAG with the connection's secret wrong: the plan fails first, one line naming the key and URL.
    capfd.readouterr()
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps({
        "conn_type": "aws", "login": ACCESS_KEY, "password": "not-the-secret",
        "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": REGION}})
    refused = dag.test(run_conf={"dataset_output_root": url})
    assert str(refused.state).endswith("failed") and "plan[-1]: failed" in _failed_tasks(refused.run_id)
    captured = capfd.readouterr()
    assert (f"precache_encodings.precache_config_path: {url}/models/precache.yaml: access denied"
            in captured.out + captured.err)
    assert "not-the-secret" not in captured.out + captured.err
