"""``airflow_provider_mmprep.operators.stages``, kept for DAG files that import the operators from here."""

from ..airflow.operators import (OPERATORS, DownloadImagesOperator, DownloadParquetOperator,  # noqa: F401
                                 GenerateWdinfoOperator, MmprepStageOperator, PrecacheEncodingsOperator,
                                 ReorganizeTarOperator)
