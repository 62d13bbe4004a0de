"""Connections the stages use, kept in Airflow's secrets store instead of the pipeline YAML.

- :class:`HuggingFaceHubHook`: the hub token (and optionally endpoint) download_parquet uses. Tasks that run
  in the worker get it as ``HF_TOKEN``/``HF_ENDPOINT`` environment variables for the duration of the task;
  pods get it as a Kubernetes secret reference (the token never passes through the pod spec).
- :class:`ObjectStorageHook`: the credentials of a dataset in object storage (``s3://…``), from an ``aws``
  connection (or any other, generically), turned into fsspec ``storage_options`` that the worker's tasks
  hand to the stage core in memory (``load_config(connection_options=…)``): never in the YAML, the plan,
  XCom or logs. Pods get credentials from ``[mmprep] storage_secret`` instead.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk import BaseHook

log = logging.getLogger(__name__)


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


#: ``aws`` connection extras with an s3fs equivalent: extra key → (s3fs option, key under it or None)
_AWS_EXTRAS = {"endpoint_url": ("endpoint_url", None), "region_name": ("client_kwargs", "region_name"),
               "aws_session_token": ("token", None), "profile_name": ("profile", None),
               "verify": ("client_kwargs", "verify"), "config_kwargs": ("config_kwargs", None)}


class ObjectStorageHook(BaseHook):
    """fsspec ``storage_options`` from an Airflow connection (``[mmprep] storage_conn_id`` or the YAML's
    ``storage_conn_id``).

    * ``aws`` (the Amazon provider's type; the provider itself is not needed): login = access key id,
      password = secret access key (both optional: empty means the worker's own AWS environment or role);
      extra ``endpoint_url`` (or ``service_config.s3.endpoint_url``) for S3-compatible stores (MinIO, Ceph,
      SeaweedFS), ``region_name``, ``aws_session_token``, ``profile_name``, ``verify``, ``config_kwargs``.
    * any other type: the extra (a JSON object) is the fsspec options as they are; login/password, when
      set, become ``key``/``secret`` and the host (with its port) ``endpoint_url``, s3fs's names.
    """

    conn_name_attr = "storage_conn_id"
    default_conn_name = "aws_default"
    hook_name = "Object storage (mmprep)"

    def __init__(self, storage_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage_conn_id = storage_conn_id

    def storage_options(self) -> dict[str, Any]:
        """The connection as fsspec options (secrets included: hand them on in memory, never print them)."""
        from airflow.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.storage_conn_id)
        except AirflowNotFoundException:
            raise ValueError(f"storage_conn_id {self.storage_conn_id!r}: no such Airflow connection (create it, "
                             f"e.g. as AIRFLOW_CONN_{self.storage_conn_id.upper()}; or unset storage_conn_id to "
                             "use the storage client's environment)") from None
        extra = _extra(conn.extra, self.storage_conn_id)
        options: dict[str, Any] = {}
        if conn.login:
            options["key"] = conn.login
        if conn.password:
            options["secret"] = conn.password
        if (conn.conn_type or "").lower() in ("aws", "s3"):
            service_config = extra.get("service_config")
            s3_config = service_config.get("s3") if isinstance(service_config, dict) else None
            if isinstance(s3_config, dict) and s3_config.get("endpoint_url") and not extra.get("endpoint_url"):
                extra["endpoint_url"] = s3_config["endpoint_url"]
            unused = sorted(set(extra) - set(_AWS_EXTRAS) - {"service_config"})
            if unused:
                log.warning("storage connection %s: extra keys without an s3fs equivalent, not used: %s",
                            self.storage_conn_id, ", ".join(unused))
            for name, (option, sub) in _AWS_EXTRAS.items():
                if extra.get(name) in (None, ""):
                    continue
                if sub is None:
                    options[option] = extra[name]
                else:
                    options.setdefault(option, {})[sub] = extra[name]
            return options
        if conn.host:
            host = conn.host if "://" in conn.host else f"https://{conn.host}"
            options["endpoint_url"] = host.rstrip("/") + (f":{conn.port}" if conn.port else "")
        return {**options, **extra}


def _extra(raw: Any, conn_id: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError):
        raise ValueError(f"storage_conn_id {conn_id!r}: the connection's extra is not a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError(f"storage_conn_id {conn_id!r}: the connection's extra is not a JSON object")
    return value


def storage_connection_options(conn_id: str | None) -> dict[str, Any] | None:
    """The options of connection ``conn_id``; ``None`` without one (the storage client's environment then)."""
    return ObjectStorageHook(conn_id).storage_options() if conn_id else None
