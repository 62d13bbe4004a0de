"""The pods the provider starts, checked as the Kubernetes API would see them.

For every stage with ``runner: kubernetes`` (precache_encodings with GPUs, download_images and
reorganize_tar on CPU), the pod ``KubernetesPodOperator.build_pod_request_obj(dry_run=True)`` renders from
the DAG's own operator arguments is serialized the way the Kubernetes client sends it
(``ApiClient().sanitize_for_serialization``) and validated in strict mode by ``kubernetes-validate``
against the oldest and newest Kubernetes minor the chart claims, with the ``[mmprep]`` settings set, left
at their defaults, and emptied. What schemas cannot check (quantities, resource names, toleration operators,
DNS-1123 names) is checked by ``airflow_provider_mmprep.testing.k8s_checks``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

if any(importlib.util.find_spec(m.split(".")[0]) is None for m in ("airflow", "airflow.providers.cncf.kubernetes")):
    pytest.skip("needs the airflow/kubernetes extras", allow_module_level=True)

from airflow_provider_mmprep.testing.airflow_env import DAGS_FOLDER, airflow_home  # noqa: E402

airflow_home(migrate=False)  # rendering pods needs no DB

import kubernetes_validate  # noqa: E402
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator  # noqa: E402
from kubernetes.client import ApiClient  # noqa: E402

from airflow_provider_mmprep.airflow.dag import build_dag  # noqa: E402
from airflow_provider_mmprep.airflow.pods import GPU_STAGES, pod_partial_kwargs  # noqa: E402
from airflow_provider_mmprep.airflow.settings import MMPREP_CONFIG_OPTIONS, ClusterDefaults  # noqa: E402
from airflow_provider_mmprep.task_ids import instance_kwargs  # noqa: E402
from airflow_provider_mmprep.task_mapping import read_dag_spec  # noqa: E402
from airflow_provider_mmprep.testing.k8s_checks import (SchemaViolation, pod_problems,  # noqa: E402
                                                         resource_problems,
                                                         supported_kube_minors, toleration_problems,
                                                         validate_strict)

CHART = Path(__file__).resolve().parents[1] / "charts" / "mmprep"
KUBE_MINORS = supported_kube_minors(CHART)
POD_STAGES = ("download_images", "reorganize_tar", "precache_encodings")

#: [mmprep] set to non-default values, every pod-shaping option included.
SETTINGS_SET = {
    "worker_image": "registry.example.com/team/mmprep-worker:0.1.0",
    "namespace": "data-prep",
    "service_account_name": "mmprep-worker",
    "pvc_claim_name": "laion-dataset",
    "pvc_mount_path": "/mnt/laion",
    "config_map_name": "mmprep-configs",
    "config_mount_path": "/opt/airflow/dags/mmprep",
    "gpu_resource_name": "nvidia.com/gpu",
    "gpu_count": "8",
    "gpu_pool": "mmprep_gpu",
    "node_selector": json.dumps({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                                 "nvidia.com/gpu.present": "true"}),
    "tolerations": json.dumps([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                               {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute",
                                "tolerationSeconds": 300}]),
    "worker_resources": json.dumps({"requests": {"cpu": "8", "memory": "48Gi", "ephemeral-storage": "20Gi"},
                                    "limits": {"memory": "64Gi"}}),
    "hf_token_secret": "hf-token:token",
    "storage_secret": "mmprep-s3",
    "deferrable": "True",
}
#: The optional ones emptied: no volume, no config map, no service account, no GPUs, no token.
SETTINGS_EMPTY = {"service_account_name": "", "pvc_claim_name": "", "config_map_name": "", "gpu_count": "0",
                  "node_selector": "", "tolerations": "[]", "worker_resources": "", "hf_token_secret": ""}
SETTINGS = {"set": SETTINGS_SET, "defaults": {}, "emptied": SETTINGS_EMPTY}


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    """dags/download_multimodal.yaml with download_images and reorganize_tar as pods too."""
    text = (DAGS_FOLDER / "download_multimodal.yaml").read_text()
    assert text.count("runner: local") == 2
    path = tmp_path / "download_multimodal.yaml"
    path.write_text(text.replace("runner: local", "runner: kubernetes"))
    return path


def configure(monkeypatch: pytest.MonkeyPatch, settings: dict[str, str]) -> ClusterDefaults:
    """[mmprep] through AIRFLOW__MMPREP__* variables, as the chart's ConfigMap sets them."""
    for option in MMPREP_CONFIG_OPTIONS:
        monkeypatch.delenv(f"AIRFLOW__MMPREP__{option.upper()}", raising=False)
    for option, value in settings.items():
        assert option in MMPREP_CONFIG_OPTIONS, option
        monkeypatch.setenv(f"AIRFLOW__MMPREP__{option.upper()}", value)
    return ClusterDefaults.from_airflow_config()


