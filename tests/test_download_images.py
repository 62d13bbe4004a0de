"""download_images against a loopback host with faults: outcomes, tar contents, crash safety, retries."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest
from PIL import Image

from airflow_provider_mmprep.config import ConfigError, load_config
from airflow_provider_mmprep.stages import StageError, download_images
from airflow_provider_mmprep.stages.download_images import run_task
from airflow_provider_mmprep.testing import sample_data
from airflow_provider_mmprep.testing.image_host import ImageHost

REPO = Path(__file__).resolve().parent.parent
SMALL = (96, 64)

FAULTS = {  # route -> (status, error fragment, retryable)
    "/fault/404": ("failed_to_download", "HTTP 404", False),
    "/fault/500": ("failed_to_download", "HTTP 500", True),
    "/fault/429?retry_after=0": ("failed_to_download", "HTTP 429", True),
    "/fault/reset": ("failed_to_download", "connection", True),
    "/fault/hang": ("failed_to_download", "timed out after 1.5s", True),
    "/fault/truncated": ("failed_to_download", "body was complete", True),
    "/fault/truncated-jpeg": ("failed_to_resize", "truncated", False),
    "/fault/html": ("failed_to_resize", "not an image", False),
    "/fault/empty": ("failed_to_download", "empty body", False),
    "/fault/drip": ("failed_to_download", "timed out after 1.5s", True),
    "/fault/redirect-loop": ("failed_to_download", "too many redirects", False),
    "/fault/bomb": ("failed_to_resize", "decompression bomb", False),
    "/fault/noai": ("failed_to_download", "X-Robots-Tag", False),
    "/fault/redirect?to=/fault/ok": ("success", None, False),
    "/fault/flaky/a?fail=1&code=503": ("success", None, False),
}


@pytest.fixture
def host() -> Iterator[ImageHost]:
    with ImageHost(latency=(0.0, 0.01), seed=3) as server:
        yield server


def write_config(tmp_path: Path, input_dir: Path, output_dir: Path, *, processes: int = 1, threads: int = 8,
                 allow_private: bool = True, retry_failed: bool = False, pattern: str = "*.parquet",
                 block: dict[str, Any] | None = None, **arguments: Any) -> Path:
    arguments.setdefault("timeout", 1.5)
    config = {"run": {"name": "t"}, "download_images": {
        "enable": True, "input_dir": str(input_dir), "output_dir": str(output_dir), "parquet_pattern": pattern,
        "download_num_processes": processes, "download_num_threads": threads,
        "allow_private_addresses": allow_private, "retry_failed": retry_failed,
        "img2dataset_additional_arguments": arguments, **(block or {})}}
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.yaml"
    path.write_text(json.dumps(config))
    return path


def run(config_path: Path, task_id: int = 0, task_count: int = 1) -> dict[str, Any]:
    return run_task(load_config(config_path, load_precache=False), task_id, task_count)


def read_rows(part_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for parquet in sorted(part_dir.glob("*.parquet")):
        rows += pq.read_table(parquet).to_pylist()
    return rows


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_every_url_ends_as_one_row_and_only_good_images_reach_the_tar(tmp_path: Path, host: ImageHost) -> None:
    good = sample_data.add_images(host, 12, size=SMALL)
    fault_urls = [host.url(route) for route in FAULTS]
    urls = good + fault_urls + ["ftp://127.0.0.1/x.jpg", "not a url", None]
    sample_data.write_url_parquet(tmp_path / "in" / "part0.parquet", urls,
                                  captions=[f"caption {i}" for i in range(len(urls))])
    config = write_config(tmp_path, tmp_path / "in", tmp_path / "out", retries=1, number_sample_per_shard=10)

    summary = run(config)

    part = tmp_path / "out" / "part0"
    rows = read_rows(part)
    assert [r["url"] for r in rows] == urls  # one row per input URL, in input order
    assert len({r["key"] for r in rows}) == len(urls)
    assert summary["urls"] == len(urls)
    by_url = {r["url"]: r for r in rows}
    for url in good:
        assert by_url[url]["status"] == "success", by_url[url]
    for route, (status, fragment, retryable) in FAULTS.items():
        row = by_url[host.url(route)]
        assert row["status"] == status, (route, row)
        if fragment:
            assert fragment in row["error_message"], (route, row["error_message"])
        assert row["retryable"] is retryable, route
    for bad in ("ftp://127.0.0.1/x.jpg", "not a url", None):
        assert by_url[bad]["status"] == "failed_to_download" and by_url[bad]["error_message"]
    for row in rows:
        assert row["status"] in ("success", "failed_to_download", "failed_to_resize")
        assert (row["error_message"] is None) == (row["status"] == "success")
    assert host.hits["/fault/flaky/a"] == 2  # failed once, retried once
    assert host.hits["/fault/404"] == 1  # never retried

    successes = {r["key"]: r for r in rows if r["status"] == "success"}
    seen: set[str] = set()
    for tar_path in sorted(part.glob("*.tar")):
        members = tar_members(tar_path)
        names = list(members)
        key_order = [name.split(".", 1)[0] for name in names]
        assert key_order == sorted(key_order)  # samples sorted by key, each sample's members adjacent
        manifest = json.loads((part / (tar_path.name + ".manifest.json")).read_text())
        keys = {name.split(".", 1)[0] for name in names}
        assert manifest["sample_count"] == len(keys)
        for key in keys:
            image_bytes = members[f"{key}.jpg"]
            with Image.open(io.BytesIO(image_bytes)) as image:
                image.load()  # fully decodable: no truncated or fake image got in
            meta = json.loads(members[f"{key}.json"])
            assert meta["key"] == key and meta["status"] == "success"
            assert members[f"{key}.txt"].decode() == successes[key]["caption"]
            assert meta["sha256"] == hashlib.sha256(image_bytes).hexdigest()  # unchanged bytes kept
        seen |= keys
    assert seen == set(successes)
    stats = [json.loads(p.read_text()) for p in sorted(part.glob("*_stats.json"))]
    assert sum(s["count"] for s in stats) == len(urls)
    assert sum(s["successes"] for s in stats) == len(successes) == summary["successes"]


def test_private_and_loopback_addresses_are_refused_by_default(tmp_path: Path, host: ImageHost) -> None:
    urls = sample_data.add_images(host, 2, size=SMALL)
    by_name = urls[1].replace("127.0.0.1", "localhost")  # a name resolving to loopback: caught at resolution
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", [urls[0], by_name])
    with pytest.raises(StageError, match="2 of 2 URLs failed"):  # every URL failed: the task fails
        run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", allow_private=False))
    rows = read_rows(tmp_path / "out" / "p")
    assert [r["status"] for r in rows] == ["failed_to_download"] * 2
    assert all("refused loopback address" in r["error_message"] for r in rows), rows
    assert sum(host.hits.values()) == 0  # nothing was ever sent to the host


def test_rerun_skips_complete_shards_and_two_processes_give_identical_tars(
        tmp_path: Path, host: ImageHost, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = sample_data.add_images(host, 30, size=SMALL)
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    first = run(write_config(tmp_path, tmp_path / "in", tmp_path / "a", number_sample_per_shard=8))
    assert first["downloaded_shards"] == 4 and first["successes"] == 30
    hits = sum(host.hits.values())
    again = run(write_config(tmp_path, tmp_path / "in", tmp_path / "a", number_sample_per_shard=8))
    assert again["downloaded_shards"] == 0 and again["skipped_shards"] == 4
    assert sum(host.hits.values()) == hits
    # second run: two worker processes, and every early finisher goes through the spill file
    monkeypatch.setattr("airflow_provider_mmprep.download.shard.MEMORY_CAP_BYTES", 1)
    run(write_config(tmp_path, tmp_path / "in", tmp_path / "b", processes=2, number_sample_per_shard=8))
    names = sorted(p.name for p in (tmp_path / "a" / "p").glob("*.tar"))
    assert names == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    for name in names:
        assert (tmp_path / "a" / "p" / name).read_bytes() == (tmp_path / "b" / "p" / name).read_bytes()
    assert pq.read_table(tmp_path / "a" / "p" / "00001.parquet").equals(
        pq.read_table(tmp_path / "b" / "p" / "00001.parquet"))
    # one shard, three processes: the shard is fetched in three pieces and joined into the same tar
    run(write_config(tmp_path, tmp_path / "in", tmp_path / "c1", number_sample_per_shard=100))
    run(write_config(tmp_path, tmp_path / "in", tmp_path / "c3", processes=3, number_sample_per_shard=100))
    single = (tmp_path / "c1" / "p" / "00000.tar").read_bytes()
    assert single == (tmp_path / "c3" / "p" / "00000.tar").read_bytes()
    assert len(tar_members(tmp_path / "c3" / "p" / "00000.tar")) == 90
    assert not [p for p in (tmp_path / "c3" / "p").iterdir() if p.name.startswith(".")]  # no piece left over


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(tmp_path: Path) -> None:
    with ImageHost(latency=(0.02, 0.06), seed=5) as host:
        urls = sample_data.add_images(host, 48, size=SMALL)
        sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
        reference = write_config(tmp_path, tmp_path / "in", tmp_path / "ref", threads=2,
                                 number_sample_per_shard=8)
        run(reference)
        killed = write_config(tmp_path, tmp_path / "in", tmp_path / "killed", threads=2, processes=2,
                              number_sample_per_shard=8)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-m", "airflow_provider_mmprep.cli", "-q", "run", str(killed),
                                 "--stage", "download_images", "--task-id", "0", "--task-count", "1"], env=env)
        part = tmp_path / "killed" / "p"
        deadline = time.monotonic() + 60
        while len(list(part.glob("*_stats.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert workers, "the killed run had no worker processes"
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)], \
            "worker processes outlived the killed task"
        assert not (part / "00005_stats.json").exists(), "the run finished before it could be killed"
        summary = run(killed)
        assert summary["skipped_shards"] >= 2
    names = sorted(p.name for p in (tmp_path / "ref" / "p").iterdir())
    assert names == sorted(p.name for p in part.iterdir())  # temporaries gone, nothing extra
    for name in names:
        if name.endswith(".tar"):
            assert (tmp_path / "ref" / "p" / name).read_bytes() == (part / name).read_bytes(), name


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_retry_failed_reattempts_only_transient_failures_into_new_shards(tmp_path: Path,
                                                                          host: ImageHost) -> None:
    good = sample_data.add_images(host, 5, size=SMALL)
    flaky = [host.url(f"/fault/flaky/{i}?fail=1&code=503") for i in range(3)]
    permanent = host.url("/fault/404")
    urls = good[:2] + flaky + [permanent] + good[2:]
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    first = run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", number_sample_per_shard=4))
    assert first["failed_to_download"] == 4 and first["shards"] == 3
    retry_config = write_config(tmp_path, tmp_path / "in", tmp_path / "out", number_sample_per_shard=4,
                                retry_failed=True)
    second = run(retry_config)
    assert second["retried_urls"] == 3 and second["retry_shards"] == 1
    assert host.hits["/fault/404"] == 1
    part = tmp_path / "out" / "p"
    retry_rows = pq.read_table(part / "00003.parquet").to_pylist()
    assert [r["url"] for r in retry_rows] == flaky
    assert all(r["status"] == "success" for r in retry_rows)
    original_keys = {r["url"]: r["key"] for r in pq.read_table(part / "00000.parquet").to_pylist()
                     + pq.read_table(part / "00001.parquet").to_pylist()}
    assert [r["key"] for r in retry_rows] == [original_keys[u] for u in flaky]  # keys kept
    all_tar_keys = [name.split(".")[0] for tar in sorted(part.glob("*.tar")) for name in tar_members(tar)
                    if name.endswith(".jpg")]
    assert len(all_tar_keys) == len(set(all_tar_keys)) == 8  # 5 good + 3 recovered, no key twice
    third = run(retry_config)  # nothing transient left: no new shard
    assert third["retried_urls"] == 0 and not (part / "00004.tar").exists()


def test_input_formats_and_additional_columns(tmp_path: Path, host: ImageHost) -> None:
    import gzip

    urls = sample_data.add_images(host, 3, size=SMALL)
    inputs = tmp_path / "in"
    inputs.mkdir()
    with gzip.open(inputs / "a.jsonl.gz", "wt") as handle:
        for i, url in enumerate(urls):
            handle.write(json.dumps({"link": url, "alt": f"alt {i}", "score": i / 2}) + "\n")
    run(write_config(tmp_path, inputs, tmp_path / "out", pattern="*.jsonl.gz", input_format="jsonl",
                     url_col="link", caption_col="alt", save_additional_columns=["score"]))
    rows = read_rows(tmp_path / "out" / "a.jsonl.gz")
    assert [r["score"] for r in rows] == [0.0, 0.5, 1.0] and [r["caption"] for r in rows] == ["alt 0", "alt 1", "alt 2"]
    members = tar_members(tmp_path / "out" / "a.jsonl.gz" / "00000.tar")
    assert json.loads(members[f"{rows[1]['key']}.json"])["score"] == 0.5

    (inputs / "b.tsv").write_text("URL\tTEXT\textra\n" + "".join(f"{u}\tt{i}\t{i}\n" for i, u in enumerate(urls)))
    run(write_config(tmp_path, inputs, tmp_path / "out", pattern="*.tsv", input_format="tsv",
                     save_additional_columns="['extra']"))
    rows = read_rows(tmp_path / "out" / "b.tsv")
    assert [r["status"] for r in rows] == ["success"] * 3 and [r["extra"] for r in rows] == [0, 1, 2]


def test_options_unknown_warns_and_bad_values_name_the_key(tmp_path: Path, host: ImageHost,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    urls = sample_data.add_images(host, 1, size=SMALL)
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", frobnicate=3, user_agent_token="acme-crawl"))
    assert "img2dataset_additional_arguments.frobnicate: unknown option" in caplog.text
    (agent,) = host.user_agents
    assert agent.startswith("mmprep/") and "acme-crawl" in agent
    with pytest.raises(ConfigError, match=r"img2dataset_additional_arguments\.resize_mode: expected one of"):
        run(write_config(tmp_path, tmp_path / "in", tmp_path / "out2", resize_mode="stretch"))  # at load
    with pytest.raises(StageError, match=r"img2dataset_additional_arguments\.url_col: column 'LINK' not found"):
        run(write_config(tmp_path, tmp_path / "in", tmp_path / "out3", url_col="LINK"))
    with pytest.raises(StageError, match="task id 3 but only 1 input part"):
        run(write_config(tmp_path, tmp_path / "in", tmp_path / "out4"), task_id=3, task_count=4)


@pytest.mark.parametrize(("name", "size"), [("000000001.jpg", 77_600), ("000000001.txt", 0),
                                            ("123456789.json", 12_345_678)])
def test_fast_tar_header_matches_tarfile(name: str, size: int) -> None:
    from airflow_provider_mmprep.tarwriter import FIXED

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    assert FIXED.header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_input_is_read_in_batches_not_whole(tmp_path: Path) -> None:
    """Arrow memory held while walking a part does not grow with the part: 4x the rows, same peak."""
    import pyarrow as pa

    from airflow_provider_mmprep.download.options import parse_options
    from airflow_provider_mmprep.download.reader import iter_shard_jobs

    def peak_for(rows: int) -> int:
        urls = [f"https://images.example.com/some/path/{i:08d}/picture.jpg" for i in range(rows)]
        path = sample_data.write_url_parquet(tmp_path / f"{rows}.parquet", urls,
                                             captions=[f"caption {i} " * 4 for i in range(rows)],
                                             row_group_size=10_000)
        baseline = pa.total_allocated_bytes()
        peak, count = 0, 0
        for job in iter_shard_jobs(path, parse_options({"number_sample_per_shard": 1000})):
            count += len(job)
            peak = max(peak, pa.total_allocated_bytes() - baseline)
        assert count == rows
        return peak

    small, large = peak_for(50_000), peak_for(200_000)
    whole_large = pq.read_table(tmp_path / "200000.parquet").nbytes
    assert large <= small * 1.25 + 1_000_000, (small, large)
    assert large < whole_large / 3, (large, whole_large)


def test_size_cap_and_per_image_limits_from_the_block(tmp_path: Path, host: ImageHost) -> None:
    big = host.add("/img/big.jpg", sample_data.make_jpeg(1, (400, 300)))
    small = host.add("/img/small.jpg", sample_data.make_jpeg(2, (40, 30)))
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", [big, small])
    run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", block={"max_image_bytes": 5_000}))
    rows = read_rows(tmp_path / "out" / "p")
    assert rows[0]["status"] == "failed_to_download" and "max_image_bytes" in rows[0]["error_message"]
    assert rows[1]["status"] == "success"


def test_keys_are_unique_across_parts(tmp_path: Path, host: ImageHost) -> None:
    """Every part restarts img2dataset's shard numbering; the part index in the key keeps the dataset's
    keys unique once reorganize_tar merges the parts (two equal adjacent keys would merge two samples)."""
    urls = sample_data.add_images(host, 6, size=SMALL)
    for index in range(2):
        sample_data.write_url_parquet(tmp_path / "in" / f"p{index}.parquet", urls[index * 3:(index + 1) * 3])
    config = write_config(tmp_path, tmp_path / "in", tmp_path / "out", number_sample_per_shard=2)
    keys = []
    for task_id in range(2):
        run(config, task_id=task_id, task_count=2)
        rows = read_rows(tmp_path / "out" / f"p{task_id}")
        assert {r["key"][:5] for r in rows} == {f"{task_id:05d}"}
        keys += [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 6
    assert all(len(k) == 14 and k.isdigit() for k in keys)


def test_the_stage_says_which_part_and_folder_each_task_has_and_which_tasks_have_work_left(
        tmp_path: Path, host: ImageHost) -> None:
    urls = sample_data.add_images(host, 6, size=SMALL)
    for index in range(2):
        sample_data.write_url_parquet(tmp_path / "in" / f"p{index}.parquet", urls[index * 3:(index + 1) * 3])
    config = write_config(tmp_path, tmp_path / "in", tmp_path / "out", number_sample_per_shard=2)
    cfg = load_config(config, load_precache=False)
    assert [download_images.task_inputs(cfg, t, 2) for t in range(2)] == [[tmp_path / "in" / "p0.parquet"],
                                                                           [tmp_path / "in" / "p1.parquet"]]
    assert download_images.incomplete_tasks(cfg, 2) == {0: "no *_stats.json in p0/", 1: "no *_stats.json in p1/"}
    summaries = [run(config, task_id=t, task_count=2) for t in range(2)]
    assert [download_images.expected_outputs(cfg, t, 2) for t in range(2)] == [[Path(s["output_dir"])]
                                                                                for s in summaries]
    assert download_images.incomplete_tasks(cfg, 2) == {}
    (tmp_path / "out" / "p1" / "00001_stats.json").unlink()  # the pod died before its last shard was done
    assert download_images.incomplete_tasks(cfg, 2) == {1: "2 of 3 URLs of its part have a status"}


def test_host_timeline_shows_how_many_requests_the_downloader_kept_in_flight(tmp_path: Path) -> None:
    """The benchmark reads the downloader's concurrency off this timeline; it must reflect real overlap."""
    with ImageHost(latency=(0.05, 0.05), seed=0, record_timeline=True) as host:
        urls = sample_data.add_images(host, 40, size=SMALL)
        sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
        run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", threads=8))
        timeline = list(host.timeline or [])
    assert len(timeline) == 40
    assert all(answered - received >= 0.045 for received, answered in timeline)  # timers may fire ~1 ms early
    busy = sum(answered - received for received, answered in timeline)
    window = max(a for _, a in timeline) - min(r for r, _ in timeline)
    assert 4 < busy / window <= 8.5  # about 8 in flight: the thread count, never more


