"""download_images writing to s3:// (a real S3 server) from local or s3:// parquet parts: every shard file
byte-identical to the local run's (stats apart from their timings), reruns skip, the report's readers see the
shards; SIGKILL in the middle of a shard's multipart upload, then a rerun, gives the same outputs and leaves
no stray object or upload."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from airflow_provider_mmprep.config import load_config
from airflow_provider_mmprep.stages import download_images, run_stage_task
from airflow_provider_mmprep.storage import Store
from airflow_provider_mmprep.testing import sample_data
from airflow_provider_mmprep.testing.image_host import ImageHost
from airflow_provider_mmprep.testing.s3_server import SeaweedS3

REPO = Path(__file__).resolve().parents[2]
TIMINGS = ("duration", "start_time", "end_time")


@pytest.fixture
def host() -> Iterator[ImageHost]:
    with ImageHost(latency=(0.0, 0.01), seed=3) as server:
        yield server


def config_file(tmp_path: Path, input_dir: str, output_dir: str, **arguments: Any) -> Path:
    arguments.setdefault("timeout", 5)
    processes = arguments.pop("processes", 1)
    config = {"run": {"name": "t"}, "download_images": {
        "enable": True, "input_dir": input_dir, "output_dir": output_dir, "download_num_processes": processes,
        "download_num_threads": 4, "allow_private_addresses": True, "img2dataset_additional_arguments": arguments}}
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.yaml"
    path.write_text(json.dumps(config))
    return path


def run(path: Path, task_id: int = 0, task_count: int = 1) -> dict[str, Any]:
    return run_stage_task(load_config(path, load_precache=False), "download_images", task_id, task_count)


def comparable(name: str, data: bytes) -> Any:
    if name.endswith("_stats.json"):
        return {k: v for k, v in json.loads(data).items() if k not in TIMINGS}
    return data


def local_tree(folder: Path) -> dict[str, Any]:
    return {p.relative_to(folder).as_posix(): comparable(p.name, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def store_tree(url: str) -> dict[str, Any]:
    store = Store(url)
    return {name: comparable(name, store.read_bytes(name)) for name in store.list_files(recursive=True)}


def test_shards_on_s3_are_the_local_runs_bytes(tmp_path: Path, host: ImageHost, s3_env: SeaweedS3,
                                               s3_bucket: str) -> None:
    urls = sample_data.add_images(host, 30, size=(96, 64)) + [host.url("/fault/404")]
    sample_data.write_url_parquet(tmp_path / "in" / "a.parquet", urls[:17])
    sample_data.write_url_parquet(tmp_path / "in" / "b.parquet", urls[17:])
    run(config_file(tmp_path, str(tmp_path / "in"), str(tmp_path / "ref"), number_sample_per_shard=8))
    run(config_file(tmp_path, str(tmp_path / "in"), str(tmp_path / "ref"), number_sample_per_shard=8), 1, 2)
    expected = local_tree(tmp_path / "ref")
    assert {n.split("/")[0] for n in expected} == {"a", "b"}
    assert any(n.endswith(".offsets.json") for n in expected) and any(n.endswith(".manifest.json") for n in expected)

    s3_env.filesystem().put(f"{tmp_path / 'in'}/", f"{s3_bucket}/in", recursive=True)
    for source, target, processes in ((str(tmp_path / "in"), f"s3://{s3_bucket}/out", 1),
                                      (f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out2", 2)):
        config = config_file(tmp_path, source, target, number_sample_per_shard=8, processes=processes)
        summaries = [run(config, t, 2) for t in range(2)]
        assert store_tree(target) == expected, (source, target)  # tars, parquets, manifests, offsets, stats
        assert [s["downloaded_shards"] for s in summaries] == [3, 2]
        hits = sum(host.hits.values())
        again = [run(config, t, 2) for t in range(2)]
        assert [s["skipped_shards"] for s in again] == [3, 2] and sum(s["downloaded_shards"] for s in again) == 0
        assert sum(host.hits.values()) == hits  # nothing fetched again
        assert again[0]["successes"] == summaries[0]["successes"] == 17

        cfg = load_config(config, load_precache=False)
        assert download_images.incomplete_tasks(cfg, 2) == {}
        finished, _ = download_images.finished_outputs(cfg)
        assert sorted(t.name for t in finished) == sorted(n for n in expected if n.endswith(".tar"))
        assert not download_images.spool_folder(f"{target}/a").exists()  # the local spool is gone


KILLER = textwrap.dedent("""\
    import os, signal, sys
    from airflow_provider_mmprep import storage
    from airflow_provider_mmprep.config import load_config
    from airflow_provider_mmprep.stages import run_stage_task
    storage.PART_SIZE = 5 * 2**20  # S3's smallest part: a shard's tar is then several parts
    real = storage.S3Upload._send_part
    def send_part(self, body):
        real(self, body)
        if self.path.endswith("00001.tar") and not self.closed:  # a part of shard 1's tar is up, more to come
            os.kill(os.getpid(), signal.SIGKILL)
    storage.S3Upload._send_part = send_part
    run_stage_task(load_config(sys.argv[1], load_precache=False), "download_images", 0, 1)
