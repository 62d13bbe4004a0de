"""``precache_config_path`` as an ``s3://`` URL (a real S3 server): the precache YAML is read through the
storage layer wherever it is read (validation and plan in ``load_config``, the precache stage itself), with
the pipeline's ``storage_options``, and every failure is one line naming the YAML key and the URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_mmprep.config import ConfigError, load_config, load_precache_config
from airflow_provider_mmprep.stages import StageError, run_stage_task
from airflow_provider_mmprep.storage import Store
from airflow_provider_mmprep.testing.s3_server import SeaweedS3

KEY = "precache_encodings.precache_config_path"
PRECACHE_YAML = """\
batch_size_per_GPU: 8
dataloader_num_workers: 0
save_original_in_tar: false
image_size: 64
device: cpu
encodings:
  - modality: image
    extension: pickle
    key: autoencoderkl_image
    encoder_config:
      cls: nemo.collections.multimodal.models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKL
      from_pretrained: /models/vae
"""


def _pipeline(tmp_path: Path, precache_url: str, options: dict | None = None, *extra: str) -> list[str]:
    overrides = [f"dataset_output_root={tmp_path}", "download_parquet.enable=false",
                 "download_images.enable=false", "reorganize_tar.enable=false", "generate_wdinfo.enable=false",
                 f"{KEY}={precache_url}", "precache_encodings.runner=kubernetes", *extra]
    for name, value in (options or {}).items():
        overrides.append(f"storage_options.{name}={value}")
    return overrides


def _yaml_options(server: SeaweedS3, secret: str = "${env:TEST_S3_SECRET}") -> dict[str, str]:
    """storage_options as a pipeline YAML would hold them: the secret by reference to the environment."""
    return {"key": server.storage_options["key"], "secret": secret, "endpoint_url": server.endpoint_url,
            "client_kwargs.region_name": "us-east-1"}


def test_precache_yaml_from_s3_equals_the_local_file(tmp_path: Path, s3_server: SeaweedS3, s3_bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch, nemo_config) -> None:
    monkeypatch.setenv("TEST_S3_SECRET", s3_server.storage_options["secret"])
    local = tmp_path / "precache.yaml"
    local.write_text(PRECACHE_YAML)
    Store(f"s3://{s3_bucket}/conf", s3_server.storage_options).write_bytes("precache.yaml", PRECACHE_YAML.encode())
    url = f"s3://{s3_bucket}/conf/precache.yaml"

    from_local = load_config(nemo_config(), _pipeline(tmp_path, str(local), None, "dataset_repo_id=o/d"))
    from_url = load_config(nemo_config(), _pipeline(tmp_path, url, _yaml_options(s3_server), "dataset_repo_id=o/d"))
    assert from_url.precache_encodings.precache_config_path == url
    assert from_url.precache == from_local.precache and from_url.precache.image_size == 64
    # the secret stays a reference in the config object (resolved only where the stage makes the filesystem)
    assert from_url.storage_options["secret"] == "${env:TEST_S3_SECRET}"
    assert load_precache_config(url, storage_options=s3_server.storage_options) == from_local.precache


def test_precache_yaml_url_failures_name_the_key_and_the_url(tmp_path: Path, s3_server: SeaweedS3, s3_bucket: str,
                                                             monkeypatch: pytest.MonkeyPatch, nemo_config) -> None:
    import s3fs

    monkeypatch.setenv("TEST_S3_SECRET", s3_server.storage_options["secret"])
    s3fs.S3FileSystem.clear_instance_cache()
    store = Store(f"s3://{s3_bucket}/conf", s3_server.storage_options)
    store.write_bytes("precache.yaml", PRECACHE_YAML.encode())
    store.write_bytes("bad.yaml", PRECACHE_YAML.replace("modality: image", "modality: video").encode())
    store.write_bytes("list.yaml", b"- 1\n- 2\n")
    good, options = f"s3://{s3_bucket}/conf/precache.yaml", _yaml_options(s3_server)

    def problems(url: str, opts: dict) -> list[str]:
        with pytest.raises(ConfigError) as info:
            load_config(nemo_config(), _pipeline(tmp_path, url, opts, "dataset_repo_id=o/d"))
        return info.value.problems

    missing = f"s3://{s3_bucket}/conf/nope.yaml"
    assert problems(missing, options) == [f"{KEY}: precache config file not found: {missing}"]
    [denied] = problems(good, _yaml_options(s3_server, secret="wrong-secret"))
    assert denied.startswith(f"{KEY}: {good}: access denied") and "check the credentials" in denied
    no_bucket = "s3://no-such-bucket-mmprep/precache.yaml"
    [bucket] = problems(no_bucket, options)
    assert bucket.startswith(f"{KEY}: {no_bucket}") and "bucket" in bucket
    monkeypatch.delenv("TEST_S3_SECRET")
    assert problems(good, options) == [f"{KEY}: storage_options.secret: environment variable TEST_S3_SECRET is not set"]
    monkeypatch.setenv("TEST_S3_SECRET", s3_server.storage_options["secret"])
    bad = f"s3://{s3_bucket}/conf/bad.yaml"
    assert problems(bad, options) == [f"{bad}: encodings.0.modality: expected one of 'image' or 'text', got 'video'"]
    listed = f"s3://{s3_bucket}/conf/list.yaml"
    assert problems(listed, options) == [f"{KEY}: {listed} must hold a mapping"]

    # The precache stage reads the YAML itself when the config was loaded without it (a pod, `mmprep run`):
    # the same one-line errors, as stage errors naming the key and the URL.
    cfg = load_config(nemo_config(), _pipeline(tmp_path, good, _yaml_options(s3_server, secret="wrong-secret"),
                                               "dataset_repo_id=o/d"), load_precache=False)
    assert cfg.precache is None
    with pytest.raises(StageError) as info:
        run_stage_task(cfg, "precache_encodings", 0, 1)
    assert str(info.value).startswith(f"{KEY}: {good}: access denied")
