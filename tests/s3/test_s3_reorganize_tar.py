"""reorganize_tar with s3:// inputs and/or outputs (a real S3 server): every output file byte-identical to the
local run's, for one task and several; reruns skip; SIGKILL in the middle of a multipart upload, then a rerun,
gives the same outputs and leaves no stray object or upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, PipelineConfig, load_config
from airflow_provider_mmprep.stages import StageError, run_stage_task
from airflow_provider_mmprep.storage import Store
from airflow_provider_mmprep.testing.s3_server import SeaweedS3
from airflow_provider_mmprep.testing.shards import make_download_output

NEMO_YAML = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"
REPO = Path(__file__).resolve().parents[2]


def overrides(raw: str, out: str, chunk: int, *extra: str) -> list[str]:
    return ["dataset_repo_id=org/data", "dataset_output_root=/unused", "download_parquet.enable=false",
            "download_images.enable=false", "precache_encodings.enable=false", "generate_wdinfo.enable=false",
            f"reorganize_tar.input_dir={raw}", f"reorganize_tar.output_dir={out}",
            f"reorganize_tar.tar_chunk_size={chunk}", *extra]


def cfg(raw: str, out: str, chunk: int, *extra: str) -> PipelineConfig:
    return load_config(NEMO_YAML, overrides(raw, out, chunk, *extra), load_precache=False)


def run(config: PipelineConfig, tasks: int) -> list[dict]:
    return [run_stage_task(config, "reorganize_tar", t, tasks) for t in range(tasks)]


def local_tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def store_tree(url: str) -> dict[str, bytes]:
    store = Store(url)
    return {name: store.read_bytes(name) for name in store.list_files()}


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Two parts of uneven shards; part 0 with download manifests (and member offsets), part 1 without."""
    folder = tmp_path / "raw"
    make_download_output(folder / "with", parts=1, shards_per_part=3, samples_per_shard=(3, 9), seed=5,
                         manifests=True)
    make_download_output(folder / "without", parts=1, shards_per_part=3, samples_per_shard=(3, 9), seed=6)
    return folder


