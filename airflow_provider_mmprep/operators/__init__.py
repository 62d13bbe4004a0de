"""Airflow operators of the provider: one per stage, thin over :func:`stages.run_stage_task`."""

from .stages import (DownloadImagesOperator, DownloadParquetOperator, GenerateWdinfoOperator,
                     MmprepStageOperator, PrecacheEncodingsOperator, ReorganizeTarOperator)

__all__ = ["MmprepStageOperator", "DownloadParquetOperator", "DownloadImagesOperator", "ReorganizeTarOperator",
           "PrecacheEncodingsOperator", "GenerateWdinfoOperator"]
