"""Build one Airflow DAG per pipeline YAML: task ids are the stage names, mapped over the plan's task lists.

Shape of every DAG (disabled stages absent)::

    plan ─► download_parquet ─► plan_download_images ─► download_images ─► reorganize_tar
         ─► precache_encodings ─► generate_wdinfo (outlet: the wdinfo Asset)

``plan`` loads the YAML with the run's Params as overrides, validates it in full and returns, per stage,
the list of mapped-instance arguments; each stage is ``.partial(...).expand_kwargs(plan[stage])``. The
download_images fan-out is planned after download_parquet ran, from the parts it actually produced. A
stage left out of the run's ``stages`` Param gets an empty list (Airflow skips it) and later stages still
run (trigger rule ``none_failed``). DAG parsing reads the YAML without resolving paths or loading the
precache file, so it stays cheap and works while ``dataset_repo_id: ???`` waits for a Param.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import STAGE_NAMES, STAGE_MODELS, ConfigError, load_config, load_raw
from .plan import compact_ranges, list_parquet_parts, plan_stage

log = logging.getLogger(__name__)

#: Params a UI trigger may set. Never encoder classes or paths of code: only where data goes and what runs.
SAFE_PARAMS = ("dataset_repo_id", "dataset_output_root", "stages", "precache_task_ids")
MAPPED_STAGES = STAGE_NAMES
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


@dataclass
class DagSpec:
    """What parsing needs from a YAML, read without resolving paths (see the module docstring)."""

    config_path: Path
    dag_id: str
    schedule: str | None
    stages: list[str]
    runners: dict[str, str]
    wdinfo_path: str | None = None
    image: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


def _leaf(raw: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(raw, key, throw_on_missing=True, throw_on_resolution_failure=True)
    except Exception:  # interpolation waiting for a Param or an override: unknown at parse time
        return None


def read_dag_spec(config_path: str | Path) -> DagSpec:
    path = Path(config_path)
    raw = load_raw(path)
    stages = []
    runners = {}
    for name in STAGE_NAMES:
        if raw.get(name) is None:
            continue
        enable = _leaf(raw, f"{name}.enable")
        if enable is False or (isinstance(enable, str) and enable.lower() == "false"):
            continue
        stages.append(name)
        runner_field = STAGE_MODELS[name].model_fields.get("runner")
        default = runner_field.default if runner_field is not None else "local"
        runners[name] = str(_leaf(raw, f"{name}.runner") or default)
        if runners[name] not in ("local", "kubernetes"):
            raise ConfigError([f"{name}.runner: expected 'local' or 'kubernetes', got {runners[name]!r}"])
    dag_id = str(_leaf(raw, "run.name") or path.stem)
    if not re.match(r"^[\w.-]+$", dag_id):
        raise ConfigError([f"run.name: {dag_id!r} is not a valid DAG id (letters, digits, _ . - only)"])
    schedule = _leaf(raw, "run.schedule")
    wdinfo = _leaf(raw, "generate_wdinfo.output_wdinfo_path") if "generate_wdinfo" in stages else None
    defaults = {"dataset_repo_id": _leaf(raw, "dataset_repo_id"),
                "dataset_output_root": _leaf(raw, "dataset_output_root")}
    image = _leaf(raw, "container")
    return DagSpec(path, dag_id, schedule, stages, runners, str(wdinfo) if wdinfo else None,
                   str(image) if isinstance(image, str) else None, defaults)


# --------------------------------------------------------------------------------------------------------
# Run time: Params → overrides → per-stage task lists
# --------------------------------------------------------------------------------------------------------


def parse_task_ids(value: Any, task_count: int, key: str = "precache_task_ids") -> list[int] | None:
    """``None``/"" → all; an int or "7" → [7]; "50-99" → 50..99. Ids must be < ``task_count``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ConfigError([f"{key}: expected a task id or a range 'A-B', got {value!r}"])
    if isinstance(value, int):
        low = high = value
    else:
        match = _RANGE.match(str(value))
        if not match:
            raise ConfigError([f"{key}: expected a task id or a range 'A-B', got {value!r}"])
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
    if low > high or high >= task_count:
        raise ConfigError([f"{key}: {value!r} selects ids outside 0..{task_count - 1} "
                           f"(this run has {task_count} tasks)"])
    return list(range(low, high + 1))


