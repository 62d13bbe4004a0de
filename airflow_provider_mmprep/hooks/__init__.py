"""The ``mmprep_hf`` hook under its public import path; defined in :mod:`airflow_provider_mmprep.airflow.hooks`."""
