"""airflow-provider-mmprep: NeMo's multimodal data preparation as an Airflow provider.

The stage core (config, plan, stages) runs without Airflow; the Airflow layer lives in ``operators/``,
``hooks/`` and the DAG factory, and is imported only when Airflow loads it. :func:`get_provider_info` is
here (not in a submodule) so Airflow's provider manager can read it without importing Airflow or torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _option(description: str, default: str | None, type_: str = "string",
            example: str | None = None) -> dict[str, Any]:
    # Airflow str.format()s defaults with its own variables: braces of JSON defaults must be doubled.
    escaped = default.replace("{", "{{").replace("}", "}}") if default else default
    return {"description": description, "version_added": None, "type": type_, "example": example,
            "default": escaped}


def option_default(name: str) -> str:
    """The unescaped default of a ``[mmprep]`` option."""
    default = MMPREP_CONFIG_OPTIONS[name]["default"] or ""
    return default.replace("{{", "{").replace("}}", "}")


#: The ``[mmprep]`` section: cluster-level defaults, so a pipeline YAML says *what* to prepare and the
#: deployment says *where* pods run. Every option is also an ``AIRFLOW__MMPREP__<NAME>`` variable.
MMPREP_CONFIG_OPTIONS: dict[str, dict[str, Any]] = {
    "config_dir": _option("Folder the DAG loader scans for pipeline YAMLs (one DAG per file). Empty: the "
                          "folder of the loader file itself.", ""),
    "worker_image": _option("Image of the pods KubernetesPodOperator starts (has mmprep and the precache "
                            "extra installed).", "mmprep-worker:0.1.0"),
    "namespace": _option("Namespace the pods run in.", "default"),
    "service_account_name": _option("Service account of the pods (empty: the namespace default).", ""),
    "in_cluster": _option("Airflow runs inside the cluster it starts pods in.", "True", "boolean"),
    "kube_config_file": _option("kubeconfig path when in_cluster is false (empty: ~/.kube/config).", ""),
    "kubernetes_conn_id": _option("Kubernetes connection id; empty: use in_cluster / kube_config_file.", ""),
    "pvc_claim_name": _option("PersistentVolumeClaim holding the dataset; mounted in every pod.",
                              "mmprep-dataset"),
    "pvc_mount_path": _option("Where the claim is mounted: the same path Airflow's workers see, so the YAML's "
                              "paths mean the same in pods.", "/data/mmprep"),
    "config_map_name": _option("ConfigMap with the pipeline YAMLs, mounted in pods so `mmprep run` reads the "
                               "same file (empty: do not mount).", ""),
    "config_mount_path": _option("Where that ConfigMap is mounted in pods (same path as in Airflow).",
                                 "/opt/airflow/dags/mmprep"),
    "gpu_resource_name": _option("Extended resource name of a GPU.", "nvidia.com/gpu"),
    "gpu_count": _option("GPUs per precache pod.", "1", "integer"),
    "gpu_pool": _option("Airflow pool capping concurrent GPU pods (create it first: tasks in a pool that does "
                        "not exist are never run; empty: default_pool).", "", "string", "mmprep_gpu"),
    "gpu_pool_slots": _option("Documentation only: the size the chart suggests for gpu_pool.", "8", "integer"),
    "node_selector": _option("JSON object: node selector of GPU pods.", "{}", "string",
                             '{"nvidia.com/gpu.present": "true"}'),
    "tolerations": _option("JSON list of tolerations of GPU pods.",
                           '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]'),
    "worker_resources": _option("JSON object: CPU/memory requests and limits of pods, "
                                'e.g. {"requests": {"cpu": "8", "memory": "32Gi"}}.', "{}"),
    "hf_conn_id": _option("Connection id of the Hugging Face hub connection (type mmprep_hf).", "hf_default"),
    "hf_token_secret": _option("Kubernetes secret holding the hub token for pods, as NAME or NAME:KEY "
                               "(key default: token). Empty: pods get no token.", ""),
    "retries": _option("Retries per mapped task instance.", "2", "integer"),
    "retry_delay_seconds": _option("First retry delay; doubles each retry (exponential backoff).", "60",
                                   "integer"),
    "deferrable": _option("Run KubernetesPodOperator deferrable (needs a triggerer).", "False", "boolean"),
}


def get_provider_info() -> dict[str, Any]:
    """What ``apache_airflow_provider`` entry point consumers (``airflow providers list``) read."""
    return {
        "package-name": "airflow-provider-mmprep",
        "name": "mmprep",
        "description": "Prepare image-text datasets for text-to-image training (NeMo multimodal data prep: "
                       "download_parquet, download_images, reorganize_tar, precache_encodings, "
                       "generate_wdinfo) as Airflow DAGs.",
        "versions": [__version__],
        "connection-types": [{"connection-type": "mmprep_hf",
                              "hook-class-name": "airflow_provider_mmprep.hooks.hf.HuggingFaceHubHook"}],
        "hook-class-names": ["airflow_provider_mmprep.hooks.hf.HuggingFaceHubHook"],
        "operators": [{"integration-name": "mmprep",
                       "python-modules": ["airflow_provider_mmprep.operators.stages"]}],
        "hooks": [{"integration-name": "mmprep", "python-modules": ["airflow_provider_mmprep.hooks.hf"]}],
        "config": {"mmprep": {"description": "Cluster-level defaults of airflow-provider-mmprep.",
                              "options": MMPREP_CONFIG_OPTIONS}},
    }
