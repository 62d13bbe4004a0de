"""A private Airflow home with a migrated SQLite DB, set up once per process before ``import airflow``.

Airflow reads ``AIRFLOW_HOME`` and friends when it is first imported, so test modules call
:func:`airflow_home` at import time, before any ``from airflow ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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
