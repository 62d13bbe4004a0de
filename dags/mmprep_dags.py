"""mmprep DAG loader: one DAG per pipeline YAML (NeMo's download_multimodal.yaml style) in a folder.

Put this file in Airflow's dags folder. It reads ``[mmprep] config_dir`` (``AIRFLOW__MMPREP__CONFIG_DIR``),
by default the folder this file is in. The word "airflow" and "DAG" below make Airflow's safe-mode scan
parse this file.
"""

from pathlib import Path

from airflow_provider_mmprep.airflow.dag import load_dags
from airflow_provider_mmprep.airflow.settings import config_dir

load_dags(config_dir() or Path(__file__).parent, globals())
