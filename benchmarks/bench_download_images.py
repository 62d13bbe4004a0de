"""Benchmark download_images against img2dataset on the same URLs, same host, same parallelism.

One command::

    /work/main/.venv/bin/python benchmarks/bench_download_images.py [--urls 4000] [--repeat 2]

What it does: serves ``--urls`` procedurally generated ~75 KB JPEGs (200 distinct images; 50-150 KB range)
from a loopback host that delays every reply by 20-200 ms; installs img2dataset into
``benchmarks/.venv-img2dataset`` (first run only, from PyPI); then, for ``resize_mode no`` and for
``resize_mode center_crop, image_size 256``, runs img2dataset and ``mmprep run --stage download_images`` as
separate processes with equal parallelism (``--processes`` × ``--threads``; ``--per-shard`` samples per
shard, img2dataset's default 10,000 unless given) and measures for each the whole-process wall time, the
successful images, and the peak
RSS of its whole process tree (sampled every 50 ms). It prints images/s and the ratios mmprep/img2dataset.
Runs alternate and the median of ``--repeat`` runs is reported. The host and both tools share the machine,
so absolute figures depend on load; the ratios are what to read.

Our per-host connection cap is raised to the total concurrency for this run: every URL comes from one host,
which a real crawl never sees, and img2dataset has no such cap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from contextlib import contextmanager

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HOST_PROCESS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from airflow_provider_mmprep.testing import sample_data
from airflow_provider_mmprep.testing.image_host import ImageHost
with ImageHost(latency=(0.02, 0.2), seed=1) as host:
    urls = sample_data.add_images(host, int(sys.argv[2]), distinct=200)
    sample_data.write_url_parquet(sys.argv[3], urls)
    sizes = sorted({len(r.body) for r in host.resources.values()})
    print(json.dumps(sizes), flush=True)
    sys.stdin.read()  # serve until the benchmark closes our stdin
"""


