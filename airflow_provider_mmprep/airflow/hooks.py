"""Hugging Face hub connection: the token (and optionally endpoint) download_parquet uses.

The connection keeps the token in Airflow's secrets store instead of the pipeline YAML. Tasks that run in
the worker get it as ``HF_TOKEN``/``HF_ENDPOINT`` environment variables for the duration of the task;
pods get it as a Kubernetes secret reference (the token never passes through the pod spec).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook


class HuggingFaceHubHook(BaseHook):
    """Connection type ``mmprep_hf``: password = token, host = endpoint (empty: the public hub)."""

    conn_name_attr = "hf_conn_id"
    default_conn_name = "hf_default"
    conn_type = "mmprep_hf"
    hook_name = "Hugging Face Hub (mmprep)"

    def __init__(self, hf_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hf_conn_id = hf_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": ["schema", "login", "port", "extra"],
                "relabeling": {"password": "Token", "host": "Endpoint (empty: https://huggingface.co)"}}

    def get_env(self) -> dict[str, str]:
        """``HF_TOKEN``/``HF_ENDPOINT`` from the connection; empty when the connection does not exist, so
        public datasets need no set-up."""
        from airflow.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.hf_conn_id)
        except AirflowNotFoundException:
            return {}
        env = {}
        if conn.password:
            env["HF_TOKEN"] = conn.password
        if conn.host:
            host = conn.host if "://" in conn.host else f"https://{conn.host}"
            env["HF_ENDPOINT"] = host.rstrip("/") + (f":{conn.port}" if conn.port else "")
        return env

    @staticmethod
    def pod_secret(spec: str) -> Any | None:
        """``NAME`` or ``NAME:KEY`` ([mmprep] hf_token_secret) → a secret exposed as ``HF_TOKEN`` in pods."""
        if not spec:
            return None
        from airflow.providers.cncf.kubernetes.secret import Secret

        name, _, key = spec.partition(":")
        return Secret("env", "HF_TOKEN", name, key or "token")
