"""Stage task ids as text and as mapped-instance arguments: written and read here, nowhere else.

A stage runs as tasks ``0..task_count-1``. Three texts name some of them: a NeMo ``node_array_size`` range
(``"50-99"``), the ``precache_task_ids`` Param (``7`` or ``"50-99"``) and ``mmprep clear --task-ids``
(``"50-99,120"``, what :func:`compact_ranges` writes). One mapped Airflow instance carries its task id
either as operator kwargs (``runner: local``) or as a pod's ``mmprep run`` arguments (``runner:
kubernetes``); :func:`instance_kwargs` writes both forms, :func:`instance_task` reads them back (``mmprep
clear``) and :data:`POD_LABEL_TEMPLATE` reads the pod form in Jinja, where Airflow renders a pod's label.
Nothing here imports Airflow.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

_SPAN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")

TASK_ID_FLAG = "--task-id"
TASK_COUNT_FLAG = "--task-count"


def parse_span(text: str) -> tuple[int, int] | None:
    """``"7"`` → ``(7, 7)``, ``"50-99"`` → ``(50, 99)`` (spaces allowed); ``None`` when not of that form.
    A reversed span (``"9-2"``) is returned as is: each caller words why it is wrong."""
    match = _SPAN.match(text)
    if not match:
        return None
    low = int(match.group(1))
    return low, int(match.group(2)) if match.group(2) is not None else low


def is_range(text: str) -> bool:
    """True for ``"A-B"`` (a NeMo ``node_array_size`` range), False for a single id or anything else."""
    return "-" in text and parse_span(text) is not None


def parse_id_list(text: str) -> list[int]:
    """``"50-52,99"`` → ``[50, 51, 52, 99]`` (sorted, unique); ``ValueError`` on a bad or reversed piece."""
    wanted: set[int] = set()
    for piece in text.split(","):
        span = parse_span(piece)
        if span is None or span[0] > span[1]:
            raise ValueError(f"expected ids and ranges like 50-99,120, got {text!r}")
        wanted.update(range(span[0], span[1] + 1))
    return sorted(wanted)


def select(value: Any, task_count: int) -> list[int] | None:
    """The ``precache_task_ids`` Param: ``None``/"" → ``None`` (all); ``7`` or ``"7"`` → ``[7]``;
    ``"50-99"`` → ``[50..99]``. ``ValueError`` when malformed or outside ``0..task_count-1``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    span = None
    if isinstance(value, int) and not isinstance(value, bool):
        span = (value, value)
    elif isinstance(value, str):
        span = parse_span(value)
    if span is None:
        raise ValueError(f"expected a task id or a range 'A-B', got {value!r}")
    low, high = span
    if low > high or high >= task_count:
        raise ValueError(f"{value!r} selects ids outside 0..{task_count - 1} (this run has {task_count} tasks)")
    return list(range(low, high + 1))


def compact_ranges(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"`` (what :func:`parse_id_list` reads)."""
    runs: list[list[int]] = []
    for task_id in sorted(set(ids)):
        if runs and runs[-1][1] == task_id - 1:
            runs[-1][1] = task_id
        else:
            runs.append([task_id, task_id])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --------------------------------------------------------------------------------------------------------
# One mapped instance: its arguments and its label
# --------------------------------------------------------------------------------------------------------


def run_arguments(stage: str, task_id: int, task_count: int) -> list[str]:
    """``mmprep run``'s flags for one task (the CLI's own flag names)."""
    return ["--stage", stage, TASK_ID_FLAG, str(task_id), TASK_COUNT_FLAG, str(task_count)]


def instance_kwargs(runner: str, stage: str, config_path: str, overrides: list[str], task_id: int,
                    task_count: int) -> dict[str, Any]:
    """Arguments of one mapped instance: operator kwargs (local) or the pod's ``mmprep`` arguments."""
    if runner == "kubernetes":
        return {"arguments": ["run", config_path, *overrides, *run_arguments(stage, task_id, task_count)]}
    return {"stage_task_id": task_id, "stage_task_count": task_count, "overrides": list(overrides)}


def instance_task(kwargs: dict[str, Any]) -> tuple[int, int]:
    """``(task_id, task_count)`` of one instance's arguments, either form of :func:`instance_kwargs`."""
    if "stage_task_id" in kwargs:
        return int(kwargs["stage_task_id"]), int(kwargs["stage_task_count"])
    arguments = list(kwargs.get("arguments") or [])
    return (int(arguments[arguments.index(TASK_ID_FLAG) + 1]),
            int(arguments[arguments.index(TASK_COUNT_FLAG) + 1]))


def task_label(task_id: int, task_count: int) -> str:
    """How a mapped instance is labelled in the UI: ``task 67/100``."""
    return f"task {int(task_id)}/{int(task_count)}"


def part_label(task_id: int) -> str:
    """download_images' label in the worker: the parquet part it downloads, ``part-00003``."""
    return f"part-{int(task_id):05d}"


#: A pod's ``map_index_template``: :func:`task_label` of the arguments :func:`instance_kwargs` wrote, read
#: in Jinja (Airflow renders it with the operator as ``task``); empty when the flags are absent.
POD_LABEL_TEMPLATE = (
    "{% set a = task.arguments %}"
    f"{{% if '{TASK_ID_FLAG}' in a %}}task {{{{ a[a.index('{TASK_ID_FLAG}') + 1] }}}}/"
    f"{{{{ a[a.index('{TASK_COUNT_FLAG}') + 1] }}}}{{% endif %}}")
