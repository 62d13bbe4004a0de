"""The stage core: one plain-Python module per NeMo sub-stage, no Airflow.

Every stage module exposes::

    def run_task(cfg: PipelineConfig, task_id: int, task_count: int) -> dict[str, Any]

which does task ``task_id`` of ``task_count`` (outputs depend only on the config and the task id, written
atomically, a rerun skips finished work) and returns a JSON-able summary. How many tasks a stage has is the
plan's business (:mod:`airflow_provider_mmprep.plan`). The CLI, the Airflow operators and the Kubernetes
pods all call :func:`run_stage_task`.

Each stage module also owns its on-disk layout and answers the questions others ask of it (the run report,
the plan, the resume commands), so nothing else globs its folders or spells its file names::

    def task_inputs(cfg, task_id, task_count) -> list[Path]       # where tasks split inputs
    def expected_outputs(cfg, task_id, task_count) -> list[Path]  # what the task leaves when done
    def incomplete_tasks(cfg, task_count) -> dict[int, str]       # task id -> why it has work left

plus readers of what is there (``finished_outputs``, ``task_shards``, ``check_output`` ...). The code that
decides what a task writes is the code that answers which tasks are incomplete.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any, Callable

from ..configbase import STAGE_NAMES
from ..storage import StorageError

if TYPE_CHECKING:  # a task run from a resolved config never imports the config layer (pydantic)
    from ..config import PipelineConfig

log = logging.getLogger(__name__)


class StageError(Exception):
    """An expected failure of a task (bad input, remote error) with a message meant for the user."""


def get_stage_runner(name: str) -> Callable[[PipelineConfig, int, int], dict[str, Any]]:
    if name not in STAGE_NAMES:
        raise StageError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            raise StageError(f"stage {name!r} is not available in this version of mmprep") from None
        raise
    return module.run_task


def run_stage_task(cfg: PipelineConfig, name: str, task_id: int, task_count: int) -> dict[str, Any]:
    """Run one task of one stage; the single entry point every runner uses."""
    if not 0 <= task_id < task_count:
        raise StageError(f"{name}: task id {task_id} is outside 0..{task_count - 1}")
    cfg.stage(name)  # raises if the stage is disabled
    log.info("%s: task %d/%d starting", name, task_id, task_count)
    from .. import tario

    tario.set_storage_options(cfg.storage_options)  # URL paths in the tar helpers use the pipeline's options
    try:
        summary = get_stage_runner(name)(cfg, task_id, task_count)
    except StorageError as exc:  # credentials, bucket, endpoint: the user's to fix, one line naming the URL
        raise StageError(f"{name}: {exc}") from None
    log.info("%s: task %d/%d done: %s", name, task_id, task_count, summary)
    return summary
