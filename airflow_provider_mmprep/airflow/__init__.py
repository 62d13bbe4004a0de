"""Where Airflow begins: every module of the provider that imports Airflow lives in this package.

- :mod:`.dag`: one ``airflow.sdk.DAG`` per pipeline YAML (what ``dags/mmprep_dags.py`` calls), built from
  the Airflow-free :mod:`airflow_provider_mmprep.task_mapping`;
- :mod:`.operators`: one operator per stage (``runner: local``), thin over ``stages.run_stage_task``;
- :mod:`.pods`: KubernetesPodOperator arguments for ``runner: kubernetes``;
- :mod:`.hooks`: the ``mmprep_hf`` Hugging Face hub connection, and object-storage credentials from an
  ``aws`` (or generic) connection as fsspec storage options;
- :mod:`.settings`: the ``[mmprep]`` config section (its options and how they are read).

Absolute imports (``from airflow.sdk import DAG``) still reach Airflow itself: a package's own
submodule named ``airflow`` is only ever ``airflow_provider_mmprep.airflow`` (tests/test_layering.py checks).
The stage core (config, plan, stages, CLI) never imports this package.
"""
