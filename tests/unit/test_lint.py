"""The test command also lints: ruff over everything the project ships and tests, and
import-linter over the import contracts in pyproject.toml ([tool.importlinter]: the layers of
``relay``, ``relay`` never importing ``workers``, the worker side never importing the web)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    result = subprocess.run([ruff, "check", "relay", "workers", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_import_contracts_are_kept() -> None:
    lint_imports = (shutil.which("lint-imports", path=str(Path(sys.executable).parent))
                    or shutil.which("lint-imports"))
    assert lint_imports, "import-linter is part of the test extra: pip install -e '.[test]'"
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