""")


def noise_jpeg(index: int) -> bytes:
    """~1 MB of incompressible JPEG, so that 8 of them make a tar of two 5 MiB upload parts."""
    image = Image.frombytes("RGB", (900, 900), random.Random(index).randbytes(900 * 900 * 3))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_sigkill_mid_shard_upload_then_rerun(tmp_path: Path, host: ImageHost, s3_env: SeaweedS3,
                                             s3_bucket: str) -> None:
    urls = []
    for i in range(20):
        host.add(f"/big/{i}.jpg", noise_jpeg(i))
        urls.append(host.url(f"/big/{i}.jpg"))
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    shaping = {"number_sample_per_shard": 8, "resize_mode": "no", "skip_reencode": True}
    run(config_file(tmp_path, str(tmp_path / "in"), str(tmp_path / "ref"), **shaping))
    expected = local_tree(tmp_path / "ref")
    assert len((tmp_path / "ref" / "p" / "00001.tar").read_bytes()) > 6 * 2**20  # two parts at least

    url = f"s3://{s3_bucket}/out"
    config = config_file(tmp_path, str(tmp_path / "in"), url, **shaping)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), str(config)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    store = Store(f"{url}/p")
    names = store.list_files()
    assert not [n for n in names if n.startswith("00001")]  # killed mid-upload of its tar: nothing visible
    # shards upload concurrently: another may have finished before the kill (then whole, the local run's
    # bytes), or be part-way (no _stats.json: the rerun does not trust it and redoes it)
    complete = [shard for shard in ("00000", "00002") if f"{shard}_stats.json" in names]
    for shard in complete:
        assert {f"p/{n}": comparable(n, store.read_bytes(n)) for n in names if n.startswith(shard)} == \
            {n: v for n, v in expected.items() if n.startswith(f"p/{shard}")}
    assert "out/p/00001.tar" in [u["Key"] for u in store.fs.list_multipart_uploads(s3_bucket)]

    rerun = run(config)
    assert rerun["skipped_shards"] == len(complete) and rerun["downloaded_shards"] == 3 - len(complete)
    assert store_tree(url) == expected
    assert store.fs.list_multipart_uploads(s3_bucket) == []  # the rerun aborted the killed run's upload
    assert [p for p in store.fs.find(f"{s3_bucket}/out") if p.rsplit("/", 1)[-1].startswith(".")] == []


def test_retry_failed_on_s3_reads_the_shards_there_and_adds_a_retry_shard(tmp_path: Path, host: ImageHost,
                                                                         s3_env: SeaweedS3, s3_bucket: str) -> None:
    good = sample_data.add_images(host, 5, size=(96, 64))
    flaky = [host.url(f"/fault/flaky/{i}?fail=1&code=503") for i in range(3)]
    urls = good[:2] + flaky + [host.url("/fault/404")] + good[2:]
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    url = f"s3://{s3_bucket}/out"
    first = run(config_file(tmp_path, str(tmp_path / "in"), url, number_sample_per_shard=4))
    assert first["failed_to_download"] == 4 and first["shards"] == 3
    path = config_file(tmp_path, str(tmp_path / "in"), url, number_sample_per_shard=4)
    config = json.loads(path.read_text())
    config["download_images"]["retry_failed"] = True
    path.write_text(json.dumps(config))
    second = run(path)  # the failures are read from the parquets in S3
    assert second["retried_urls"] == 3 and second["retry_shards"] == 1 and second["successes"] == 8
    assert host.hits["/fault/404"] == 1
    names = Store(f"{url}/p").list_files()
    assert "00003_stats.json" in names
    assert json.loads(Store(f"{url}/p").read_bytes("00003_stats.json"))["retry_round"]
    third = run(path)
    assert third["retried_urls"] == 0 and "00004.tar" not in Store(f"{url}/p").list_files()


def spooled_bytes(spool: Path) -> int:
    """Bytes of pieces and spill files in a download's spool folder. Called from an upload thread while other
    threads write, rename and remove pieces: a file gone between the listing and its stat counts nothing
    (raising there would fail that upload; the CI flake this once was)."""
    total = 0
    for path in spool.glob(".0000?.piece*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def test_uploads_run_beside_the_downloads_and_pieces_wait_for_room(tmp_path: Path, host: ImageHost,
                                                                   s3_env: SeaweedS3, s3_bucket: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One process, 8 rows per shard (one row per piece), the spool bound one shard: while shard 0's upload is
    held open after its first piece (nothing visible at its name yet, its 7 other pieces waiting on disk),
    the later shards still download and upload, one piece at a time (the bound: one shard's rows spooled),
    and are complete before shard 0 is. Released, the outputs are the local run's bytes."""
    import threading

    from airflow_provider_mmprep.download import pipeline

    urls = sample_data.add_images(host, 32, size=(96, 64))
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    run(config_file(tmp_path, str(tmp_path / "in"), str(tmp_path / "ref"), number_sample_per_shard=8))
    expected = local_tree(tmp_path / "ref")

    url = f"s3://{s3_bucket}/out"
    spool = download_images.spool_folder(f"{url}/p")
    seen: dict[str, Any] = {}
    spooled: list[tuple[int, float]] = []
    real_uploaded = pipeline.Publisher._uploaded

    def uploaded(self: Any, shard_id: int, number: int) -> None:
        spooled.append((spooled_bytes(spool), self.bound_bytes()))
        real_uploaded(self, shard_id, number)
        if shard_id == 0 and number == 0:  # shard 0's multipart upload stays open while the others go on
            deadline = threading.Event()
            for _ in range(600):
                names = set(Store(f"{url}/p").list_files())
                if {f"0000{s}_stats.json" for s in (1, 2, 3)} <= names or deadline.wait(0.1):
                    break
            seen["objects visible"] = sorted(n for n in Store(f"{url}/p").list_files() if n.startswith("0000"))
            seen["shard 0 pieces on disk"] = len(list(spool.glob(".00000.piece???.*[0-9].mmprep-tmp")))

    monkeypatch.setattr(pipeline.Publisher, "_uploaded", uploaded)
    summary = run(config_file(tmp_path, str(tmp_path / "in"), url, number_sample_per_shard=8))
    assert summary["downloaded_shards"] == 4
    later = [f"0000{s}{e}" for s in (1, 2, 3) for e in (".parquet", ".tar", ".tar.offsets", "_stats.json")]
    assert {k: v for k, v in seen.items() if k != "objects visible"} == {"shard 0 pieces on disk": 7}
    assert not any(n.startswith("00000") for n in seen["objects visible"])
    assert {n for n in later if not n.endswith(".offsets")} <= set(seen["objects visible"])
    piece = max(size for size, _bound in spooled[1:]) / 8  # about one piece: every image alike
    assert all(size <= bound + piece for size, bound in spooled if bound), spooled
    assert store_tree(url) == expected


