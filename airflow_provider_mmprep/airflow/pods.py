"""KubernetesPodOperator settings for stages with ``runner: kubernetes``: one pod per task id.

The pod runs ``mmprep run CONFIG [overrides] --stage S --task-id N --task-count M`` (the arguments come
from the plan task); image, GPUs, node selector, tolerations, service account and the dataset PVC come
from ``[mmprep]`` (the YAML's top-level ``container``, NeMo's image key, wins for the image). The PVC is
mounted at the path Airflow's workers see, so every path in the YAML means the same in the pod. Datasets in
object storage need no PVC: ``[mmprep] storage_secret`` names a secret whose keys become the pods'
environment (the storage client's credentials, read directly or through ``${env:NAME}`` in
``storage_options``).
"""

from __future__ import annotations

from typing import Any

from ..task_ids import POD_LABEL_TEMPLATE
from .settings import ClusterDefaults

GPU_STAGES = ("precache_encodings",)


def toleration(raw: dict[str, Any]) -> Any:
    """A ``V1Toleration`` from ``[mmprep] tolerations`` JSON, written in Kubernetes' own field names
    (``tolerationSeconds``, as the chart's values and ``kubectl`` use them)."""
    from kubernetes.client import models as k8s

    attribute = {json_name: name for name, json_name in k8s.V1Toleration.attribute_map.items()}
    unknown = sorted(set(raw) - set(attribute))
    if unknown:
        raise ValueError(f"[mmprep] tolerations: unknown field(s) {unknown} in {raw!r} "
                         f"(fields: {sorted(attribute)})")
    return k8s.V1Toleration(**{attribute[key]: value for key, value in raw.items()})


def pod_partial_kwargs(stage: str, cluster: ClusterDefaults, image: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``KubernetesPodOperator.partial`` (besides task_id and retries)."""
    from kubernetes.client import models as k8s

    from .hooks import HuggingFaceHubHook

    limits = dict(cluster.worker_resources.get("limits", {}))
    requests = dict(cluster.worker_resources.get("requests", {}))
    gpu = stage in GPU_STAGES and cluster.gpu_count > 0
    if gpu:
        limits[cluster.gpu_resource_name] = str(cluster.gpu_count)
    volumes, mounts = [], []
    if cluster.pvc_claim_name:
        volumes.append(k8s.V1Volume(name="mmprep-dataset", persistent_volume_claim=(
            k8s.V1PersistentVolumeClaimVolumeSource(claim_name=cluster.pvc_claim_name))))
        mounts.append(k8s.V1VolumeMount(name="mmprep-dataset", mount_path=cluster.pvc_mount_path))
    if cluster.config_map_name:
        volumes.append(k8s.V1Volume(name="mmprep-configs",
                                    config_map=k8s.V1ConfigMapVolumeSource(name=cluster.config_map_name)))
        mounts.append(k8s.V1VolumeMount(name="mmprep-configs", mount_path=cluster.config_mount_path,
                                        read_only=True))
    if gpu:  # PyTorch data loader workers share memory through /dev/shm; the 64 MiB default is too small
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    secret = HuggingFaceHubHook.pod_secret(cluster.hf_token_secret)
    kwargs: dict[str, Any] = {
        "name": f"mmprep-{stage.replace('_', '-')}",
        "namespace": cluster.namespace,
        "image": image or cluster.worker_image,
        "cmds": ["mmprep"],
        "container_resources": k8s.V1ResourceRequirements(limits=limits or None, requests=requests or None),
        "node_selector": dict(cluster.node_selector) if gpu else {},
        "tolerations": [toleration(t) for t in cluster.tolerations] if gpu else [],
        "volumes": volumes,
        "volume_mounts": mounts,
        "labels": {"app.kubernetes.io/name": "mmprep", "mmprep/stage": stage},
        "in_cluster": cluster.in_cluster,
        "get_logs": True,
        "on_finish_action": "delete_succeeded_pod",
        "deferrable": cluster.deferrable,
        "map_index_template": POD_LABEL_TEMPLATE,
    }
    secrets = [secret] if secret is not None else []
    if cluster.storage_secret:  # object storage: the secret's keys as environment variables (envFrom)
        from airflow.providers.cncf.kubernetes.secret import Secret

        secrets.append(Secret("env", None, cluster.storage_secret))
    if secrets:
        kwargs["secrets"] = secrets
    if cluster.service_account_name:
        kwargs["service_account_name"] = cluster.service_account_name
    if cluster.kube_config_file and not cluster.in_cluster:
        kwargs["config_file"] = cluster.kube_config_file
    if cluster.kubernetes_conn_id:
        kwargs["kubernetes_conn_id"] = cluster.kubernetes_conn_id
    if gpu and cluster.gpu_pool:
        kwargs["pool"] = cluster.gpu_pool
    return kwargs
