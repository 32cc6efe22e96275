"""The tree stays clean under the project's ruff configuration (pyproject.toml [tool.ruff])."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:  # the test extra installs it; a bare checkout without it has nothing to run
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    out = subprocess.run([ruff, "check", "stagediff", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"ruff finds problems (fix them, or `ruff check --fix`):\n{out.stdout}{out.stderr}"