def rendered_pods(pipeline: Path, cluster: ClusterDefaults) -> dict[str, dict[str, Any]]:
    """stage → the serialized pod of its task 3 of 8, built from the DAG's own operator arguments."""
    spec = read_dag_spec(pipeline)
    assert [s for s in spec.stages if spec.runners[s] == "kubernetes"] == list(POD_STAGES)
    dag = build_dag(pipeline, cluster)
    pods = {}
    for stage in POD_STAGES:
        kwargs = pod_partial_kwargs(stage, cluster, spec.image)
        mapped = dag.get_task(stage)
        assert mapped.operator_class is KubernetesPodOperator
        assert all(mapped.partial_kwargs[key] == value for key, value in kwargs.items()
                   if key in mapped.partial_kwargs)
        arguments = instance_kwargs("kubernetes", stage, str(pipeline), ["dataset_repo_id=org/data"], 3, 8)
        op = KubernetesPodOperator(task_id=stage, **arguments, **kwargs)
        pods[stage] = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    return pods


@pytest.mark.parametrize("kube", KUBE_MINORS)
@pytest.mark.parametrize("settings", sorted(SETTINGS))
def test_pods_validate_strictly_and_pass_the_api_servers_rules(
        monkeypatch: pytest.MonkeyPatch, pipeline: Path, settings: str, kube: str) -> None:
    cluster = configure(monkeypatch, SETTINGS[settings])
    for stage, pod in rendered_pods(pipeline, cluster).items():
        validate_strict(pod, kube)
        problems = pod_problems(pod)
        assert not problems, (stage, problems)


@pytest.mark.parametrize("settings", sorted(SETTINGS))
def test_pods_carry_the_settings(monkeypatch: pytest.MonkeyPatch, pipeline: Path, settings: str) -> None:
    cluster = configure(monkeypatch, SETTINGS[settings])
    for stage, pod in rendered_pods(pipeline, cluster).items():
        spec, container = pod["spec"], pod["spec"]["containers"][0]
        gpus = stage in GPU_STAGES and cluster.gpu_count > 0
        limits = (container.get("resources") or {}).get("limits") or {}
        assert limits.get(cluster.gpu_resource_name) == (str(cluster.gpu_count) if gpus else None), stage
        assert (spec.get("nodeSelector") or {}) == (cluster.node_selector if gpus else {})
        assert len(spec.get("tolerations") or []) == (len(cluster.tolerations) if gpus else 0)
        assert pod["metadata"]["namespace"] == cluster.namespace
        assert spec.get("serviceAccountName") == (cluster.service_account_name or None)
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes") or []
                  if "persistentVolumeClaim" in v]
        assert claims == ([cluster.pvc_claim_name] if cluster.pvc_claim_name else [])
        secrets = [e for e in container.get("env") or [] if "valueFrom" in e]
        assert len(secrets) == (1 if cluster.hf_token_secret else 0)
        env_from = [e["secretRef"]["name"] for e in container.get("envFrom") or []]
        assert env_from == ([cluster.storage_secret] if cluster.storage_secret else [])
        args = container["command"] + container["args"]
        assert args[args.index("--stage") + 1] == stage



