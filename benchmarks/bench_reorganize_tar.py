"""reorganize_tar, whole process, against ``cat`` of the same input tars, measured in the same run.

Inputs (``--sources``, each about ``--images`` JPEGs of ~75 KB, so ≥ 2 GB by default):
  * ``img2dataset``: shards written by img2dataset itself (installed in its own virtualenv by
    ``bench_download_images.ensure_img2dataset``), fetched from the loopback image host: the shards most
    users arrive with, with no manifest of ours, so every member header is read;
  * ``mmprep``: the same URLs through our download_images, whose manifests record ``member_offsets``, so
    reorganize_tar reads no header at all;
  * ``synthetic``: download-style tars written directly (no download; for quick runs while developing).

For each source, task count (``--tasks``, run at once as separate processes, as a node array on one
machine would) and page-cache state (``--modes``), it alternates ``--repeat`` times
  * ``cat <all input tars> > out`` (the anchor: read every byte once, write every byte once), and
  * ``python -m airflow_provider_mmprep.cli run CONFIG --stage reorganize_tar --task-id i --task-count N``
    (whole processes: interpreter start, imports, config, indexing, copying), chunk size ``--chunk``
    (prime: it divides no input count),
with ``sync`` before each timed run so neither pays the other's write-back. Each row is run with the
tasks given the config in each of ``--config-forms``: ``resolved`` (``mmprep validate CONFIG --resolved-out``
once, up front, as a launcher validates before it starts a node array; its time is printed apart; each
task then starts without the config layer: :mod:`airflow_provider_mmprep.resolved`) and ``yaml`` (every
task validates the YAML itself). Warm: the inputs were just
read. Cold: ``echo 3 > /proc/sys/vm/drop_caches`` after the sync when this user may (it says which),
else ``posix_fadvise(DONTNEED)`` on every input tar. It prints the medians and the ratio
cat time / reorganize time (1.0 = as fast as cat; targets: ≥ 0.8 on img2dataset's shards, ≥ 0.9 on ours).

Beside that ratio of medians it prints the median of each round's own ratio (that round's ``cat`` against
its ``reorganize``, run back to back): on a machine whose kernel speed drifts for seconds at a time, the
pairs see the same drift.

It also prints the header-indexing rate of :func:`tarindex.index_tar` (warm, one thread, best of 5, wall
and per CPU second, the cyclic collector paused as reorganize_tar pauses it): on each source's tars and on
a header-dense tar (1-3 KB members), target ≥ 1 M headers/s (a member's header chain counts once; its
header blocks are printed too); and beside it the rates without the compiled walker (the Python walk)
and of the general one-header-at-a-time parser.

    /work/main/.venv/bin/python benchmarks/bench_reorganize_tar.py [--images 28000] [--sources ...]
        [--tasks 1,4] [--modes warm,cold] [--config-forms resolved,yaml] [--repeat 3] [--keep]

Results on the project's 2-core machine are in ``docs/reorganize-wdinfo-inspect.md``.
"""

from __future__ import annotations

import argparse
import json
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from airflow_provider_mmprep.manifest import write_manifest  # noqa: E402
from airflow_provider_mmprep.tarindex import find_tars, index_tar  # noqa: E402
from airflow_provider_mmprep.testing.shards import download_style_samples, write_tar  # noqa: E402

TARGETS = {"img2dataset": 0.8, "mmprep": 0.9, "synthetic": 0.8}


# --- inputs ---------------------------------------------------------------------------------------------

def make_synthetic(root: Path, megabytes: int) -> None:
    rng = random.Random(7)
    total, shard = 0, 0
    while total < megabytes * 1_000_000:
        part, index = divmod(shard, 9)
        path = write_tar(root / f"part-{part:03d}" / f"{index:05d}.tar",
                         download_style_samples(index, rng.randint(90, 170), rng, (50_000, 150_000)))
        total += path.stat().st_size
        shard += 1


def make_downloaded(work: Path, images: int, sources: list[str], per_shard: int) -> dict[str, Path]:
    """Fetch ``images`` URLs from the loopback host with img2dataset and/or our download_images."""
    import bench_download_images as dl  # its host, img2dataset install and command lines, not copies

    args = argparse.Namespace(processes=2, threads=64, per_shard=per_shard, skip_reencode=True)
    parquet_dir = work / "parquet"
    parquet_dir.mkdir(parents=True, exist_ok=True)
    folders = {}
    with dl.image_host(images, parquet_dir / "urls.parquet") as (sizes, _timeline):
        print(f"loopback host: {images} JPEGs of {sizes[0] // 1024}-{sizes[-1] // 1024} KB", flush=True)
        for source in sources:
            out = work / source
            started = time.perf_counter()
            if source == "img2dataset":
                result = dl.run_img2dataset(dl.ensure_img2dataset(), parquet_dir / "urls.parquet", out,
                                            dl.MODES["no"], args)
            else:
                result = dl.run_mmprep(parquet_dir, out, dl.MODES["no"], args)
            print(f"{source}: {result['ok']} images downloaded in {time.perf_counter() - started:.0f}s",
                  flush=True)
            folders[source] = out
    return folders


