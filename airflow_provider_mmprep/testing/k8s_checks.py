"""Kubernetes checks for the tests: strict API-schema validation, plus the API server's rules schemas lack.

``kubernetes-validate`` (the published OpenAPI schemas, strict: unknown fields are errors) does the
structure. What the schemas leave to the API server's validation code is checked here, following the rules
of ``k8s.io/apimachinery/pkg/util/validation`` and ``pkg/apis/core/validation``: object, volume and
container names (DNS-1123), label keys and values, resource names and quantities (parsed by the Kubernetes
client's own ``parse_quantity``), and toleration operators and effects.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_STANDARD_RESOURCES = {"cpu", "memory", "ephemeral-storage", "storage", "pods"}
TOLERATION_OPERATORS = {"Exists", "Equal"}
TAINT_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}


def supported_kube_minors(chart_dir: Path) -> tuple[str, str]:
    """(oldest, newest) minor of the chart's ``kubeVersion: ">=1.A.0-0 <1.B.0-0"`` (newest = B - 1)."""
    declared = yaml.safe_load((chart_dir / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*1\.(\d+)\.0-0\s+<\s*1\.(\d+)\.0-0", declared.strip())
    if not match:
        raise ValueError(f"Chart.yaml kubeVersion {declared!r} is not of the form '>=1.A.0-0 <1.B.0-0'")
    return f"1.{match.group(1)}", f"1.{int(match.group(2)) - 1}"


class SchemaViolation(AssertionError):
    """An object the Kubernetes API schemas refuse: kubernetes-validate's message and where it applies."""


def validate_strict(obj: dict[str, Any], minor: str) -> None:
    """Raise :class:`SchemaViolation` with kubernetes-validate's own message unless ``obj`` is valid for
    Kubernetes ``minor`` with unknown fields rejected. Refuses a minor the validator has no schemas for."""
    import kubernetes_validate

    try:
        schema_version = kubernetes_validate.validate(obj, minor, strict=True)
    except kubernetes_validate.ValidationError as error:  # its str() dumps the whole schema: keep the message
        where = "/".join(map(str, error.absolute_path)) or "(top level)"
        name = (obj.get("metadata") or {}).get("name")
        raise SchemaViolation(f"{obj.get('kind')}/{name} is not valid Kubernetes {minor} "
                              f"(kubernetes-validate, strict) at {where}: {error.message}") from None
    assert schema_version == minor, f"kubernetes-validate has no {minor} schemas (used {schema_version})"


def name_problems(name: Any, kind: str, where: str, limit: int = 253) -> list[str]:
    pattern = DNS1123_LABEL if limit == 63 else DNS1123_SUBDOMAIN
    if isinstance(name, str) and len(name) <= limit and pattern.fullmatch(name):
        return []
    return [f"{where}: {name!r} is not a DNS-1123 {kind} ({limit} characters at most)"]


def qualified_name_problems(key: Any, where: str) -> list[str]:
    """A label key / taint key / extended resource name: [DNS-1123 subdomain prefix '/'] name (63)."""
    if not isinstance(key, str):
        return [f"{where}: {key!r} is not a string"]
    prefix, _, name = key.rpartition("/")
    problems = name_problems(prefix, "subdomain", where) if prefix else []
    if not (len(name) <= 63 and _QUALIFIED_NAME.fullmatch(name)):
        problems.append(f"{where}: {key!r} is not a qualified name")
    return problems


def label_problems(labels: dict[str, Any] | None, where: str) -> list[str]:
    problems = []
    for key, value in (labels or {}).items():
        problems += qualified_name_problems(key, f"{where}[{key!r}]")
        if not (isinstance(value, str) and len(value) <= 63 and (value == "" or _QUALIFIED_NAME.fullmatch(value))):
            problems.append(f"{where}[{key!r}]: {value!r} is not a label value")
    return problems


def quantity(value: Any, where: str) -> tuple[Decimal | None, list[str]]:
    """The value of a Kubernetes quantity string, parsed by the Kubernetes client."""
    from kubernetes.utils import parse_quantity

    if not isinstance(value, str):  # the API accepts numbers, but YAML 1 vs "1" is where typos hide
        return None, [f"{where}: quantity {value!r} should be a string"]
    try:
        return parse_quantity(value), []
    except ValueError as exc:
        return None, [f"{where}: {value!r} is not a Kubernetes quantity ({exc})"]


def resource_problems(resources: dict[str, Any] | None, where: str) -> list[str]:
    """Resource names, quantities, integer extended resources, and requests <= limits."""
    problems: list[str] = []
    parsed: dict[str, dict[str, Decimal]] = {}
    for part in ("requests", "limits"):
        parsed[part] = {}
        for name, value in ((resources or {}).get(part) or {}).items():
            at = f"{where}.{part}[{name!r}]"
            standard = name in _STANDARD_RESOURCES or name.startswith("hugepages-")
            if not standard:
                problems += qualified_name_problems(name, at)
                if "/" not in name or name.split("/")[0].endswith("kubernetes.io"):
                    problems.append(f"{at}: {name!r} is neither a standard resource nor an extended one "
                                    "(domain/name outside kubernetes.io)")
            number, bad = quantity(value, at)
            problems += bad
            if number is None:
                continue
            if number < 0:
                problems.append(f"{at}: {value!r} is negative")
            if not standard and number != number.to_integral_value():
                problems.append(f"{at}: extended resource {name!r} must be a whole number, got {value!r}")
            parsed[part][name] = number
    for name, request in parsed["requests"].items():
        limit = parsed["limits"].get(name)
        if limit is not None and request > limit:
            problems.append(f"{where}: request of {name!r} exceeds its limit")
        standard = name in _STANDARD_RESOURCES or name.startswith("hugepages-")
        if not standard and limit is not None and request != limit:
            problems.append(f"{where}: extended resource {name!r} needs request == limit")
    return problems


def toleration_problems(tolerations: list[dict[str, Any]] | None, where: str) -> list[str]:
    problems: list[str] = []
    for index, toleration in enumerate(tolerations or []):
        at = f"{where}[{index}]"
        operator = toleration.get("operator") or "Equal"
        if operator not in TOLERATION_OPERATORS:
            problems.append(f"{at}.operator: {operator!r} is not one of {sorted(TOLERATION_OPERATORS)}")
        if toleration.get("key"):
            problems += qualified_name_problems(toleration["key"], f"{at}.key")
        elif operator != "Exists":
            problems.append(f"{at}: an empty key needs operator Exists")
        if operator == "Exists" and toleration.get("value"):
            problems.append(f"{at}: operator Exists takes no value")
        effect = toleration.get("effect")
        if effect and effect not in TAINT_EFFECTS:
            problems.append(f"{at}.effect: {effect!r} is not one of {sorted(TAINT_EFFECTS)}")
        if toleration.get("tolerationSeconds") is not None and effect != "NoExecute":
            problems.append(f"{at}: tolerationSeconds only applies to effect NoExecute")
    return problems


def object_meta_problems(obj: dict[str, Any], where: str) -> list[str]:
    meta = obj.get("metadata") or {}
    problems = name_problems(meta.get("name"), "subdomain", f"{where}.metadata.name")
    if "namespace" in meta:
        problems += name_problems(meta["namespace"], "label", f"{where}.metadata.namespace", 63)
    problems += label_problems(meta.get("labels"), f"{where}.metadata.labels")
    for key in meta.get("annotations") or {}:
        problems += qualified_name_problems(key, f"{where}.metadata.annotations[{key!r}]")
    return problems


def pod_problems(pod: dict[str, Any]) -> list[str]:
    """What the API server would reject in a serialized V1Pod and the schemas let through."""
    spec = pod["spec"]
    problems = object_meta_problems(pod, "pod")
    volumes = {v["name"] for v in spec.get("volumes") or []}
    for index, volume in enumerate(spec.get("volumes") or []):
        at = f"spec.volumes[{index}]"
        problems += name_problems(volume["name"], "label", f"{at}.name", 63)
        if "persistentVolumeClaim" in volume:
            problems += name_problems(volume["persistentVolumeClaim"].get("claimName"), "subdomain",
                                      f"{at}.persistentVolumeClaim.claimName")
        if "configMap" in volume:
            problems += name_problems(volume["configMap"].get("name"), "subdomain", f"{at}.configMap.name")
        size = (volume.get("emptyDir") or {}).get("sizeLimit")
        if size is not None:
            problems += quantity(size, f"{at}.emptyDir.sizeLimit")[1]
    if len(volumes) != len(spec.get("volumes") or []):
        problems.append("spec.volumes: duplicate names")
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or []):
            at = f"spec.{kind}[{index}]"
            problems += name_problems(container.get("name"), "label", f"{at}.name", 63)
            problems += resource_problems(container.get("resources"), f"{at}.resources")
            for mount in container.get("volumeMounts") or []:
                if mount["name"] not in volumes:
                    problems.append(f"{at}.volumeMounts: {mount['name']!r} is not a volume of the pod")
                if not mount["mountPath"].startswith("/"):
                    problems.append(f"{at}.volumeMounts: {mount['mountPath']!r} is not absolute")
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    problems += name_problems(ref.get("name"), "subdomain", f"{at}.env[{env['name']}]")
    if spec.get("serviceAccountName"):
        problems += name_problems(spec["serviceAccountName"], "subdomain", "spec.serviceAccountName")
    problems += label_problems(spec.get("nodeSelector"), "spec.nodeSelector")
    problems += toleration_problems(spec.get("tolerations"), "spec.tolerations")
    return problems
