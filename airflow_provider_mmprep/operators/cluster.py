"""The ``[mmprep]`` section read once per DAG parse: where pods run, how many GPUs, which volume."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .. import option_default


def _get(name: str) -> str:
    from airflow.configuration import conf

    return conf.get("mmprep", name, fallback=option_default(name)) or ""


def _json(name: str, kind: type) -> Any:
    raw = _get(name).strip() or ("{}" if kind is dict else "[]")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"[mmprep] {name}: not valid JSON ({exc}): {raw!r}") from None
    if not isinstance(value, kind):
        raise ValueError(f"[mmprep] {name}: expected a JSON {kind.__name__}, got {raw!r}")
    return value


@dataclass
class ClusterDefaults:
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
    retries: int = 2
    retry_delay_seconds: int = 60
    deferrable: bool = False

    @classmethod
    def from_airflow_config(cls) -> "ClusterDefaults":
        def flag(name: str) -> bool:
            return _get(name).strip().lower() in ("true", "1", "yes", "on")

        return cls(
            worker_image=_get("worker_image"), namespace=_get("namespace") or "default",
            service_account_name=_get("service_account_name"), in_cluster=flag("in_cluster"),
            kube_config_file=_get("kube_config_file"), kubernetes_conn_id=_get("kubernetes_conn_id"),
            pvc_claim_name=_get("pvc_claim_name"), pvc_mount_path=_get("pvc_mount_path"),
            config_map_name=_get("config_map_name"), config_mount_path=_get("config_mount_path"),
            gpu_resource_name=_get("gpu_resource_name") or "nvidia.com/gpu",
            gpu_count=int(_get("gpu_count") or 0), gpu_pool=_get("gpu_pool"),
            node_selector=_json("node_selector", dict), tolerations=_json("tolerations", list),
            worker_resources=_json("worker_resources", dict), hf_conn_id=_get("hf_conn_id") or "hf_default",
            hf_token_secret=_get("hf_token_secret"), retries=int(_get("retries") or 0),
            retry_delay_seconds=int(_get("retry_delay_seconds") or 60), deferrable=flag("deferrable"))