# --- page cache -------------------------------------------------------------------------------------------

def drop_caches_allowed() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1\n")
        return True
    except OSError:
        return False


def make_cold(tars: list[Path], drop: bool) -> None:
    os.sync()
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return
    for path in tars:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_warm(tars: list[Path]) -> None:
    for path in tars:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    os.sync()


# --- the two contenders -------------------------------------------------------------------------------

def children_cpu() -> float:
    """CPU seconds (user + system) of the waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_cat(tars: list[Path], out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``cat`` copying the tars into one file."""
    cpu = children_cpu()
    started = time.perf_counter()
    with open(out, "wb") as handle:
        subprocess.run(["cat", *map(str, tars)], stdout=handle, check=True)
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed, children_cpu() - cpu


def write_config(work: Path, input_dir: Path, out_dir: Path, chunk: int) -> Path:
    config = {"run": {"name": "bench"}, "reorganize_tar": {
        "enable": True, "input_dir": str(input_dir), "output_dir": str(out_dir), "tar_chunk_size": chunk,
        "file_ext_in_tar": [".jpg", ".txt", ".json"]}}  # every member: both sides copy the same bytes
    path = work / f"reorganize_{input_dir.name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def cli_env() -> dict[str, str]:
    """The environment of the ``mmprep`` processes: this checkout's package first on the path."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def resolve_config(config: Path) -> tuple[Path, float]:
    """``mmprep validate CONFIG --resolved-out``, as a launcher does once before starting the tasks: the
    resolved file and the seconds that one validation took (printed, not part of any task's time)."""
    out = config.with_name(config.stem + ".resolved.json")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "airflow_provider_mmprep.cli", "validate", str(config), "-q",
                    "--resolved-out", str(out)], env=cli_env(), check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - started


