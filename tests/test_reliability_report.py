"""The figures harness behind RELIABILITY.md (`tests/fixtures/reliability.py`): what it counts
as tried and as held, run as `make test-long` runs it (a pytest of its own, with xdist)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.reliability import BY_DESIGN, FAMILIES, _Outcome, render

ROOT = Path(__file__).resolve().parents[1]


def row(text: str, family: str) -> str:
    return next(x for x in text.splitlines() if x.startswith(f"| {FAMILIES[family].what} |"))


def test_trials_of_tests_that_ran_are_counted_and_each_miss_is_listed() -> None:
    text = render(
        [
            ("t.py::kill[0]", _Outcome("build-kill-arrow", trials=2, ran=True, passed=True)),
            ("t.py::kill[1]", _Outcome("build-kill-arrow", trials=1, ran=True, passed=False)),
            ("t.py::kill[2]", _Outcome("build-kill-arrow", trials=5)),  # skipped or never reached
            ("t.py::fault", _Outcome("storage-transient", trials=9, ran=True, passed=True)),
        ],
        90.0,
    )
    assert "| 2 | 3 kills | 2/3 |" in row(text, "build-kill-arrow")
    assert "| 1 | 9 faults fired | 9/9 |" in row(text, "storage-transient")
    assert "| 0 | not run | - |" in row(text, "load"), "a family that did not run is shown"
    assert "- `t.py::kill[1]`" in text and "kill[2]" not in text and "t.py::fault`" not in text
    assert all(f"- {entry}" in text for entry in BY_DESIGN)


def test_a_run_with_workers_writes_the_figures(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Marks, `trials(n)` and outcomes travel from xdist's workers to the report."""
    pytester.makepyfile(
        test_figures="""
        import pytest

        @pytest.mark.reliability("train-kill")
        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_kills(n, trials):
            trials(n)
            assert n != 2

        @pytest.mark.reliability("load")
        def test_load():
            pass

        def test_unmarked():
            pass
        """
    )
    report = pytester.path / "RELIABILITY.md"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess(
        "-p", "tests.fixtures.reliability", "-n", "2", f"--reliability-report={report}"
    )
    result.assert_outcomes(passed=4, failed=1)
    text = report.read_text()
    assert "| 3 | 6 kills | 4/6 |" in row(text, "train-kill")
    assert "| 1 | 1 caches | 1/1 |" in row(text, "load")
    assert "- `test_figures.py::test_kills[2]`" in text