def overrides_from_params(params: dict[str, Any]) -> list[str]:
    out = []
    for key in ("dataset_repo_id", "dataset_output_root"):
        value = params.get(key)
        if value not in (None, ""):
            if not isinstance(value, str) or any(c in value for c in "${}\n"):
                raise ConfigError([f"{key}: expected a plain string without interpolation, got {value!r}"])
            out.append(f"{key}={value}")
    return out


def max_map_length() -> int:
    try:
        from airflow.configuration import conf

        return conf.getint("core", "max_map_length", fallback=1024)
    except Exception:  # pragma: no cover - outside Airflow
        return 1024


def check_fan_out(stage: str, count: int, limit: int) -> None:
    if count > limit:
        raise ConfigError([
            f"{stage}: {count} mapped tasks exceed Airflow's [core] max_map_length = {limit}. Raise it "
            f"(AIRFLOW__CORE__MAX_MAP_LENGTH={count}, on the scheduler and API server) or group the work into "
            "fewer, larger tasks (lower node_array_size; for download_images, fewer parquet_subpartitions)."])


def stage_task_kwargs(spec_runner: str, stage: str, config_path: str, overrides: list[str], task_id: int,
                      task_count: int) -> dict[str, Any]:
    """Arguments of one mapped instance: operator kwargs (local) or the pod's ``mmprep`` arguments."""
    if spec_runner == "kubernetes":
        return {"arguments": ["run", config_path, *overrides, "--stage", stage, "--task-id", str(task_id),
                              "--task-count", str(task_count)]}
    return {"stage_task_id": task_id, "stage_task_count": task_count, "overrides": list(overrides)}


def plan_run(spec: DagSpec, params: dict[str, Any], limit: int | None = None) -> dict[str, Any]:
    """The ``plan`` task's result: ``{stage: [kwargs, …], "overrides": [...], "stages": [...]}``."""
    limit = max_map_length() if limit is None else limit
    overrides = overrides_from_params(params)
    selected = params.get("stages") or spec.stages
    unknown = [s for s in selected if s not in spec.stages]
    if unknown:
        raise ConfigError([f"stages: {', '.join(unknown)} not enabled in {spec.config_path} "
                           f"(enabled: {', '.join(spec.stages)})"])
    # The precache YAML is checked only when precache runs in this run and in the Airflow worker: pods read
    # it from their own mount (the chart's ConfigMap), and a run of other stages does not need the encoders.
    cfg = load_config(spec.config_path, overrides,
                      load_precache="precache_encodings" in selected
                      and spec.runners.get("precache_encodings", "local") != "kubernetes")
    result: dict[str, Any] = {"overrides": overrides, "stages": list(selected)}
    for stage in spec.stages:
        result[stage] = []
        if stage not in selected:
            continue
        if stage == "download_images" and "download_parquet" in spec.stages:
            continue  # planned by plan_download_images, from the parts download_parquet produced
        stage_plan = plan_stage(cfg, stage)
        task_ids, task_count = stage_plan.task_ids or [], stage_plan.task_count or 0
        if stage == "precache_encodings":
            chosen = parse_task_ids(params.get("precache_task_ids"), task_count)
            if chosen is not None:
                task_ids = chosen
        check_fan_out(stage, len(task_ids), limit)
        result[stage] = [stage_task_kwargs(spec.runners[stage], stage, str(spec.config_path), overrides, t,
                                           task_count) for t in task_ids]
        log.info("plan: %s runs tasks %s of %d", stage, compact_ranges(task_ids) or "none", task_count)
    return result


def plan_download_images(spec: DagSpec, overrides: list[str], selected: list[str],
                         limit: int | None = None) -> list[dict[str, Any]]:
    """download_images' instances: one per parquet part present now (after download_parquet)."""
    if "download_images" not in selected:
        return []
    limit = max_map_length() if limit is None else limit
    cfg = load_config(spec.config_path, overrides, load_precache=False)
    block = cfg.download_images
    parts = list_parquet_parts(block.input_dir, block.parquet_pattern)
    if not parts:
        raise ConfigError([f"download_images.input_dir: no parquet part matching {block.parquet_pattern!r} "
                           f"in {block.input_dir}"])
    check_fan_out("download_images", len(parts), limit)
    return [stage_task_kwargs(spec.runners["download_images"], "download_images", str(spec.config_path),
                              overrides, i, len(parts)) for i in range(len(parts))]
