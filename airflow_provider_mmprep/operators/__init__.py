"""The stage operators under their public import path; defined in :mod:`airflow_provider_mmprep.airflow.operators`."""

from ..airflow.operators import (DownloadImagesOperator, DownloadParquetOperator, GenerateWdinfoOperator,
                                 MmprepStageOperator, PrecacheEncodingsOperator, ReorganizeTarOperator)

__all__ = ["MmprepStageOperator", "DownloadParquetOperator", "DownloadImagesOperator", "ReorganizeTarOperator",
           "PrecacheEncodingsOperator", "GenerateWdinfoOperator"]
