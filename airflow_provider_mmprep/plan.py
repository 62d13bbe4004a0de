"""The neutral plan: which stages run, in what order, over which folders and task ids.

It is built from a validated config plus what is on disk now; the CLI prints it and the Airflow layer
renders it (one task per stage, mapped over ``task_ids``). Fan-out follows the real data: download_images
has one task per parquet part present, known only once download_parquet has run.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .task_ids import compact_ranges


@dataclass
class StagePlan:
    name: str
    input: str | None
    output: str | None
    runner: str
    task_count: int | None  # None: depends on files an earlier stage has not produced yet
    task_ids: list[int] | None
    waits_for: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe_tasks(self) -> str:
        if self.task_ids is None:
            return f"after {self.waits_for}"
        if len(self.task_ids) == self.task_count:
            return f"{self.task_count} task{'s' if self.task_count != 1 else ''}"
        return f"tasks {compact_ranges(self.task_ids)} of {self.task_count}"


@dataclass
class Plan:
    dag_id: str
    stages: list[StagePlan]

    def to_dict(self) -> dict[str, Any]:
        return {"dag_id": self.dag_id, "stages": [asdict(s) for s in self.stages]}


def list_parquet_parts(input_dir: str | Path, pattern: str) -> list[Path]:
    """Parquet parts under ``input_dir`` (recursively, hidden folders skipped) whose path relative to it
    matches ``pattern`` the way huggingface_hub's ``allow_patterns`` does; sorted by relative path."""
    root = Path(input_dir)
    if not root.is_dir():
        return []
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if name.startswith("."):
                continue
            rel = name if rel_folder == "." else f"{rel_folder}/{name}".replace(os.sep, "/")
            if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(name, pattern):
                found.append(rel)
    return [root / rel for rel in sorted(found)]


def plan_stage(cfg: PipelineConfig, name: str) -> StagePlan:
    """Plan one enabled stage against what is on disk now."""
    block = cfg.stage(name)
    upstream = _upstream_of(cfg, name)
    runner = getattr(block, "runner", "local")
    if name == "download_parquet":
        return StagePlan(name, f"hf://datasets/{cfg.dataset_repo_id}", str(block.output_dir), runner, 1, [0])
    if name == "download_images":
        from .stages.download_images import input_parts  # the stage says which inputs are its tasks'

        parts = input_parts(cfg)
        if not parts and upstream == "download_parquet":
            return StagePlan(name, str(block.input_dir), str(block.output_dir), runner, None, None,
                             waits_for="download_parquet")
        return StagePlan(name, str(block.input_dir), str(block.output_dir), runner, len(parts),
                         list(range(len(parts))))
    if name in ("reorganize_tar", "precache_encodings"):
        selection = block.task_selection
        return StagePlan(name, str(block.input_dir), str(block.output_dir), runner, selection.task_count,
                         selection.task_ids)
    if name == "generate_wdinfo":
        return StagePlan(name, str(block.input_dir), str(block.output_wdinfo_path), runner, 1, [0])
    raise KeyError(name)


def build_plan(cfg: PipelineConfig) -> Plan:
    return Plan(dag_id=cfg.run.name, stages=[plan_stage(cfg, name) for name in cfg.enabled_stages])


def _upstream_of(cfg: PipelineConfig, name: str) -> str | None:
    enabled = cfg.enabled_stages
    index = enabled.index(name)
    return enabled[index - 1] if index > 0 else None
