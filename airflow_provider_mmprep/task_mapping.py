"""What the DAG of a pipeline YAML maps, without Airflow: the DAG's shape at parse time, each run's instances.

The Airflow side (:mod:`airflow_provider_mmprep.airflow.dag`) turns this into an ``airflow.sdk.DAG``; this
module decides what goes into it. Shape of every DAG (disabled stages absent)::

    plan ─► download_parquet ─► plan_download_images ─► download_images ─► reorganize_tar
         ─► precache_encodings ─► generate_wdinfo (outlet: the wdinfo Asset)

``plan`` loads the YAML with the run's Params as overrides, validates it in full and returns, per stage,
the list of mapped-instance arguments (:func:`task_ids.instance_kwargs`); each stage is
``.partial(...).expand_kwargs(plan[stage])``. The download_images fan-out is planned after
download_parquet ran, from the parts it actually produced. A stage left out of the run's ``stages`` Param
gets an empty list (Airflow skips it) and later stages still run (trigger rule ``none_failed``). DAG
parsing reads the YAML without resolving paths or loading the precache file (:func:`read_dag_spec`), so it
stays cheap and works while ``dataset_repo_id: ???`` waits for a Param.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from . import task_ids
from .config import STAGE_MODELS, STAGE_NAMES, ConfigError, load_config, load_raw, stage_key
from .plan import plan_stage

log = logging.getLogger(__name__)


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
    #: the YAML's ``storage_conn_id`` (an Airflow connection for object storage), None where not set
    storage_conn_id: str | None = None


def _leaf(raw: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(raw, key, throw_on_missing=True, throw_on_resolution_failure=True)
    except Exception:  # interpolation waiting for a Param or an override: unknown at parse time
        return None


def read_dag_spec(config_path: str | Path) -> DagSpec:
    """The DAG's shape from the YAML as written: enabled stages and their runners, read by the stage
    models themselves (:func:`config.stage_key`); a value known only at run time counts as the default."""
    path = Path(config_path)
    raw = load_raw(path)
    stages = []
    runners = {}
    for name in STAGE_NAMES:
        if raw.get(name) is None:
            continue
        enable = _leaf(raw, f"{name}.enable")
        if enable is not None and not stage_key(name, "enable", enable):
            continue
        stages.append(name)
        runner = STAGE_MODELS[name].model_fields.get("runner")
        if runner is None:  # a stage without a runner key (generate_wdinfo) runs in the Airflow worker
            runners[name] = "local"
        else:
            value = _leaf(raw, f"{name}.runner")
            runners[name] = runner.default if value is None else stage_key(name, "runner", value)
    dag_id = str(_leaf(raw, "run.name") or path.stem)
    if not re.match(r"^[\w.-]+$", dag_id):
        raise ConfigError([f"run.name: {dag_id!r} is not a valid DAG id (letters, digits, _ . - only)"])
    schedule = _leaf(raw, "run.schedule")
    wdinfo = _leaf(raw, "generate_wdinfo.output_wdinfo_path") if "generate_wdinfo" in stages else None
    defaults = {"dataset_repo_id": _leaf(raw, "dataset_repo_id"),
                "dataset_output_root": _leaf(raw, "dataset_output_root")}
    image = _leaf(raw, "container")
    conn_id = _leaf(raw, "storage_conn_id")
    return DagSpec(path, dag_id, schedule, stages, runners, str(wdinfo) if wdinfo else None,
                   str(image) if isinstance(image, str) else None, defaults,
                   conn_id if isinstance(conn_id, str) and conn_id else None)


# --------------------------------------------------------------------------------------------------------
# Run time: Params → overrides → per-stage task lists
# --------------------------------------------------------------------------------------------------------


def parse_task_ids(value: Any, task_count: int, key: str = "precache_task_ids") -> list[int] | None:
    """The ``precache_task_ids`` Param (:func:`task_ids.select`): ``None``/"" → all; 7 or "7" → [7];
    "50-99" → 50..99. Ids must be < ``task_count``."""
    try:
        return task_ids.select(value, task_count)
    except ValueError as exc:
        raise ConfigError([f"{key}: {exc}"]) from None


def overrides_from_params(params: dict[str, Any]) -> list[str]:
    out = []
    for key in ("dataset_repo_id", "dataset_output_root"):
        value = params.get(key)
        if value not in (None, ""):
            if not isinstance(value, str) or any(c in value for c in "${}\n"):
                raise ConfigError([f"{key}: expected a plain string without interpolation, got {value!r}"])
            out.append(f"{key}={value}")
    return out


def check_fan_out(stage: str, count: int, limit: int) -> None:
    """Refuse more instances than Airflow maps (``limit``: its ``[core] max_map_length``), saying how to fix it."""
    if count > limit:
        raise ConfigError([
            f"{stage}: {count} mapped tasks exceed Airflow's [core] max_map_length = {limit}. Raise it "
            f"(AIRFLOW__CORE__MAX_MAP_LENGTH={count}, on the scheduler and API server) or group the work into "
            "fewer, larger tasks (lower node_array_size; for download_images, fewer parquet_subpartitions)."])


def plan_run(spec: DagSpec, params: dict[str, Any], limit: int,
             connection_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``plan`` task's result: ``{stage: [kwargs, …], "overrides": [...], "stages": [...]}``; at most
    ``limit`` instances per stage (Airflow's ``[core] max_map_length``). ``connection_options``: storage
    options from the deployment (:func:`config.load_config`), used to read URLs, never returned."""
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
                      and spec.runners.get("precache_encodings", "local") != "kubernetes",
                      connection_options=connection_options)
    result: dict[str, Any] = {"overrides": overrides, "stages": list(selected)}
    for stage in spec.stages:
        result[stage] = []
        if stage not in selected:
            continue
        if stage == "download_images" and "download_parquet" in spec.stages:
            continue  # planned by plan_download_images, from the parts download_parquet produced
        stage_plan = plan_stage(cfg, stage)
        ids, task_count = stage_plan.task_ids or [], stage_plan.task_count or 0
        if stage == "precache_encodings":
            chosen = parse_task_ids(params.get("precache_task_ids"), task_count)
            if chosen is not None:
                ids = chosen
        check_fan_out(stage, len(ids), limit)
        result[stage] = [task_ids.instance_kwargs(spec.runners[stage], stage, str(spec.config_path), overrides,
                                                  t, task_count) for t in ids]
        log.info("plan: %s runs tasks %s of %d", stage, task_ids.compact_ranges(ids) or "none", task_count)
    return result


def plan_download_images(spec: DagSpec, overrides: list[str], selected: list[str], limit: int,
                         connection_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """download_images' instances: one per parquet part present now (after download_parquet)."""
    if "download_images" not in selected:
        return []
    from .stages.download_images import input_parts  # the stage says which inputs are its tasks'

    cfg = load_config(spec.config_path, overrides, load_precache=False, connection_options=connection_options)
    block = cfg.download_images
    parts = input_parts(cfg)
    if not parts:
        raise ConfigError([f"download_images.input_dir: no parquet part matching {block.parquet_pattern!r} "
                           f"in {block.input_dir}"])
    check_fan_out("download_images", len(parts), limit)
    return [task_ids.instance_kwargs(spec.runners["download_images"], "download_images", str(spec.config_path),
                                     overrides, i, len(parts)) for i in range(len(parts))]
