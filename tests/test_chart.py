"""charts/mmprep without a helm binary or a cluster.

What IS checked: Chart.yaml; values.schema.json against the default and example values (and that it rejects
bad values); every template rendered with a small renderer for the restricted Go-template subset these
templates are written in (see ``render``; any other construct fails the test instead of being skipped);
every rendered document is a Kubernetes object whose field names all exist in the official kubernetes
Python client's models for its kind; the pipeline YAMLs in the ConfigMap load with mmprep's own config
loader; the official-chart values file refers to the names this chart creates.
What is NOT checked: Helm's own rendering (sprig edge cases), the official Airflow chart's schema (not
available offline), admission by a real API server, or that a ReadWriteMany storage class exists.
"""

from __future__ import annotations

import configparser
import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client
import pytest
import yaml

from airflow_provider_mmprep.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "mmprep"
RELEASE = {"Name": "mmprep", "Namespace": "airflow"}

# --------------------------------------------------------------------------------------------------------
# A renderer for the subset of Helm templates the chart uses
# --------------------------------------------------------------------------------------------------------

_ACTION = re.compile(r"(\{\{-?\s*)(.*?)(\s*-?\}\})", re.S)
_PATH = re.compile(r"^\.(Values|Release|Chart)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)$")


class UnsupportedTemplate(ValueError):
    pass


def _lookup(path: str, scope: dict[str, Any]) -> Any:
    match = _PATH.match(path)
    if not match:
        raise UnsupportedTemplate(f"unsupported value reference {path!r}")
    value: Any = scope[match.group(1)]
    for key in [k for k in match.group(2).split(".") if k]:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n") if value else "{}"


def _go_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _call(func: str, args: list[Any]) -> Any:
    if func == "quote":
        return json.dumps(_go_string(args[-1]))
    if func == "toYaml":
        return _to_yaml(args[-1])
    if func == "toJson":
        return json.dumps(args[-1], separators=(",", ":"), sort_keys=True)
    if func in ("nindent", "indent"):
        width, text = int(args[0]), _go_string(args[1])
        indented = "\n".join(" " * width + line if line else line for line in text.split("\n"))
        return ("\n" + indented) if func == "nindent" else indented
    raise UnsupportedTemplate(f"unsupported function {func!r}")


def _evaluate(expression: str, scope: dict[str, Any]) -> Any:
    """``.Values.a.b``, ``fn ARG``, and pipelines ``X | fn [N]`` with fn in quote/toYaml/toJson/(n)indent."""
    value: Any = None
    for position, stage in enumerate(s.strip() for s in expression.split("|")):
        words = stage.split()
        if position == 0:
            if len(words) == 1:
                value = _lookup(words[0], scope)
            elif len(words) == 2:
                value = _call(words[0], [_lookup(words[1], scope)])
            else:
                raise UnsupportedTemplate(f"unsupported expression {stage!r}")
        else:
            value = _call(words[0], [*words[1:], value])
    return value


