"""A private Airflow home with a migrated SQLite DB, set up once per process before ``import airflow``.

Airflow reads ``AIRFLOW_HOME`` and friends when it is first imported, so test modules call
:func:`airflow_home` at import time, before any ``from airflow ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

_HOME: Path | None = None
_MIGRATED = False
DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"


def airflow_home(dags_folder: Path = DAGS_FOLDER, migrate: bool = True) -> Path:
    global _HOME, _MIGRATED
    if _HOME is None:
        _HOME = _make_home(dags_folder)
    if migrate and not _MIGRATED:
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _MIGRATED = True
    return _HOME


def _make_home(dags_folder: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="mmprep-airflow-"))
    os.environ.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                       "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
                       "AIRFLOW__MMPREP__CONFIG_DIR": str(dags_folder),
                       "AIRFLOW__MMPREP__RETRIES": "0", "AIRFLOW__CORE__UNIT_TEST_MODE": "False"})
    return home


def clear_and_rerun(dag: object, run_id: str, task_ids: list[str | tuple[str, int]]) -> str:
    """Clear chosen (mapped) task instances of an existing DAG run the way Airflow's REST
    ``clearTaskInstances`` does (the run's serialized DAG, ``clear(dry_run=True)`` to select failed
    instances, ``clear_task_instances`` with the run reset to queued), then run what becomes schedulable
    in that same run, in-process, as ``dag.test()`` runs a new one. Returns the run's final state.

    ``dag.test()`` itself cannot resume: it deletes an existing run of the same date and starts over.
    """
    from sqlalchemy import select

    from airflow.models.dagbag import DBDagBag
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import clear_task_instances
    from airflow.sdk.definitions.dag import _run_task  # dag.test()'s own runner (private, pinned 3.3)
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    def the_run(session):  # noqa: ANN001, ANN202
        return session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id))

    with create_session() as session:
        scheduler_dag = DBDagBag().get_dag_for_run(the_run(session), session=session)
        chosen = scheduler_dag.clear(dry_run=True, task_ids=task_ids, run_id=run_id, only_failed=True,
                                     session=session)
        clear_task_instances(chosen, session, DagRunState.QUEUED)
        session.commit()
        run = the_run(session)
        run.dag = scheduler_dag
        run.state = DagRunState.RUNNING  # what the scheduler does with a queued run
        session.commit()
        while run.state == DagRunState.RUNNING:
            session.expire_all()
            schedulable, _ = run.update_state(session=session)
            for ti in schedulable:
                if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                    ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
                ti.scheduled_dttm = datetime.now(timezone.utc)
            session.commit()
            scheduled = [ti for ti in run.get_task_instances(session=session)
                         if ti.state == TaskInstanceState.SCHEDULED]
            if not scheduled and run.state == DagRunState.RUNNING:
                raise RuntimeError(f"run {run_id} is running but nothing can be scheduled")
            for ti in scheduled:
                _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
        return str(run.state)
