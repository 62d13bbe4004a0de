"""One operator per stage, each a thin shell over :func:`stages.run_stage_task`.

Every operator runs task ``stage_task_id`` of ``stage_task_count`` of its stage with the pipeline YAML at
``config_path`` plus dotlist ``overrides`` (both templated), exactly what ``mmprep run`` and the pods do,
so the same task gives the same output whichever runner ran it. With ``storage_conn_id`` (``[mmprep]
storage_conn_id`` or the YAML's), the connection's object-storage credentials reach the stage as storage
options in memory (:class:`.hooks.ObjectStorageHook`). Mapped instances label themselves
(``part-00003`` for download_images, ``task 67/100`` otherwise) through the ``mmprep_label`` context key
that the DAG's ``map_index_template`` reads.

Per-instance cost matters at a 1,024-way fan-out, so an instance makes no execution-API call a plain mapped
``@task`` does not: the stage summary goes to the task log, not to XCom (nothing reads it; ``do_xcom_push``
is off unless asked for), and the label rides on the task's final state update instead of a call of its own
(``benchmarks/bench_fanout.py`` measures both).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Sequence

from airflow.sdk import BaseOperator

from ..config import PipelineConfig, load_config
from ..stages import run_stage_task
from ..task_ids import part_label, task_label

MAP_INDEX_TEMPLATE = "{{ mmprep_label | default('') }}"


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _carry_label(context: Any, label: str) -> None:
    """Set the mapped instance's label on the task instance before it runs, so that the map_index_template,
    rendered again after execute, finds it unchanged: the task runner then sends no separate
    set-rendered-map-index call and the label reaches the API server with the success (or failure) update,
    which carries ``rendered_map_index``. Where the runtime has no such attribute, the template alone still
    sets the label (one call more)."""
    ti = context.get("ti")
    map_index = getattr(ti, "map_index", None)
    if isinstance(map_index, int) and map_index >= 0 and hasattr(ti, "rendered_map_index"):
        ti.rendered_map_index = label


class MmprepStageOperator(BaseOperator):
    """Run one task of one stage in the Airflow worker (``runner: local``)."""

    stage_name: ClassVar[str] = ""
    template_fields: Sequence[str] = ("config_path", "overrides", "stage_task_id", "stage_task_count")
    ui_color = "#e8f1fb"

    def __init__(self, *, config_path: str, overrides: Sequence[str] = (), stage_task_id: int = 0,
                 stage_task_count: int = 1, hf_conn_id: str | None = None, storage_conn_id: str | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("do_xcom_push", False)
        super().__init__(**kwargs)
        self.config_path = config_path
        self.overrides = list(overrides)
        self.stage_task_id = stage_task_id
        self.stage_task_count = stage_task_count
        self.hf_conn_id = hf_conn_id
        self.storage_conn_id = storage_conn_id

    def label(self, cfg: PipelineConfig) -> str:
        return task_label(self.stage_task_id, self.stage_task_count)

    def task_env(self) -> dict[str, str]:
        return {}

    def execute(self, context: Any) -> dict[str, Any]:
        from .hooks import storage_connection_options

        # the precache YAML only matters to precache: a download task must not fail on it (found live);
        # object-storage credentials from the Airflow connection (one connection fetch, only where one is
        # named), handed to the stage in memory only
        cfg = load_config(self.config_path, list(self.overrides), stages=[self.stage_name],
                          load_precache=self.stage_name == "precache_encodings",
                          connection_options=storage_connection_options(self.storage_conn_id))
        label = context["mmprep_label"] = self.label(cfg)
        _carry_label(context, label)
        with _env(self.task_env()):
            summary = run_stage_task(cfg, self.stage_name, int(self.stage_task_id), int(self.stage_task_count))
        self.after_run(cfg, summary, context)
        return summary

    def after_run(self, cfg: PipelineConfig, summary: dict[str, Any], context: Any) -> None:
        """Hook for stage-specific bookkeeping (asset event extras)."""


class DownloadParquetOperator(MmprepStageOperator):
    """Fetch the dataset's parquet files; the hub token comes from the ``mmprep_hf`` connection."""

    stage_name = "download_parquet"

    def task_env(self) -> dict[str, str]:
        from .hooks import HuggingFaceHubHook

        # an existing connection is explicit configuration: it wins over ambient HF_* variables
        return HuggingFaceHubHook(self.hf_conn_id or HuggingFaceHubHook.default_conn_name).get_env()


class DownloadImagesOperator(MmprepStageOperator):
    stage_name = "download_images"

    def label(self, cfg: PipelineConfig) -> str:
        return part_label(self.stage_task_id)


class ReorganizeTarOperator(MmprepStageOperator):
    stage_name = "reorganize_tar"


class PrecacheEncodingsOperator(MmprepStageOperator):
    stage_name = "precache_encodings"


class GenerateWdinfoOperator(MmprepStageOperator):
    """Write wdinfo.pkl; the wdinfo Asset (this task's outlet) gets the real path in its event extra."""

    stage_name = "generate_wdinfo"

    def label(self, cfg: PipelineConfig) -> str:
        return str(cfg.generate_wdinfo.output_wdinfo_path)

    def after_run(self, cfg: PipelineConfig, summary: dict[str, Any], context: Any) -> None:
        events = context.get("outlet_events")
        for outlet in self.outlets or []:
            if events is not None:
                events[outlet].extra = {"wdinfo_path": str(cfg.generate_wdinfo.output_wdinfo_path),
                                        **{k: v for k, v in summary.items()
                                           if isinstance(v, (int, float, str))}}


OPERATORS: dict[str, type[MmprepStageOperator]] = {
    op.stage_name: op for op in (DownloadParquetOperator, DownloadImagesOperator, ReorganizeTarOperator,
                                 PrecacheEncodingsOperator, GenerateWdinfoOperator)}
