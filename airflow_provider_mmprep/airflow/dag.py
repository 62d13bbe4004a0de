"""One ``airflow.sdk.DAG`` per pipeline YAML, from the Airflow-free :class:`task_mapping.DagSpec` (the converter)."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, get_current_context, get_parsing_context, task, teardown

from ..task_mapping import DagSpec, plan_download_images, plan_run, read_dag_spec
from .hooks import storage_connection_options
from .operators import MAP_INDEX_TEMPLATE, OPERATORS
from .settings import ClusterDefaults, max_map_length

log = logging.getLogger(__name__)


def wdinfo_asset(spec: DagSpec) -> Asset:
    """The Asset a training DAG schedules on, identified by its name alone, ``mmprep.<dag_id>.wdinfo`` (its
    URI is the name), so ``Asset(name=...)`` or ``Asset.ref(name=...)`` in the consumer is the same asset.
    Not the wdinfo path as URI: Params move it per run (the event's extra carries each run's path), and two
    pipelines whose YAMLs default to one output root would claim one URI under two names, which Airflow
    rejects, dropping the producer's events (found on the live services)."""
    return Asset(name=f"mmprep.{spec.dag_id}.wdinfo")


def _params(spec: DagSpec) -> dict[str, Param]:
    """What a UI trigger may set: where data goes and what runs, never encoder classes or paths of code."""
    return {
        "dataset_repo_id": Param(spec.defaults.get("dataset_repo_id"), type=["null", "string"],
                                 description="Hugging Face dataset repo (org/name); empty: the YAML's."),
        "dataset_output_root": Param(spec.defaults.get("dataset_output_root"), type=["null", "string"],
                                     description="Folder for all outputs; empty: the YAML's."),
        "stages": Param(list(spec.stages), type="array", items={"type": "string", "enum": list(spec.stages)},
                        description="Stages to run (others are skipped; their outputs must exist)."),
        "precache_task_ids": Param(None, type=["null", "integer", "string"],
                                   description='precache_encodings task ids to run: one id or "50-99"; '
                                               "empty: all."),
    }


def build_dag(config_path: str | Path, cluster: ClusterDefaults | None = None) -> DAG:
    spec = read_dag_spec(config_path)
    cluster = cluster or ClusterDefaults.from_airflow_config()
    # object-storage credentials of the tasks run here (pods get [mmprep] storage_secret instead); fetched
    # by each task when it runs, never at parse time
    storage_conn_id = spec.storage_conn_id or cluster.storage_conn_id or None
    default_args = {"retries": cluster.retries, "retry_delay": timedelta(seconds=cluster.retry_delay_seconds),
                    "retry_exponential_backoff": True, "max_retry_delay": timedelta(hours=1)}
    with DAG(dag_id=spec.dag_id, schedule=spec.schedule, catchup=False, params=_params(spec),
             default_args=default_args, tags=["mmprep"], render_template_as_native_obj=False,
             doc_md=f"NeMo multimodal data preparation from `{spec.config_path}` (one task per stage, mapped "
                    "over the plan's task ids).") as dag:

        @task(task_id="plan", retries=0)
        def plan() -> dict[str, Any]:
            return plan_run(spec, dict(get_current_context()["params"]), limit=max_map_length(),
                            connection_options=storage_connection_options(storage_conn_id))

        @task(retries=0, trigger_rule="none_failed")
        def stage_tasks(planned: dict[str, Any], stage: str) -> list[dict[str, Any]]:
            """The plan's list for one stage (Airflow maps only over a task's whole return value)."""
            if stage == "download_images" and "download_parquet" in spec.stages:
                return plan_download_images(spec, planned["overrides"], planned["stages"], limit=max_map_length(),
                                            connection_options=storage_connection_options(storage_conn_id))
            return planned[stage]

        planned = plan()
        previous: Any = planned
        for stage in spec.stages:
            instances = stage_tasks.override(task_id=f"plan_{stage}")(planned, stage)
            previous >> instances
            common: dict[str, Any] = {"task_id": stage, "trigger_rule": "none_failed"}
            if stage == "generate_wdinfo":
                common["outlets"] = [wdinfo_asset(spec)]
            if spec.runners[stage] == "kubernetes":
                from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

                from .pods import pod_partial_kwargs

                node = KubernetesPodOperator.partial(**common, **pod_partial_kwargs(stage, cluster, spec.image)
                                                     ).expand_kwargs(instances)
            else:
                extra: dict[str, Any] = {"storage_conn_id": storage_conn_id}
                if stage == "download_parquet":
                    extra["hf_conn_id"] = cluster.hf_conn_id
                node = OPERATORS[stage].partial(**common, config_path=str(spec.config_path),
                                                map_index_template=MAP_INDEX_TEMPLATE, do_xcom_push=False,
                                                **extra
                                                ).expand_kwargs(instances)
            instances >> node
            previous = node

        @teardown
        def report() -> str | None:
            """report.html beside wdinfo.pkl. A teardown runs after the stages whether they failed or not
            (that is when its resume commands matter) and does not decide the run's state."""
            from ..config import load_config
            from ..report import write_report

            context = get_current_context()
            planned = context["ti"].xcom_pull(task_ids="plan")
            if not planned:  # the plan itself failed: its error is the report
                return None
            # only the stages this run selected (the `stages` Param): the others' outputs may live elsewhere,
            # and listing them as missing would send users to redo work this run never owned
            unselected = [f"{stage}.enable=False" for stage in spec.stages if stage not in planned["stages"]]
            cfg = load_config(spec.config_path, [*planned["overrides"], *unselected], load_precache=False,
                              connection_options=storage_connection_options(storage_conn_id))
            return str(write_report(cfg, overrides=planned["overrides"], dag_id=spec.dag_id,
                                    run_id=context["run_id"]))

        previous >> report()
    return dag


