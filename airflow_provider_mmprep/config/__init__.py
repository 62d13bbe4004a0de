"""The pipeline YAML: :mod:`.models` says which keys there are, :mod:`.loader` reads a file into them.

Everything is importable from here (``from airflow_provider_mmprep.config import load_config``). Airflow's
own ``[mmprep]`` settings are read on the Airflow side, in :mod:`airflow_provider_mmprep.airflow.settings`.
Nothing here imports Airflow.
"""

from .loader import (BUNDLED_LAUNCHER_SCRIPTS_PATH, ConfigError, download_option_problems, format_pydantic_error,
                     load_config, load_precache_config, load_raw, model_path_problems, precache_unknown_keys,
                     stage_key)
from .models import (RANGE_DEFAULT_TASK_COUNT, STAGE_MODELS, STAGE_NAMES, ComputeDtype, DownloadImagesConfig,
                     DownloadParquetConfig, EncoderConfig, EncodingSpec, GenerateWdinfoConfig, PipelineConfig,
                     PrecacheConfig, PrecacheEncodingsConfig, ReorganizeTarConfig, RunConfig, Runner,
                     TaskSelection, resolve_task_selection)

__all__ = ["BUNDLED_LAUNCHER_SCRIPTS_PATH", "ConfigError", "download_option_problems", "format_pydantic_error",
           "load_config", "load_precache_config", "load_raw", "model_path_problems", "precache_unknown_keys",
           "stage_key", "RANGE_DEFAULT_TASK_COUNT", "STAGE_MODELS", "STAGE_NAMES", "ComputeDtype",
           "DownloadImagesConfig", "DownloadParquetConfig", "EncoderConfig", "EncodingSpec",
           "GenerateWdinfoConfig", "PipelineConfig", "PrecacheConfig", "PrecacheEncodingsConfig",
           "ReorganizeTarConfig", "RunConfig", "Runner", "TaskSelection", "resolve_task_selection"]
