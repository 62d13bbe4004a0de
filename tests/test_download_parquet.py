"""download_parquet against a loopback Hugging Face endpoint driven by the real huggingface_hub client."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_mmprep.cli import main
from airflow_provider_mmprep.config import load_config
from airflow_provider_mmprep.plan import list_parquet_parts, plan_stage
from airflow_provider_mmprep.stages import StageError, download_parquet, run_stage_task
from airflow_provider_mmprep.stages.download_parquet import split_parquet

from conftest import make_table, parquet_bytes

REPO = "org/captions"


def _repo_files() -> dict[str, bytes]:
    return {
        "data/train-00000.parquet": parquet_bytes(make_table(2500, 0), row_group_size=300),
        "data/train-00001.parquet": parquet_bytes(make_table(1001, 2500), row_group_size=1000),
        "extra/other.parquet": parquet_bytes(make_table(10, 9000)),
        "README.md": b"# a dataset card",
        "data/notes.csv": b"URL,TEXT\n",
    }


def _cfg(nemo_config, root: Path, *extra: str):
    return load_config(nemo_config(), [f"dataset_repo_id={REPO}", f"dataset_output_root={root}",
                                       "download_parquet.parquet_pattern=data/*.parquet", *extra])


def test_downloads_only_matching_files_and_reports_parts(nemo_config, use_hub, tmp_path) -> None:
    files = _repo_files()
    use_hub.hub.add_repo(REPO, files)
    cfg = _cfg(nemo_config, tmp_path)
    summary = run_stage_task(cfg, "download_parquet", 0, 1)
    out = tmp_path / "parquet"
    assert summary["parts"] == 2 and summary["files"] == 2
    got = sorted(p.relative_to(out).as_posix() for p in list_parquet_parts(out, "data/*.parquet"))
    assert got == ["data/train-00000.parquet", "data/train-00001.parquet"]
    for rel in got:
        assert (out / rel).read_bytes() == files[rel]
    assert not (out / "README.md").exists() and not (out / "extra").exists()
    assert set(use_hub.hub.downloads) == {"data/train-00000.parquet", "data/train-00001.parquet"}
    # download_images now fans out over what is really there
    assert plan_stage(cfg, "download_images").task_ids == [0, 1]


def test_rerun_downloads_nothing_already_complete(nemo_config, use_hub, tmp_path) -> None:
    use_hub.hub.add_repo(REPO, _repo_files())
    cfg = _cfg(nemo_config, tmp_path)
    run_stage_task(cfg, "download_parquet", 0, 1)
    sent = use_hub.hub.bytes_sent
    run_stage_task(cfg, "download_parquet", 0, 1)
    assert use_hub.hub.bytes_sent == sent
    assert all(count == 1 for count in use_hub.hub.downloads.values())


def test_dropped_connection_is_retried_within_the_run(nemo_config, use_hub, tmp_path) -> None:
    files = _repo_files()
    use_hub.hub.add_repo(REPO, files)
    big = "data/train-00000.parquet"
    use_hub.hub.cut_download(big, after_bytes=len(files[big]) // 3, times=1)
    run_stage_task(_cfg(nemo_config, tmp_path), "download_parquet", 0, 1)
    assert (tmp_path / "parquet" / big).read_bytes() == files[big]
    assert use_hub.hub.downloads[big] == 2


def test_interrupted_run_resumes_without_refetching_complete_files(nemo_config, use_hub, tmp_path) -> None:
    files = _repo_files()
    use_hub.hub.add_repo(REPO, files)
    big, small = "data/train-00000.parquet", "data/train-00001.parquet"
    # the connection drops mid-file on every try of the first run, so that run fails
    use_hub.hub.cut_download(big, after_bytes=len(files[big]) // 3, times=50)
    cfg = _cfg(nemo_config, tmp_path)
    with pytest.raises(StageError, match=r"download_parquet: download from .* failed .*; rerun to resume"):
        run_stage_task(cfg, "download_parquet", 0, 1)
    assert not (tmp_path / "parquet" / big).exists()  # never a partial file under the final name
    assert (tmp_path / "parquet" / small).read_bytes() == files[small]
    use_hub.hub.faults.clear()
    run_stage_task(cfg, "download_parquet", 0, 1)
    assert (tmp_path / "parquet" / big).read_bytes() == files[big]
    assert use_hub.hub.downloads[small] == 1  # the complete file was not fetched again


def test_subpartitions_concatenate_to_the_original(nemo_config, use_hub, tmp_path) -> None:
    files = _repo_files()
    use_hub.hub.add_repo(REPO, files)
    cfg = _cfg(nemo_config, tmp_path, "download_parquet.parquet_subpartitions=3")
    summary = run_stage_task(cfg, "download_parquet", 0, 1)
    out = tmp_path / "parquet"
    assert summary["parts"] == 6 and summary["split"] == 2
    for rel in ("data/train-00000.parquet", "data/train-00001.parquet"):
        original = pq.read_table(pa.BufferReader(files[rel]))
        stem = rel[: -len(".parquet")]
        parts = [out / f"{stem}_part{i:03d}-of-003.parquet" for i in range(3)]
        assert not (out / rel).exists()  # original removed once its parts exist
        tables = [pq.read_table(p) for p in parts]
        assert sum(t.num_rows for t in tables) == original.num_rows
        assert max(t.num_rows for t in tables) - min(t.num_rows for t in tables) <= 1
        assert pa.concat_tables(tables).equals(original)
        assert tables[0].schema.equals(original.schema)
    # the rerun neither downloads nor splits again
    sent = use_hub.hub.bytes_sent
    again = run_stage_task(cfg, "download_parquet", 0, 1)
    assert use_hub.hub.bytes_sent == sent and again["split"] == 0 and again["parts"] == 6
    assert plan_stage(cfg, "download_images").task_count == 6


def test_changing_the_subpartition_count_replaces_old_parts(nemo_config, use_hub, tmp_path) -> None:
    use_hub.hub.add_repo(REPO, _repo_files())
    run_stage_task(_cfg(nemo_config, tmp_path, "download_parquet.parquet_subpartitions=3"),
                   "download_parquet", 0, 1)
    summary = run_stage_task(_cfg(nemo_config, tmp_path, "download_parquet.parquet_subpartitions=2"),
                             "download_parquet", 0, 1)
    names = sorted(p.name for p in list_parquet_parts(tmp_path / "parquet", "data/*.parquet"))
    assert summary["parts"] == 4 and all("-of-002" in n for n in names), names


def test_the_stage_says_which_parts_are_there_and_whether_its_task_has_work_left(nemo_config, tmp_path) -> None:
    cfg = _cfg(nemo_config, tmp_path)
    assert download_parquet.expected_outputs(cfg) == []
    assert download_parquet.incomplete_tasks(cfg) == {0: "no parquet output"}
    out = tmp_path / "parquet" / "data"
    out.mkdir(parents=True)
    for rel, body in _repo_files().items():
        if rel.startswith("data/"):
            (out / Path(rel).name).write_bytes(body)
    parts = download_parquet.expected_outputs(cfg)
    assert parts == [out / "train-00000.parquet", out / "train-00001.parquet"]
    assert [download_parquet.part_rows(p) for p in parts] == [2500, 1001]
    assert download_parquet.incomplete_tasks(cfg) == {}
    parts[1].write_bytes(parts[1].read_bytes()[:100])  # truncated
    assert download_parquet.part_rows(parts[1]) is None
    assert download_parquet.incomplete_tasks(cfg) == {0: "unreadable parquet output"}


def test_split_streams_many_row_groups_exactly(tmp_path: Path) -> None:
    table = make_table(100_003)
    source = tmp_path / "big.parquet"
    pq.write_table(table, source, row_group_size=7_000)
    parts = split_parquet(source, 7, tmp_path)
    assert pa.concat_tables([pq.read_table(p) for p in parts]).equals(table)
    assert not source.exists() and not list(tmp_path.glob(".*tmp*"))


def test_missing_repo_is_a_clear_error(nemo_config, use_hub, tmp_path, capsys) -> None:
    cfg = _cfg(nemo_config, tmp_path)
    with pytest.raises(StageError, match=r"dataset_repo_id: dataset repo 'org/captions' not found at "
                                         r"http://127\.0\.0\.1:\d+ \(check the name"):
        run_stage_task(cfg, "download_parquet", 0, 1)
    code = main(["run", str(nemo_config()), f"dataset_repo_id={REPO}", f"dataset_output_root={tmp_path}",
                 "--stage", "download_parquet"])
    assert code == 1
    assert "not found" in capsys.readouterr().err


def test_no_matching_file_is_a_clear_error(nemo_config, use_hub, tmp_path) -> None:
    use_hub.hub.add_repo(REPO, {"README.md": b"x"})
    with pytest.raises(StageError, match="download_parquet.parquet_pattern: no file of dataset"):
        run_stage_task(_cfg(nemo_config, tmp_path), "download_parquet", 0, 1)


def test_cli_run_download_parquet(nemo_config, use_hub, tmp_path, capsys) -> None:
    use_hub.hub.add_repo(REPO, _repo_files())
    code = main(["run", str(nemo_config()), f"dataset_repo_id={REPO}", f"dataset_output_root={tmp_path}",
                 "--stage", "download_parquet", "download_parquet.parquet_subpartitions=2",
                 "--summary-json"])
    assert code == 0
    out = capsys.readouterr()
    assert "\"parts\": 6" in out.out  # 3 files (pattern *.parquet) x 2 parts
    assert "6 parquet part(s) ready" in out.err


def test_token_comes_from_config_or_environment(nemo_config, use_hub, tmp_path, monkeypatch) -> None:
    use_hub.hub.add_repo(REPO, _repo_files())
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    run_stage_task(_cfg(nemo_config, tmp_path / "a"), "download_parquet", 0, 1)
    assert use_hub.hub.authorizations == {"Bearer hf_from_env"}
    run_stage_task(_cfg(nemo_config, tmp_path / "b", "download_parquet.hf_token=hf_from_config"),
                   "download_parquet", 0, 1)
    assert "Bearer hf_from_config" in use_hub.hub.authorizations


def test_unreachable_hub_is_one_line(nemo_config, tmp_path, capsys, monkeypatch) -> None:
    import httpx

    from huggingface_hub import HfApi

    def refuse(*args, **kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(HfApi, "list_repo_files", refuse)  # as after huggingface_hub's own retries
    code = main(["run", str(nemo_config()), f"dataset_repo_id={REPO}", f"dataset_output_root={tmp_path}",
                 "--stage", "download_parquet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "download_parquet: cannot reach the dataset hub at http://127.0.0.1:9 (ConnectError: [Errno 111] " \
           "Connection refused)" in err
