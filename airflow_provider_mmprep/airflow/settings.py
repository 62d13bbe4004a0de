"""The ``[mmprep]`` Airflow config section: its options, and :class:`ClusterDefaults` read from them.

The options are declared here (``get_provider_info`` hands them to Airflow, which then knows their
defaults and lists them in ``airflow config list``) and read with Airflow's own typed getters, once per DAG
parse. They are cluster-level defaults, so a pipeline YAML says *what* to prepare and the deployment says
*where* pods run. Every option is also an ``AIRFLOW__MMPREP__<NAME>`` variable (the chart's ConfigMap).
Airflow is imported only inside the functions that read it: Airflow's own configuration calls
``get_provider_info`` (which takes the options from here) while it starts, before ``airflow.configuration``
can be imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SECTION = "mmprep"


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


#: The ``[mmprep]`` options, as ``get_provider_info()["config"]`` declares them.
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
    "storage_secret": _option("Kubernetes secret whose keys become environment variables of every pod, for "
                              "datasets in object storage (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                              "AWS_ENDPOINT_URL). Empty: pods get none.", "", "string", "mmprep-s3"),
    "storage_conn_id": _option("Airflow connection (type aws, or any other whose extra holds fsspec options) "
                               "whose credentials become the storage_options of tasks run in Airflow's workers, for "
                               "datasets in object storage; a pipeline YAML's storage_conn_id wins. Empty: the "
                               "storage client's environment of the worker.", "", "string", "mmprep_s3"),
    "retries": _option("Retries per mapped task instance.", "2", "integer"),
    "retry_delay_seconds": _option("First retry delay; doubles each retry (exponential backoff).", "60",
                                   "integer"),
    "deferrable": _option("Run KubernetesPodOperator deferrable (needs a triggerer).", "False", "boolean"),
}


@dataclass
class ClusterDefaults:
    """``[mmprep]`` as the DAG builder and the pods use it (see :data:`MMPREP_CONFIG_OPTIONS`)."""

    worker_image: str
    namespace: str
    service_account_name: str
    in_cluster: bool
    kube_config_file: str
    kubernetes_conn_id: str
    pvc_claim_name: str
    pvc_mount_path: str
    config_map_name: str
    config_mount_path: str
    gpu_resource_name: str
    gpu_count: int
    gpu_pool: str
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    worker_resources: dict[str, Any] = field(default_factory=dict)
    hf_conn_id: str = "hf_default"
    hf_token_secret: str = ""
    storage_secret: str = ""
    storage_conn_id: str = ""
    retries: int = 2
    retry_delay_seconds: int = 60
    deferrable: bool = False

    @classmethod
    def from_airflow_config(cls) -> "ClusterDefaults":
        """Read ``[mmprep]`` through Airflow's ``conf`` (airflow.cfg, then ``AIRFLOW__MMPREP__*``, then the
        declared default). Strings may be empty (no volume, no service account, no token); a JSON option
        set empty means none (``{}``/``[]``)."""
        from airflow.configuration import conf

        def text(name: str) -> str:
            return conf.get(SECTION, name, fallback=option_default(name)) or ""

        def flag(name: str) -> bool:
            return conf.getboolean(SECTION, name, fallback=option_default(name))

        def number(name: str) -> int:
            return conf.getint(SECTION, name, fallback=option_default(name))

        def json_value(name: str, kind: type) -> Any:
            value = conf.getjson(SECTION, name, fallback=None)
            if value is None:  # set empty: none; not set where Airflow does not know the provider: the default
                value = kind() if conf.has_option(SECTION, name) else json.loads(option_default(name))
            if not isinstance(value, kind):
                raise ValueError(f"[{SECTION}] {name}: expected a JSON {kind.__name__}, got {value!r}")
            return value

        return cls(
            worker_image=text("worker_image"), namespace=text("namespace") or "default",
            service_account_name=text("service_account_name"), in_cluster=flag("in_cluster"),
            kube_config_file=text("kube_config_file"), kubernetes_conn_id=text("kubernetes_conn_id"),
            pvc_claim_name=text("pvc_claim_name"), pvc_mount_path=text("pvc_mount_path"),
            config_map_name=text("config_map_name"), config_mount_path=text("config_mount_path"),
            gpu_resource_name=text("gpu_resource_name") or "nvidia.com/gpu", gpu_count=number("gpu_count"),
            gpu_pool=text("gpu_pool"), node_selector=json_value("node_selector", dict),
            tolerations=json_value("tolerations", list), worker_resources=json_value("worker_resources", dict),
            hf_conn_id=text("hf_conn_id") or "hf_default", hf_token_secret=text("hf_token_secret"),
            storage_secret=text("storage_secret"), storage_conn_id=text("storage_conn_id"),
            retries=number("retries"), retry_delay_seconds=number("retry_delay_seconds"),
            deferrable=flag("deferrable"))


def max_map_length() -> int:
    """Airflow's ``[core] max_map_length``: the most instances one mapped task may have (read at plan time)."""
    from airflow.configuration import conf

    return conf.getint("core", "max_map_length", fallback=1024)


def config_dir() -> str:
    """``[mmprep] config_dir``: the folder the DAG loader scans for pipeline YAMLs (empty: the loader's own)."""
    from airflow.configuration import conf

    return conf.get(SECTION, "config_dir", fallback="") or ""