@pytest.mark.parametrize("retry_failed", [False, True])
def test_rerun_of_a_finished_task_with_several_processes_is_a_no_op(tmp_path: Path, host: ImageHost,
                                                                    retry_failed: bool) -> None:
    urls = sample_data.add_images(host, 6, size=SMALL) + [host.url("/fault/404")]
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    config = write_config(tmp_path, tmp_path / "in", tmp_path / "out", processes=-1, number_sample_per_shard=4,
                          retry_failed=retry_failed)
    first = run(config)
    assert first["downloaded_shards"] == 2 and first["successes"] == 6
    part = tmp_path / "out" / "p"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in part.iterdir()}
    hits = sum(host.hits.values())
    again = run(config)  # nothing pending: crashed with ZeroDivisionError when processes != 1
    assert again["downloaded_shards"] == 0 and again["skipped_shards"] == 2
    assert sum(host.hits.values()) == hits
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in part.iterdir()} == before


def test_csv_read_as_parquet_hints_input_format(tmp_path: Path, host: ImageHost) -> None:
    urls = sample_data.add_images(host, 2, size=SMALL)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "urls.parquet").write_text("URL,TEXT\n" + "".join(f"{u},t\n" for u in urls))  # CSV, misnamed
    with pytest.raises(StageError) as caught:
        run(write_config(tmp_path, inputs, tmp_path / "out"))
    assert str(caught.value).startswith("download_images.img2dataset_additional_arguments.input_format: "
                                        "urls.parquet is not a parquet file (")
    assert "set input_format to its format (one of csv" in str(caught.value)


