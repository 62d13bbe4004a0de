"""How long the run report takes per tar, against the floor of reading the same manifests.

    /work/main/.venv/bin/python benchmarks/bench_report.py [--tars 20000]

Writes TARS small tars with manifests for reorganize_tar and precache_encodings each (plus a wdinfo.pkl) in
a temporary folder, then times, in the same run and on the same files:
- anchor: a bare loop that stats each tar and json-loads its manifest (what any reader must do);
- the report: ``build_report_html`` (collection, four plots, HTML).
Prints seconds, µs per manifest and the ratio report / anchor, best of 3 each.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_provider_mmprep.config import load_config  # noqa: E402
from airflow_provider_mmprep.manifest import write_manifest  # noqa: E402
from airflow_provider_mmprep.report import build_report_html  # noqa: E402

CONFIG = textwrap.dedent("""\
    run: {name: bench}
    dataset_output_root: ROOT
    reorganize_tar: {input_dir: ROOT/raw, output_dir: ROOT/reorganized, node_array_size: 64}
    precache_encodings:
      input_dir: ROOT/reorganized
      output_dir: ROOT/precached
      node_array_size: 1024
      precache_config_path: ${launcher_scripts_path}/conf/data_preparation/multimodal/precache_sd.yaml
    generate_wdinfo: {input_dir: ROOT/precached, output_wdinfo_path: ROOT/wdinfo.pkl}
    """)


def make(root: Path, tars: int) -> list[Path]:
    paths = []
    for stage in ("reorganized", "precached"):
        folder = root / stage
        folder.mkdir(parents=True)
        for index in range(tars):
            tar = folder / f"{index:06d}.tar"
            tar.write_bytes(b"\0" * 10240)
            write_manifest(tar, 1000, task_id=index * 64 // tars)
            paths.append(tar)
    with (root / "wdinfo.pkl").open("wb") as fh:
        pickle.dump({"tar_files": [f"{i:06d}.tar" for i in range(tars)], "chunk_size": 1000,
                     "total_key_count": 1000 * tars}, fh)
    return paths


def anchor(paths: list[Path]) -> int:
    total = 0
    for tar in paths:
        os.stat(tar)
        total += json.loads(tar.with_name(tar.name + ".manifest.json").read_bytes())["sample_count"]
    return total


def best(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tars", type=int, default=20000, help="tars per stage")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make(root, args.tars)
        (root / "c.yaml").write_text(CONFIG.replace("ROOT", str(root)))
        cfg = load_config(root / "c.yaml", stages=[])  # as `mmprep report` loads it: runs no stage
        anchor_s = best(lambda: anchor(paths))
        report_s = best(lambda: build_report_html(cfg))
    count = len(paths)
    print(f"manifests: {count:,}")
    print(f"anchor (stat + json.loads each): {anchor_s:.2f} s, {anchor_s / count * 1e6:.0f} µs/manifest")
    print(f"report (collect + plots + HTML): {report_s:.2f} s, {report_s / count * 1e6:.0f} µs/manifest")
    print(f"ratio report / anchor: {report_s / anchor_s:.2f}")


if __name__ == "__main__":
    main()