def test_a_hanging_early_row_holds_back_only_its_own_shard(tmp_path: Path, host: ImageHost, s3_env: SeaweedS3,
                                                           s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 0's first row hangs until the timeout: its later pieces finish and wait on disk (a shard is one
    multipart upload, its pieces in order), but the next shards' uploads go on and complete meanwhile, with
    the spool (two shards here, ``$MMPREP_SPOOL_SHARDS``) within its bound; the outputs are the local run's."""
    from airflow_provider_mmprep.download import pipeline

    monkeypatch.setenv("MMPREP_SPOOL_SHARDS", "2")
    urls = [host.url("/fault/hang/0")] + sample_data.add_images(host, 31, size=(96, 64))
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    run(config_file(tmp_path, str(tmp_path / "in"), str(tmp_path / "ref"), number_sample_per_shard=8, timeout=4))
    expected = local_tree(tmp_path / "ref")

    url = f"s3://{s3_bucket}/out"
    spool = download_images.spool_folder(f"{url}/p")
    order: list[tuple[int, int]] = []
    spooled: list[tuple[int, float]] = []
    visible_at_first: list[str] = []
    real_uploaded = pipeline.Publisher._uploaded

    def uploaded(self: Any, shard_id: int, number: int) -> None:
        spooled.append((spooled_bytes(spool), self.bound_bytes()))
        if (shard_id, number) == (0, 0):
            visible_at_first.extend(Store(f"{url}/p").list_files())
        order.append((shard_id, number))
        real_uploaded(self, shard_id, number)

    monkeypatch.setattr(pipeline.Publisher, "_uploaded", uploaded)
    summary = run(config_file(tmp_path, str(tmp_path / "in"), url, number_sample_per_shard=8, timeout=4))
    assert summary["downloaded_shards"] == 4
    assert order.index((0, 0)) > order.index((3, 7))  # every later shard's pieces went up before the held one
    assert {"00001_stats.json", "00002_stats.json", "00003_stats.json"} <= set(visible_at_first)
    assert not any(n.startswith("00000") for n in visible_at_first)
    piece = max(size for size, _bound in spooled) / 16
    assert all(size <= bound + piece for size, bound in spooled if bound), spooled
    assert store_tree(url) == expected
