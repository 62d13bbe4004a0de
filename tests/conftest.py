"""Shared fixtures: isolated HF cache/home, a NeMo-style config writer, parquet builders, a loopback hub."""

from __future__ import annotations

import io
import itertools
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_mmprep.testing.hf_endpoint import HubServer
from airflow_provider_mmprep.testing.s3_server import SeaweedS3


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every output file under ``folder`` by relative path (temporaries and mmprep's own state left out)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".mmprep" not in p.parts and not p.name.startswith(".")}


def tree_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of every file under ``folder``: unchanged means neither rewritten nor replaced."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _isolated_hf(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's Hugging Face cache or token; never reach the real Hub."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: a leak fails fast


def make_table(rows: int, offset: int = 0) -> pa.Table:
    """(URL, TEXT) rows like LAION's parquet, plus a numeric column so type fidelity is checked too."""
    ids = list(range(offset, offset + rows))
    return pa.table({
        "URL": [f"http://127.0.0.1:1/img/{i}.jpg" for i in ids],
        "TEXT": [f"caption number {i} with unicode é ✓" for i in ids],
        "similarity": pa.array([i / 7 for i in ids], pa.float64()),
    })


def parquet_bytes(table: pa.Table, row_group_size: int = 1000) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture
def use_hub(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


NEMO_CONFIG = textwrap.dedent("""\
    run:
      name: download_multimodal
      results_dir: ${base_results_dir}/${.name}
      time_limit: "04:00:00"
      dependency: "singleton"
    dataset_repo_id: ???
    dataset_output_root: ???
    download_parquet:
      enable: True
      output_dir: ${..dataset_output_root}/parquet
      parquet_subpartitions: 1
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
    reorganize_tar:
      enable: True
      input_dir: ${..download_images.output_dir}
      output_dir: ${..dataset_output_root}/tarfiles_reorganized
      node_array_size: 1
      tar_chunk_size: 1000
      file_ext_in_tar: [.jpg, .txt]
    precache_encodings:
      enable: True
      input_dir: ${..reorganize_tar.output_dir}
      output_dir: ${..dataset_output_root}/tarfiles_precached
      tar_chunk_size: ${..reorganize_tar.tar_chunk_size}
      node_array_size: 4
      precache_config_path: ${launcher_scripts_path}/conf/data_preparation/multimodal/precache_sd.yaml
    generate_wdinfo:
      enable: True
      input_dir: ${..precache_encodings.output_dir}
      tar_chunk_size: ${..precache_encodings.tar_chunk_size}
      file_ext_in_tar: [.pickle]
      output_wdinfo_path: ${..dataset_output_root}/wdinfo.pkl
    """)


@pytest.fixture
def nemo_config(tmp_path: Path) -> Callable[..., Path]:
    """Write NeMo's download_multimodal.yaml (optionally edited by text replacement) and return its path."""

    def write(replace: dict[str, str] | None = None, name: str = "download_multimodal.yaml") -> Path:
        text = f"launcher_scripts_path: {launcher_with_models(tmp_path / 'launcher')}\n" + NEMO_CONFIG
        for old, new in (replace or {}).items():
            assert old in text, old
            text = text.replace(old, new)
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def launcher_with_models(folder: Path) -> Path:
    """A ``launcher_scripts_path`` holding NeMo's precache_sd.yaml with its placeholder model paths pointed at
    folders that exist (empty: nothing loads them unless a test runs precache), so configs validate."""
    from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH

    rel = Path("conf/data_preparation/multimodal/precache_sd.yaml")
    target = folder / rel
    if not target.is_file():
        for model in ("vae", "clip"):
            (folder / "models" / model).mkdir(parents=True, exist_ok=True)
        text = (BUNDLED_LAUNCHER_SCRIPTS_PATH / rel).read_text()
        text = text.replace("/path/to/vae.bin", str(folder / "models" / "vae"))
        text = text.replace("openai/clip-vit-large-patch14", str(folder / "models" / "clip"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return folder


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing test that used the live Airflow services (tests/live/) carries their log tails."""
    outcome = yield
    report = outcome.get_result()
    services = getattr(item, "funcargs", {}).get("live") if report.failed else None
    if services is not None and hasattr(services, "log_tails"):
        report.sections.append(("live Airflow service logs (tails)", services.log_tails()))


# A real S3 server (SeaweedFS on loopback) for the object-storage tests (tests/s3/): started once per session
# by the first test that asks for it, a fresh bucket per test.

_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    """A fresh, empty bucket's name (tests never see each other's objects)."""
    name = f"test-{next(_bucket_numbers):04d}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """The server's credentials and endpoint in the standard AWS environment variables.

    s3fs caches clients by their arguments, not by the environment they read: the cache is cleared on both
    sides so a test that changes the variables (wrong credentials) leaves no client behind that uses them."""
    import s3fs

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
