"""artifacts.check_workdir in-process: the refusals that subprocess tests cannot reach as root."""

import os

import pytest

from mim4dd_jax import artifacts, checkpoint
from mim4dd_jax.errors import ConfigError


@pytest.mark.parametrize("name", ["a[1]", "b*", "c?", "d]"])
def test_a_workdir_with_glob_characters_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="checkpoints cannot be read back"):
        artifacts.check_workdir(str(tmp_path / name / "run"))
    assert not (tmp_path / name).exists()


def test_why_glob_characters_are_refused_orbax_cannot_read_its_checkpoint_back(tmp_path):
    # The library limitation the refusal guards against; if orbax fixes it, this test says so.
    import jax.numpy as jnp

    for folder, readable in ((tmp_path / "plain", True), (tmp_path / "br[x]", False)):
        saver = checkpoint.Checkpointer(str(folder))
        saver.save(1, {"a": jnp.ones(3)})
        saver.close()
        loader = checkpoint.Checkpointer(str(folder))
        assert (loader.restore({"a": jnp.zeros(3)}) is not None) == readable
        loader.close()


def test_a_workdir_whose_parent_is_a_file_is_refused(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        artifacts.check_workdir(str(parent / "run"))


def test_a_workdir_in_a_folder_without_write_access_is_refused(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        artifacts.os,
        "access",
        lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode),
    )
    with pytest.raises(ConfigError, match="is not writable"):
        artifacts.check_workdir(str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_good_workdir_is_returned_absolute_and_created_only_by_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert artifacts.check_workdir("run") == str(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert artifacts.prepare_workdir("run") == str(tmp_path / "run")
    assert (tmp_path / "run").is_dir()


def test_a_workdir_from_before_the_precision_field_resumes_only_at_float32(tmp_path):
    import json

    from helpers import tiny_config

    from mim4dd_jax import distill

    config = tiny_config("dm,ipc1")
    old = distill._config_fingerprint(config)
    del old["precision"]  # a run made before the field existed (it ran in float32)
    (tmp_path / "config.json").write_text(json.dumps(old))
    distill.check_same_run(str(tmp_path), config)  # accepted
    config.precision = "bfloat16"
    with pytest.raises(ConfigError, match="precision=None, not 'bfloat16'"):
        distill.check_same_run(str(tmp_path), config)
