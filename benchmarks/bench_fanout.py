"""Fan-out through the live scheduler: one mmprep mapped stage of N instances vs a plain Airflow DAG of N
mapped no-op ``@task``s, in the same run of the same services (PostgreSQL, LocalExecutor).

    .venv/bin/python benchmarks/bench_fanout.py [--tasks 1024] [--parallelism 4]

The mmprep DAG runs only ``precache_encodings`` (``runner: local``) with ``node_array_size: N`` over one
input tar that was encoded before the timed run (``mmprep run`` as task 0 of N), so every instance does the
stage's real resume bookkeeping (config load, its share of the inputs, the finished output's fingerprint
check, nothing left to encode) and the time measured is Airflow's per-instance overhead plus ours. Prints trigger-to-success seconds and task instances
per second for both, the ratio (goal: ours within 1.2x of plain Airflow's per-instance time), and the CPU
seconds per instance of each part (services, task processes, PostgreSQL).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_provider_mmprep.testing.live_airflow import LiveAirflow  # noqa: E402
from airflow_provider_mmprep.testing.pipeline import write_tiny_precache_config  # noqa: E402
from airflow_provider_mmprep.testing.precache_fixtures import write_shard  # noqa: E402

REPO_DAGS = Path(__file__).resolve().parents[1] / "dags"

PLAIN_DAG = textwrap.dedent('''\
    """Plain Airflow fan-out (benchmark anchor): N mapped no-op tasks."""
    from airflow.sdk import dag, task


    @dag(dag_id="plain_fanout", schedule=None, catchup=False)
    def plain_fanout():
        @task
        def items():
            return list(range({tasks}))

        @task
        def noop(i):
            return None

        noop.expand(i=items())


    plain_fanout()
    ''')

FANOUT_YAML = textwrap.dedent("""\
    run:
      name: mmprep_fanout
    dataset_repo_id: org/unused
    dataset_output_root: {root}
    precache_encodings:
      enable: True
      runner: local
      input_dir: ${{..dataset_output_root}}/tars
      output_dir: ${{..dataset_output_root}}/precached
      tar_chunk_size: 4
      node_array_size: {tasks}
      precache_config_path: ${{..dataset_output_root}}/models/precache.yaml
    """)


@dataclass
class FanoutRun:
    """One DAG run: trigger-to-success, and the mapped task's own span (first start to last end) and mean
    instance duration, which leave out the fixed hops before and after it (plan tasks, report teardown)."""

    seconds: float
    task_instances: int
    mapped_span: float
    mean_duration: float
    cpu_seconds: float
    cpu_parts: dict[str, float]


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and of its children it has reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15), counted from state = 1
        table[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return table


def services_cpu_seconds(live: LiveAirflow) -> dict[str, float]:
    """CPU seconds used so far, per part: each Airflow service's own process, the task processes (the
    scheduler's LocalExecutor workers and everything they start), PostgreSQL (server and backends). What a
    run costs the machine, which the wall-clock ratio on a shared 2-core machine shows only through the noise
    of everything else running, and where it goes."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)

    def tree(root: int) -> float:
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in table:
                total += table[pid][1]
                todo.extend(children.get(pid, []))
        return total

    parts: dict[str, float] = {}
    for service, process in live.processes.items():
        if process.pid not in table:
            continue
        own = table[process.pid][1]
        below = sum(tree(child) for child in children.get(process.pid, []))
        if service == "scheduler":
            parts["scheduler"], parts["task processes"] = own, below
        else:
            parts[service] = own + below
    if live.postgres is not None and live.postgres.dir is not None:
        pidfile = live.postgres.dir / "data" / "postmaster.pid"
        if pidfile.exists():
            parts["postgresql"] = tree(int(pidfile.read_text().split()[0]))
    return parts


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def timed_run(live: LiveAirflow, dag_id: str, mapped_task: str, timeout: float) -> FanoutRun:
    live.unpause(dag_id)
    cpu_before = services_cpu_seconds(live)
    started = time.monotonic()
    run_id = live.trigger(dag_id, {})
    state = live.wait_run(dag_id, run_id, timeout=timeout)
    elapsed = time.monotonic() - started
    time.sleep(2)  # let the last task processes be reaped into their parents' counts
    cpu_after = services_cpu_seconds(live)
    cpu = {part: seconds - cpu_before.get(part, 0.0) for part, seconds in cpu_after.items()}
    instances = live.task_instances(dag_id, run_id)
    if state != "success":
        failed = [(task, index) for (task, index), ti in instances.items() if ti["state"] != "success"]
        logs = "".join(live.task_log(dag_id, run_id, task, index)[-3000:] for task, index in failed[:2])
        raise SystemExit(f"{dag_id} run {run_id} ended {state}; not successful: {failed[:10]}\n{logs}")
    mapped = [ti for (task, _), ti in instances.items() if task == mapped_task]
    span = (max(_when(ti["end_date"]) for ti in mapped) - min(_when(ti["start_date"]) for ti in mapped))
    return FanoutRun(elapsed, len(instances), span.total_seconds(),
                     statistics.mean(ti["duration"] for ti in mapped), sum(cpu.values()), cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1024, help="mapped instances per DAG (default 1024)")
    parser.add_argument("--parallelism", type=int, default=4, help="LocalExecutor slots (default 4)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each DAG, alternating (default 1)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mmprep-bench-fanout-"))
    try:
        dags, root = work / "dags", work / "data"
        dags.mkdir()
        write_shard(root / "tars" / "00000.tar", [f"{k:09d}" for k in range(4)], random.Random(0), [(64, 64)])
        write_tiny_precache_config(root / "models")
        shutil.copy(REPO_DAGS / "mmprep_dags.py", dags)
        (dags / "fanout.yaml").write_text(FANOUT_YAML.format(root=root, tasks=args.tasks))
        mmprep = Path(sys.executable).parent / "mmprep"
        subprocess.run([str(mmprep), "run", str(dags / "fanout.yaml"), "--stage", "precache_encodings",
                        "--task-id", "0", "--task-count", str(args.tasks)], check=True, capture_output=True)
        (dags / "plain_fanout.py").write_text(PLAIN_DAG.replace("{tasks}", str(args.tasks)))
        # Airflow's default re-parse interval (the live harness uses 5 s so tests see new files at once):
        # every re-parse of both DAG files costs the dag-processor CPU for as long as a run lasts
        config = {"MMPREP__RETRIES": "0", "CORE__MAX_MAP_LENGTH": str(max(1024, args.tasks)),
                  "LOGGING__LOGGING_LEVEL": "WARNING", "DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30"}
        with LiveAirflow(work / "live", dags, airflow_config=config, parallelism=args.parallelism) as live:
            live.wait_parsed(["plain_fanout", "mmprep_fanout"])
            timeout = 60 + 5 * args.tasks
            runs: dict[str, list[FanoutRun]] = {"plain": [], "mmprep": []}
            for _ in range(args.rounds):  # alternate, so a change in the machine's load hits both alike
                runs["plain"].append(timed_run(live, "plain_fanout", "noop", timeout))
                runs["mmprep"].append(timed_run(live, "mmprep_fanout", "precache_encodings", timeout))
        print(f"fan-out of {args.tasks} mapped instances, LocalExecutor parallelism {args.parallelism}, PostgreSQL, "
              f"{args.rounds} round(s), medians")
        median = {name: {field: statistics.median(getattr(r, field) for r in rs)
                         for field in ("seconds", "task_instances", "mapped_span", "mean_duration", "cpu_seconds")}
                  for name, rs in runs.items()}
        for name, label in (("plain", "plain Airflow"), ("mmprep", "mmprep stage ")):
            m = median[name]
            print(f"  {label}: {m['seconds']:8.1f} s trigger->success ({m['task_instances']:.0f} task instances, "
                  f"{args.tasks / m['seconds']:5.2f} mapped instances/s); mapped span {m['mapped_span']:7.1f} s "
                  f"({args.tasks / m['mapped_span']:5.2f}/s), mean instance duration {m['mean_duration']:5.2f} s, "
                  f"CPU of all services {m['cpu_seconds']:7.1f} s ({m['cpu_seconds'] / args.tasks:5.3f} s per instance)")
        for name, label in (("plain", "plain Airflow"), ("mmprep", "mmprep stage ")):
            parts = {part: statistics.median(r.cpu_parts.get(part, 0.0) for r in runs[name])
                     for part in runs[name][0].cpu_parts}
            print(f"  {label} CPU per mapped instance by part: "
                  + ", ".join(f"{part} {seconds / args.tasks:.3f} s" for part, seconds in parts.items()))
        ours, plain = median["mmprep"], median["plain"]
        print(f"  ratio mmprep / plain: trigger->success {ours['seconds'] / plain['seconds']:.2f}x, "
              f"per mapped instance (span / N) {ours['mapped_span'] / plain['mapped_span']:.2f}x  (goal <= 1.2x), "
              f"CPU {ours['cpu_seconds'] / plain['cpu_seconds']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
