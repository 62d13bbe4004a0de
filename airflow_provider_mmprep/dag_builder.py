"""Kept for DAG folders that hold a copy of ``dags/mmprep_dags.py`` from before the Airflow code moved to
:mod:`airflow_provider_mmprep.airflow`: that copy imports ``load_dags`` from here, and an upgrade of the
package must not make every pipeline DAG of the folder vanish."""

from .airflow.dag import build_dag, load_dags  # noqa: F401
