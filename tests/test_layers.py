"""The package layers (pyproject.toml's import-linter contracts) hold, and the contracts do catch a breach."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts of ``root``/pyproject.toml on the package under ``root`` (no cache)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})  # fmt: skip


def test_the_package_keeps_its_layers():
    p = _lint(ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 broken" in p.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The executor importing the search (what review found) is reported, naming both modules."""
    shutil.copytree(ROOT / "mqpredict", tmp_path / "mqpredict", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    job = tmp_path / "mqpredict" / "execute" / "job.py"
    job.write_text(job.read_text() + "\nfrom mqpredict.search.confirm import confirm  # noqa: E402\n")
    p = _lint(tmp_path)
    assert p.returncode != 0
    assert "BROKEN" in p.stdout and "mqpredict.execute.job -> mqpredict.search.confirm" in p.stdout, p.stdout