def test_gpu_pods_run_in_default_pool_unless_a_pool_is_named(monkeypatch: pytest.MonkeyPatch,
                                                             pipeline: Path) -> None:
    """A pool that does not exist leaves tasks scheduled forever (the scheduler only warns), so a fresh
    install without the chart's pool must use Airflow's default_pool."""
    for settings, pool in (({}, "default_pool"), ({"gpu_pool": "mmprep_gpu"}, "mmprep_gpu")):
        dag = build_dag(pipeline, configure(monkeypatch, settings))
        assert dag.get_task("precache_encodings").partial_kwargs.get("pool", "default_pool") == pool
        assert dag.get_task("reorganize_tar").partial_kwargs.get("pool", "default_pool") == "default_pool"

def test_a_misspelled_pod_field_fails_with_the_validators_message(
        monkeypatch: pytest.MonkeyPatch, pipeline: Path) -> None:
    """Strict mode is what catches a typo: the same pod with `resurces` passes without it."""
    pod = rendered_pods(pipeline, configure(monkeypatch, SETTINGS_SET))["precache_encodings"]
    broken = copy.deepcopy(pod)
    container = broken["spec"]["containers"][0]
    container["resurces"] = container.pop("resources")
    kubernetes_validate.validate(broken, KUBE_MINORS[1], strict=False)
    with pytest.raises(SchemaViolation, match=r"at spec/containers/0: .*'resurces' was unexpected"):
        validate_strict(broken, KUBE_MINORS[1])


@pytest.mark.parametrize("resources, complaint", [
    ({"limits": {"nvidia.com/gpu": "two"}}, "'two' is not a Kubernetes quantity"),
    ({"limits": {"nvidia.com/gpu": "0.5"}}, "must be a whole number"),
    ({"limits": {"gpu": "1"}}, "neither a standard resource nor an extended one"),
    ({"limits": {"nvidia.com/gpu": 1}}, "should be a string"),
    ({"requests": {"memory": "64Gi"}, "limits": {"memory": "48Gi"}}, "request of 'memory' exceeds its limit"),
    ({"requests": {"cpu": "-1"}}, "is negative"),
])
def test_resource_checks_reject_what_the_api_server_would(resources: dict[str, Any], complaint: str) -> None:
    assert any(complaint in p for p in resource_problems(resources, "resources"))


@pytest.mark.parametrize("toleration, complaint", [
    ({"key": "nvidia.com/gpu", "operator": "Exist"}, "'Exist' is not one of"),
    ({"key": "k", "operator": "Exists", "value": "v"}, "Exists takes no value"),
    ({"key": "k", "effect": "NoScheduled"}, "'NoScheduled' is not one of"),
    ({"key": "bad key", "operator": "Exists"}, "is not a qualified name"),
    ({"key": "k", "effect": "NoSchedule", "tolerationSeconds": 30}, "only applies to effect NoExecute"),
])
def test_toleration_checks_reject_what_the_api_server_would(toleration: dict[str, Any], complaint: str) -> None:
    assert any(complaint in p for p in toleration_problems([toleration], "tolerations"))


def test_names_must_be_dns_1123(monkeypatch: pytest.MonkeyPatch, pipeline: Path) -> None:
    cluster = configure(monkeypatch, {**SETTINGS_SET, "pvc_claim_name": "Laion_Dataset",
                                      "service_account_name": "mmprep.worker-"})
    pod = rendered_pods(pipeline, cluster)["precache_encodings"]
    validate_strict(pod, KUBE_MINORS[0])  # the schemas let both through
    problems = pod_problems(pod)
    assert any("'Laion_Dataset' is not a DNS-1123 subdomain" in p for p in problems), problems
    assert any("'mmprep.worker-' is not a DNS-1123 subdomain" in p for p in problems), problems


def test_tolerations_take_kubernetes_field_names_and_refuse_unknown_ones() -> None:
    from airflow_provider_mmprep.airflow.pods import toleration

    made = toleration({"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute",
                       "tolerationSeconds": 300})
    assert made.toleration_seconds == 300 and made.operator == "Equal"
    with pytest.raises(ValueError, match=r"\[mmprep\] tolerations: unknown field\(s\) \['operater'\]"):
        toleration({"key": "pool", "operater": "Exists"})
