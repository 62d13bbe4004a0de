"""Task ids as text and as mapped-instance arguments: every writer and reader of them is in task_ids.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from airflow_provider_mmprep import task_ids
from airflow_provider_mmprep.cli import build_parser
from airflow_provider_mmprep.clear_client import map_indices
from airflow_provider_mmprep.config import ConfigError, load_config, stage_key
from airflow_provider_mmprep.task_mapping import read_dag_spec


def test_spans_lists_and_compact_ranges_read_back() -> None:
    assert task_ids.parse_span(" 50 - 99 ") == (50, 99) and task_ids.parse_span("7") == (7, 7)
    assert task_ids.parse_span("9-2") == (9, 2)  # callers word why a reversed span is wrong
    assert task_ids.parse_span("a-b") is None and task_ids.parse_span("1-2-3") is None
    assert task_ids.is_range("50-99") and not task_ids.is_range("7") and not task_ids.is_range("x-1")
    assert task_ids.parse_id_list("50-52,99, 3") == [3, 50, 51, 52, 99]
    for bad in ("50-", "9-2", "1,,2", "x"):
        with pytest.raises(ValueError, match="expected ids and ranges like 50-99,120"):
            task_ids.parse_id_list(bad)
    ids = [0, 1, 2, 5, 7, 8, 40, 41, 99]
    assert task_ids.compact_ranges(ids) == "0-2,5,7-8,40-41,99"
    assert task_ids.parse_id_list(task_ids.compact_ranges(ids)) == ids


def test_the_precache_task_ids_param() -> None:
    assert task_ids.select(None, 4) is None and task_ids.select(" ", 4) is None
    assert task_ids.select("1-2", 4) == [1, 2] and task_ids.select(3, 4) == [3] and task_ids.select("3", 4) == [3]
    for bad in (True, 1.5, "1,2", "x"):
        with pytest.raises(ValueError, match="expected a task id or a range 'A-B'"):
            task_ids.select(bad, 4)
    for outside in ("2-9", "3-1", 4):
        with pytest.raises(ValueError, match=r"selects ids outside 0..3 \(this run has 4 tasks\)"):
            task_ids.select(outside, 4)


@pytest.mark.parametrize("runner", ["local", "kubernetes"])
def test_instance_arguments_read_back(runner: str) -> None:
    kwargs = task_ids.instance_kwargs(runner, "reorganize_tar", "/c.yaml", ["a=b"], 67, 100)
    assert task_ids.instance_task(kwargs) == (67, 100)
    if runner == "kubernetes":  # the pod runs the CLI: its own parser reads what the plan wrote
        args, extra = build_parser().parse_known_args(kwargs["arguments"])
        assert (args.config, args.stage, args.task_id, args.task_count, args.overrides + extra) == (
            "/c.yaml", ["reorganize_tar"], 67, 100, ["a=b"])


@pytest.mark.skipif(importlib.util.find_spec("jinja2") is None, reason="jinja2 comes with Airflow")
def test_the_pods_label_template_reads_what_the_plan_wrote() -> None:
    import jinja2

    template = jinja2.Template(task_ids.POD_LABEL_TEMPLATE)
    for task_id, count in ((0, 1), (3, 8), (1023, 1024)):
        arguments = task_ids.instance_kwargs("kubernetes", "precache_encodings", "/c.yaml", ["x=--task-id"],
                                             task_id, count)["arguments"]
        assert template.render(task=SimpleNamespace(arguments=arguments)) == task_ids.task_label(task_id, count)
    assert template.render(task=SimpleNamespace(arguments=["inspect", "/data"])) == ""
    assert task_ids.part_label(3) == "part-00003" and task_ids.task_label(67, 100) == "task 67/100"


def test_clear_maps_task_ids_of_either_runner_to_map_indices() -> None:
    local = [task_ids.instance_kwargs("local", "precache_encodings", "/c.yaml", [], t, 100) for t in range(48, 100)]
    pods = [task_ids.instance_kwargs("kubernetes", "precache_encodings", "/c.yaml", [], t, 100)
            for t in range(48, 100)]
    for instances in (local, pods):
        assert map_indices(instances, [50, 51, 52, 99]) == ([2, 3, 4, 51], [])
        assert map_indices(instances, [3, 50, 120]) == ([2], [3, 120])


def test_node_array_size_ranges_use_the_same_reading(nemo_config: Callable[..., Path], tmp_path: Path) -> None:
    base = ["dataset_repo_id=org/d", f"dataset_output_root={tmp_path}", "precache_encodings.override_task_count=100"]
    cfg = load_config(nemo_config(), [*base, "precache_encodings.node_array_size= 50 - 52"])
    assert cfg.precache_encodings.task_selection.task_ids == [50, 51, 52]
    for bad in ("52-50", "7-", "x"):
        with pytest.raises(ConfigError, match="precache_encodings.node_array_size: expected a positive integer"):
            load_config(nemo_config(), [*base, f"precache_encodings.node_array_size={bad}"])


def test_dag_shape_reads_enable_and_runner_as_the_models_do(nemo_config: Callable[..., Path],
                                                            tmp_path: Path) -> None:
    """The DAG (read_dag_spec) and the plan task (load_config) agree on which stages run, and where."""
    path = nemo_config({"download_images:\n  enable: True": 'download_images:\n  enable: "off"',
                        "reorganize_tar:\n  enable: True": "reorganize_tar:\n  enable: True\n  runner: kubernetes"})
    spec = read_dag_spec(path)
    cfg = load_config(path, ["dataset_repo_id=org/d", f"dataset_output_root={tmp_path}"], load_precache=False)
    assert spec.stages == cfg.enabled_stages == ["download_parquet", "reorganize_tar", "precache_encodings",
                                                 "generate_wdinfo"]
    assert spec.runners == {"download_parquet": "local", "reorganize_tar": "kubernetes",
                            "precache_encodings": "kubernetes", "generate_wdinfo": "local"}
    assert [spec.runners[s] for s in spec.stages[:-1]] == [cfg.stage(s).runner for s in spec.stages[:-1]]
    with pytest.raises(ConfigError, match=r"^reorganize_tar.runner: expected one of 'local' or 'kubernetes', "
                                          r"got 'docker'$"):
        read_dag_spec(nemo_config({"reorganize_tar:\n  enable: True": "reorganize_tar:\n  runner: docker"}))
    with pytest.raises(ConfigError, match=r"^download_images.enable: expected true or false, got 'maybe'$"):
        stage_key("download_images", "enable", "maybe")