def test_every_url_refused_fails_the_task_and_a_fixed_setting_redoes_the_shards(
        tmp_path: Path, host: ImageHost, caplog: pytest.LogCaptureFixture) -> None:
    urls = sample_data.add_images(host, 6, size=SMALL)
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    refused = write_config(tmp_path, tmp_path / "in", tmp_path / "out", allow_private=False,
                           number_sample_per_shard=4)
    with pytest.raises(StageError) as caught:
        run(refused)
    message = str(caught.value)
    assert message.startswith("download_images.max_failed_share: download_images[p]: 6 of 6 URLs failed (100%); "
                              "top reasons: refused loopback address 127.0.0.1 (6) (every URL failed)")
    part = tmp_path / "out" / "p"
    assert len(list(part.glob("*_stats.json"))) == 2  # what it could write is kept (every URL has a status)
    with pytest.raises(StageError):
        run(refused)  # a rerun with the same setting fails the same way, fetching nothing
    assert sum(host.hits.values()) == 0
    fixed = run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", allow_private=True,
                             number_sample_per_shard=4))
    assert fixed["successes"] == 6 and fixed["redone_shards"] == 2 and fixed["skipped_shards"] == 0
    assert "redoing 2 shard(s)" in caplog.text and "allow_private_addresses" in caplog.text
    manifest = json.loads((part / "00000.tar.manifest.json").read_text())
    assert manifest["options_fingerprint"] == json.loads((part / "00000_stats.json").read_text())[
        "options_fingerprint"]
    again = run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", allow_private=True,
                             number_sample_per_shard=4))
    assert again["downloaded_shards"] == 0 and again["redone_shards"] == 0


