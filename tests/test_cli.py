"""The `lopt` command (meta_train/cli.py): one entry, every tool behind a subcommand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lopt.checkpoint import saved_steps
from meta_train import cli
from tests.test_meta_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out
    assert "examples:" in out and "lopt train --config configs/default.toml" in out


def test_measure_help_lists_every_tool(capsys):
    assert cli.main(["measure", "--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.MEASURE_TOOLS:
        assert f"\n  {name} " in out


@pytest.mark.parametrize(
    "argv",
    [[name] for name in cli.COMMANDS if name not in ("measure", "resume")]
    + [["measure", name] for name in cli.MEASURE_TOOLS],
    ids=lambda argv: " ".join(argv),
)
def test_every_subcommand_has_help_with_options_and_an_example(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse exits after --help
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lopt {' '.join(argv)}")
    assert "options:" in out and "-h, --help" in out
    # The examples name the command as it was called (argparse's %(prog)s or literally).
    assert "example" in out.lower() and f"lopt {' '.join(argv)}" in out.split("options:", 1)[1]


def test_resume_help_and_bad_arguments(tmp_path, capsys):
    assert cli.main(["resume", "--help"]) == 0
    assert "usage: lopt resume RUN_DIR" in capsys.readouterr().out
    assert cli.main(["resume"]) == 2
    assert "expected one RUN_DIR" in capsys.readouterr().err
    assert cli.main(["resume", str(tmp_path)]) == 2  # exists, but is no run folder
    err = capsys.readouterr().err
    assert "is not a run folder" in err and str(tmp_path) in err


@pytest.mark.parametrize("argv", [["trian"], ["measure", "sped"]])
def test_an_unknown_command_is_a_usage_error(argv, capsys):
    assert cli.main(argv) == 2
    assert f"unknown command {argv[-1]!r}" in capsys.readouterr().err


def test_a_tool_that_returns_its_figures_exits_0(tmp_path, capsys):
    # `lopt synthetic` and the measurement tools return a dict, not a status.
    argv = ["synthetic", "--problem", "linear", "--iterations", "2", "--estimators", "pes"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").is_file()


def test_a_measurement_tools_config_error_is_one_message(tmp_path, capsys):
    argv = ["measure", "compare-lopts", "--out", str(tmp_path), "nope.key=1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("config error: unknown section(s) ['nope']")


def test_the_module_form_of_a_tool_ends_a_config_error_in_one_message(tmp_path):
    cmd = [sys.executable, "-m", "evaluate.measure.compare_lopts", "--out", str(tmp_path), "x.y=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: unknown section(s)")


@pytest.mark.slow  # 11 s; test_meta_train's exact-resume test covers resuming in the default stage
def test_train_then_resume_from_the_run_folder_alone(tmp_path):
    run_dir = tmp_path / "run"
    train = [*TINY, f"run.out_dir='{run_dir}'", "meta.outer_steps=1", "run.checkpoint_every=1"]
    assert cli.main(["train", *train, "--no-eval"]) == 0
    assert saved_steps(str(run_dir / "checkpoints")) == [1]
    # The folder's own config.json; only the allowed keys change.
    assert cli.main(["resume", str(run_dir), "meta.outer_steps=2", "--no-eval"]) == 0
    assert saved_steps(str(run_dir / "checkpoints"))[-1] == 2


def test_the_console_script_is_installed_with_the_project():
    script = Path(sys.executable).parent / "lopt"
    assert script.exists(), f"{script}: the [project.scripts] entry is not installed"
    out = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "usage: lopt COMMAND" in out.stdout
