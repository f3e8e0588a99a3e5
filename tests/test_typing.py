"""The package ships ``py.typed``: ``mypy lightning_power`` (settings in ``pyproject.toml``) must stay clean."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mypy_passes_on_the_package():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "lightning_power"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
