"""The client installs and runs alone: these tests run where torch is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter of this venv, away from the repository."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_torch_is_not_installed_where_the_client_tests_run(tmp_path: Path) -> None:
    done = run_python("import torch", tmp_path)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


def test_the_client_imports_nothing_of_the_server(tmp_path: Path) -> None:
    code = (
        "import sys, tokserve_client\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('app', 'torch', 'fastapi')))"
    )
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