@contextmanager
def image_host(urls: int, parquet: Path):
    """The loopback host in its own process, so the RSS sampler here never slows it down."""
    proc = subprocess.Popen([sys.executable, "-c", HOST_PROCESS, str(REPO), str(urls), str(parquet)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()

VENV = REPO / "benchmarks" / ".venv-img2dataset"
IMG2DATASET_VERSION = "1.47.0"
MODES = {"no": {"resize_mode": "no"}, "center_crop_256": {"resize_mode": "center_crop", "image_size": 256}}


def ensure_img2dataset() -> Path:
    exe = VENV / "bin" / "img2dataset"
    if not exe.exists():
        print(f"installing img2dataset {IMG2DATASET_VERSION} into {VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"img2dataset=={IMG2DATASET_VERSION}"],
                       check=True)
    return exe


class PeakRss:
    """Sample the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        """The pid and its descendants, from /proc/<pid>/task/*/children (cheap: no scan of every process)."""
        found, todo = [], [pid]
        while todo:
            current = todo.pop()
            found.append(current)
            try:
                for task in os.listdir(f"/proc/{current}/task"):
                    with open(f"/proc/{current}/task/{task}/children") as handle:
                        todo.extend(int(child) for child in handle.read().split())
            except OSError:
                continue
        return found

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        linux = os.path.exists(f"/proc/{self.pid}/task")
        while not self._stop.is_set():
            if linux:
                total = sum(self._rss(pid) for pid in self._tree(self.pid))
            else:  # pragma: no cover - other systems: psutil (scans every process, costlier)
                import psutil

                try:
                    root = psutil.Process(self.pid)
                    total = sum(p.memory_info().rss for p in [root] + root.children(recursive=True))
                except psutil.Error:
                    total = 0
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(cmd: list[str], env: dict[str, str] | None = None, log_path: Path | None = None) -> tuple[float, int]:
    with open(log_path or os.devnull, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        rss = PeakRss(proc.pid)
        code = proc.wait()
        wall = time.perf_counter() - start
        peak = rss.stop()
    if code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}; see {log_path}")
    return wall, peak


def successes(folder: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in folder.rglob("*_stats.json"))


def run_img2dataset(exe: Path, parquet: Path, out: Path, mode: dict, args: argparse.Namespace) -> dict:
    cmd = [str(exe), "--url_list", str(parquet), "--input_format", "parquet", "--url_col", "URL",
           "--caption_col", "TEXT", "--output_format", "webdataset", "--output_folder", str(out),
           "--processes_count", str(args.processes), "--thread_count", str(args.threads),
           "--number_sample_per_shard", str(args.per_shard), "--encode_quality", "95", "--timeout", "10",
           "--retries", "0",
           "--enable_wandb", "False"]
    for key, value in mode.items():
        cmd += [f"--{key}", str(value)]
    if args.skip_reencode:
        cmd += ["--skip_reencode", "True"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    wall, peak = timed(cmd, env, out.parent / f"{out.name}.log")
    return {"wall": wall, "rss": peak, "ok": successes(out)}


def run_mmprep(parquet_dir: Path, out: Path, mode: dict, args: argparse.Namespace) -> dict:
    extra = {"encode_quality": 95, "number_sample_per_shard": args.per_shard, "timeout": 10, "retries": 0, **mode}
    if args.skip_reencode:
        extra["skip_reencode"] = True
    config = {"run": {"name": "bench"}, "download_images": {
        "enable": True, "input_dir": str(parquet_dir), "output_dir": str(out), "parquet_pattern": "*.parquet",
        "download_num_processes": args.processes, "download_num_threads": args.threads,
        "allow_private_addresses": True, "max_connections_per_host": args.processes * args.threads,
        "img2dataset_additional_arguments": extra}}
    config_path = out.parent / f"{out.name}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    cmd = [sys.executable, "-m", "airflow_provider_mmprep.cli", "run", str(config_path), "--stage",
           "download_images", "--task-id", "0", "--task-count", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    wall, peak = timed(cmd, env, out.parent / f"{out.name}.log")
    return {"wall": wall, "rss": peak, "ok": successes(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=10_000,
                        help="number_sample_per_shard for both (img2dataset's default, which NeMo's config keeps)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--skip-reencode", action="store_true",
                        help="pass skip_reencode true to both tools (equal work for resize_mode no)")
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    args = parser.parse_args()
    exe = ensure_img2dataset()
    work = Path(tempfile.mkdtemp(prefix="bench_download_images_"))
    parquet_dir = work / "parquet"
    parquet_dir.mkdir()
    with image_host(args.urls, parquet_dir / "urls.parquet") as sizes:
        print(f"{args.urls} URLs, JPEGs {sizes[0] // 1024}-{sizes[-1] // 1024} KB "
              f"(mean {sum(sizes) // len(sizes) // 1024} KB), latency 20-200 ms, "
              f"{args.processes} processes x {args.threads} threads, {args.per_shard} samples/shard, "
              f"cpus={os.cpu_count()}"
              f"{', skip_reencode true for both' if args.skip_reencode else ''}", flush=True)
        report = {}
        for mode_name in args.modes.split(","):
            mode = MODES[mode_name]
            runs: dict[str, list[dict]] = {"img2dataset": [], "mmprep": []}
            for rep in range(args.repeat):
                for tool in ("img2dataset", "mmprep"):
                    out = work / f"{tool}_{mode_name}_{rep}"
                    result = (run_img2dataset(exe, parquet_dir / "urls.parquet", out, mode, args)
                              if tool == "img2dataset" else run_mmprep(parquet_dir, out, mode, args))
                    result["ips"] = result["ok"] / result["wall"]
                    runs[tool].append(result)
                    print(f"  {mode_name:16s} {tool:12s} run {rep}: {result['ok']} images in {result['wall']:.1f}s "
                          f"= {result['ips']:.0f} img/s, peak RSS {result['rss'] / 2**20:.0f} MB", flush=True)
            med = {tool: {k: statistics.median(r[k] for r in rs) for k in ("ips", "rss", "ok")}
                   for tool, rs in runs.items()}
            speed = med["mmprep"]["ips"] / med["img2dataset"]["ips"]
            memory = med["mmprep"]["rss"] / med["img2dataset"]["rss"]
            report[mode_name] = {"speed_ratio": speed, "rss_ratio": memory, **med}
            print(f"{mode_name}: mmprep {med['mmprep']['ips']:.0f} img/s vs img2dataset "
                  f"{med['img2dataset']['ips']:.0f} img/s -> speed ratio {speed:.2f}x; peak RSS "
                  f"{med['mmprep']['rss'] / 2**20:.0f} MB vs {med['img2dataset']['rss'] / 2**20:.0f} MB -> "
                  f"ratio {memory:.2f}", flush=True)
    print(json.dumps(report, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"outputs kept in {work}")


if __name__ == "__main__":
    main()
