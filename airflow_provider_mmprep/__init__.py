"""airflow-provider-mmprep: NeMo's multimodal data preparation as an Airflow provider.

The stage core (config, plan, stages, CLI) runs without Airflow; everything that imports Airflow lives in
the ``airflow/`` subpackage and is imported only when Airflow loads it (``operators`` and ``hooks`` here
re-export its operators and hook under their public names). :func:`get_provider_info` is here (not in a
submodule) so Airflow's provider manager can read it without importing Airflow or torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    """What ``apache_airflow_provider`` entry point consumers (``airflow providers list``) read."""
    from .airflow.settings import MMPREP_CONFIG_OPTIONS  # no Airflow import: Airflow calls this at start-up

    return {
        "package-name": "airflow-provider-mmprep",
        "name": "mmprep",
        "description": "Prepare image-text datasets for text-to-image training (NeMo multimodal data prep: "
                       "download_parquet, download_images, reorganize_tar, precache_encodings, "
                       "generate_wdinfo) as Airflow DAGs.",
        "versions": [__version__],
        "connection-types": [{"connection-type": "mmprep_hf",
                              "hook-class-name": "airflow_provider_mmprep.airflow.hooks.HuggingFaceHubHook"}],
        "hook-class-names": ["airflow_provider_mmprep.airflow.hooks.HuggingFaceHubHook"],
        "operators": [{"integration-name": "mmprep",
                       "python-modules": ["airflow_provider_mmprep.airflow.operators"]}],
        "hooks": [{"integration-name": "mmprep", "python-modules": ["airflow_provider_mmprep.airflow.hooks"]}],
        "config": {"mmprep": {"description": "Cluster-level defaults of airflow-provider-mmprep.",
                              "options": MMPREP_CONFIG_OPTIONS}},
    }
