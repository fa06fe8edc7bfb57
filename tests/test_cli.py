"""The `ran-bench` dispatcher: every subcommand is reachable and parses its own arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ran_bench import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"ran-bench {command}" in capsys.readouterr().out


def test_nested_subcommand_parses_through_the_dispatcher(tmp_path, capsys):
    # `data` has sub-commands, which argparse cannot parse intermixed; the dispatcher must still work.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "make-demo", "--help"])
    assert exit_info.value.code == 0
    assert "make-demo" in capsys.readouterr().out


def test_options_and_overrides_mix_in_any_order(monkeypatch):
    seen = {}
    module = __import__(cli.COMMANDS["eval"][0], fromlist=["main"])
    monkeypatch.setattr(module, "main", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["eval", "runs/x", "--size", "320", "data.root=/data", "--size", "224"]) == 0
    assert seen["path"] == "runs/x" and seen["size"] == [320, 224] and seen["overrides"] == ["data.root=/data"]


def test_unknown_command_is_an_error_listing_the_commands():
    proc = subprocess.run([sys.executable, "-m", "ran_bench", "trian"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'trian'" in proc.stderr and "train" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["bench", "infer", "--model", "attention57"], "error: unknown model 'attention57'; known models: attention56"),
    (["profile", "--models", "attention57"], "error: unknown model(s) attention57 in --models"),
    (["data", "prepare-val", "{tmp}", "--ground-truth", "{tmp}/LOC_val_solution.csv"],
     "error: --ground-truth {tmp}/LOC_val_solution.csv does not exist"),
    (["submit", "--config", "configs/demo.yaml", "--time", "1h", "--dry-run"],
     "error: --time '1h': expected minutes, HH:MM:SS or D-HH:MM:SS"),
    (["bench", "readme", "--add", "{tmp}/results.csv", "--out-dir", "{tmp}"],
     "error: --add {tmp}/results.csv: no such file"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(cli.__file__.rsplit("/ran_bench/", 1)[0])  # configs/ is relative to the checkout
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path)), err
    assert len(err.strip().splitlines()) == 1, err