def _config_error_dag_id(path: Path) -> str:
    return "mmprep_config_error__" + re.sub(r"[^\w.-]", "_", path.stem)


def config_error_dag(path: Path, error: str) -> DAG:
    """A stand-in for a pipeline YAML that does not build: paused, one task that fails with ``error``.

    Raising in the loader would make Airflow drop every DAG of the folder (one DAG file serves all YAMLs),
    so one broken YAML would hide the others; the stand-in keeps them running and shows the error where the
    YAML's DAG would be (description, docs, the task's log when triggered)."""
    dag_id = _config_error_dag_id(path)
    message = f"{path}: {error}"
    with DAG(dag_id, schedule=None, description=message[:200], doc_md=f"```\n{message}\n```",
             tags=["mmprep", "config-error"], is_paused_upon_creation=True) as dag:
        @task(task_id="config_error")
        def config_error() -> None:
            raise ValueError(message)

        config_error()
    return dag


def _plain_dag_id(head: dict[str, Any], path: Path) -> str | None:
    """The DAG id a YAML will get, when it can be told without building it (None: an interpolated name)."""
    run = head.get("run")
    name = run.get("name") if isinstance(run, dict) else None
    if name is None:
        return path.stem
    return name if isinstance(name, str) and "${" not in name else None


def load_dags(folder: str | Path, namespace: dict[str, Any]) -> dict[str, DAG]:
    """Build a DAG for each ``*.yaml`` in ``folder`` that holds a pipeline (a ``run`` block and stage
    blocks; precache YAMLs and others are skipped) and put it in ``namespace`` (the loader's globals).
    A pipeline YAML that does not build gets :func:`config_error_dag` instead, so the others stay. Where a
    worker parses the file to run one task (Airflow's parsing context names the DAG), only that DAG is built:
    every mapped instance parses the file, so a folder of many pipelines would cost each of them."""
    import yaml

    wanted = get_parsing_context().dag_id  # set where a worker parses the file to run one task
    built: dict[str, DAG] = {}
    for path in sorted(Path(folder).glob("*.y*ml")):
        try:
            head = yaml.safe_load(path.read_text()) or {}
        except Exception as exc:
            log.error("mmprep: %s is not valid YAML, no DAG built: %s", path, exc)
            continue
        if not isinstance(head, dict) or not any(stage in head for stage in OPERATORS):
            continue
        if wanted and _plain_dag_id(head, path) not in (wanted, None) and wanted != _config_error_dag_id(path):
            continue  # a task process of another pipeline: building this DAG would only cost it time
        try:
            dag = build_dag(path)
            if dag.dag_id in built:
                raise ValueError(f"run.name {dag.dag_id!r} is already used by another YAML in {folder}")
        except Exception as exc:  # noqa: BLE001 - any error of one YAML must not take the others down
            log.error("mmprep: %s: no DAG built: %s", path, exc)
            dag = config_error_dag(path, str(exc))
        built[dag.dag_id] = dag
        namespace[f"mmprep_dag_{len(built)}"] = dag
    return built
