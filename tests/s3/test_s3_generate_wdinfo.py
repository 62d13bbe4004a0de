"""generate_wdinfo and the config on s3:// (a real S3 server): the same wdinfo as on local disk, tar paths
relative to the URL, clear errors for URLs where a stage cannot take one yet and for refused credentials."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest

import numpy as np

from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, ConfigError, PipelineConfig, load_config
from airflow_provider_mmprep.manifest import write_manifest
from airflow_provider_mmprep.stages import StageError, run_stage_task
from airflow_provider_mmprep.storage import Store
from airflow_provider_mmprep.testing.s3_server import SeaweedS3
from airflow_provider_mmprep.testing.shards import write_tar

NEMO_YAML = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"
CHUNK = 4

ENV_OPTIONS = ["storage_options.key=${env:AWS_ACCESS_KEY_ID}", "storage_options.secret=${env:AWS_SECRET_ACCESS_KEY}",
               "storage_options.endpoint_url=${env:AWS_ENDPOINT_URL}"]


def wdinfo_cfg(input_dir: str, wdinfo: str, *extra: str) -> PipelineConfig:
    return load_config(NEMO_YAML, ["dataset_repo_id=org/data", "download_parquet.enable=false", "download_images.enable=false",
                                   "reorganize_tar.enable=false", "precache_encodings.enable=false",
                                   f"generate_wdinfo.input_dir={input_dir}", f"generate_wdinfo.tar_chunk_size={CHUNK}",
                                   f"generate_wdinfo.output_wdinfo_path={wdinfo}", *extra], load_precache=False)


def precached_tar(path: Path, count: int, start: int = 0, with_manifest: bool = True) -> Path:
    """A precache-style tar (one .pickle of arrays per sample), with its manifest unless told not to."""
    samples = [(f"{i:06d}", {"pickle": pickle.dumps({"autoencoderkl_image": np.full((8, 4, 4), i, np.float16)})})
               for i in range(start, start + count)]
    write_tar(path, samples)
    if with_manifest:
        write_manifest(path, count)
    return path


def dataset(folder: Path) -> Path:
    precached_tar(folder / "00000.tar", CHUNK, 0)
    precached_tar(folder / "00001.tar", CHUNK, 10, with_manifest=False)  # counted from its headers
    precached_tar(folder / "sub" / "00002.tar", CHUNK, 20)  # nested: listed relative
    precached_tar(folder / "00003.tar", 2, 30)  # short
    precached_tar(folder / "00004.tar", 3, 40)
    (folder / "00004.tar.INCOMPLETE").touch()  # NeMo's marker
    precached_tar(folder / "00005.tar", CHUNK + 1, 50, with_manifest=False)  # oversized
    precached_tar(folder / "00006.tar", CHUNK, 60, with_manifest=False)
    with open(folder / "00006.tar", "r+b") as handle:  # damaged: truncated inside the last member
        handle.truncate(2 * 1024 + 700)
    precached_tar(folder / ".hidden" / "00007.tar", CHUNK, 70)  # hidden folders are not data
    return folder


def test_wdinfo_on_s3_equals_the_local_one_with_paths_relative_to_the_url(
        s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    local = dataset(tmp_path / "precached")
    fs = s3_env.filesystem()
    fs.put(f"{local}/", f"{s3_bucket}/ds/precached", recursive=True)
    url = f"s3://{s3_bucket}/ds/precached"

    local_summary = run_stage_task(wdinfo_cfg(str(local), str(tmp_path / "wdinfo.pkl")), "generate_wdinfo", 0, 1)
    cfg = wdinfo_cfg(url, f"s3://{s3_bucket}/ds/wdinfo.pkl", *ENV_OPTIONS)
    assert cfg.storage_options == {"key": "${env:AWS_ACCESS_KEY_ID}", "secret": "${env:AWS_SECRET_ACCESS_KEY}",
                                   "endpoint_url": "${env:AWS_ENDPOINT_URL}"}  # no secret in the config object
    summary = run_stage_task(cfg, "generate_wdinfo", 0, 1)

    local_info = pickle.loads((tmp_path / "wdinfo.pkl").read_bytes())
    info = pickle.loads(fs.cat_file(f"{s3_bucket}/ds/wdinfo.pkl"))
    assert info["tar_files"] == ["00000.tar", "00001.tar", "sub/00002.tar"]
    assert info["dataset_root"] == url and local_info.pop("dataset_root") == str(local)
    info.pop("dataset_root")
    assert info == local_info
    assert "damaged" in info["not_listed"]["00006.tar"]
    assert summary["counts_from_headers"] == local_summary["counts_from_headers"] == 3
    assert {k: v for k, v in summary.items() if k not in ("wdinfo",)} == \
        {k: v for k, v in local_summary.items() if k not in ("wdinfo",)}
    # NeMo joins each listed path to the root it is given: those objects are the local tars, byte for byte
    store = Store(url)
    for rel in info["tar_files"]:
        assert store.read_bytes(rel) == (local / rel).read_bytes()
    # a rerun over the same tars does not rewrite the object
    assert run_stage_task(cfg, "generate_wdinfo", 0, 1)["rewritten"] is False


def test_unsafe_member_names_are_refused_on_s3_as_locally(s3_env: SeaweedS3, s3_bucket: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("000001.pickle", "../evil.pickle"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    s3_env.filesystem().pipe_file(f"{s3_bucket}/bad/00000.tar", buffer.getvalue())
    with pytest.raises(StageError) as info:
        run_stage_task(wdinfo_cfg(f"s3://{s3_bucket}/bad", f"s3://{s3_bucket}/w.pkl"), "generate_wdinfo", 0, 1)
    assert "../evil.pickle" in str(info.value)
    assert not Store(f"s3://{s3_bucket}").exists("w.pkl")


def test_wrong_credentials_and_missing_bucket_fail_the_task_with_one_line(
        s3_env: SeaweedS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    url = f"s3://{s3_bucket}/ds"
    with pytest.raises(StageError) as info:
        run_stage_task(wdinfo_cfg(url, f"{url}/wdinfo.pkl", *ENV_OPTIONS), "generate_wdinfo", 0, 1)
    assert str(info.value).startswith(f"generate_wdinfo: {url}: access denied") and "\n" not in str(info.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.env["AWS_SECRET_ACCESS_KEY"])
    missing = "s3://no-such-bucket/ds"
    with pytest.raises(StageError) as info:
        run_stage_task(wdinfo_cfg(missing, f"{missing}/wdinfo.pkl"), "generate_wdinfo", 0, 1)
    assert str(info.value).startswith(f"generate_wdinfo: {missing}: the bucket 'no-such-bucket' does not exist")


def test_config_takes_urls_only_where_the_stage_can_and_keeps_secrets_out(tmp_path: Path, caplog) -> None:
    cfg = load_config(NEMO_YAML, ["dataset_repo_id=org/data", "dataset_output_root=s3://bucket/ds//x",
                                  "download_images.enable=false", "reorganize_tar.enable=false",
                                  "precache_encodings.enable=false", f"generate_wdinfo.input_dir={tmp_path}"],
                      load_precache=False)
    assert cfg.download_parquet.output_dir == "s3://bucket/ds//x/parquet"  # a URL is kept as written
    assert cfg.generate_wdinfo.output_wdinfo_path == "s3://bucket/ds//x/wdinfo.pkl"
    assert cfg.generate_wdinfo.input_dir == tmp_path  # a local path stays a Path
    every_stage = load_config(NEMO_YAML, ["dataset_repo_id=org/data", "dataset_output_root=s3://bucket/ds"],
                              load_precache=False)  # every stage's folders may be URLs now
    assert every_stage.precache_encodings.output_dir == "s3://bucket/ds/tarfiles_precached"
    precache_url = load_config(NEMO_YAML, ["dataset_repo_id=org/data", "dataset_output_root=s3://bucket/ds",
                                           "precache_encodings.precache_config_path=s3://bucket/precache.yaml"],
                               load_precache=False)  # so may the precache YAML (read in tests/s3/test_s3_precache_config.py)
    assert precache_url.precache_encodings.precache_config_path == "s3://bucket/precache.yaml"
    cfg = load_config(NEMO_YAML, ["dataset_repo_id=org/data", f"dataset_output_root={tmp_path}",
                                  "download_images.enable=false", "reorganize_tar.enable=false",
                                  "precache_encodings.enable=false", "storage_options.secret=plain-text", "storage_options.key=${env:K}"],
                      load_precache=False)
    assert cfg.storage_options == {"secret": "plain-text", "key": "${env:K}"}
    assert any("storage_options.secret: a literal secret" in w for w in cfg.warnings)
    assert not any("storage_options.key" in w for w in cfg.warnings)
    with pytest.raises(ConfigError, match="storage_options: expected a mapping"):
        load_config(NEMO_YAML, ["dataset_repo_id=org/data", f"dataset_output_root={tmp_path}", "storage_options=3"],
                    load_precache=False)


def _inspect(capsys, *args: str) -> tuple[int, dict, str]:
    import json

    from airflow_provider_mmprep.cli import main

    capsys.readouterr()
    code = main(["inspect", *args, "--json", "--pickle-samples", "2"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def test_inspect_on_urls_reports_what_it_reports_locally(s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path,
                                                          capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    local = dataset(tmp_path / "precached")
    run_stage_task(wdinfo_cfg(str(local), str(tmp_path / "wdinfo.pkl")), "generate_wdinfo", 0, 1)
    url = f"s3://{s3_bucket}/ds/precached"
    s3_env.filesystem().put(f"{local}/", f"{s3_bucket}/ds/precached", recursive=True)
    run_stage_task(wdinfo_cfg(url, f"s3://{s3_bucket}/ds/wdinfo.pkl"), "generate_wdinfo", 0, 1)

    code_local, folder_local, _ = _inspect(capsys, str(local))
    code, folder, _ = _inspect(capsys, url)
    assert code == code_local == 1  # the damaged and the short tars are problems
    assert folder.pop("path") == url and folder_local.pop("path") == str(local)
    assert folder == folder_local and folder["tar_count"] == 7 and folder["tars"][0]["pickle"]

    code_local, info_local, _ = _inspect(capsys, str(tmp_path / "wdinfo.pkl"))
    code, info, _ = _inspect(capsys, f"s3://{s3_bucket}/ds/wdinfo.pkl")
    assert code == code_local == 0 and info["root"] == url and info["counted_samples"] == 3 * CHUNK
    for key in ("path", "root"):
        info.pop(key), info_local.pop(key)
    assert info == info_local

    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()  # a new process would build its client from the new environment
    code, _, err = _inspect(capsys, url)
    last = err.strip().splitlines()[-1]  # (the client's own log lines come before it)
    assert code == 2 and last.startswith(f"error: {url}: access denied")