def render(text: str, values: dict[str, Any], chart: dict[str, Any]) -> str:
    """Render ``text`` with Helm's whitespace trimming, ``if/else/end`` and the expressions above."""
    scope = {"Values": values, "Release": RELEASE,
             "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]}}
    out: list[str] = []
    stack: list[bool] = []  # per open `if`: is this branch emitting?
    position = 0
    for match in _ACTION.finditer(text):
        literal = text[position:match.start()]
        if match.group(1).endswith("-") or match.group(1).startswith("{{-"):
            literal = literal.rstrip()
        if all(stack):
            out.append(literal)
        position = match.end()
        if match.group(3).lstrip().startswith("-"):
            rest = text[position:]
            position += len(rest) - len(rest.lstrip())
        action = match.group(2).strip()
        if action.startswith("/*"):
            continue
        if action.startswith("if "):
            stack.append(all(stack) and bool(_evaluate(action[3:], scope)))
        elif action == "else":
            parent = all(stack[:-1])
            stack[-1] = parent and not stack[-1]
        elif action == "end":
            stack.pop()
        elif all(stack):
            out.append(_go_string(_evaluate(action, scope)))
    if stack:
        raise UnsupportedTemplate("unclosed if")
    if all(stack):
        out.append(text[position:])
    return "".join(out)


def test_renderer_follows_helm_semantics() -> None:
    chart = {"name": "c", "version": "1", "appVersion": "2"}
    values = {"on": True, "off": False, "m": {"b": 1, "a": "x"}, "s": "v"}
    assert render("a:\n  {{- if .Values.on }}\n  b: {{ .Values.s | quote }}\n  {{- end }}\n", values, chart) == \
        'a:\n  b: "v"\n'
    assert render("x: {{- if .Values.off }} 1{{- else }} 2{{- end }}", values, chart) == "x: 2"
    assert render("m:\n  {{- toYaml .Values.m | nindent 2 }}", values, chart) == "m:\n  a: x\n  b: 1"
    assert render("j: {{ toJson .Values.m | quote }}", values, chart) == 'j: "{\\"a\\":\\"x\\",\\"b\\":1}"'
    with pytest.raises(UnsupportedTemplate):
        render('{{ include "x" . }}', values, chart)
    with pytest.raises(UnsupportedTemplate):
        render("{{ range .Values.m }}{{ end }}", values, chart)


# --------------------------------------------------------------------------------------------------------
# Values and schema
# --------------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge key by key, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


DEFAULTS = _load(CHART / "values.yaml")
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
CHART_META = _load(CHART / "Chart.yaml")
VALUE_SETS = {"default": DEFAULTS,
              "production": _merge(DEFAULTS, _load(CHART / "examples" / "values-production.yaml"))}


def test_chart_metadata_matches_the_package() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert CHART_META["apiVersion"] == "v2" and CHART_META["name"] == "mmprep"
    assert re.fullmatch(r"\d+\.\d+\.\d+", CHART_META["version"])
    assert CHART_META["appVersion"] == setup["metadata"]["version"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_values_validate_against_the_schema(name: str) -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(VALUE_SETS[name], SCHEMA, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("override, complaint", [
    ({"gpu": {"count": -1}}, "-1 is less than the minimum"),
    ({"gpu": {"tolerations": [{"key": "k", "operator": "Sometimes"}]}}, "'Sometimes' is not one of"),
    ({"persistence": {"claimName": "Data_Set"}}, "does not match"),
    ({"persistence": {"size": "lots"}}, "does not match"),
    ({"persistence": {"mountPath": "data"}}, "does not match"),
    ({"configs": {"bad name.yaml": "x: 1"}}, "does not match"),
    ({"worker": {"image": "has space:1"}}, "does not match"),
    ({"gpus": {}}, "Additional properties are not allowed"),
])
def test_schema_rejects_bad_values(override: dict[str, Any], complaint: str) -> None:
    with pytest.raises(jsonschema.ValidationError, match=re.escape(complaint)):
        jsonschema.validate(_merge(DEFAULTS, override), SCHEMA, cls=jsonschema.Draft7Validator)


# --------------------------------------------------------------------------------------------------------
# Rendered manifests
# --------------------------------------------------------------------------------------------------------

_API_CLIENT_KINDS = {("v1", "PersistentVolumeClaim"), ("v1", "ServiceAccount"), ("v1", "ConfigMap"),
                     ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")}


def _model_class(api_version: str, kind: str) -> type:
    group_version = api_version.split("/")[-1].capitalize()  # "v1"
    prefix = "V1" if group_version == "V1" else group_version
    return getattr(kubernetes.client, f"{prefix}{kind}")


def _check_fields(data: Any, type_name: str, where: str) -> None:
    """Every key of ``data`` must be a field of the kubernetes client model ``type_name`` (recursively)."""
    if type_name.startswith(("list[", "List[")):
        assert isinstance(data, list), f"{where}: expected a list"
        for index, item in enumerate(data):
            _check_fields(item, type_name[5:-1], f"{where}[{index}]")
        return
    if type_name.startswith(("dict(", "dict[")):
        assert isinstance(data, dict), f"{where}: expected a mapping"
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in data.items():
            _check_fields(item, inner, f"{where}.{key}")
        return
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in scalars:  # e.g. a label value YAML read as a bool would be rejected by the API server
        assert isinstance(data, scalars[type_name]) and not (type_name == "int" and isinstance(data, bool)), \
            f"{where}: expected {type_name}, got {data!r}"
        return
    model = getattr(kubernetes.client, type_name, None)
    if model is None:  # datetime, object
        return
    assert isinstance(data, dict), f"{where}: {type_name} must be a mapping"
    by_json_name = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, item in data.items():
        assert key in by_json_name, f"{where}: {key!r} is not a field of {type_name}"
        _check_fields(item, model.openapi_types[by_json_name[key]], f"{where}.{key}")


def render_chart(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    rendered = {}
    for template in sorted((CHART / "templates").glob("*.yaml")):
        text = render(template.read_text(), values, CHART_META)
        rendered[template.name] = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    return rendered


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_templates_render_to_valid_kubernetes_objects(name: str) -> None:
    values = VALUE_SETS[name]
    objects = [obj for docs in render_chart(values).values() for obj in docs]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "ConfigMap", "PersistentVolumeClaim", "Role", "RoleBinding", "ServiceAccount"]
    for obj in objects:
        assert (obj["apiVersion"], obj["kind"]) in _API_CLIENT_KINDS
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
        assert obj["metadata"]["namespace"] == RELEASE["Namespace"]
        model = _model_class(obj["apiVersion"], obj["kind"])
        _check_fields(obj, model.__name__, obj["kind"])
    by_kind = {o["kind"]: o for o in objects if o["kind"] != "ConfigMap"}
    pvc = by_kind["PersistentVolumeClaim"]["spec"]
    assert pvc["accessModes"] == ["ReadWriteMany"]
    assert str(pvc["resources"]["requests"]["storage"]) == str(values["persistence"]["size"])
    assert by_kind["ServiceAccount"]["automountServiceAccountToken"] is False
    pod_rule = next(r for r in by_kind["Role"]["rules"] if r["resources"] == ["pods"])
    assert {"create", "get", "list", "watch", "delete"} <= set(pod_rule["verbs"])
    binding = by_kind["RoleBinding"]
    assert binding["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]
    assert binding["subjects"] == values["rbac"]["airflowServiceAccounts"]


def test_optional_objects_are_left_out_when_disabled() -> None:
    values = _merge(DEFAULTS, {"persistence": {"create": False}, "rbac": {"create": False},
                               "workerServiceAccount": {"create": False}})
    kinds = sorted(o["kind"] for docs in render_chart(values).values() for o in docs)
    assert kinds == ["ConfigMap", "ConfigMap"]
    keep_off = render_chart(_merge(DEFAULTS, {"persistence": {"keep": False, "storageClassName": "rwx"}}))
    pvc = keep_off["pvc.yaml"][0]
    assert "annotations" not in pvc["metadata"] and pvc["spec"]["storageClassName"] == "rwx"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_airflow_env_configmap_carries_the_gpu_settings(name: str) -> None:
    values = VALUE_SETS[name]
    env = render_chart(values)["configmap-airflow-env.yaml"][0]["data"]
    assert all(k.startswith("AIRFLOW__MMPREP__") and isinstance(v, str) for k, v in env.items())
    assert json.loads(env["AIRFLOW__MMPREP__NODE_SELECTOR"]) == values["gpu"]["nodeSelector"]
    assert json.loads(env["AIRFLOW__MMPREP__TOLERATIONS"]) == values["gpu"]["tolerations"]
    assert int(env["AIRFLOW__MMPREP__GPU_COUNT"]) == values["gpu"]["count"]
    assert env["AIRFLOW__MMPREP__PVC_CLAIM_NAME"] == values["persistence"]["claimName"]
    assert env["AIRFLOW__MMPREP__IN_CLUSTER"] in ("true", "false")


def test_pipeline_configs_in_the_configmap_load_with_mmprep(tmp_path: Path) -> None:
    data = render_chart(DEFAULTS)["configmap-configs.yaml"][0]["data"]
    assert data == DEFAULTS["configs"]
    for file_name, text in data.items():
        path = tmp_path / file_name
        path.write_text(text)
        cfg = load_config(path, ["dataset_repo_id=org/dataset"])
        assert cfg.precache_encodings.runner == "kubernetes"
        root = Path(DEFAULTS["persistence"]["mountPath"])
        assert cfg.generate_wdinfo.output_wdinfo_path.is_relative_to(root)  # on the shared volume
        assert cfg.precache_encodings.task_selection.task_count <= 1024  # within [core] max_map_length


def test_notes_render() -> None:
    notes = render((CHART / "templates" / "NOTES.txt").read_text(), DEFAULTS, CHART_META)
    assert "airflow pools set mmprep_gpu 8" in notes and "{{" not in notes


# --------------------------------------------------------------------------------------------------------
# Values for the official Apache Airflow chart
# --------------------------------------------------------------------------------------------------------


def test_official_chart_values_refer_to_this_charts_objects() -> None:
    airflow = _load(CHART / "examples" / "airflow-values.yaml")
    assert airflow["airflowVersion"] == __import__("importlib.metadata").metadata.version("apache-airflow")
    assert airflow["images"]["airflow"]["repository"] and airflow["images"]["airflow"]["tag"]
    env_from = yaml.safe_load(airflow["extraEnvFrom"])  # the official chart takes this key as a YAML string
    assert env_from == [{"configMapRef": {"name": DEFAULTS["airflowEnvConfigMapName"]}}]
    assert all(e["name"].startswith("AIRFLOW__") for e in airflow["env"])
    volumes = {v["name"]: v for v in airflow["volumes"]}
    mounts = {m["name"]: m for m in airflow["volumeMounts"]}
    assert set(volumes) == set(mounts)
    claims = {v["persistentVolumeClaim"]["claimName"]: n for n, v in volumes.items() if "persistentVolumeClaim" in v}
    maps = {v["configMap"]["name"]: n for n, v in volumes.items() if "configMap" in v}
    assert mounts[claims[DEFAULTS["persistence"]["claimName"]]]["mountPath"] == DEFAULTS["persistence"]["mountPath"]
    assert mounts[maps[DEFAULTS["configMapName"]]]["mountPath"] == DEFAULTS["configMountPath"]
    for volume in volumes.values():
        _check_fields(volume, "V1Volume", "volumes")
    for mount in mounts.values():
        _check_fields(mount, "V1VolumeMount", "volumeMounts")
    # every service account bound by this chart's RoleBinding is one the official chart creates for release
    # "airflow" (<release>-scheduler/-worker/-triggerer)
    assert {s["name"] for s in DEFAULTS["rbac"]["airflowServiceAccounts"]} <= \
        {"airflow-scheduler", "airflow-worker", "airflow-triggerer"}


def test_mmprep_env_keys_are_provider_config_options() -> None:
    """Once the provider declares its [mmprep] config section, every variable we set must be one of them."""
    try:
        from airflow_provider_mmprep import get_provider_info  # type: ignore[attr-defined]
    except ImportError:
        pytest.skip("the provider's get_provider_info() (issue 6) is not in this tree yet")
    options = get_provider_info().get("config", {}).get("mmprep", {}).get("options", {})
    env = render_chart(DEFAULTS)["configmap-airflow-env.yaml"][0]["data"]
    airflow = _load(CHART / "examples" / "airflow-values.yaml")
    names = set(env) | {e["name"] for e in airflow["env"] if e["name"].startswith("AIRFLOW__MMPREP__")}
    unknown = sorted(n for n in names if n[len("AIRFLOW__MMPREP__"):].lower() not in options)
    assert not unknown, f"not options of the provider's [mmprep] section: {unknown}"
