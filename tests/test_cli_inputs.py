"""More bad command-line inputs: checked in-process where the check lives, and a few through
run.py for the contract (one ``error: ...`` line on stderr, exit status 2, no workdir)."""

import importlib.util
import os

import pytest
from helpers import ROOT, run_cli

from mim4dd_jax import cli
from mim4dd_jax import config as config_lib
from mim4dd_jax.errors import ConfigError


def fmnist_config(arg="dm,ipc1"):
    spec = importlib.util.spec_from_file_location(
        "fmnist_config", os.path.join(ROOT, "configs", "fashion_mnist.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_unknown_config_token_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match="token 'fast' not understood; expected a method"):
        fmnist_config("dm,ipc1,fast")
    with pytest.raises(ConfigError, match=r"optional flags \(local\)"):
        config_lib.parse_arg("dm,ipc1,fast")
    assert config_lib.parse_arg("dm,ipc1,local") == ("dm", 1, {"local"})


BAD_VALUES = {
    "negative mi.weight": ("mi.weight", -0.5, r"mi.weight must be a number >= 0, got -0.5"),
    "momentum one": ("distill.momentum", 1.0, r"distill.momentum must be in \[0, 1\), got 1.0"),
    "momentum above one": ("distill.momentum", 1.5, r"must be in \[0, 1\), got 1.5"),
    "negative momentum": ("distill.momentum", -0.1, r"must be in \[0, 1\), got -0.1"),
    "bad mi.networks": ("mi.networks", "crossed", r"unknown mi.networks 'crossed'; valid"),
    "bad mtt.remat": ("mtt.remat", "maybe", r"unknown mtt.remat 'maybe'; valid"),
    "negative eval.epochs": ("eval.epochs", -1, r"eval.epochs must be >= 0, got -1"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_validate_rejects(case):
    field, value, message = BAD_VALUES[case]
    config = fmnist_config()
    config_lib.validate(config)  # the unmodified config is fine
    config_lib.set_dotted(config, field, value)
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


def test_validate_accepts_the_edges():
    config = fmnist_config()
    for field, value in (("mi.weight", 0.0), ("distill.momentum", 0.0), ("eval.epochs", 0)):
        config_lib.set_dotted(config, field, value)
    config_lib.validate(config)


def test_stray_positional_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run.py", "extra", "words"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unexpected arguments ['extra', 'words']; use --config=... --workdir=..."]


def test_one_line_of_a_config_file_error():
    # config_flags folds get_config()'s traceback into its message; the last line is ours.
    wrapped = RuntimeError(
        "Error loading config file\nTraceback ...\nmim4dd_jax.errors.ConfigError: token bad"
    )
    wrapped.__cause__ = ConfigError("Traceback ...\nmim4dd_jax.errors.ConfigError: token bad")
    assert cli._one_line(wrapped) == "token bad"


CLI_CASES = {
    "missing --config": (["--workdir={wd}"], "--config is required"),
    "missing --workdir": (["--config=configs/fashion_mnist.py:dm,ipc1"], "--workdir is required"),
    "stray positional": (
        ["--config=configs/fashion_mnist.py:dm,ipc1", "--workdir={wd}", "oops"],
        "unexpected arguments ['oops']",
    ),
    "unknown token": (
        ["--config=configs/fashion_mnist.py:dm,ipc1,fast", "--workdir={wd}"],
        "config argument token 'fast' not understood",
    ),
    "negative eval.epochs": (
        ["--config=configs/fashion_mnist.py:dm,ipc1", "--config.eval.epochs=-2", "--workdir={wd}"],
        "eval.epochs must be >= 0, got -2",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_contract(tmp_path, case):
    args, expected = CLI_CASES[case]
    workdir = tmp_path / "wd"
    r = run_cli(*(a.format(wd=workdir) for a in args))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert expected in lines[0], lines[0]
    assert not workdir.exists()