def test_failure_share_warns_with_top_reasons_and_fails_above_the_limit(
        tmp_path: Path, host: ImageHost, caplog: pytest.LogCaptureFixture) -> None:
    urls = sample_data.add_images(host, 3, size=SMALL) + [host.url("/fault/404"), host.url("/fault/404/b")]
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    summary = run(write_config(tmp_path, tmp_path / "in", tmp_path / "a"))  # default: fails only if all fail
    assert summary["top_failure_reasons"] == {"HTTP 404": 2}
    assert "download_images[p]: 2 of 5 URLs failed (40%); top reasons: HTTP 404 (2)" in caplog.text
    with pytest.raises(StageError, match=r"2 of 5 URLs failed \(40%\).*more than max_failed_share 0.25"):
        run(write_config(tmp_path, tmp_path / "in", tmp_path / "b", block={"max_failed_share": 0.25}))


def test_incremental_mode_overwrite_redoes_the_part(tmp_path: Path, host: ImageHost) -> None:
    urls = sample_data.add_images(host, 5, size=SMALL)
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    config = write_config(tmp_path, tmp_path / "in", tmp_path / "out", number_sample_per_shard=4,
                          incremental_mode="overwrite")
    run(config)
    tar = tmp_path / "out" / "p" / "00000.tar"
    before, hits = tar.read_bytes(), sum(host.hits.values())
    again = run(config)
    assert again["redone_shards"] == 2 and again["downloaded_shards"] == 2
    assert sum(host.hits.values()) == 2 * hits and tar.read_bytes() == before  # fetched again, same bytes
    with pytest.raises(ConfigError, match="incremental_mode: expected incremental or overwrite, got .append."):
        run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", incremental_mode="append"))


