"""Object-storage credentials from an Airflow connection (a real S3 server, the connection defined as an
``AIRFLOW_CONN_*`` variable, no AWS variables in the environment): ``ObjectStorageHook`` turns it into fsspec
``storage_options`` that a stage operator hands to the stage core in memory; wrong credentials fail the task
with one line naming the URL, and the secret appears in no log, config repr or result."""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
from pathlib import Path
from typing import Iterator

import pytest

# find_spec, not importorskip: airflow must not be imported before airflow_home() sets AIRFLOW_HOME
if importlib.util.find_spec("airflow") is None:
    pytest.skip("needs the airflow extra", allow_module_level=True)

from airflow_provider_mmprep.testing.airflow_env import airflow_home  # noqa: E402

airflow_home(migrate=False)  # connections from the environment need no DB

from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, load_config  # noqa: E402
from airflow_provider_mmprep.manifest import write_manifest  # noqa: E402
from airflow_provider_mmprep.stages import StageError  # noqa: E402
from airflow_provider_mmprep.storage import Store, merge_options, resolve_options  # noqa: E402
from airflow_provider_mmprep.testing.s3_server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3  # noqa: E402
from airflow_provider_mmprep.testing.shards import write_tar  # noqa: E402

NEMO_YAML = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Nothing but the connection can authenticate: no AWS variables, no ~/.aws, no cached clients."""
    import s3fs

    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def aws_connection(server: SeaweedS3, secret: str = SECRET_KEY) -> str:
    """An ``aws`` connection as Airflow reads it from ``AIRFLOW_CONN_<ID>`` (JSON form)."""
    return json.dumps({"conn_type": "aws", "login": ACCESS_KEY, "password": secret,
                       "extra": {"endpoint_url": server.endpoint_url, "region_name": REGION}})


def test_connection_options_merge_under_the_pipeline_options() -> None:
    base = {"key": "k", "secret": "s", "client_kwargs": {"region_name": "r"}}
    assert merge_options(None, None) is None and merge_options(base, None) == base
    flat = merge_options(base, {"client_kwargs": {"verify": False}, "key": "${env:OTHER_KEY}"})
    assert flat == {"key": "${env:OTHER_KEY}", "secret": "s", "client_kwargs": {"region_name": "r", "verify": False}}
    prefixed = merge_options(base, {"s3://raw": {"profile": "raw"}}, ["s3://raw/x", "s3://curated/y", "/local"])
    assert prefixed == {"s3://raw": {**base, "profile": "raw"}, "s3://": base}
    assert resolve_options(prefixed, "s3://curated/y") == base  # no entry of its own: the connection's
    assert resolve_options(prefixed, "s3://raw/x/00000.tar")["profile"] == "raw"


def test_aws_and_generic_connections_become_storage_options(monkeypatch: pytest.MonkeyPatch,
                                                            s3_server: SeaweedS3) -> None:
    from airflow_provider_mmprep.airflow.hooks import ObjectStorageHook, storage_connection_options

    monkeypatch.setenv("AIRFLOW_CONN_MMPREP_S3_AWS", aws_connection(s3_server))
    assert ObjectStorageHook("mmprep_s3_aws").storage_options() == {
        "key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": s3_server.endpoint_url,
        "client_kwargs": {"region_name": REGION}}
    monkeypatch.setenv("AIRFLOW_CONN_MMPREP_S3_ROLE", json.dumps({  # the worker's own credentials
        "conn_type": "aws", "extra": {"service_config": {"s3": {"endpoint_url": "http://127.0.0.1:9"}}}}))
    assert storage_connection_options("mmprep_s3_role") == {"endpoint_url": "http://127.0.0.1:9"}
    monkeypatch.setenv("AIRFLOW_CONN_MMPREP_S3_GENERIC", json.dumps({
        "conn_type": "generic", "login": ACCESS_KEY, "password": SECRET_KEY, "host": s3_server.endpoint_url,
        "extra": {"config_kwargs": {"max_pool_connections": 20}}}))
    assert storage_connection_options("mmprep_s3_generic") == {
        "key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": s3_server.endpoint_url,
        "config_kwargs": {"max_pool_connections": 20}}
    assert storage_connection_options(None) is None and storage_connection_options("") is None
    with pytest.raises(ValueError, match="storage_conn_id 'mmprep_s3_missing': no such Airflow connection"):
        storage_connection_options("mmprep_s3_missing")


def _precached(folder: Path, tars: int, samples: int) -> Path:
    for number in range(tars):
        tar = folder / f"{number:05d}.tar"
        write_tar(tar, [(f"{number:03d}{i:03d}", {"pickle": pickle.dumps({"v": i})}) for i in range(samples)])
        write_manifest(tar, samples)
    return folder


def _operator(url: str, conn_id: str):
    from airflow_provider_mmprep.airflow.operators import GenerateWdinfoOperator

    overrides = ["dataset_repo_id=org/data", "download_parquet.enable=false", "download_images.enable=false",
                 "reorganize_tar.enable=false", "precache_encodings.enable=false",
                 f"generate_wdinfo.input_dir={url}/precached", "generate_wdinfo.tar_chunk_size=4",
                 f"generate_wdinfo.output_wdinfo_path={url}/wdinfo.pkl"]
    return GenerateWdinfoOperator(task_id=f"generate_wdinfo_{conn_id}", config_path=str(NEMO_YAML),
                                  overrides=overrides, storage_conn_id=conn_id)


def test_a_stage_operator_reads_and_writes_s3_with_the_connection_alone(
        no_aws_env: None, monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    s3_server.filesystem().put(f"{_precached(tmp_path / 'precached', 3, 4)}/", f"{s3_bucket}/ds/precached",
                               recursive=True)
    url = f"s3://{s3_bucket}/ds"
    monkeypatch.setenv("AIRFLOW_CONN_MMPREP_S3", aws_connection(s3_server))
    caplog.set_level(logging.DEBUG, logger="airflow_provider_mmprep")
    summary = _operator(url, "mmprep_s3").execute({})
    info = pickle.loads(s3_server.filesystem().cat_file(f"{s3_bucket}/ds/wdinfo.pkl"))
    assert info["tar_files"] == ["00000.tar", "00001.tar", "00002.tar"] and info["total_key_count"] == 12
    assert info["dataset_root"] == f"{url}/precached"
    assert SECRET_KEY not in caplog.text and SECRET_KEY not in json.dumps(summary, default=str)

    # the config the operator builds holds the connection's options in memory only: not in its repr or dump
    cfg = load_config(NEMO_YAML, _operator(url, "x").overrides, load_precache=False,
                      connection_options={"key": ACCESS_KEY, "secret": SECRET_KEY})
    assert cfg.storage_options["secret"] == SECRET_KEY and SECRET_KEY not in repr(cfg)

    written = s3_server.filesystem().cat_file(f"{s3_bucket}/ds/wdinfo.pkl")
    monkeypatch.setenv("AIRFLOW_CONN_MMPREP_S3_WRONG", aws_connection(s3_server, secret="not-the-secret"))
    with pytest.raises(StageError) as wrong:
        _operator(url, "mmprep_s3_wrong").execute({})
    message = str(wrong.value)
    assert message.startswith(f"generate_wdinfo: {url}/precached: access denied") and "\n" not in message
    assert "check the credentials" in message and "not-the-secret" not in message
    assert Store(url, s3_server.storage_options).read_bytes("wdinfo.pkl") == written  # untouched


def test_the_yaml_storage_conn_id_wins_over_the_mmprep_option(tmp_path: Path, nemo_config) -> None:
    import dataclasses

    from airflow_provider_mmprep.airflow.dag import build_dag
    from airflow_provider_mmprep.airflow.settings import ClusterDefaults

    cluster = dataclasses.replace(ClusterDefaults.from_airflow_config(), storage_conn_id="cluster_s3")
    plain = build_dag(nemo_config(), cluster)
    assert plain.get_task("generate_wdinfo").partial_kwargs["storage_conn_id"] == "cluster_s3"
    own = tmp_path / "own.yaml"
    own.write_text(nemo_config().read_text() + "storage_conn_id: team_a_s3\n")
    dag = build_dag(own, cluster)
    assert dag.get_task("reorganize_tar").partial_kwargs["storage_conn_id"] == "team_a_s3"
    cfg = load_config(own, ["dataset_repo_id=o/d", "dataset_output_root=s3://b/x"], load_precache=False)
    assert cfg.storage_conn_id == "team_a_s3" and not any("storage_conn_id" in w for w in cfg.warnings)
