"""The built config is locked (issue 27): an unknown field is an error in code as on the command
line, naming the field and the nearest valid one; config files' HPARAMS are checked the same way."""

import pytest
from helpers import run_cli

from mim4dd_jax import config as config_lib
from mim4dd_jax import sharding
from mim4dd_jax.errors import ConfigError


def test_set_dotted_refuses_an_unknown_field_and_names_the_nearest():
    c = config_lib.build({"name": "fake"}, "dm,ipc1")
    with pytest.raises(ConfigError, match=r"'distill\.itrations'.*'distill\.iterations'"):
        config_lib.set_dotted(c, "distill.itrations", 5)
    with pytest.raises(ConfigError, match=r"unknown config field 'distil\.lr'"):
        config_lib.set_dotted(c, "distil.lr", 5)
    assert c.distill.iterations == 20000  # nothing was created or changed


def test_the_built_config_is_locked_in_code():
    c = config_lib.build({"name": "fake"}, "random,ipc1")
    with pytest.raises(AttributeError):
        c.eval.epoch = 3
    with pytest.raises(KeyError):
        c.eval.update({"epoch": 3})
    c.eval.epochs = 3  # existing fields stay writable
    assert c.eval.epochs == 3


def test_a_misspelt_hparams_key_is_refused():
    with pytest.raises(ConfigError, match=r"'distill\.itrations'.*'distill\.iterations'"):
        config_lib.build({"name": "fake"}, "dm,ipc1", hparams={("dm", 1): {"distill.itrations": 5}})
    with pytest.raises(ConfigError, match="'data.nme'"):
        config_lib.build({"nme": "fake"}, "dm,ipc1")


def test_the_mesh_defaults_are_sharding_defaults():
    c = config_lib.build({"name": "fake"}, "dm,ipc1")
    assert c.mesh.to_dict() == sharding.DEFAULTS


def test_a_config_file_with_a_misspelt_key_fails_in_one_line(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from mim4dd_jax import config\n"
        "def get_config(arg):\n"
        "    return config.build({'name': 'fake'}, arg,"
        " hparams={('dm', 1): {'distill.itrations': 5}})\n"
    )
    r = run_cli(f"--config={path}:dm,ipc1", f"--workdir={tmp_path / 'w'}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'distill.itrations'" in lines[0], r.stderr[-2000:]
    assert "did you mean 'distill.iterations'?" in lines[0]
    assert not (tmp_path / "w").exists()
