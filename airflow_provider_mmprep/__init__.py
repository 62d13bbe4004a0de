"""airflow-provider-mmprep: NeMo's multimodal data preparation as an Airflow provider.

The stage core (config, plan, stages) runs without Airflow; the Airflow layer lives in ``operators/``,
``hooks/`` and the DAG factory, and is imported only when Airflow loads it.
"""

__version__ = "0.1.0"
