"""config.loader reads a YAML without OmegaConf where OmegaConf would read it to the same values
(``_load_plain``): every case here is loaded both ways and must give the same config, warnings and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_mmprep.config import ConfigError, PipelineConfig, load_config
from airflow_provider_mmprep.config import loader

REORG = """
reorganize_tar:
  enable: true
  input_dir: /data/raw
  output_dir: /data/out
  tar_chunk_size: {chunk}
  file_ext_in_tar: [.jpg, .txt]
"""

# (YAML text, overrides, whether the plain reading applies)
CASES: list[tuple[str, list[str], bool]] = [
    (REORG.format(chunk=997), [], True),
    ('{"run": {"name": "bench"}, "reorganize_tar": {"enable": true, "input_dir": "/a", "output_dir": "/b", '
     '"tar_chunk_size": 997, "file_ext_in_tar": [".jpg", ".txt", ".json"]}}', [], True),
    (REORG.format(chunk=0), [], True),
    (REORG.format(chunk="abc"), [], True),
    (REORG.format(chunk="1.5"), [], True),
    (REORG.format(chunk="true"), [], True),
    (REORG.format(chunk="'12'"), [], True),
    (REORG.format(chunk="1e3"), [], False),  # a float to OmegaConf, a string to yaml.safe_load
    (REORG.format(chunk="'1e3'"), [], False),
    (REORG.format(chunk="2001-12-14"), [], False),  # a date to yaml.safe_load, a string to OmegaConf
    (REORG.format(chunk="???"), [], False),
    (REORG.format(chunk="${x}"), ["x=5"], False),
    (REORG.format(chunk=7) + "  node_array_size: 2-5\n  override_task_count: 9\n  extra_key: 1\n", [], True),
    (REORG.format(chunk=7) + "  node_array_size: 0\n  strict: maybe\n", [], True),
    (REORG.format(chunk=7).replace("[.jpg, .txt]", ".jpg"), [], True),
    (REORG.format(chunk=7) + "  tar_chunk_size: 5\n", [], False),  # a repeated key: OmegaConf refuses it
    (REORG.format(chunk=7) + "run: 5\n", [], True),
    (REORG.format(chunk=7) + "run: {name: x, schedule: null, results_dir: /r}\nunused_top: 1\n", [], True),
    (REORG.format(chunk=7) + "run: {name: [1]}\n", [], True),
    (REORG.format(chunk=7) + "storage_options: {anon: true, secret: abc}\n", [], True),
    (REORG.format(chunk=7) + "storage_options: 5\n", [], False),
    (REORG.format(chunk=7) + "storage_options:\n", [], True),
    (REORG.format(chunk=7) + "storage_conn_id: 'bad id'\n", [], True),
    (REORG.format(chunk=7) + "dataset_output_root: /root\ndataset_repo_id: a/b\n", [], True),
    (REORG.format(chunk=7) + "base: &b {enable: false}\ngenerate_wdinfo: *b\n", [], False),
    (REORG.format(chunk=7) + "generate_wdinfo:\n  <<: {enable: false}\n", [], False),
    (REORG.format(chunk=7) + "generate_wdinfo:\n", [], True),
    (REORG.format(chunk=7) + "generate_wdinfo: 5\n", [], False),
    (REORG.format(chunk=7) + "1: x\n", [], False),
    (REORG.format(chunk=7) + "? [a, b]\n: x\n", [], False),  # a key that is a list
    (REORG.format(chunk=7) + "download_images:\n  enable: true\n  input_dir: /p\n  output_dir: /t\n"
     "  img2dataset_additional_arguments: {resize_mode: no, encode_quality: 95}\n", [], True),
    (REORG.format(chunk=7) + "download_images:\n  enable: true\n  input_dir: /p\n  output_dir: /t\n"
     "  img2dataset_additional_arguments: {bogus_option: 1}\n  download_num_processes: 0\n", [], True),
    (REORG.format(chunk=7) + "generate_wdinfo:\n  enable: 'no'\n", [], True),
    (REORG.format(chunk=7) + "generate_wdinfo:\n  enable: maybe\n", [], True),
    (REORG.format(chunk=7) + "generate_wdinfo:\n  enable: true\n", [], True),
    (REORG.format(chunk=7), ["reorganize_tar.tar_chunk_size=5"], True),
    (REORG.format(chunk=7), ["reorganize_tar.tar_chunk_size=0", "reorganize_tar.strict=yes"], True),
    (REORG.format(chunk=7), ["reorganize_tar.file_ext_in_tar=[.jpg,.json]"], True),
    (REORG.format(chunk=7), ["reorganize_tar.file_ext_in_tar=.jpg"], False),
    (REORG.format(chunk=7), ["reorganize_tar.enable=false"], True),
    (REORG.format(chunk=7), ["generate_wdinfo.enable=false", "precache_encodings.enable=false"], True),
    (REORG.format(chunk=7), ["generate_wdinfo.input_dir=/x", "generate_wdinfo.output_wdinfo_path=/w"], True),
    (REORG.format(chunk=7), ["reorganize_tar.input_dir=*.tar"], False),
    (REORG.format(chunk=7), ["reorganize_tar.input_dir="], True),
    (REORG.format(chunk=7), ["reorganize_tar=5"], False),
    (REORG.format(chunk=7), ["reorganize_tar.tar_chunk_size=1e3"], False),
    (REORG.format(chunk=7), ["reorganize_tar.tar_chunk_size=${x}", "x=3"], False),
    (REORG.format(chunk=7), ["reorganize_tar.x[0]=1"], False),
    (REORG.format(chunk=7), ["nokey"], False),
    ("", [], False),
    ("- a\n", [], False),
    ("just text\n", [], False),
    ("a: [\n", [], False),
    ("unused: 1\n", [], True),
]


def _outcome(path: Path, overrides: list[str], plain_allowed: bool, monkeypatch: pytest.MonkeyPatch,
             caplog: pytest.LogCaptureFixture) -> tuple[Any, ...]:
    """(result or error, warnings logged, whether the plain reading was used)."""
    used: list[bool] = []
    real = loader._load_plain

    def load_plain(*args: Any) -> Any:
        data = real(*args) if plain_allowed else None
        used.append(data is not None)
        return data

    monkeypatch.setattr(loader, "_load_plain", load_plain)
    caplog.clear()
    try:
        result: Any = load_config(path, list(overrides), load_precache=False, stages=["reorganize_tar"])
    except ConfigError as exc:
        result = ("ConfigError", exc.problems)
    except Exception as exc:  # an uncaught error must stay the same error
        result = (type(exc).__name__, str(exc))
    return result, [r.getMessage() for r in caplog.records], used == [True]


@pytest.mark.parametrize("text, overrides, plain", CASES)
def test_plain_reading_matches_omegaconf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture, text: str, overrides: list[str],
                                         plain: bool) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    fast, fast_warnings, used = _outcome(path, overrides, True, monkeypatch, caplog)
    slow, slow_warnings, _ = _outcome(path, overrides, False, monkeypatch, caplog)
    assert used == plain
    assert fast == slow
    assert fast_warnings == slow_warnings
    if isinstance(fast, PipelineConfig):  # made without validating again: validating changes nothing
        assert PipelineConfig(**dict(fast)) == fast


def test_missing_file_and_folder(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.yaml", tmp_path):
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert str(path) in exc.value.problems[0]


def test_task_process_imports_no_omegaconf(tmp_path: Path) -> None:
    """A plain config reaches its models without importing OmegaConf (start-up of every task process)."""
    path = tmp_path / "config.yaml"
    path.write_text(REORG.format(chunk=7))
    code = ("import sys\nfrom airflow_provider_mmprep.config import load_config\n"
            f"cfg = load_config({str(path)!r}, ['reorganize_tar.tar_chunk_size=5'], stages=['reorganize_tar'])\n"
            "assert cfg.reorganize_tar.tar_chunk_size == 5\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'omegaconf'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
