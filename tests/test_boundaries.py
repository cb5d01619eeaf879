"""The architecture as a checked contract: the stages never import each other, and the cache
contract (`schemas`) imports neither stage nor torch/transformers."""

import subprocess
import sys

import pytest

CASES = [
    ("student_trainer", ["cache_builder"]),
    ("cache_builder", ["student_trainer"]),
    ("schemas", ["cache_builder", "student_trainer", "kdcache", "torch", "transformers"]),
]


@pytest.mark.parametrize("package,forbidden", CASES)
def test_package_does_not_import(package: str, forbidden: list[str]) -> None:
    code = (
        f"import sys, {package}, importlib, pkgutil\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    if m.name.endswith(('.testing', 'make_teacher')):\n"
        "        continue\n"
        "    importlib.import_module(m.name)\n"
        f"print(','.join(sorted(n for n in {forbidden!r} if n in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{package} imports {out.stdout.strip()}"


def test_import_linter_contracts_hold() -> None:
    """The same contracts as `make lint`, through import-linter when it is installed."""
    lint = pytest.importorskip("importlinter")
    del lint
    out = subprocess.run([sys.executable, "-m", "importlinter.cli"], capture_output=True, text=True)
    if "No module named" in out.stderr:
        out = subprocess.run(["lint-imports"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
