"""Every subcommand teaches through --help, and the top-level help stays light."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from kdcache.cli import main


@pytest.mark.parametrize("command", ["build", "train", "inspect", "validate", "demo"])
def test_every_subcommand_has_help(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 5


def test_train_help_lists_every_loss_with_its_options() -> None:
    from student_trainer.losses import LOSSES

    out = CliRunner().invoke(main, ["train", "--help"]).output
    for name, spec in LOSSES.items():
        assert f"{name}:" in out
        for option in spec.options:
            assert f"{option}=" in out


def test_top_level_help_does_not_import_torch() -> None:
    code = "import sys\nfrom kdcache.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_unknown_loss_lists_the_valid_ones(tmp_path) -> None:
    result = CliRunner().invoke(
        main, ["train", "--cache", str(tmp_path), "--out", str(tmp_path / "o"), "--loss", "nope"]
    )
    assert (
        result.exit_code != 0 and "fkl-tail" in result.output and "Traceback" not in result.output
    )


def test_public_api_is_lazy_and_complete() -> None:
    code = (
        "import sys, kdcache\n"
        "light = 'torch' not in sys.modules\n"
        "assert callable(kdcache.build) and callable(kdcache.train) and callable(kdcache.open_cache)\n"
        "print(light, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
