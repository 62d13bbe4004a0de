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
with ImageHost(latency=(0.02, 0.2), seed=1, record_timeline=True) as host:
    urls = sample_data.add_images(host, int(sys.argv[2]), distinct=200)
    sample_data.write_url_parquet(sys.argv[3], urls)
    sizes = sorted({len(r.body) for r in host.resources.values()})
    print(json.dumps(sizes), flush=True)
    for _line in sys.stdin:  # each line asks for the timeline of the requests since the last ask
        times, host.timeline[:] = list(host.timeline), []
        print(json.dumps({"requests": len(times), "first": min((t[0] for t in times), default=0.0),
                          "last": max((t[1] for t in times), default=0.0),
                          "busy": sum(t[1] - t[0] for t in times)}), flush=True)
"""


class HostTimeline:
    """Ask the host process what the requests since the last ask looked like."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def take(self) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("timeline\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


@contextmanager
def image_host(urls: int, parquet: Path):
    """The loopback host in its own process, so the RSS sampler here never slows it down."""
    proc = subprocess.Popen([sys.executable, "-c", HOST_PROCESS, str(REPO), str(urls), str(parquet)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        sizes = json.loads(proc.stdout.readline())
        yield sizes, HostTimeline(proc)
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()

VENV = REPO / "benchmarks" / ".venv-img2dataset"
IMG2DATASET_VERSION = "1.47.0"
MODES = {"no": {"resize_mode": "no"}, "center_crop_256": {"resize_mode": "center_crop", "image_size": 256}}
TARGETS = {"no": 3.0, "center_crop_256": 2.0}  # issue 3: speed ratio wanted over img2dataset


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


def timed(cmd: list[str], env: dict[str, str] | None = None, log_path: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, peak RSS, and wall-clock start and end (to set against the host's log)."""
    with open(log_path or os.devnull, "wb") as log:
        started_at = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        rss = PeakRss(proc.pid)
        code = proc.wait()
        wall = time.perf_counter() - start
        ended_at = time.time()
        peak = rss.stop()
    if code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}; see {log_path}")
    return {"wall": wall, "rss": peak, "started_at": started_at, "ended_at": ended_at}


def phases(result: dict, timeline: dict) -> dict:
    """Where a run's wall time went, from the host's view of its requests."""
    window = max(timeline["last"] - timeline["first"], 1e-9)
    return {"startup": timeline["first"] - result["started_at"], "window": window,
            "in_flight": timeline["busy"] / window, "after": result["ended_at"] - timeline["last"],
            "mean_reply": timeline["busy"] / max(timeline["requests"], 1)}


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
    return {**timed(cmd, env, out.parent / f"{out.name}.log"), "ok": successes(out)}


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
    return {**timed(cmd, env, out.parent / f"{out.name}.log"), "ok": successes(out)}


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
    parallelism = args.processes * args.threads
    with image_host(args.urls, parquet_dir / "urls.parquet") as (sizes, host_timeline):
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
                    result.update(phases(result, host_timeline.take()))
                    runs[tool].append(result)
                    print(f"  {mode_name:16s} {tool:12s} run {rep}: {result['ok']} images in {result['wall']:.1f}s "
                          f"= {result['ips']:.0f} img/s, peak RSS {result['rss'] / 2**20:.0f} MB; "
                          f"first request after {result['startup']:.2f}s, {result['in_flight']:.0f} requests in "
                          f"flight on average for {result['window']:.2f}s, exit {result['after']:.2f}s after the "
                          f"last reply", flush=True)
            keys = ("ips", "rss", "ok", "startup", "in_flight", "after", "mean_reply")
            med = {tool: {k: statistics.median(r[k] for r in rs) for k in keys} for tool, rs in runs.items()}
            speed = med["mmprep"]["ips"] / med["img2dataset"]["ips"]
            memory = med["mmprep"]["rss"] / med["img2dataset"]["rss"]
            # No client holding ``parallelism`` requests in flight can beat parallelism / mean reply time.
            mean_reply = statistics.mean(r["mean_reply"] for rs in runs.values() for r in rs)
            ceiling = parallelism / mean_reply
            needed = TARGETS[mode_name] * med["img2dataset"]["ips"]
            report[mode_name] = {"speed_ratio": speed, "rss_ratio": memory, "ceiling_ips": ceiling,
                                 "ceiling_ratio": ceiling / med["img2dataset"]["ips"], **med}
            print(f"{mode_name}: mmprep {med['mmprep']['ips']:.0f} img/s vs img2dataset "
                  f"{med['img2dataset']['ips']:.0f} img/s -> speed ratio {speed:.2f}x "
                  f"(target {TARGETS[mode_name]:g}x); peak RSS {med['mmprep']['rss'] / 2**20:.0f} MB vs {med['img2dataset']['rss'] / 2**20:.0f} MB -> "
                  f"ratio {memory:.2f}", flush=True)
            print(f"  latency-bound ceiling with {parallelism} requests always in flight and no start-up: "
                  f"{ceiling:.0f} img/s (mean reply {1000 * mean_reply:.0f} ms) = "
                  f"{ceiling / med['img2dataset']['ips']:.2f}x img2dataset; the target needs {needed:.0f} img/s = {needed / ceiling:.0%} of that ceiling; "
                  f"mmprep reaches {med['mmprep']['ips'] / ceiling:.0%}", flush=True)
    print(json.dumps(report, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"outputs kept in {work}")


if __name__ == "__main__":
    main()
