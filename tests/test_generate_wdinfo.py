"""generate_wdinfo on precache-style tars: NeMo's format, exact counts, short tars never listed as full."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, PipelineConfig, load_config
from airflow_provider_mmprep.manifest import write_manifest
from airflow_provider_mmprep.safepickle import safe_loads
from airflow_provider_mmprep.stages import StageError
from airflow_provider_mmprep.stages import generate_wdinfo, reorganize_tar
from airflow_provider_mmprep.stages.generate_wdinfo import run_task
from airflow_provider_mmprep.testing.shards import make_download_output, write_tar

NEMO_YAML = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/download_multimodal.yaml"
CHUNK = 4


def make_cfg(folder: Path, wdinfo: Path, chunk: int = CHUNK, *extra: str) -> PipelineConfig:
    return load_config(NEMO_YAML, ["dataset_repo_id=org/data", f"dataset_output_root={folder.parent}",
                                   f"generate_wdinfo.input_dir={folder}", f"generate_wdinfo.tar_chunk_size={chunk}",
                                   f"generate_wdinfo.output_wdinfo_path={wdinfo}", *extra], load_precache=False)


def precached_tar(path: Path, count: int, start: int = 0, with_manifest: bool = True, jpg: bool = False) -> Path:
    samples = []
    for i in range(start, start + count):
        arrays = {"autoencoderkl_image": np.full((8, 4, 4), i, np.float16),
                  "clip-vit-large-patch14_text": np.full((80, 768), i, np.float32)}
        members = {"pickle": pickle.dumps(arrays)}
        if jpg:
            members["jpg"] = b"jpeg bytes"
        samples.append((f"{i:06d}", members))
    write_tar(path, samples)
    if with_manifest:
        write_manifest(path, count)
    return path


def nemo_style_check(wdinfo_path: Path, dataset_root: Path) -> int:
    """Use the wdinfo as NeMo's loader does: load the pickle, join each listed path to the dataset root,
    assume every tar holds chunk_size samples; return how many samples were actually read."""
    with open(wdinfo_path, "rb") as handle:
        info = pickle.load(handle)
    assert info["tar_files"] == sorted(info["tar_files"])
    assert all(not os.path.isabs(t) for t in info["tar_files"])
    urls = [os.path.join(dataset_root, t) for t in info["tar_files"]]
    read = 0
    for url in urls:
        samples = list(wds.WebDataset(url, shardshuffle=False))
        assert len(samples) == info["chunk_size"], url
        for item in samples:
            arrays = safe_loads(item["pickle"])
            assert arrays["autoencoderkl_image"].shape == (8, 4, 4)
        read += len(samples)
    assert read == info["total_key_count"] == len(urls) * info["chunk_size"]
    return read


def test_wdinfo_lists_only_full_tars_with_exact_counts(tmp_path: Path) -> None:
    folder = tmp_path / "precached"
    precached_tar(folder / "00000.tar", CHUNK, 0)
    precached_tar(folder / "00001.tar", CHUNK, 10, with_manifest=False)  # counted from headers
    precached_tar(folder / "sub" / "00002.tar", CHUNK, 20)  # nested: listed relative
    precached_tar(folder / "00003.tar", 2, 30)  # short, unmarked: counted short
    precached_tar(folder / "00004.tar", 3, 40)
    (folder / "00004.tar.INCOMPLETE").touch()  # NeMo's marker
    precached_tar(folder / "00005.tar", CHUNK + 1, 50, with_manifest=False)  # oversized
    wdinfo = tmp_path / "out" / "wdinfo.pkl"
    summary = run_task(make_cfg(folder, wdinfo), 0, 1)

    assert summary["full_tars"] == 3 and summary["total_key_count"] == 3 * CHUNK
    assert summary["counts_from_manifests"] == 4 and summary["counts_from_headers"] == 2
    info = pickle.loads(wdinfo.read_bytes())
    assert info["tar_files"] == ["00000.tar", "00001.tar", "sub/00002.tar"]
    assert info["chunk_size"] == CHUNK and info["total_key_count"] == 12
    assert info["tar_sample_counts"]["00003.tar"] == 2 and info["tar_sample_counts"]["00005.tar"] == CHUNK + 1
    assert set(info["not_listed"]) == {"00003.tar", "00004.tar", "00005.tar"}
    assert "INCOMPLETE" in info["not_listed"]["00004.tar"]
    assert nemo_style_check(wdinfo, folder) == 12
    assert not [p for p in wdinfo.parent.iterdir() if p.name.startswith(".")]  # atomic: no temporaries


def test_the_stage_says_whether_its_task_has_work_left(tmp_path: Path) -> None:
    folder = tmp_path / "precached"
    precached_tar(folder / "00000.tar", CHUNK, 0)
    wdinfo = tmp_path / "out" / "wdinfo.pkl"
    cfg = make_cfg(folder, wdinfo)
    assert generate_wdinfo.expected_outputs(cfg) == [wdinfo]
    assert generate_wdinfo.incomplete_tasks(cfg) == {0: "no wdinfo.pkl"}
    run_task(cfg, 0, 1)
    assert generate_wdinfo.incomplete_tasks(cfg) == {}
    assert generate_wdinfo.listed_but_missing(cfg, generate_wdinfo.check_output(cfg).info) == []
    (folder / "00000.tar").rename(folder / "moved.tar")
    assert generate_wdinfo.listed_but_missing(cfg, generate_wdinfo.check_output(cfg).info) == ["00000.tar"]
    wdinfo.write_bytes(pickle.dumps({"tar_files": [Path("a.tar")], "chunk_size": 1, "total_key_count": 1}))
    assert generate_wdinfo.incomplete_tasks(cfg) == {0: "unreadable wdinfo.pkl"}  # a class: not unpickled
    wdinfo.write_bytes(pickle.dumps({"tar_files": []}))
    assert generate_wdinfo.incomplete_tasks(cfg) == {0: "wdinfo.pkl without the keys NeMo reads"}


def test_manifest_counts_are_trusted_and_stale_ones_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "precached"
    trusted = precached_tar(folder / "00000.tar", 3, 0, with_manifest=False)
    write_manifest(trusted, CHUNK)  # the producer's word is taken without reading the tar
    stale = precached_tar(folder / "00001.tar", CHUNK, 10)
    precached_tar(folder / "00001.tar", 2, 10, with_manifest=False)  # tar rewritten after its manifest
    summary = run_task(make_cfg(folder, tmp_path / "wdinfo.pkl"), 0, 1)
    info = pickle.loads((tmp_path / "wdinfo.pkl").read_bytes())
    assert info["tar_files"] == ["00000.tar"]
    assert info["tar_sample_counts"] == {"00000.tar": CHUNK, "00001.tar": 2}
    assert summary["counts_from_manifests"] == 1 and summary["counts_from_headers"] == 1
    assert stale.exists()


def test_samples_lacking_an_extension_or_damaged_tars_are_not_listed(tmp_path: Path) -> None:
    folder = tmp_path / "precached"
    precached_tar(folder / "00000.tar", CHUNK, 0, with_manifest=False, jpg=True)
    precached_tar(folder / "00001.tar", CHUNK, 10, with_manifest=False)  # no .jpg
    damaged = precached_tar(folder / "00002.tar", CHUNK, 20, with_manifest=False, jpg=True)
    with open(damaged, "r+b") as handle:
        handle.truncate(damaged.stat().st_size - 11_000)
    run_task(make_cfg(folder, tmp_path / "wdinfo.pkl", CHUNK, "generate_wdinfo.file_ext_in_tar=[.pickle,.jpg]"), 0, 1)
    info = pickle.loads((tmp_path / "wdinfo.pkl").read_bytes())
    assert info["tar_files"] == ["00000.tar"]
    assert "lack one of" in info["not_listed"]["00001.tar"]
    assert info["not_listed"]["00002.tar"].startswith("damaged")


def test_no_full_tar_is_an_error_naming_the_key(tmp_path: Path) -> None:
    folder = tmp_path / "precached"
    precached_tar(folder / "00000.tar", 2)
    with pytest.raises(StageError, match=r"generate_wdinfo\.tar_chunk_size: no tar .* holds exactly 4"):
        run_task(make_cfg(folder, tmp_path / "wdinfo.pkl"), 0, 1)
    with pytest.raises(StageError, match=r"generate_wdinfo\.input_dir"):
        run_task(make_cfg(tmp_path / "missing", tmp_path / "wdinfo.pkl"), 0, 1)


def test_reorganized_output_feeds_wdinfo(tmp_path: Path) -> None:
    """reorganize_tar's short last tar (marker + manifest) is excluded; the rest is read as NeMo would."""
    raw, out = tmp_path / "raw", tmp_path / "reorganized"
    make_download_output(raw, parts=1, shards_per_part=3, samples_per_shard=(5, 9), seed=2)
    cfg = load_config(NEMO_YAML, ["dataset_repo_id=org/data", f"dataset_output_root={tmp_path}",
                                  f"reorganize_tar.input_dir={raw}", f"reorganize_tar.output_dir={out}",
                                  "reorganize_tar.tar_chunk_size=5", f"generate_wdinfo.input_dir={out}",
                                  "generate_wdinfo.tar_chunk_size=5", "generate_wdinfo.file_ext_in_tar=[.jpg,.txt]",
                                  f"generate_wdinfo.output_wdinfo_path={tmp_path}/wdinfo.pkl"], load_precache=False)
    reorganized = reorganize_tar.run_task(cfg, 0, 1)
    summary = run_task(cfg, 0, 1)
    assert summary["counts_from_manifests"] == reorganized["output_tars"]
    short = reorganized["short_tar"]["samples"]
    assert summary["total_key_count"] == reorganized["usable_samples"] - short
    info = pickle.loads((tmp_path / "wdinfo.pkl").read_bytes())
    assert reorganized["short_tar"]["name"] in info["not_listed"]  # the fixture does not divide by 5
    for rel in info["tar_files"]:
        assert len(list(wds.WebDataset(os.path.join(out, rel), shardshuffle=False))) == 5


