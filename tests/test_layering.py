"""The stage core must run where Airflow is not installed (GPU pods, the CLI); Airflow begins in one package."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "airflow_provider_mmprep"
CORE_MODULES = ["airflow_provider_mmprep.config", "airflow_provider_mmprep.plan",
                "airflow_provider_mmprep.cli", "airflow_provider_mmprep.stages",
                "airflow_provider_mmprep.fsutil", "airflow_provider_mmprep.manifest",
                "airflow_provider_mmprep.progress", "airflow_provider_mmprep.report",
                "airflow_provider_mmprep.task_mapping", "airflow_provider_mmprep.task_ids",
                "airflow_provider_mmprep.clear_client"]
#: Where Airflow is imported: the airflow/ subpackage, the re-exports of its public names, the demo and the
#: test helpers that start Airflow.
AIRFLOW_SIDE = ("airflow/", "operators/", "hooks/", "dag_builder.py", "demo.py", "testing/")


def _stage_modules() -> list[str]:
    """Every module of the stage core's packages: the stages and the run report."""
    root = Path(__file__).parents[1] / "airflow_provider_mmprep"
    return [f"airflow_provider_mmprep.{package}.{p.stem}" for package in ("stages", "report")
            for p in (root / package).glob("*.py") if p.stem != "__init__"]


def test_core_imports_no_airflow_and_no_torch() -> None:
    modules = CORE_MODULES + _stage_modules()
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'torch')\n"
            "             or m.startswith('airflow_provider_mmprep.airflow'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_only_the_airflow_side_names_airflow() -> None:
    """A module that imports Airflow outside the airflow/ subpackage (and the places that start Airflow)
    is a layering mistake even where the import is lazy, which the import test above cannot see."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(AIRFLOW_SIDE):
            continue
        if re.search(r"^\s*(from airflow[.\s]|import airflow\b)", path.read_text(), re.MULTILINE):
            offenders.append(rel)
    assert offenders == []


@pytest.mark.skipif(importlib.util.find_spec("airflow") is None, reason="needs the airflow extra")
def test_the_airflow_subpackage_does_not_shadow_airflow(tmp_path: Path) -> None:
    """``airflow_provider_mmprep/airflow/`` is named like Airflow; absolute imports inside it still reach
    Airflow itself, and ``airflow`` stays Airflow for the DAG files that import both."""
    code = ("import sys\n"
            "import airflow_provider_mmprep.airflow.dag as dag, airflow_provider_mmprep.airflow.settings\n"
            "import airflow, airflow.sdk\n"
            "print(airflow.__file__)\n"
            "print(dag.DAG is airflow.sdk.DAG, 'airflow_provider_mmprep' in airflow.__file__)\n")
    env_home = {"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**env_home, "PYTHONPATH": str(PACKAGE.parent)}).stdout.splitlines()
    assert out[-1] == "True False", out


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "mmprep"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "validate" in result.stdout
