"""download_images with stragglers: hanging and slow-drip URLs must not hold the task's fetch budget.

The worst case for a design that fetches one shard at a time is a straggler at the end of every shard: each
shard then costs a whole deadline. These tests place them there and read the host's view of the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_provider_mmprep.download.pipeline import socket_cap
from airflow_provider_mmprep.testing import sample_data
from airflow_provider_mmprep.testing.image_host import ImageHost

from test_download_images import SMALL, read_rows, run, write_config

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 2.0
PER_SHARD = 10


def straggler_urls(host: ImageHost, shards: int) -> list[str]:
    """``shards`` shards of PER_SHARD rows whose last two rows hang and drip until the deadline."""
    urls = []
    for shard in range(shards):
        urls += sample_data.add_images(host, PER_SHARD - 2, size=SMALL, start=shard * PER_SHARD)
        urls += [host.url(f"/fault/hang/{shard}"), host.url(f"/fault/drip/{shard}?rate=64")]
    return urls


@pytest.mark.parametrize("processes", [1, 2])
def test_next_shard_starts_while_stragglers_wait_and_the_run_ends_one_deadline_after_the_last_reply(
        tmp_path: Path, processes: int) -> None:
    shards = 4
    with ImageHost(latency=(0.01, 0.03), seed=2, record_timeline=True) as host:
        urls = straggler_urls(host, shards)
        sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
        config = write_config(tmp_path, tmp_path / "in", tmp_path / "out", processes=processes, threads=4,
                              timeout=TIMEOUT, number_sample_per_shard=PER_SHARD)
        summary = run(config)
        ended = time.time()
        arrivals = dict(host.arrivals)
        last_useful_reply = max(answered for _received, answered in host.timeline or [])
    assert summary["successes"] == shards * (PER_SHARD - 2) and summary["shards"] == shards
    for shard in range(shards - 1):
        straggler_started = min(arrivals[f"/fault/hang/{shard}"], arrivals[f"/fault/drip/{shard}"])
        next_shard_started = min(t for path, t in arrivals.items()
                                 if path.startswith("/img/") and int(path[5:].split(".")[0]) // PER_SHARD == shard + 1)
        # the next shard's requests go out while this shard's stragglers are still waiting for their deadline
        assert next_shard_started < straggler_started + TIMEOUT / 2, shard
    # ends within one deadline of its last useful reply, not one deadline per shard
    assert ended - last_useful_reply < TIMEOUT * 1.5
    rows = read_rows(tmp_path / "out" / "p")
    assert sorted(r["error_message"] for r in rows if r["status"] != "success") == \
        [f"timed out after {TIMEOUT:g}s"] * (2 * shards)


def test_outputs_are_byte_identical_across_process_counts_with_stragglers(tmp_path: Path) -> None:
    with ImageHost(latency=(0.0, 0.05), seed=4) as host:
        urls = straggler_urls(host, 3)
        sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
        outputs = {}
        for processes, per_shard in ((1, PER_SHARD), (2, PER_SHARD), (1, 3 * PER_SHARD), (3, 3 * PER_SHARD)):
            out = tmp_path / f"out{processes}-{per_shard}"
            run(write_config(tmp_path, tmp_path / "in", out, processes=processes, threads=3, timeout=1.0,
                             number_sample_per_shard=per_shard))
            outputs[processes, per_shard] = {p.name: p.read_bytes() for p in sorted((out / "p").iterdir())
                                             if not p.name.endswith("_stats.json")}  # stats hold timings
    assert outputs[1, PER_SHARD] == outputs[2, PER_SHARD]
    assert sorted(outputs[1, PER_SHARD]) == [f"0000{i}.{ext}" for i in range(3)
                                              for ext in ("parquet", "tar", "tar.manifest.json", "tar.offsets.json")]
    # one shard cut in three pieces fetched by three processes, joined: the tar one process writes
    assert outputs[1, 3 * PER_SHARD] == outputs[3, 3 * PER_SHARD] and len(outputs[3, 3 * PER_SHARD]) == 4


MEMORY_PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from airflow_provider_mmprep.config import load_config
from airflow_provider_mmprep.stages.download_images import run_task
summary = run_task(load_config(sys.argv[2], load_precache=False), 0, 1)
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "urls": summary["urls"]}))
"""


def test_open_requests_stay_capped_and_memory_flat_with_a_third_of_the_urls_hanging(tmp_path: Path) -> None:
    """Three times the URLs (a third of them hanging) costs no more memory, and the sockets stay capped."""
    threads = 8
    peaks = {}
    with ImageHost(latency=(0.0, 0.01), seed=6) as host:
        for count in (60, 180):
            urls = []
            for index in range(count):
                urls += ([host.url(f"/fault/hang/{count}-{index}")] if index % 3 == 2 else
                         sample_data.add_images(host, 1, size=SMALL, start=count * 10 + index))
            source = tmp_path / f"in{count}"
            sample_data.write_url_parquet(source / "p.parquet", urls)
            config = write_config(tmp_path, source, tmp_path / f"out{count}", threads=threads, timeout=0.5,
                                  number_sample_per_shard=20)
            host.max_in_flight = 0
            done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(REPO), str(config)], check=True,
                                  capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            assert result["urls"] == count
            peaks[count] = result["peak_kb"]
            # stalled requests keep their sockets, up to the cap, and never beyond it
            assert threads < host.max_in_flight <= socket_cap(threads)
    assert peaks[180] < peaks[60] + 16 * 1024, peaks  # KB: flat, not growing with the hanging URLs


def test_a_stalled_host_gets_no_more_connections_than_its_cap_while_others_are_served(tmp_path: Path) -> None:
    """Demoted requests still count against ``max_connections_per_host``: new work goes to other hosts."""
    with ImageHost(host="127.0.0.1", seed=1) as stalled, ImageHost(host="127.0.0.2", seed=1) as healthy:
        urls = []
        for index in range(40):  # interleaved: every other URL is on the stalled host
            urls += [stalled.url(f"/fault/hang/{index}")]
            urls += sample_data.add_images(healthy, 1, size=SMALL, start=index)
        sample_data.write_url_parquet(tmp_path / "in" / "p.parquet", urls)
        config = write_config(tmp_path, tmp_path / "in", tmp_path / "out", threads=4, timeout=1.0,
                              number_sample_per_shard=PER_SHARD, block={"max_connections_per_host": 2})
        summary = run(config)
        assert stalled.max_in_flight == 2  # demoted requests kept their connections; no third one was opened
        assert summary["successes"] == 40 and healthy.hits and sum(healthy.hits.values()) == 40
