"""``python -m airflow_provider_mmprep.demo``: the whole Airflow DAG on this machine, in a few minutes.

It makes a few hundred procedural images with captions, serves them from a loopback image host and their
URL parquet from a loopback Hugging Face–compatible endpoint, builds tiny encoders, then runs the
``mmprep_demo`` DAG (``dags/demo_multimodal.yaml``: every stage ``runner: local``) with ``dag.test()`` on
SQLite and CPU. Everything lands under ``--out`` (default ``./demo-output``): the data, the Airflow home,
wdinfo.pkl and report.html. A rerun reuses finished work (``--clean`` starts over).

``--serve`` runs the same DAG the way a deployment does instead: a throw-away PostgreSQL, Airflow's
api-server, scheduler, dag-processor and triggerer (LocalExecutor) as separate processes
(:mod:`.testing.live_airflow`), triggers the run through the REST API, prints the UI's address and login,
and keeps everything serving until Ctrl-C, then stops all it started.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import PipelineConfig

DEMO_DAG_ID = "mmprep_demo"
REPO_DAGS = Path(__file__).resolve().parents[1] / "dags"


def prepare_airflow_env(home: Path, dags_folder: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Point Airflow at a private home/SQLite DB and the DAG folder; must run before ``import airflow``."""
    env = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder), "AIRFLOW__MMPREP__CONFIG_DIR": str(dags_folder),
           "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
           **(extra or {})}
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


def migrate_db() -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL)


def count_tars(cfg: PipelineConfig, stage: str) -> tuple[int, int]:
    """(tar files, samples) in one stage's output, as the stage reports its finished tars (their manifests'
    counts)."""
    tars, unlisted = importlib.import_module(f"{__package__}.stages.{stage}").finished_outputs(cfg)
    return len(tars) + len(unlisted), sum(t.sample_count for t in tars)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_provider_mmprep.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="where everything goes (default ./demo-output)")
    parser.add_argument("--images", type=int, default=300, help="procedural images to serve")
    parser.add_argument("--dags", default=str(REPO_DAGS), help="DAG folder holding demo_multimodal.yaml")
    parser.add_argument("--clean", action="store_true", help="delete --out first")
    parser.add_argument("--serve", action="store_true",
                        help="run on real Airflow services (PostgreSQL, api-server, scheduler, dag-processor, "
                             "triggerer) and keep the UI up until Ctrl-C")
    parser.add_argument("--port", type=int, default=8080, help="UI/API port for --serve (default 8080; a free "
                                                                 "one if taken)")
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)

    out = Path(args.out).resolve()
    if args.clean and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    prepare_airflow_env(out / "airflow_home", Path(args.dags).resolve(),
                        {"MMPREP_DEMO_ROOT": str(out), "AIRFLOW__MMPREP__RETRIES": "0"})
    print(f"[demo] Airflow home {out / 'airflow_home'} (SQLite); migrating the database ...", flush=True)
    migrate_db()
    from .testing.pipeline import local_sources, write_tiny_precache_config

    print("[demo] building tiny encoders ...", flush=True)
    write_tiny_precache_config(out / "models")

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(Path(args.dags).resolve()))
    if bag.import_errors:
        for path, error in bag.import_errors.items():
            print(f"[demo] DAG import error in {path}:\n{error}", file=sys.stderr)
        return 1
    dag = bag.get_dag(DEMO_DAG_ID)
    with local_sources(images=args.images, parquet_files=1) as sources:
        print(f"[demo] serving {sources.urls} images at {sources.images.base_url}, dataset "
              f"{sources.repo_id} at {sources.hub.url}; running DAG {DEMO_DAG_ID} ...", flush=True)
        run = dag.test()
    state = str(getattr(run, "state", "unknown"))
    from .config import load_config
    from .report import default_report_path

    cfg = load_config(Path(args.dags) / "demo_multimodal.yaml")
    report = default_report_path(cfg)  # written by the DAG's final `report` task
    print(f"\n[demo] DAG run {getattr(run, 'run_id', '?')}: {state} in {time.monotonic() - started:.0f} s")
    for label, stage in (("downloaded shards", "download_images"), ("reorganized shards", "reorganize_tar"),
                         ("precached shards", "precache_encodings")):
        tars, samples = count_tars(cfg, stage)
        print(f"[demo] {label:18} {cfg.stage(stage).output_dir}: {tars} tars, {samples} samples")
    from .stages.generate_wdinfo import check_output

    wdinfo = check_output(cfg)
    if wdinfo.info is not None:
        info = wdinfo.info
        print(f"[demo] wdinfo.pkl          {wdinfo.path}: {len(info['tar_files'])} tars x {info['chunk_size']} "
              f"= {info['total_key_count']} samples")
    if report.is_file():
        print(f"[demo] report             {report}")
    else:
        print(f"[demo] report             missing: the DAG's report task did not write {report}", file=sys.stderr)
    return 0 if state.endswith("success") else 1


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def serve(args: argparse.Namespace) -> int:
    """The demo DAG on real services; see the module docstring."""
    from .testing.live_airflow import PASSWORD, USERNAME, LiveAirflow
    from .testing.pipeline import local_sources, write_tiny_precache_config

    out = Path(args.out).resolve()
    if args.clean and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print("[demo] building tiny encoders ...", flush=True)
    write_tiny_precache_config(out / "models")
    port = args.port if _port_free(args.port) else None
    with local_sources(images=args.images, parquet_files=1, set_env=False) as sources:
        print(f"[demo] serving {sources.urls} images at {sources.images.base_url}, dataset {sources.repo_id} at "
              f"{sources.hub.url}; starting PostgreSQL and Airflow's services ...", flush=True)
        env = {"HF_ENDPOINT": sources.hub.url, "MMPREP_DEMO_ROOT": str(out), "TRANSFORMERS_VERBOSITY": "error"}
        with LiveAirflow(out / "airflow_live", Path(args.dags).resolve(), env=env, port=port,
                         airflow_config={"MMPREP__RETRIES": "0", "LOGGING__LOGGING_LEVEL": "WARNING"}) as live:
            live.wait_parsed([DEMO_DAG_ID])
            live.unpause(DEMO_DAG_ID)
            run_id = live.trigger(DEMO_DAG_ID, {})
            print(f"[demo] UI: {live.base_url}  (login {USERNAME} / {PASSWORD}); run {run_id} of {DEMO_DAG_ID} "
                  f"started; service logs in {live.logs}", flush=True)
            state = live.wait_run(DEMO_DAG_ID, run_id, timeout=3600)
            print(f"[demo] DAG run {run_id}: {state} in {time.monotonic() - started:.0f} s; outputs under {out}, "
                  f"wdinfo.pkl and report.html there", flush=True)
            print(f"[demo] serving the UI at {live.base_url} (login {USERNAME} / {PASSWORD}); Ctrl-C stops "
                  "everything", flush=True)
            try:
                while True:
                    live.check_alive()
                    time.sleep(2)
            except KeyboardInterrupt:
                print("\n[demo] stopping the services ...", flush=True)
    return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
