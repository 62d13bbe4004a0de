"""The NeMo config is read unchanged, validated once, and every problem names its YAML key path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from airflow_provider_mmprep.cli import main
from airflow_provider_mmprep.config import (BUNDLED_LAUNCHER_SCRIPTS_PATH, ConfigError, load_config,
                                            load_precache_config)
from airflow_provider_mmprep.plan import build_plan
from airflow_provider_mmprep.task_ids import compact_ranges

REQUIRED = ["dataset_repo_id=org/dataset"]


def test_nemo_file_resolves_relative_and_launcher_interpolation(nemo_config, tmp_path: Path) -> None:
    cfg = load_config(nemo_config(), [*REQUIRED, f"dataset_output_root={tmp_path}/root",
                                      "base_results_dir=/results"])
    root = tmp_path / "root"
    assert cfg.download_parquet.output_dir == root / "parquet"
    assert cfg.download_images.input_dir == root / "parquet"  # ${..download_parquet.output_dir}
    assert cfg.reorganize_tar.input_dir == root / "tarfiles_raw"
    assert cfg.generate_wdinfo.tar_chunk_size == 1000  # two hops of interpolation
    assert cfg.generate_wdinfo.output_wdinfo_path == root / "wdinfo.pkl"
    # NeMo's default precache path points into launcher_scripts_path (the fixture sets one whose
    # precache_sd.yaml names existing model folders; without it, it defaults to our bundle)
    assert cfg.precache_encodings.precache_config_path == (
        tmp_path / "launcher" / "conf/data_preparation/multimodal/precache_sd.yaml")
    bundled = load_config(nemo_config(), [*REQUIRED, f"dataset_output_root={tmp_path}/root",
                                          f"launcher_scripts_path={BUNDLED_LAUNCHER_SCRIPTS_PATH}"],
                          load_precache=False)
    assert bundled.precache_encodings.precache_config_path == (
        BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/precache_sd.yaml")
    assert [e.key for e in cfg.precache.encodings] == ["autoencoderkl_image", "clip-vit-large-patch14_text"]
    # YAML 1.1 reads `resize_mode: no` as False; it must stay img2dataset's "no"
    assert cfg.download_images.img2dataset_additional_arguments == {"encode_quality": 95, "resize_mode": "no"}
    assert cfg.enabled_stages == ["download_parquet", "download_images", "reorganize_tar",
                                  "precache_encodings", "generate_wdinfo"]


def test_launcher_level_names_are_overrides(nemo_config, tmp_path: Path) -> None:
    path = nemo_config({"dataset_output_root: ???": "dataset_output_root: ${data_dir}/laion"})
    cfg = load_config(path, [*REQUIRED, f"data_dir={tmp_path}"])
    assert cfg.download_images.output_dir == tmp_path / "laion" / "tarfiles_raw"
    with pytest.raises(ConfigError) as err:
        load_config(path, REQUIRED)
    assert any(p.startswith("download_parquet.output_dir: interpolation refers to 'data_dir'")
               and "data_dir=" in p for p in err.value.problems)


def test_required_values_are_reported_once_with_their_users(nemo_config) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(nemo_config())
    problems = err.value.problems
    assert problems[0].startswith("dataset_output_root: required value is missing ('???')")
    assert "needed by download_parquet.output_dir" in problems[0]
    assert any(p.startswith("dataset_repo_id: required value is missing") for p in problems)
    assert len(problems) == 2  # no cascade of 'expected a path, got None'


def test_every_validation_error_names_its_key_path(nemo_config, tmp_path: Path) -> None:
    overrides = [
        *REQUIRED, f"dataset_output_root={tmp_path}",
        "download_images.download_num_threads=abc",
        "download_images.download_num_processes=0",
        "download_parquet.parquet_subpartitions=-2",
        "reorganize_tar.tar_chunk_size=0",
        "reorganize_tar.node_array_size=9-3",
        "reorganize_tar.strict=maybe",
        "generate_wdinfo.file_ext_in_tar=7",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(nemo_config(), overrides)
    problems = err.value.problems
    expected = {
        "download_images.download_num_threads: expected an integer, got 'abc'",
        "download_images.download_num_processes: expected a positive integer or -1 (all CPUs), got 0",
        "download_parquet.parquet_subpartitions: expected a positive integer, got -2",
        "reorganize_tar.tar_chunk_size: expected a positive integer, got 0",
        "reorganize_tar.strict: expected true or false, got 'maybe'",
        "generate_wdinfo.file_ext_in_tar: expected a list, got 7",
    }
    assert expected <= set(problems), problems
    assert any(p.startswith("reorganize_tar.node_array_size: expected a positive integer or a range")
               for p in problems)
    # interpolated from reorganize_tar.tar_chunk_size: reported where it is used, too
    assert "precache_encodings.tar_chunk_size: expected a positive integer, got 0" in problems


def test_unknown_keys_warn_and_known_keys_are_kept(nemo_config, tmp_path: Path, caplog) -> None:
    path = nemo_config({"  parquet_pattern: \"*.parquet\"\n": "  parquet_pattern: \"*.parquet\"\n"
                        "  nemo_only_key: 3\n"})
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path, [*REQUIRED, f"dataset_output_root={tmp_path}", "surprise=1"])
    assert "download_parquet: keys not used by mmprep: nemo_only_key" in caplog.text
    assert "top level: keys not used by mmprep: surprise" in caplog.text
    assert cfg.download_parquet.parquet_pattern == "*.parquet"


def test_disabled_stages_are_not_validated_or_planned(nemo_config, tmp_path: Path) -> None:
    overrides = [f"dataset_output_root={tmp_path}", "download_parquet.enable=false",
                 "precache_encodings.enable=false", "precache_encodings.node_array_size=bogus"]
    cfg = load_config(nemo_config(), overrides)  # dataset_repo_id only needed by download_parquet
    assert cfg.download_parquet is None and cfg.precache_encodings is None and cfg.precache is None
    assert [s.name for s in build_plan(cfg).stages] == ["download_images", "reorganize_tar",
                                                       "generate_wdinfo"]


@pytest.mark.parametrize("node_array_size, extra, ids, count", [
    ("4", [], [0, 1, 2, 3], 4),
    ("50-99", ["precache_encodings.override_task_count=100"], list(range(50, 100)), 100),
    ("1", ["precache_encodings.override_task_id=67", "precache_encodings.override_task_count=100"],
     [67], 100),
])
def test_node_array_size_keeps_nemo_resume_meaning(nemo_config, tmp_path, node_array_size, extra, ids,
                                                   count) -> None:
    cfg = load_config(nemo_config(), [*REQUIRED, f"dataset_output_root={tmp_path}",
                                      f"precache_encodings.node_array_size={node_array_size}", *extra])
    selection = cfg.precache_encodings.task_selection
    assert (selection.task_ids, selection.task_count) == (ids, count)


def test_task_ids_outside_the_count_are_refused(nemo_config, tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(nemo_config(), [*REQUIRED, f"dataset_output_root={tmp_path}",
                                    "precache_encodings.node_array_size=50-99",
                                    "precache_encodings.override_task_count=60"])
    assert err.value.problems == [
        "precache_encodings: node_array_size/override_task_id select task id 60, outside the task count 60 "
        "(set override_task_count to the size of the original run)"]


def test_precache_yaml_is_validated_with_its_file_named(nemo_config, tmp_path: Path) -> None:
    bad = tmp_path / "precache.yaml"
    bad.write_text("batch_size_per_GPU: 0\nencodings:\n  - modality: video\n    extension: mp4\n"
                   "    key: k\n    precision: 8\n    encoder_config: {}\n")
    with pytest.raises(ConfigError) as err:
        load_precache_config(bad)
    text = "\n".join(err.value.problems)
    assert f"{bad}: batch_size_per_GPU: expected a positive integer, got 0" in text
    assert f"{bad}: encodings.0.modality: expected one of 'image' or 'text', got 'video'" in text
    assert f"{bad}: encodings.0.precision: expected one of 16 or 32, got 8" in text
    assert f"{bad}: encodings.0.encoder_config.cls: required key is missing" in text
    with pytest.raises(ConfigError) as err:
        load_config(nemo_config(), [*REQUIRED, f"dataset_output_root={tmp_path}",
                                    f"precache_encodings.precache_config_path={tmp_path}/nope.yaml"])
    assert err.value.problems == [
        f"precache_encodings.precache_config_path: precache config file not found: {tmp_path}/nope.yaml"]


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not a valid YAML file"):
        load_config(broken)


def test_compact_ranges() -> None:
    assert compact_ranges([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert compact_ranges([3]) == "3"


# CLI


def test_cli_validate_exit_codes_and_one_line_per_problem(nemo_config, tmp_path, capsys) -> None:
    path = str(nemo_config())
    assert main(["validate", path, *REQUIRED, f"dataset_output_root={tmp_path}"]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", path, *REQUIRED, f"dataset_output_root={tmp_path}",
                 "download_images.download_num_threads=abc", "reorganize_tar.tar_chunk_size=x"]) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err_lines == [
        "error: download_images.download_num_threads: expected an integer, got 'abc'",
        "error: reorganize_tar.tar_chunk_size: expected an integer, got 'x'",
        "error: precache_encodings.tar_chunk_size: expected an integer, got 'x'",
        "error: generate_wdinfo.tar_chunk_size: expected an integer, got 'x'",
    ]
    assert main(["validate", path, "not-an-override"]) == 2


def test_cli_plan_shows_stages_folders_and_pending_task_counts(nemo_config, tmp_path, capsys) -> None:
    path = str(nemo_config())
    assert main(["plan", path, *REQUIRED, f"dataset_output_root={tmp_path}", "--json",
                 "precache_encodings.node_array_size=2-3", "precache_encodings.override_task_count=8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    stages = {s["name"]: s for s in plan["stages"]}
    assert list(stages) == ["download_parquet", "download_images", "reorganize_tar", "precache_encodings",
                            "generate_wdinfo"]
    assert stages["download_images"]["task_ids"] is None
    assert stages["download_images"]["waits_for"] == "download_parquet"
    assert stages["download_images"]["input"] == f"{tmp_path}/parquet"
    assert (stages["precache_encodings"]["task_ids"], stages["precache_encodings"]["task_count"]) == ([2, 3], 8)
    assert main(["plan", path, *REQUIRED, f"dataset_output_root={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "download_images  [after download_parquet" in text
    assert "precache_encodings  [4 tasks" in text


def test_cli_run_refuses_bad_usage(nemo_config, tmp_path, capsys) -> None:
    path = str(nemo_config())
    base = [path, *REQUIRED, f"dataset_output_root={tmp_path}"]
    assert main(["run", *base, "--task-id", "1"]) == 2
    assert main(["run", *base, "--task-id", "0", "--task-count", "1"]) == 2  # needs one --stage
    assert main(["run", *base, "download_parquet.enable=false", "--stage", "download_parquet"]) == 2
    assert "download_parquet.enable: stage is disabled" in capsys.readouterr().err


# Issue 11: everything a stage would reject is rejected by validate/plan, before anything runs


def _errors(source) -> list[str]:
    """The ``error:`` lines of captured stderr (log lines are interleaved with them)."""
    text = source if isinstance(source, str) else source.readouterr().err
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("override, message", [
    ("resize_mode=squash", "download_images.img2dataset_additional_arguments.resize_mode: expected one of "
                           "no, border, keep_ratio, keep_ratio_largest, center_crop, got 'squash'"),
    ("image_size=big", "download_images.img2dataset_additional_arguments.image_size: expected a number, "
                       "got 'big'"),
    ("encode_format=gif", "download_images.img2dataset_additional_arguments.encode_format: expected one of "
                          "jpg, png, webp, got 'gif'"),
])
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_download_options_are_validated_before_anything_runs(nemo_config, tmp_path, capsys, command,
                                                             override, message) -> None:
    path = str(nemo_config())
    code = main([command, path, *REQUIRED, f"dataset_output_root={tmp_path}",
                 f"download_images.img2dataset_additional_arguments.{override}"])
    assert code == 2
    assert _errors(capsys) == [f"error: {message}"]
    assert main(["run", path, *REQUIRED, f"dataset_output_root={tmp_path}",
                 f"download_images.img2dataset_additional_arguments.{override}"]) == 2
    assert not (tmp_path / "parquet").exists()  # download_parquet never ran


def test_unknown_download_option_is_warned_about_at_validate(nemo_config, tmp_path, capsys) -> None:
    assert main(["validate", str(nemo_config()), *REQUIRED, f"dataset_output_root={tmp_path}",
                 "download_images.img2dataset_additional_arguments.frobnicate=3"]) == 0
    assert "download_images.img2dataset_additional_arguments.frobnicate: unknown option, ignored" \
        in capsys.readouterr().err
    # a disabled stage's options are not checked
    assert main(["validate", str(nemo_config()), *REQUIRED, f"dataset_output_root={tmp_path}",
                 "download_images.enable=false",
                 "download_images.img2dataset_additional_arguments.resize_mode=squash"]) == 0


def test_precache_yaml_unknown_keys_are_warned_about(tmp_path: Path, caplog) -> None:
    from conftest import launcher_with_models

    folder = launcher_with_models(tmp_path / "l")
    good = folder / "conf/data_preparation/multimodal/precache_sd.yaml"
    path = tmp_path / "p.yaml"
    path.write_text(good.read_text().replace("batch_size_per_GPU: 128", "batch_size_per_gpu: 16")
                    .replace("    precision: 16\n", "    precision: 16\n    precission: 32\n"))
    with caplog.at_level(logging.WARNING):
        precache = load_precache_config(path)
    assert precache.batch_size_per_GPU == 32  # the misspelt key is not used, and that is said
    assert f"{path}: keys not used by mmprep: batch_size_per_gpu, encodings.0.precission" in caplog.text


def test_bundled_precache_yaml_with_placeholder_paths_does_not_validate(nemo_config, tmp_path, capsys) -> None:
    bundled = BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/precache_sd.yaml"
    args = [str(nemo_config()), *REQUIRED, f"dataset_output_root={tmp_path}",
            f"launcher_scripts_path={BUNDLED_LAUNCHER_SCRIPTS_PATH}"]
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert _errors(err) == [f"error: {bundled}: encodings.0.encoder_config.from_pretrained: '/path/to/vae.bin' is a "
                      "placeholder; set the local folder (or file) of the weights"]
    # a hub id may exist in the GPU pod's volume (runner kubernetes): warned about here
    assert "encodings.1.encoder_config.version: 'openai/clip-vit-large-patch14' is a hub id" in err
    # precache running on this machine (local runner, or `run --stage precache_encodings`): both are errors
    assert main(["validate", *args, "precache_encodings.runner=local"]) == 2
    assert len(_errors(capsys)) == 2
    # a run that leaves precache out is not held up by its model paths
    assert main(["plan", *args, "precache_encodings.enable=false"]) == 0
    cfg = load_config(args[0], args[1:], stages=["download_images"])
    assert cfg.precache is not None


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("- a\n- b\n", "expected a mapping at the top level, got list"),
    ("hello\n", "expected a mapping at the top level, got str"),
    ("foo: 1\n", "no pipeline stage in this file"),
])
@pytest.mark.parametrize("command", ["validate", "plan", "run", "report"])
def test_empty_or_non_mapping_configs_are_usage_errors(tmp_path, capsys, text, message, command) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: {message}"), err  # one line, no traceback


def test_run_or_report_with_every_stage_disabled_is_a_usage_error(nemo_config, tmp_path, capsys) -> None:
    off = [f"{s}.enable=false" for s in ("download_parquet", "download_images", "reorganize_tar",
                                         "precache_encodings", "generate_wdinfo")]
    args = [str(nemo_config()), f"dataset_output_root={tmp_path}", *off]
    assert main(["validate", *args]) == 0  # a valid file, just nothing enabled
    assert main(["run", *args]) == 2
    assert main(["report", *args]) == 2
    assert "every stage is disabled" in capsys.readouterr().err


def test_range_without_override_task_count_refers_to_a_run_of_100_tasks(nemo_config, tmp_path, capsys,
                                                                       caplog) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = load_config(nemo_config(), [*REQUIRED, f"dataset_output_root={tmp_path}",
                                          "precache_encodings.node_array_size=1-2"])
    selection = cfg.precache_encodings.task_selection
    assert (selection.task_ids, selection.task_count) == ([1, 2], 100)  # was "tasks 1-2 of 3"
    assert "precache_encodings.node_array_size: range '1-2' without override_task_count" in caplog.text
    assert main(["plan", str(nemo_config()), *REQUIRED, f"dataset_output_root={tmp_path}",
                 "precache_encodings.node_array_size=1-2"]) == 0
    assert "precache_encodings  [tasks 1-2 of 100" in capsys.readouterr().out
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert "of `override_task_count`, default 100" in docs


@pytest.mark.parametrize("task_args, message", [
    (["--task-id", "5", "--task-count", "2"], "--task-id: 5 is outside 0..1 (--task-count 2)"),
    (["--task-id", "-1", "--task-count", "2"], "--task-id: -1 is outside 0..1 (--task-count 2)"),
    (["--task-id", "0", "--task-count", "0"], "--task-count: expected a positive integer, got 0"),
])
def test_out_of_range_task_id_is_a_usage_error_before_anything_runs(nemo_config, tmp_path, capsys, task_args,
                                                                    message) -> None:
    code = main(["run", str(nemo_config()), *REQUIRED, f"dataset_output_root={tmp_path}",
                 "--stage", "reorganize_tar", *task_args])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]  # before loading anything
    assert not (tmp_path / "tarfiles_reorganized").exists()


def test_version_and_verbosity_flags_after_the_subcommand(nemo_config, tmp_path, capsys) -> None:
    from airflow_provider_mmprep import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"mmprep {__version__}"
    path = str(nemo_config())
    assert main(["validate", path, *REQUIRED, f"dataset_output_root={tmp_path}", "-q"]) == 0
    assert main(["plan", path, "-v", *REQUIRED, f"dataset_output_root={tmp_path}"]) == 0
    assert main(["-q", "validate", path, *REQUIRED, f"dataset_output_root={tmp_path}", "-v"]) == 0


def test_glob_in_a_dotlist_override_is_a_plain_string(nemo_config, tmp_path) -> None:
    cfg = load_config(nemo_config(), [*REQUIRED, f"dataset_output_root={tmp_path}",
                                      "download_parquet.parquet_pattern=*.parquet",
                                      "download_images.parquet_pattern=**/*-00*.parquet"])
    assert cfg.download_parquet.parquet_pattern == "*.parquet"
    assert cfg.download_images.parquet_pattern == "**/*-00*.parquet"