def test_dataset_smaller_than_one_tar_says_what_happened_and_what_to_change(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from airflow_provider_mmprep.stages import precache_encodings

    root = tmp_path / "ds"
    make_download_output(root / "tarfiles_raw", parts=1, shards_per_part=1, samples_per_shard=(5, 5))
    cfg = load_config(NEMO_YAML, ["dataset_repo_id=org/data", f"dataset_output_root={root}",
                                  "reorganize_tar.tar_chunk_size=1000", "precache_encodings.node_array_size=1"],
                      load_precache=False)
    reorganize_tar.run_task(cfg, 0, 1)
    assert (root / "tarfiles_reorganized" / "00000.tar.INCOMPLETE").exists()
    summary = precache_encodings.run_task(cfg.model_copy(update={"precache": object()}), 0, 1)
    assert summary["encoded_tars"] == 0 and summary["nothing_to_encode"]
    assert "only the short tar 00000.tar" in caplog.text and "process_incomplete_tars" in caplog.text
    assert "already encoded" not in caplog.text
    with pytest.raises(StageError) as caught:
        run_task(cfg, 0, 1)
    message = str(caught.value)
    assert message.startswith("generate_wdinfo.tar_chunk_size: no full tar: the dataset has only 5 usable")
    assert "Lower tar_chunk_size (at most 5)" in message and "no .tar files found" not in message