def time_reorganize(config: Path, out_dir: Path, tasks: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all) of ``tasks`` whole reorganize_tar processes started together,
    until the last ends."""
    env = cli_env()
    cpu = children_cpu()
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "airflow_provider_mmprep.cli", "run", str(config),
                               "--stage", "reorganize_tar", "--task-id", str(i), "--task-count", str(tasks)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(tasks)]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - started
    for proc, err in zip(procs, errors):
        if proc.returncode:
            raise SystemExit(f"reorganize_tar failed ({proc.returncode}): {err.decode()[-2000:]}")
    return elapsed, children_cpu() - cpu


def compare(source: str, input_dir: Path, work: Path, tasks: int, cold: bool, drop: bool, repeat: int,
            chunk: int, form: str) -> dict:
    tars = find_tars(input_dir)
    total = sum(p.stat().st_size for p in tars)
    out_dir = work / "reorganized"
    config = write_config(work, input_dir, out_dir, chunk)
    validate_s = None
    if form == "resolved":
        config, validate_s = resolve_config(config)
    cat, reorg, cat_cpu, reorg_cpu, loads = [], [], [], [], []
    for round_no in range(repeat):
        for which in (("cat", "reorg") if round_no % 2 == 0 else ("reorg", "cat")):
            shutil.rmtree(out_dir, ignore_errors=True)
            make_cold(tars, drop) if cold else make_warm(tars)
            loads.append(os.getloadavg()[0])
            if which == "cat":
                wall, cpu = time_cat(tars, work / "cat.out")
                cat.append(wall)
                cat_cpu.append(cpu)
            else:
                wall, cpu = time_reorganize(config, out_dir, tasks)
                reorg.append(wall)
                reorg_cpu.append(cpu)
    cat_s, reorg_s = statistics.median(cat), statistics.median(reorg)
    paired = statistics.median(c / r for c, r in zip(cat, reorg))  # round i: cat[i] and reorg[i], adjacent
    result = {"source": source, "config": form, "validate_s": validate_s, "tasks": tasks,
              "cache": "cold" if cold else "warm", "mb": total / 1e6,
              "tars": len(tars), "cat_s": cat_s, "reorganize_s": reorg_s, "ratio": cat_s / reorg_s,
              "paired_ratio": paired,
              "cat_cpu_s": statistics.median(cat_cpu), "reorganize_cpu_s": statistics.median(reorg_cpu),
              "load": statistics.median(loads), "target": TARGETS[source]}
    resolved = f" (resolved once, up front, in {validate_s:.2f}s)" if validate_s is not None else ""
    print(f"{source:11s} {tasks} task(s) {result['cache']}, config {form}{resolved}: {len(tars)} tars, "
          f"{total / 1e6:.0f} MB; "
          f"cat {cat_s:.2f}s ({total / 1e6 / cat_s:.0f} MB/s) [{' '.join(f'{t:.2f}' for t in cat)}], "
          f"reorganize {reorg_s:.2f}s ({total / 1e6 / reorg_s:.0f} MB/s) [{' '.join(f'{t:.2f}' for t in reorg)}]"
          f" -> {result['ratio']:.2f}x cat (target >= {TARGETS[source]}; round by round {paired:.2f}x); "
          f"CPU seconds cat {result['cat_cpu_s']:.2f}, reorganize {result['reorganize_cpu_s']:.2f}; load average "
          f"{min(loads):.1f}-{max(loads):.1f}", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


# --- header indexing --------------------------------------------------------------------------------------

def header_rate(tars: list[Path], reference: bool = False, rounds: int = 5) -> tuple[int, int, float, float]:
    """(member headers, header blocks, best wall seconds, best CPU seconds) of indexing ``tars`` warm in
    this process, one thread. A member's header chain is its header plus any pax or GNU long-name blocks
    before it (img2dataset: a pax header and its records, so three blocks per member). Timed as
    reorganize_tar runs it: the cyclic collector paused for the whole run (``tarindex.gc_paused``; between
    two indexes it would otherwise traverse every object of the last one), each round's index dropped
    before the next (none kept alive meanwhile)."""
    from airflow_provider_mmprep.tarindex import gc_paused

    headers = blocks = 0
    for tar in tars:
        for sample in index_tar(tar).samples:
            headers += len(sample.members)
            blocks += sum((m.offset - m.header_offset) // 512 for m in sample.members)
    best = cpu = float("inf")
    with gc_paused():
        for _ in range(rounds):
            started, started_cpu = time.perf_counter(), time.process_time()
            for tar in tars:
                index_tar(tar, reference=reference)
            best = min(best, time.perf_counter() - started)
            cpu = min(cpu, time.process_time() - started_cpu)
    return headers, blocks, best, cpu


def count_rate(tars: list[Path], rounds: int = 5) -> float:
    """Best wall seconds of the count-only pass (:func:`.tarindex.count_samples`, what reorganize_tar's
    tasks run on the inputs they do not copy from) over ``tars``; inf where it cannot count them."""
    from airflow_provider_mmprep.tarindex import count_samples

    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        if any(count_samples(tar) is None for tar in tars):
            return float("inf")
        best = min(best, time.perf_counter() - started)
    return best


def report_header_rates(work: Path, folders: dict[str, Path]) -> dict:
    """Header indexing rates: the compiled walker (when built), the Python walk without it, and the
    general one-header-at-a-time parser."""
    from airflow_provider_mmprep import tarindex

    compiled = tarindex._tarwalk
    dense = write_tar(work / "dense" / "00000.tar",
                      download_style_samples(0, 40_000, random.Random(1), (1_000, 3_000)))
    rates = {}
    print(f"compiled walker: {'built' if compiled is not None else 'NOT BUILT (pure-Python walk)'}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for label, tars in [*((s, find_tars(f)) for s, f in folders.items()), ("dense 1-3 KB members", [dense])]:
        make_warm(tars)
        headers, blocks, seconds, cpu = header_rate(tars)
        tarindex._tarwalk = None
        try:
            _, _, python_walk, _ = header_rate(tars, rounds=2)
        finally:
            tarindex._tarwalk = compiled
        _, _, general, _ = header_rate(tars, reference=True, rounds=1)
        counting = count_rate(tars)
        rates[label] = {"headers": headers, "header_blocks": blocks, "per_s": headers / seconds,
                        "per_cpu_s": headers / cpu, "python_walk_per_s": headers / python_walk,
                        "general_per_s": headers / general, "count_per_s": headers / counting}
        print(f"header indexing, {label}: {headers} member headers ({blocks} header blocks) in "
              f"{seconds * 1000:.0f} ms = {headers / seconds / 1e6:.2f} M headers/s wall, "
              f"{headers / cpu / 1e6:.2f} M/s per CPU second ({blocks / seconds / 1e6:.2f} M header blocks/s; "
              f"target >= 1 M headers/s); without the compiled walker {headers / python_walk / 1e6:.2f} M/s; "
              f"general parser {headers / general / 1e6:.2f} M/s; count-only pass "
              f"{headers / counting / 1e6:.2f} M/s", flush=True)
    shutil.rmtree(work / "dense")
    return rates


def bench_wdinfo(work: Path, tar_count: int) -> None:
    """generate_wdinfo over ``tar_count`` tiny tars that all have manifests (goal: under 2 s)."""
    from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, load_config
    from airflow_provider_mmprep.stages import generate_wdinfo

    folder = work / "wdinfo_input"
    folder.mkdir()
    template = work / "template.tar"
    write_tar(template, [(f"{i:05d}", {"pickle": b"x"}) for i in range(3)])
    data = template.read_bytes()
    for i in range(tar_count):
        tar = folder / f"{i:06d}.tar"
        tar.write_bytes(data)
        write_manifest(tar, 3)
    yaml = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"
    cfg = load_config(yaml, ["dataset_repo_id=x/y", f"dataset_output_root={work}",
                             f"generate_wdinfo.input_dir={folder}", "generate_wdinfo.tar_chunk_size=3",
                             f"generate_wdinfo.output_wdinfo_path={work}/wdinfo.pkl"], load_precache=False)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        summary = generate_wdinfo.run_task(cfg, 0, 1)
        times.append(time.perf_counter() - started)
    assert summary["full_tars"] == tar_count, summary
    print(f"generate_wdinfo, {tar_count} tars with manifests: median {statistics.median(times):.2f}s (goal < 2 s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default="img2dataset,mmprep", help="comma list of img2dataset, mmprep, synthetic")
    parser.add_argument("--images", type=int, default=28_000, help="URLs to download (~75 KB each)")
    parser.add_argument("--per-shard", type=int, default=5_000, help="number_sample_per_shard of both downloaders")
    parser.add_argument("--synthetic-mb", type=int, default=2_000)
    parser.add_argument("--tasks", default="1,4", help="comma list of task counts")
    parser.add_argument("--modes", default="warm,cold")
    parser.add_argument("--config-forms", default="resolved,yaml",
                        help="what the tasks are given: resolved (mmprep validate --resolved-out once, up front: "
                             "tasks start without the config layer), yaml (each task validates the YAML)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=997, help="tar_chunk_size (prime: divides no input count)")
    parser.add_argument("--wdinfo-tars", type=int, default=0, help="also time generate_wdinfo over this many tars")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--reuse", type=Path, help="a folder kept by --keep: measure its inputs again")
    args = parser.parse_args()

    # As pip-installed packages are (compiled at install): an editable checkout run under
    # PYTHONDONTWRITEBYTECODE would make every reorganize process compile the package from source.
    import compileall

    compileall.compile_dir(REPO / "airflow_provider_mmprep", quiet=2)
    from airflow_provider_mmprep import tarindex

    print(f"compiled header walker: {'built' if tarindex._tarwalk is not None else 'NOT BUILT (pure-Python walk)'}")
    sources = args.sources.split(",")
    work = args.reuse or Path(tempfile.mkdtemp(prefix="bench_reorganize_", dir=os.environ.get("BENCH_DIR")))
    keep = args.keep or args.reuse is not None
    try:
        downloaded = [s for s in sources if s != "synthetic" and not (work / s).is_dir()]
        folders = make_downloaded(work, args.images, downloaded, args.per_shard) if downloaded else {}
        folders.update({s: work / s for s in sources if s != "synthetic" and s not in folders})
        if "synthetic" in sources and not (work / "synthetic").is_dir():
            make_synthetic(work / "synthetic", args.synthetic_mb)
        if "synthetic" in sources:
            folders["synthetic"] = work / "synthetic"
        folders = {s: folders[s] for s in sources}
        drop = drop_caches_allowed()
        print(f"cold cache by {'echo 3 > /proc/sys/vm/drop_caches' if drop else 'posix_fadvise(DONTNEED) per input'}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; chunk size {args.chunk}", flush=True)
        results = [compare(source, folder, work, int(tasks), mode == "cold", drop, args.repeat, args.chunk, form)
                   for source, folder in folders.items() for form in args.config_forms.split(",")
                   for tasks in args.tasks.split(",") for mode in args.modes.split(",")]
        rates = report_header_rates(work, folders)
        print("\n| input | config | tasks | cache | MB | cat s | reorganize s | ratio | round by round | target "
              "| CPU s cat / reorganize | load |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['source']} | {r['config']} | {r['tasks']} | {r['cache']} | {r['mb']:.0f} | "
                  f"{r['cat_s']:.2f} | {r['reorganize_s']:.2f} | {r['ratio']:.2f}x | {r['paired_ratio']:.2f}x | >= {r['target']} | "
                  f"{r['cat_cpu_s']:.2f} / {r['reorganize_cpu_s']:.2f} | {r['load']:.1f} |")
        print(json.dumps({"results": results, "header_rates": rates}))
        if args.wdinfo_tars:
            bench_wdinfo(work, args.wdinfo_tars)
    finally:
        if keep:
            print(f"kept {work} (--reuse {work} measures it again)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
