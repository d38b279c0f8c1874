"""The type checker over src/ (settings in pyproject.toml), as part of the test run."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")


def test_mypy_is_clean():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
