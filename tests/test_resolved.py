"""Resolved configs: validated once (``mmprep validate --resolved-out``), run by tasks without pydantic."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_mmprep.cli import main
from airflow_provider_mmprep.config import STAGE_NAMES, ConfigError, load_config
from airflow_provider_mmprep.resolved import ResolvedBlock, load_resolved
from airflow_provider_mmprep.stages.reorganize_tar import run_task
from airflow_provider_mmprep.testing.shards import make_download_output

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["dataset_repo_id=org/dataset"]


def _same(resolved: object, real: object, where: str) -> None:
    """Field by field (types included), nested models and lists of them too."""
    if hasattr(real, "model_fields"):
        assert isinstance(resolved, ResolvedBlock), where
        for name in type(real).model_fields:
            _same(getattr(resolved, name), getattr(real, name), f"{where}.{name}")
    elif isinstance(real, list):
        assert isinstance(resolved, list) and len(resolved) == len(real), where
        for i, (a, b) in enumerate(zip(resolved, real)):
            _same(a, b, f"{where}.{i}")
    else:
        assert type(resolved) is type(real) and resolved == real, (where, resolved, real)


def test_a_resolved_config_holds_what_validation_gave(nemo_config, tmp_path: Path, capsys) -> None:
    overrides = [*REQUIRED, f"dataset_output_root={tmp_path}/root", "reorganize_tar.node_array_size=3-5",
                 "reorganize_tar.override_task_count=8", "generate_wdinfo.output_wdinfo_path=s3://bucket/wd.pkl"]
    config = nemo_config()
    out = tmp_path / "resolved.json"
    assert main(["validate", str(config), *overrides, "--resolved-out", str(out)]) == 0
    assert f"resolved config written to {out}" in capsys.readouterr().out
    real = load_config(config, overrides)
    resolved = load_resolved(out)
    _same(resolved, real, "config")
    assert resolved.enabled_stages == real.enabled_stages == list(STAGE_NAMES)
    assert resolved.stage("reorganize_tar").input_dir == tmp_path / "root" / "tarfiles_raw"
    assert resolved.generate_wdinfo.output_wdinfo_path == "s3://bucket/wd.pkl"  # a URL stays a string
    # what is not a field (properties, methods) is the real model's answer
    assert resolved.reorganize_tar.task_selection == real.reorganize_tar.task_selection
    assert resolved.reorganize_tar.task_selection.task_ids == [3, 4, 5]
    assert resolved.precache.crop_size == real.precache.crop_size
    assert [e.encoder_config.kwargs for e in resolved.precache.encodings] == \
        [e.encoder_config.kwargs for e in real.precache.encodings]
    assert resolved.precache.encoder_problems() == real.precache.encoder_problems()
    body = json.loads(out.read_text())
    precache_yaml = real.precache_encodings.precache_config_path
    assert sorted(body["read"]) == sorted([str(config), str(precache_yaml)])
    with pytest.raises(AttributeError, match="read-only"):
        resolved.reorganize_tar.tar_chunk_size = 3  # type: ignore[misc]
    with pytest.raises(KeyError):
        resolved.stage("nope")
    # plan reads it as it reads the YAML
    assert main(["plan", str(out), "--json"]) == 0
    from_resolved = json.loads(capsys.readouterr().out)
    assert main(["plan", str(config), *overrides, "--json"]) == 0
    assert from_resolved == json.loads(capsys.readouterr().out)
    # the precache YAML is part of what was validated: editing it makes the resolved file stale too
    precache_yaml.write_text(precache_yaml.read_text() + "\n# edited\n")
    with pytest.raises(ConfigError, match=f"{precache_yaml} has changed since it was resolved"):
        load_resolved(out)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if not p.name.endswith(".manifest.json")}


def test_tasks_run_from_a_resolved_config_write_the_same_bytes_without_importing_pydantic(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_download_output(raw, parts=2, shards_per_part=3, samples_per_shard=(4, 11), seed=21, manifests=True)
    config = tmp_path / "c.yaml"
    block = {"enable": True, "input_dir": str(raw), "output_dir": str(tmp_path / "out"), "tar_chunk_size": 7,
             "file_ext_in_tar": [".jpg", ".txt", ".json"]}
    config.write_text(json.dumps({"run": {"name": "t"}, "reorganize_tar": block}))
    cfg = load_config(config, [f"reorganize_tar.output_dir={tmp_path / 'reference'}"])
    run_task(cfg, 0, 1)
    resolved = tmp_path / "resolved.json"
    assert main(["validate", str(config), "--resolved-out", str(resolved)]) == 0
    script = ("import sys\nfrom airflow_provider_mmprep.cli import main\n"
              "code = main(['run', sys.argv[1], '--stage', 'reorganize_tar', '--task-id', sys.argv[2], "
              "'--task-count', '3', '-q'])\n"
              "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'pydantic_core', 'yaml', "
              "'omegaconf'}))\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for task_id in range(3):
        run = subprocess.run([sys.executable, "-c", script, str(resolved), str(task_id)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split("\n")[-2] == "0 []", run.stdout
    assert _digests(tmp_path / "out") == _digests(tmp_path / "reference") and len(_digests(tmp_path / "out")) > 5


def test_a_stale_foreign_or_damaged_resolved_config_is_refused(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    make_download_output(raw, parts=1, shards_per_part=2, samples_per_shard=(3, 5), seed=22, manifests=True)
    config = tmp_path / "c.yaml"
    config.write_text(f"reorganize_tar:\n  input_dir: {raw}\n  output_dir: {tmp_path / 'out'}\n"
                      "  tar_chunk_size: 4\n")
    resolved = tmp_path / "resolved.json"
    assert main(["validate", str(config), "--resolved-out", str(resolved)]) == 0
    capsys.readouterr()
    run = ["run", str(resolved), "--stage", "reorganize_tar", "--task-id", "0", "--task-count", "1"]

    def refused(*args: str) -> str:
        assert main(list(args)) == 2
        return capsys.readouterr().err

    assert "give the overrides to mmprep validate" in refused(*run, "reorganize_tar.tar_chunk_size=5")
    assert f"{resolved}: already a resolved config" in refused("validate", str(resolved), "--resolved-out",
                                                                 str(tmp_path / "again.json"))
    body = json.loads(resolved.read_text())
    config.write_text(config.read_text().replace("tar_chunk_size: 4", "tar_chunk_size: 5"))
    assert f"{config} has changed since it was resolved; write it again with mmprep validate {config}" in refused(*run)
    assert not (tmp_path / "out").exists()  # nothing ran
    config.unlink()  # a pod without the YAML: the resolved file stands alone
    assert main(run) == 0 and len(list((tmp_path / "out").glob("*.tar"))) == 2
    capsys.readouterr()
    resolved.write_text(json.dumps({**body, "schema": "0" * 64}))
    assert "with another config schema than this mmprep" in refused(*run)
    resolved.write_text(json.dumps(body)[:200])
    assert f"{resolved}: not a readable resolved config" in refused(*run)
    with pytest.raises(ConfigError, match="holds no pipeline config"):
        resolved.write_text(json.dumps({**body, "config": [1]}))
        load_resolved(resolved)


def test_precache_from_a_resolved_config_checks_its_model_paths_where_it_runs(nemo_config, tmp_path: Path,
                                                                              capsys) -> None:
    """Validation without a stage to run only warns about model paths a pod may mount; the task that encodes
    from the resolved config checks them, as load_config does for a task given the YAML."""
    config = nemo_config()
    out = tmp_path / "resolved.json"
    assert main(["validate", str(config), *REQUIRED, f"dataset_output_root={tmp_path}/root",
                 "--resolved-out", str(out)]) == 0
    (tmp_path / "launcher" / "models" / "vae").rmdir()
    capsys.readouterr()
    assert main(["run", str(out), "--stage", "precache_encodings", "--task-id", "0", "--task-count", "1"]) == 2
    err = capsys.readouterr().err
    assert "precache_sd.yaml: encodings.0.encoder_config.from_pretrained" in err and "models/vae" in err, err


def test_a_resolved_block_naming_no_model_of_ours_is_refused_when_asked_for_more_than_its_fields(
        tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"reorganize_tar:\n  input_dir: {tmp_path}\n  output_dir: {tmp_path / 'out'}\n")
    resolved = tmp_path / "resolved.json"
    assert main(["validate", str(config), "--resolved-out", str(resolved), "-q"]) == 0
    text = resolved.read_text()
    resolved.write_text(text.replace('"ReorganizeTarConfig"', '"TypeAdapter"'))
    block = load_resolved(resolved).reorganize_tar
    assert block.tar_chunk_size == 1000  # the fields are data
    with pytest.raises(ConfigError, match="'TypeAdapter' is not a block of mmprep's config"):
        block.task_selection


def test_every_stage_runs_from_a_resolved_config_as_from_its_yaml(tmp_path: Path, monkeypatch, capsys) -> None:
    """The demo's whole pipeline, `mmprep run` in this process: once from the YAML, once from the file
    resolved from it; same shards, encodings and wdinfo."""
    pytest.importorskip("torch")
    from airflow_provider_mmprep.safepickle import safe_loads_plain
    from airflow_provider_mmprep.testing.pipeline import local_sources, write_tiny_precache_config

    demo = REPO / "dags" / "demo_multimodal.yaml"
    write_tiny_precache_config(tmp_path / "yaml" / "models")
    shutil.copytree(tmp_path / "yaml" / "models", tmp_path / "resolved" / "models")
    with local_sources(images=60, parquet_files=1):
        monkeypatch.setenv("MMPREP_DEMO_ROOT", str(tmp_path / "yaml"))
        assert main(["run", str(demo), "-q"]) == 0
        monkeypatch.setenv("MMPREP_DEMO_ROOT", str(tmp_path / "resolved"))  # ${oc.env:…} read when resolving
        assert main(["validate", str(demo), "--resolved-out", str(tmp_path / "demo.json"), "-q"]) == 0
        monkeypatch.setenv("MMPREP_DEMO_ROOT", str(tmp_path / "elsewhere"))  # not read again by the tasks
        assert main(["run", str(tmp_path / "demo.json"), "-q"]) == 0
    assert not (tmp_path / "elsewhere").exists()
    for folder in ("tarfiles_reorganized", "tarfiles_precached"):
        written = _digests(tmp_path / "yaml" / folder)
        assert _digests(tmp_path / "resolved" / folder) == written and len(written) >= 2, folder
    wdinfo = [safe_loads_plain((tmp_path / form / "wdinfo.pkl").read_bytes()) for form in ("yaml", "resolved")]
    assert [w["tar_files"] for w in wdinfo][0] == wdinfo[1]["tar_files"] and wdinfo[0]["total_key_count"] == 50
