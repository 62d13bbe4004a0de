"""``mmprep inspect`` on folders and wdinfo files made here; pickles are read without executing them."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from airflow_provider_mmprep.cli import main
from airflow_provider_mmprep.manifest import write_manifest
from airflow_provider_mmprep.testing.shards import write_tar

REPO = Path(__file__).resolve().parents[1]


def arrays(i: int) -> bytes:
    return pickle.dumps({"autoencoderkl_image": np.zeros((8, 64, 64), np.float16),
                         "t5_text": np.ones((i + 1, 16), np.float16)})


def run_inspect(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    code = main(["inspect", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def shard_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    write_tar(folder / "00000.tar", [(f"a{i}", {"jpg": b"j", "txt": b"t"}) for i in range(3)])
    write_tar(folder / "00001.tar", [("b0", {"jpg": b"j", "txt": b"t"}), ("b1", {"jpg": b"j"}),
                                     ("a1", {"jpg": b"j", "txt": b"t"})])  # missing .txt; key a1 repeated
    write_tar(folder / "00002.tar", [("c0", {"jpg": b"j", "txt": b"t"})])
    (folder / "00002.tar.INCOMPLETE").touch()
    write_manifest(folder / "00000.tar", 3)
    return folder


def test_folder_report(shard_folder: Path, capsys: pytest.CaptureFixture) -> None:
    code, report = run_inspect(capsys, str(shard_folder))
    assert code == 0, report["problems"]
    assert report["tar_count"] == 3 and report["total_samples"] == 7
    assert report["samples_per_tar"] == {"min": 1, "max": 3, "histogram": {"3": 2}}
    assert report["uniform"] is True and report["marked_incomplete"] == ["00002.tar"]
    assert report["extensions"] == {"jpg": 7, "txt": 6}
    assert report["samples_missing_members"] == 1
    by_tar = {t["tar"]: t for t in report["tars"]}
    assert by_tar["00001.tar"]["missing_members"] == {"txt": 1}
    assert by_tar["00000.tar"]["manifest_sample_count"] == 3
    assert report["duplicate_keys_across_tars"] == {"count": 1,
                                                    "examples": [{"key": "a1", "tars": ["00000.tar", "00001.tar"]}]}


def test_text_report_is_readable(shard_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(shard_folder)]) == 0
    text = capsys.readouterr().out
    assert "3 tars, 7 samples" in text and "keys duplicated across tars: 1" in text
    assert "00002.tar: 1 samples (incomplete)" in text


def test_pickle_members_are_described_and_evil_ones_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "precached"
    write_tar(folder / "00000.tar", [(f"{i:04d}", {"pickle": arrays(i)}) for i in range(2)])

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    write_tar(folder / "00001.tar", [("0100", {"pickle": pickle.dumps({"x": Evil()})}),
                                     ("0101", {"pickle": arrays(0)})])
    code, report = run_inspect(capsys, str(folder), "--pickle-samples", "2")
    assert code == 1  # problems found
    good, evil = report["tars"]
    assert good["pickle"] == {"variants": [
        {"autoencoderkl_image": {"shape": [8, 64, 64], "dtype": "float16"},
         "t5_text": {"shape": [1, 16], "dtype": "float16"}},
        {"autoencoderkl_image": {"shape": [8, 64, 64], "dtype": "float16"},
         "t5_text": {"shape": [2, 16], "dtype": "float16"}}]}
    assert "refused global" in evil["pickle"]["error"]
    assert any("pickle refused" in p for p in report["problems"])
    assert not (tmp_path / "PWNED").exists()


def test_damage_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "shards"
    tar = write_tar(folder / "00000.tar", [(f"k{i}", {"jpg": bytes(2000), "txt": b"t"}) for i in range(3)])
    with open(tar, "r+b") as handle:
        handle.truncate(3000)
    code, report = run_inspect(capsys, str(folder))
    assert code == 1 and "truncated" in report["problems"][0] and report["tars"][0]["samples"] == 1


def test_wdinfo_report_checks_listed_tars(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "precached"
    for t in range(2):
        write_tar(root / f"{t:05d}.tar", [(f"{t}{i:03d}", {"pickle": arrays(1)}) for i in range(2)])
    wdinfo = tmp_path / "elsewhere" / "wdinfo.pkl"
    wdinfo.parent.mkdir()
    good = {"tar_files": ["00000.tar", "00001.tar"], "chunk_size": 2, "total_key_count": 4,
            "dataset_root": str(root)}
    wdinfo.write_bytes(pickle.dumps(good))
    code, report = run_inspect(capsys, str(wdinfo))
    assert code == 0, report["problems"]
    assert report["root"] == str(root) and report["counted_samples"] == 4
    assert report["tars"][0]["pickle"]["t5_text"] == {"shape": [2, 16], "dtype": "float16"}

    bad = {"tar_files": ["00001.tar", "00000.tar", "gone.tar"], "chunk_size": 3, "total_key_count": 5}
    wdinfo.write_bytes(pickle.dumps(bad))
    code, report = run_inspect(capsys, str(wdinfo), "--root", str(root))
    assert code == 1
    text = "\n".join(report["problems"])
    assert "not sorted" in text and "gone.tar: listed but missing" in text
    assert "total_key_count 5 != 3 tars x 3" in text and "00000.tar: holds 2 samples" in text


def test_wdinfo_with_globals_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wdinfo = tmp_path / "wdinfo.pkl"
    wdinfo.write_bytes(pickle.dumps({"tar_files": [], "chunk_size": np.int64(3)}))
    assert main(["inspect", str(wdinfo)]) == 2
    assert "refused global" in capsys.readouterr().err


def test_console_entry_point_runs(shard_folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "airflow_provider_mmprep.cli", "inspect", str(shard_folder),
                           "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tar_count"] == 3


def test_text_report_caps_per_tar_lines_on_big_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "many"
    for index in range(30):
        samples = [(f"k{index}_{i}", {"jpg": b"j", "txt": b"t"}) for i in range(2)]
        if index == 25:
            samples.append((f"k{index}_x", {"jpg": b"j"}))  # a tar with a problem is always shown
        write_tar(folder / f"{index:05d}.tar", samples)
    main(["inspect", str(folder)])
    lines = capsys.readouterr().out.splitlines()
    tar_lines = [line for line in lines if line.startswith("    0")]
    assert len(tar_lines) == 20
    assert any(line.startswith("    00025.tar: 3 samples, missing") for line in tar_lines)
    assert "    ... and 10 more tar(s) (--max-tars 0 or --json lists all)" in lines
    main(["inspect", str(folder), "--max-tars", "0"])
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("    0")]) == 30


def test_output_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    for index in range(400):
        write_tar(folder / f"{index:05d}.tar", [(f"k{index}", {"jpg": b"j", "txt": b"t"})])
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(f"{sys.executable} -m airflow_provider_mmprep.cli -q inspect {folder} --json | head -1",
                          shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout == "{\n" and "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
