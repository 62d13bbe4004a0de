"""reorganize_tar throughput against ``cat`` of the same input tars, measured in the same run.

Builds ≥300 MB of download_images-style shards (random-byte .jpg of 50–150 KB, .txt, .json; uneven
sample counts; several parts) in a temporary folder, then alternates, ``--repeat`` times:
  * ``cat <all input tars> > out`` (the anchor: read every byte once, write every byte once), and
  * reorganize_tar task 0 of 1 into a fresh folder, with a chunk size that divides no input count,
``sync`` before each timed run so neither pays the other's write-back; once with a warm page cache (a
warm-up read first) and once cold (our input files evicted with ``posix_fadvise(DONTNEED)`` before each
run). Prints throughputs (input MB/s), CPU seconds and the ratio per round, then the medians.

With ``--tasks N`` (default 4), also runs N tasks one after another, cold, as N pods would: once over
inputs carrying download_images' manifests and once without them.

Also measures generate_wdinfo over a folder of 100,000 tiny tars with manifests (the "under 2 s" goal).

    /work/main/.venv/bin/python benchmarks/bench_reorganize_tar.py [--mb 320] [--repeat 5] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, load_config  # noqa: E402
from airflow_provider_mmprep.manifest import MANIFEST_SUFFIX, write_manifest  # noqa: E402
from airflow_provider_mmprep.stages import generate_wdinfo, reorganize_tar  # noqa: E402
from airflow_provider_mmprep.tarindex import index_tar  # noqa: E402
from airflow_provider_mmprep.testing.shards import download_style_samples, write_tar  # noqa: E402

NEMO_YAML = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"


def make_input(root: Path, megabytes: int) -> tuple[list[Path], int, int]:
    rng = random.Random(7)
    tars, total, samples, shard = [], 0, 0, 0
    while total < megabytes * 1_000_000:
        part, index = divmod(shard, 9)
        count = rng.randint(90, 170)
        path = write_tar(root / f"part-{part:03d}" / f"{index:05d}.tar",
                         download_style_samples(index, count, rng, (50_000, 150_000)))
        tars.append(path)
        total += path.stat().st_size
        samples += count
        shard += 1
    return tars, total, samples


def sync() -> None:
    os.sync()


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only, after a sync): a cold read of
    exactly our inputs, without touching the rest of the machine's cache."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_cat(tars: list[Path], out: Path, cold: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``cat tars > out``."""
    evict(tars) if cold else sync()
    cpu, started = child_cpu(), time.perf_counter()
    with open(out, "wb") as handle:
        subprocess.run(["cat", *map(str, tars)], stdout=handle, check=True)
    elapsed = time.perf_counter() - started
    cpu = child_cpu() - cpu
    out.unlink()
    return elapsed, cpu