@pytest.mark.parametrize("where", ["s3->s3", "local->s3", "s3->local"])
def test_outputs_are_the_local_runs_bytes(where: str, raw: Path, s3_env: SeaweedS3, s3_bucket: str,
                                          tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run(cfg(str(raw), str(reference), 4), 1)
    expected = local_tree(reference)
    assert any(name.endswith(".INCOMPLETE") for name in expected)  # the short last tar is marked

    s3_env.filesystem().put(f"{raw}/", f"{s3_bucket}/raw", recursive=True)
    source = f"s3://{s3_bucket}/raw" if where.startswith("s3") else str(raw)
    target = f"s3://{s3_bucket}/out" if where.endswith("s3") else str(tmp_path / "out")
    for tasks in (1, 3):
        config = cfg(source, target, 4)
        summaries = run(config, tasks)
        got = store_tree(target) if target.startswith("s3://") else local_tree(Path(target))
        assert got == expected, tasks  # tars, manifests, offsets sidecars and the marker, byte for byte
        assert sum(s["written"] for s in summaries) == (len([n for n in expected if n.endswith(".tar")])
                                                        if tasks == 1 else 0)
        again = run(config, 1)[0]
        assert again["written"] == 0 and again["skipped_complete"] == again["output_tars"]


def test_damage_and_unsafe_names_are_reported_as_locally(raw: Path, s3_env: SeaweedS3, s3_bucket: str,
                                                          tmp_path: Path) -> None:
    broken = raw / "without" / "part-000" / "00001.tar"
    broken.write_bytes(broken.read_bytes()[:5000])
    local = run(cfg(str(raw), str(tmp_path / "ref"), 4), 1)[0]
    s3_env.filesystem().put(f"{raw}/", f"{s3_bucket}/raw", recursive=True)
    remote = run(cfg(f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/out", 4), 1)[0]
    assert remote["damaged_inputs"] == local["damaged_inputs"] and remote["damaged_inputs"]
    assert store_tree(f"s3://{s3_bucket}/out") == local_tree(tmp_path / "ref")

    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("../000000001.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    s3_env.filesystem().pipe_file(f"{s3_bucket}/bad/00000.tar", buffer.getvalue())
    with pytest.raises(StageError, match=r"reorganize_tar\.input_dir: .*\.\./000000001\.jpg"):
        run(cfg(f"s3://{s3_bucket}/bad", f"s3://{s3_bucket}/bad-out", 4), 1)
    assert Store(f"s3://{s3_bucket}/bad-out").list_files() == []


KILLER = textwrap.dedent("""\
    import os, signal, sys
    from airflow_provider_mmprep import storage
    from airflow_provider_mmprep.config import load_config
    from airflow_provider_mmprep.stages import run_stage_task
    storage.PART_SIZE = 5 * 2**20  # S3's smallest part: an output is then several parts
    real = storage.S3Upload._send_part
    def send_part(self, body):
        real(self, body)
        if self.path.endswith("00001.tar") and not self.closed:  # a part of output 1 is up, more to come
            os.kill(os.getpid(), signal.SIGKILL)
    storage.S3Upload._send_part = send_part
    run_stage_task(load_config(sys.argv[1], sys.argv[2:], load_precache=False), "reorganize_tar", 0, 1)
""")


def test_sigkill_mid_multipart_upload_then_rerun(s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_download_output(raw, parts=1, shards_per_part=3, samples_per_shard=(6, 9), seed=3,
                         image_bytes=(700_000, 900_000), manifests=True)
    reference = tmp_path / "reference"
    run(cfg(str(raw), str(reference), 8), 1)
    s3_env.filesystem().put(f"{raw}/", f"{s3_bucket}/raw", recursive=True)
    url = f"s3://{s3_bucket}/out"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(NEMO_YAML),
                           *overrides(f"s3://{s3_bucket}/raw", url, 8, "reorganize_tar.write_threads=1")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    store = Store(url)
    names = store.list_files()
    assert "00001.tar" not in names and "00001.tar.manifest.json" not in names  # nothing at its final name
    assert "00000.tar" in names  # the output finished before the kill is there, whole
    uploads = store.fs.list_multipart_uploads(s3_bucket)
    assert [u["Key"] for u in uploads] == ["out/00001.tar"]  # the unfinished upload: no object

    rerun = run(cfg(f"s3://{s3_bucket}/raw", url, 8), 1)[0]
    assert rerun["skipped_complete"] >= 1 and rerun["written"] == rerun["output_tars"] - rerun["skipped_complete"]
    assert store_tree(url) == local_tree(reference)
    assert store.fs.list_multipart_uploads(s3_bucket) == []  # the rerun removed its own leftover upload
    assert [p for p in store.fs.find(f"{s3_bucket}/out") if p.rsplit("/", 1)[-1].startswith(".")] == []


def test_reorganized_on_s3_then_wdinfo_equals_the_local_chain(raw: Path, s3_env: SeaweedS3, s3_bucket: str,
                                                             tmp_path: Path) -> None:
    import pickle

    def chain(root: str, source: str, chunk: int) -> PipelineConfig:
        return load_config(NEMO_YAML, [
            "dataset_repo_id=org/data", f"dataset_output_root={root}", "download_parquet.enable=false",
            "download_images.enable=false", "precache_encodings.enable=false",
            f"reorganize_tar.input_dir={source}", f"reorganize_tar.tar_chunk_size={chunk}",
            "generate_wdinfo.input_dir=${..reorganize_tar.output_dir}", f"generate_wdinfo.tar_chunk_size={chunk}",
            "generate_wdinfo.file_ext_in_tar=[.jpg,.txt]"], load_precache=False)

    s3_env.filesystem().put(f"{raw}/", f"{s3_bucket}/raw", recursive=True)
    local, remote = chain(str(tmp_path / "local"), str(raw), 4), chain(f"s3://{s3_bucket}/ds", f"s3://{s3_bucket}/raw", 4)
    for config in (local, remote):
        run(config, 1)
        run_stage_task(config, "generate_wdinfo", 0, 1)
    local_info = pickle.loads((tmp_path / "local" / "wdinfo.pkl").read_bytes())
    info = pickle.loads(Store(f"s3://{s3_bucket}/ds").read_bytes("wdinfo.pkl"))
    assert info.pop("dataset_root") == f"s3://{s3_bucket}/ds/tarfiles_reorganized"
    local_info.pop("dataset_root")
    assert info == local_info and info["tar_files"] and info["not_listed"]  # the short last tar is left out

    # the whole dataset smaller than one chunk: one short tar, and generate_wdinfo says why nothing is listed
    small = chain(f"s3://{s3_bucket}/small", f"s3://{s3_bucket}/raw", 1000)
    run(small, 1)
    with pytest.raises(StageError, match=r"generate_wdinfo\.tar_chunk_size: no full tar: the dataset has only \d+"):
        run_stage_task(small, "generate_wdinfo", 0, 1)


@pytest.mark.parametrize("where", ["s3->s3", "s3->local"])
def test_an_input_truncated_inside_its_last_padding_gives_the_local_runs_bytes(
        where: str, s3_env: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    """Cut inside the zeros after its last member's data, a tar keeps that member (its data is whole); the
    ranged reads cannot fetch the missing zeros, so they are written as the local copy writes them."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(5):
            for ext, size in (("jpg", 700 + 333 * i), ("txt", 10 + i)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes([i + 1]) * size))
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        last = tar.getmembers()[-1]
    assert (last.size + 7) % 512 > 7  # the cut falls inside the padding, not on a block boundary
    cut = buffer.getvalue()[:last.offset_data + last.size + 7]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "00000.tar").write_bytes(cut)
    reference = tmp_path / "reference"
    local = run(cfg(str(raw), str(reference), 2), 1)[0]
    assert not local["damaged_inputs"] and local["usable_samples"] == 5
    s3_env.filesystem().pipe_file(f"{s3_bucket}/cut/00000.tar", cut)
    for tasks in (1, 2):
        target = f"s3://{s3_bucket}/cut-out-{tasks}" if where.endswith("s3") else str(tmp_path / f"out-{tasks}")
        summaries = run(cfg(f"s3://{s3_bucket}/cut", target, 2), tasks)
        assert not any(s["damaged_inputs"] for s in summaries)
        got = store_tree(target) if target.startswith("s3://") else local_tree(Path(target))
        assert got == local_tree(reference), tasks  # the last member whole, with its padding