def test_changed_option_redoes_shards_in_place_and_shards_without_a_fingerprint_are_kept(
        tmp_path: Path, host: ImageHost) -> None:
    urls = sample_data.add_images(host, 7, size=SMALL)
    sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
    run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", number_sample_per_shard=2))
    part = tmp_path / "out" / "p"
    # fewer, bigger, resized shards: the old ones are redone in place, those beyond the new count removed
    bigger = run(write_config(tmp_path, tmp_path / "in", tmp_path / "out", number_sample_per_shard=4,
                              image_size=32, resize_mode="center_crop"))
    assert bigger["skipped_shards"] == 0 and bigger["redone_shards"] == 2 and bigger["successes"] == 7
    assert sorted(p.name for p in part.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert sorted(p.name for p in part.glob("*_stats.json")) == ["00000_stats.json", "00001_stats.json"]
    with Image.open(io.BytesIO(tar_members(part / "00000.tar")[f"{read_rows(part)[0]['key']}.jpg"])) as image:
        assert image.size == (32, 32)

    run(write_config(tmp_path, tmp_path / "in", tmp_path / "old", number_sample_per_shard=2))
    for stats_file in (tmp_path / "old" / "p").glob("*_stats.json"):  # as an older mmprep wrote them
        stats = json.loads(stats_file.read_text())
        del stats["options_fingerprint"], stats["options"]
        stats_file.write_text(json.dumps(stats))
    hits = sum(host.hits.values())
    kept = run(write_config(tmp_path, tmp_path / "in", tmp_path / "old", number_sample_per_shard=2))
    assert kept["skipped_shards"] == 4 and kept["redone_shards"] == 0  # nothing is fetched again on upgrade
    assert sum(host.hits.values()) == hits