def time_reorganize(cfg, tars: list[Path], out_dir: Path, cold: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of reorganize_tar task 0 of 1."""
    shutil.rmtree(out_dir, ignore_errors=True)
    evict(tars) if cold else sync()
    cpu, started = time.process_time(), time.perf_counter()
    reorganize_tar.run_task(cfg, 0, 1)
    return time.perf_counter() - started, time.process_time() - cpu


def compare(label: str, cfg, tars: list[Path], total: int, work: Path, out_dir: Path, repeat: int,
            cold: bool) -> float:
    if not cold:
        time_cat(tars, work / "warmup.out", cold=False)  # page cache warm for both contenders
    cat, reorg = [], []
    for round_no in range(repeat):
        order = ("cat", "reorg") if round_no % 2 == 0 else ("reorg", "cat")
        for which in order:
            if which == "cat":
                cat.append(time_cat(tars, work / "cat.out", cold))
            else:
                reorg.append(time_reorganize(cfg, tars, out_dir, cold))
        cat_mbs, reorg_mbs = total / 1e6 / cat[-1][0], total / 1e6 / reorg[-1][0]
        print(f"{label} round {round_no + 1} ({'/'.join(order)}): cat {cat_mbs:6.0f} MB/s "
              f"(cpu {cat[-1][1]:.2f}s)  reorganize {reorg_mbs:6.0f} MB/s (cpu {reorg[-1][1]:.2f}s)  "
              f"ratio {reorg_mbs / cat_mbs:.2f}x")
    cat_wall = statistics.median(t for t, _ in cat)
    reorg_wall = statistics.median(t for t, _ in reorg)
    cat_cpu = statistics.median(c for _, c in cat)
    reorg_cpu = statistics.median(c for _, c in reorg)
    ratio = cat_wall / reorg_wall
    print(f"{label} median: cat {total / 1e6 / cat_wall:.0f} MB/s ({cat_wall:.3f}s wall, {cat_cpu:.3f}s cpu), "
          f"reorganize {total / 1e6 / reorg_wall:.0f} MB/s ({reorg_wall:.3f}s wall, {reorg_cpu:.3f}s cpu): "
          f"throughput ratio {ratio:.2f}x of cat (target >= 0.8x); cpu ratio {reorg_cpu / cat_cpu:.2f}x")
    return ratio


def time_tasks(cfg, tars: list[Path], out_dir: Path, tasks: int) -> float:
    """Wall seconds of ``tasks`` reorganize_tar tasks run one after another, inputs evicted before each: on a
    cluster every task starts on its own node with a cold cache."""
    shutil.rmtree(out_dir, ignore_errors=True)
    elapsed = 0.0
    for task_id in range(tasks):
        evict(tars)
        started = time.perf_counter()
        reorganize_tar.run_task(cfg, task_id, tasks)
        elapsed += time.perf_counter() - started
    return elapsed


def compare_tasks(cfg, tars: list[Path], total: int, work: Path, out_dir: Path, tasks: int, repeat: int) -> None:
    """``tasks`` tasks over inputs that carry download_images' manifests (each task reads only the inputs
    feeding its outputs) and over the same inputs without them (each task reads every input's headers),
    against one cold ``cat``."""
    manifests = [t.with_name(t.name + MANIFEST_SUFFIX) for t in tars]
    for tar, manifest in zip(tars, manifests):  # what download_images writes beside each shard
        count = len(index_tar(tar).samples)
        write_manifest(tar, count, extensions=["jpg", "json", "txt"], every_sample_has=["jpg", "json", "txt"])
    cat, with_m, without_m = [], [], []
    for _ in range(repeat):
        cat.append(time_cat(tars, work / "cat.out", cold=True)[0])
        with_m.append(time_tasks(cfg, tars, out_dir, tasks))
        for manifest in manifests:
            manifest.rename(manifest.with_name("." + manifest.name))
        without_m.append(time_tasks(cfg, tars, out_dir, tasks))
        for manifest in manifests:
            manifest.with_name("." + manifest.name).rename(manifest)
    cat_wall, with_wall, without_wall = (statistics.median(x) for x in (cat, with_m, without_m))
    print(f"cold, {tasks} tasks in turn (median of {repeat}): cat {total / 1e6 / cat_wall:.0f} MB/s; with manifests "
          f"{with_wall:.2f}s in all = {cat_wall / with_wall:.2f}x cat; without manifests {without_wall:.2f}s = "
          f"{cat_wall / without_wall:.2f}x cat (every task reads every input's headers)")
    for manifest in manifests:
        manifest.unlink()


def bench_wdinfo(work: Path, tar_count: int) -> None:
    """generate_wdinfo over ``tar_count`` tiny tars that all have manifests."""
    folder = work / "wdinfo_input"
    folder.mkdir()
    template = work / "template.tar"
    write_tar(template, [(f"{i:05d}", {"pickle": b"x"}) for i in range(3)])
    data = template.read_bytes()
    started = time.perf_counter()
    for i in range(tar_count):
        tar = folder / f"{i:06d}.tar"
        tar.write_bytes(data)
        write_manifest(tar, 3)
    print(f"(made {tar_count} tars + manifests in {time.perf_counter() - started:.1f}s)")
    cfg = load_config(NEMO_YAML, ["dataset_repo_id=x/y", f"dataset_output_root={work}",
                                  f"generate_wdinfo.input_dir={folder}", "generate_wdinfo.tar_chunk_size=3",
                                  f"generate_wdinfo.output_wdinfo_path={work}/wdinfo.pkl"],
                      load_precache=False)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        summary = generate_wdinfo.run_task(cfg, 0, 1)
        times.append(time.perf_counter() - started)
    assert summary["full_tars"] == tar_count, summary
    print(f"generate_wdinfo, {tar_count} tars with manifests: "
          f"{' '.join(f'{t:.2f}s' for t in times)} (median {statistics.median(times):.2f}s; goal < 2 s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=320, help="input size to generate (MB)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=97, help="tar_chunk_size (prime: divides no input count)")
    parser.add_argument("--wdinfo-tars", type=int, default=100_000)
    parser.add_argument("--mode", choices=["warm", "cold", "both"], default="both",
                        help="warm: inputs in page cache; cold: inputs evicted (fadvise) before every run")
    parser.add_argument("--ext", default=".jpg,.txt,.json",
                        help="file_ext_in_tar (default all members, so both sides copy the same bytes)")
    parser.add_argument("--threads", type=int, default=0, help="reorganize_tar.write_threads (0 = auto)")
    parser.add_argument("--tasks", type=int, default=4,
                        help="also run this many tasks in turn, cold, with and without input manifests (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_reorganize_", dir=os.environ.get("BENCH_DIR")))
    try:
        started = time.perf_counter()
        tars, total, samples = make_input(work / "raw", args.mb)
        print(f"input: {len(tars)} tars, {samples} samples, {total / 1e6:.0f} MB "
              f"(made in {time.perf_counter() - started:.1f}s); chunk size {args.chunk}")
        out_dir = work / "reorganized"
        cfg = load_config(NEMO_YAML, ["dataset_repo_id=x/y", f"dataset_output_root={work}",
                                      f"reorganize_tar.input_dir={work / 'raw'}",
                                      f"reorganize_tar.output_dir={out_dir}",
                                      f"reorganize_tar.tar_chunk_size={args.chunk}",
                                      f"reorganize_tar.file_ext_in_tar=[{args.ext}]",
                                      f"reorganize_tar.write_threads={args.threads}"],
                          load_precache=False)
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
              f"write_threads={cfg.reorganize_tar.write_threads or 'auto'}")
        if args.mode in ("warm", "both"):
            compare("warm", cfg, tars, total, work, out_dir, args.repeat, cold=False)
        if args.mode in ("cold", "both"):
            compare("cold", cfg, tars, total, work, out_dir, args.repeat, cold=True)
        if args.tasks > 1:
            compare_tasks(cfg, tars, total, work, out_dir, args.tasks, max(1, args.repeat // 2))
        written = sum(p.stat().st_size for p in out_dir.glob("*.tar"))
        print(f"output: {len(list(out_dir.glob('*.tar')))} tars, {written / 1e6:.0f} MB; "
              f"load average after: {os.getloadavg()[0]:.2f}")
        shutil.rmtree(work / "raw")
        shutil.rmtree(out_dir)
        if args.wdinfo_tars:
            bench_wdinfo(work, args.wdinfo_tars)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
