"""The CLI end to end on s3:// (a real S3 server): a pipeline YAML whose storage_options reference environment
variables, `mmprep run` of the stages that take URLs, the same bytes as the same run on local disk."""

from __future__ import annotations

import io
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_mmprep.cli import main
from airflow_provider_mmprep.manifest import write_manifest
from airflow_provider_mmprep.storage import Store
from airflow_provider_mmprep.testing.s3_server import SeaweedS3
from airflow_provider_mmprep.testing.shards import write_tar

REPO = "org/captions"
CHUNK = 3

PIPELINE = textwrap.dedent("""\
    run:
      name: s3_pipeline
    dataset_repo_id: {repo}
    dataset_output_root: {root}
    storage_options:
      key: ${{env:MY_S3_KEY}}
      secret: ${{env:MY_S3_SECRET}}
      endpoint_url: ${{env:MY_S3_ENDPOINT}}
    download_parquet:
      output_dir: ${{..dataset_output_root}}/parquet
      parquet_subpartitions: 2
      parquet_pattern: "*.parquet"
    generate_wdinfo:
      input_dir: ${{..dataset_output_root}}/precached
      tar_chunk_size: {chunk}
      file_ext_in_tar: [.pickle]
      output_wdinfo_path: ${{..dataset_output_root}}/wdinfo.pkl
    """)


def _parquet(rows: int) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"URL": [f"http://127.0.0.1:1/{i}.jpg" for i in range(rows)],
                             "TEXT": [f"caption {i}" for i in range(rows)]}), buffer, row_group_size=100)
    return buffer.getvalue()


def _precached(folder: Path) -> None:
    for shard, count in ((0, CHUNK), (1, CHUNK), (2, 1)):
        path = folder / f"{shard:05d}.tar"
        write_tar(path, [(f"{shard:03d}{i:03d}", {"pickle": pickle.dumps({"x": np.arange(4) + i})})
                         for i in range(count)])
        write_manifest(path, count)


def _tree(store: Store) -> dict[str, bytes]:
    return {rel: store.read_bytes(rel) for rel in store.list_files(recursive=True)}


def test_mmprep_run_into_s3_gives_the_local_runs_bytes(use_hub, s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    use_hub.hub.add_repo(REPO, {"a.parquet": _parquet(250), "b.parquet": _parquet(7)})
    for name, value in (("MY_S3_KEY", s3_server.env["AWS_ACCESS_KEY_ID"]),
                        ("MY_S3_SECRET", s3_server.env["AWS_SECRET_ACCESS_KEY"]),
                        ("MY_S3_ENDPOINT", s3_server.endpoint_url)):
        monkeypatch.setenv(name, value)
    local_root, url = tmp_path / "local", f"s3://{s3_bucket}/dataset"
    _precached(local_root / "precached")
    s3_server.filesystem().put(f"{local_root / 'precached'}/", f"{s3_bucket}/dataset/precached", recursive=True)

    for root, name in ((local_root, "local.yaml"), (url, "s3.yaml")):
        (tmp_path / name).write_text(PIPELINE.format(repo=REPO, root=root, chunk=CHUNK))
        assert main(["validate", str(tmp_path / name)]) == 0
        assert main(["run", str(tmp_path / name)]) == 0, capsys.readouterr().err
    assert "secret" not in capsys.readouterr().err.lower()  # no warning: the secret is a reference

    store = Store(url, s3_server.storage_options)
    remote = _tree(store)
    local = {p.relative_to(local_root).as_posix(): p.read_bytes() for p in sorted(local_root.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local_root).parts)}
    assert sorted(remote) == sorted(local)
    assert [rel for rel in remote if rel.startswith("parquet/")] == [
        "parquet/a_part000-of-002.parquet", "parquet/a_part001-of-002.parquet",
        "parquet/b_part000-of-002.parquet", "parquet/b_part001-of-002.parquet"]
    for rel in remote:
        if rel != "wdinfo.pkl":
            assert remote[rel] == local[rel], rel
    info, local_info = pickle.loads(remote["wdinfo.pkl"]), pickle.loads(local["wdinfo.pkl"])
    assert info.pop("dataset_root") == f"{url}/precached"
    local_info.pop("dataset_root")
    assert info == local_info and info["tar_files"] == ["00000.tar", "00001.tar"]

    # the stages' own answers (what the run report and Airflow's resume read) see the finished outputs in S3
    from airflow_provider_mmprep.config import load_config
    from airflow_provider_mmprep.stages import download_parquet, generate_wdinfo

    config = load_config(tmp_path / "s3.yaml")
    assert download_parquet.incomplete_tasks(config) == {} and generate_wdinfo.incomplete_tasks(config) == {}
    assert len(download_parquet.expected_outputs(config)) == 4
    checked = generate_wdinfo.check_output(config)
    assert checked.info is not None and generate_wdinfo.listed_but_missing(config, checked.info) == []
    assert main(["report", str(tmp_path / "s3.yaml"), "--out", str(tmp_path / "report.html")]) == 0
    assert (tmp_path / "report.html").is_file()

    # wrong credentials: the task fails with one line naming the URL, and nothing is written
    monkeypatch.setenv("MY_S3_SECRET", "wrong")
    assert main(["run", str(tmp_path / "s3.yaml"), "--stage", "generate_wdinfo"]) == 1
    err = capsys.readouterr().err
    assert f"{url}/precached: access denied" in err and "wrong" not in err
