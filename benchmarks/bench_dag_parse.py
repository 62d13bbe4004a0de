"""DAG parse time of the mmprep loader per YAML, against a one-task DAG file parsed the same way (anchor).

Each measurement runs in a fresh interpreter that has already imported Airflow (as Airflow's DAG processor
has), then parses the folder with DagBag: ``cold`` includes importing mmprep's Airflow layer (first parse
in a processor), ``warm`` is a second parse in the same process. Run:

    python benchmarks/bench_dag_parse.py [--repeat 5] [--yamls 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = r"""
import json, sys, time
import airflow.sdk  # the DAG processor has Airflow loaded already
from airflow.dag_processing.dagbag import DagBag
folder = sys.argv[1]
t0 = time.perf_counter(); bag = DagBag(folder); cold = time.perf_counter() - t0
assert not bag.import_errors, bag.import_errors
t0 = time.perf_counter(); DagBag(folder); warm = time.perf_counter() - t0
print(json.dumps({"dags": len(bag.dag_ids), "cold": cold, "warm": warm}))
"""
ANCHOR = """from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator
with DAG(dag_id="anchor_{n}", schedule=None):
    EmptyOperator(task_id="noop")
"""

KPO_ANCHOR = """from airflow.sdk import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
with DAG(dag_id="kpo_{n}", schedule=None):
    KubernetesPodOperator(task_id="pod", image="busybox", cmds=["true"])
"""


def measure(folder: Path, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--yamls", type=int, default=10, help="copies of the production YAML in the folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        mm, anchor, kpo = tmp_path / "mmprep", tmp_path / "anchor", tmp_path / "kpo"
        mm.mkdir(), anchor.mkdir(), kpo.mkdir()
        shutil.copy(REPO / "dags" / "mmprep_dags.py", mm)
        text = (REPO / "dags" / "download_multimodal.yaml").read_text()
        for n in range(args.yamls):
            (mm / f"pipe_{n}.yaml").write_text(text.replace("name: download_multimodal", f"name: pipe_{n}"))
            (anchor / f"anchor_{n}.py").write_text(ANCHOR.format(n=n))
            (kpo / f"kpo_{n}.py").write_text(KPO_ANCHOR.format(n=n))
        env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        rows: dict[str, list[dict[str, float]]] = {"mmprep": [], "anchor": [], "kpo": []}
        for _ in range(args.repeat):
            rows["mmprep"].append(measure(mm, {**env, "AIRFLOW__MMPREP__CONFIG_DIR": str(mm)}))
            rows["anchor"].append(measure(anchor, env))
            rows["kpo"].append(measure(kpo, env))
    for kind in ("cold", "warm"):
        mm_s = statistics.median(r[kind] for r in rows["mmprep"]) / args.yamls
        an_s = statistics.median(r[kind] for r in rows["anchor"]) / args.yamls
        kpo_s = statistics.median(r[kind] for r in rows["kpo"]) / args.yamls
        print(f"{kind}: mmprep {mm_s * 1000:.1f} ms per YAML; anchors per DAG file: one EmptyOperator "
              f"{an_s * 1000:.1f} ms (ratio {mm_s / an_s:.1f}x), one KubernetesPodOperator {kpo_s * 1000:.1f} ms "
              f"(ratio {mm_s / kpo_s:.2f}x)  [median of {args.repeat}; {args.yamls} files; target < 300 ms per YAML]")


if __name__ == "__main__":
    main()
