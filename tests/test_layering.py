"""The stage core must run where Airflow is not installed (GPU pods, the CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CORE_MODULES = ["airflow_provider_mmprep.config", "airflow_provider_mmprep.plan",
                "airflow_provider_mmprep.cli", "airflow_provider_mmprep.stages",
                "airflow_provider_mmprep.fsutil", "airflow_provider_mmprep.manifest",
                "airflow_provider_mmprep.progress", "airflow_provider_mmprep.report"]


def _stage_modules() -> list[str]:
    """Every module of the stage core's packages: the stages and the run report."""
    root = Path(__file__).parents[1] / "airflow_provider_mmprep"
    return [f"airflow_provider_mmprep.{package}.{p.stem}" for package in ("stages", "report")
            for p in (root / package).glob("*.py") if p.stem != "__init__"]


def test_core_imports_no_airflow_and_no_torch() -> None:
    modules = CORE_MODULES + _stage_modules()
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'torch'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "mmprep"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "validate" in result.stdout
