"""The tfds path for users with internet, tested offline: the install has what tfds' download code
needs, and a download that cannot happen fails in one line, fast, before any workdir exists.

The network failures are simulated where a real offline machine fails: ``socket.getaddrinfo``
raises ``gaierror(EAI_NONAME)`` (what DNS gives without network) or hangs (a black-holed
resolver); everything above it, tfds' builder, download manager, downloader threads, requests and
urllib3, is the real code.
"""

import configparser
import importlib.util
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, cli_env

from mim4dd_jax import data, tfds_download
from mim4dd_jax.errors import ConfigError

tfds = pytest.importorskip("tensorflow_datasets")

CIFAR_HOST = "www.cs.toronto.edu"
PROXY_VARS = ["http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Direct connections, so the simulated resolver is the one asked."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


@pytest.fixture
def offline(monkeypatch):
    """DNS fails as on a machine without network; returns the hosts that were looked up."""
    lookups = []

    def getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def assert_one_offline_line(message: str, cause: str) -> None:
    assert "\n" not in message, message
    assert message.startswith("cannot download tfds dataset 'cifar10': "), message
    assert cause in message, message
    for alternative in ("data.source=npz", "mnist_folder", "data.path", "data.tfds_data_dir"):
        assert alternative in message, message


def test_install_has_what_the_tfds_download_path_needs(tmp_path):
    # tfds 4.9.10 resolves a builder's code_path (for its checksums) with importlib_resources,
    # which neither tfds nor etils>=1.14 declares for Python >= 3.9.
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    required = cfg["options"]["install_requires"].lower().replace("-", "_").split()
    assert "importlib_resources" in required
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    assert not builder.is_prepared()
    assert os.path.basename(str(builder.code_path)) == "cifar.py"
    assert any(CIFAR_HOST in url for url in builder.url_infos)
    manager = builder._make_download_manager(
        download_dir=None, download_config=tfds.download.DownloadConfig()
    )
    assert isinstance(manager, tfds.download.DownloadManager)


def test_offline_download_fails_in_one_line_before_writing_anything(tmp_path, offline):
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        tfds_download.load_splits("cifar10", str(tmp_path / "tfds"))
    assert time.monotonic() - start < 5
    assert_one_offline_line(str(error.value), f"{CIFAR_HOST}:443 is unreachable")
    assert "Name or service not known" in str(error.value)
    assert offline == [CIFAR_HOST]  # the check reached tfds' registered URL, once
    assert not (tmp_path / "tfds").exists()  # tfds has not started: nothing written


def test_a_resolver_that_hangs_is_cut_short(tmp_path, monkeypatch):
    def getaddrinfo(*args, **kwargs):
        time.sleep(2)  # a black-holed resolver; it gives up, long after our limit
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(tfds_download, "CONNECT_TIMEOUT_S", 0.3)
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        tfds_download.load_splits("cifar10", str(tmp_path))
    assert time.monotonic() - start < 2
    assert_one_offline_line(str(error.value), f"{CIFAR_HOST}:443 did not answer within 0.3 s")


def test_a_download_failing_inside_tfds_is_retried_a_bounded_number_of_times(
    tmp_path, offline, monkeypatch
):
    # Past our check (say the network drops just after it): tfds' own downloader fails. Unbounded,
    # it retries 10 times with exponential back-off, about 3.5 minutes.
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(tfds_download, "check_reachable", lambda urls: None)
    retries = downloader.MAX_RETRIES
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        tfds_download.load_splits("cifar10", str(tmp_path))
    assert time.monotonic() - start < 10
    assert_one_offline_line(str(error.value), f"Failed to resolve '{CIFAR_HOST}'")
    assert offline == [CIFAR_HOST] * (1 + tfds_download.MAX_RETRIES)
    assert downloader.MAX_RETRIES == retries  # restored


def _cifar10_config(arg: str):
    spec = importlib.util.spec_from_file_location("cifar10_config", f"{ROOT}/configs/cifar10.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize(
    "module, arg",
    [("distill", "dm,ipc10"), ("coreset", "random,ipc10"), ("experts_run", "experts")],
)
def test_every_mode_fails_before_creating_its_workdir(tmp_path, offline, module, arg):
    mode_module = importlib.import_module(f"mim4dd_jax.{module}")
    config = _cifar10_config(arg)
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match="cannot download tfds dataset 'cifar10'"):
        mode_module.run(config, str(workdir))
    assert not workdir.exists()


def test_cli_offline_gives_one_line_and_exit_code_2_within_30_s(tmp_path):
    # run.py in a child whose resolver fails as offline: the real exit code and stderr.
    workdir, tfds_dir = tmp_path / "run", tmp_path / "tfds"
    code = (
        "import runpy, socket, sys\n"
        "def offline(*args, **kwargs):\n"
        "    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')\n"
        "socket.getaddrinfo = offline\n"
        "sys.argv = ['run.py', '--config=configs/cifar10.py:dm,ipc10',\n"
        f"            '--workdir={workdir}', '--config.data.tfds_data_dir={tfds_dir}']\n"
        "runpy.run_path('run.py', run_name='__main__')\n"
    )
    env = {k: v for k, v in cli_env().items() if k.lower() not in PROXY_VARS}
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert_one_offline_line(lines[0].removeprefix("error: "), "Name or service not known")
    assert elapsed < 30
    assert not workdir.exists() and not tfds_dir.exists()


class Mim4ddTinyTfds(tfds.testing.DummyMnist):
    """A registered tfds dataset generated in code (no download): 20 train / 20 test, 28x28x1."""


def test_an_empty_data_dir_is_prepared_for_random_access(tmp_path):
    # tfds.data_source(name, data_dir=...) prepares the default TFRecord, which it cannot read.
    data_dir = tmp_path / "fresh"
    raw = data.load_raw(Mim4ddTinyTfds.name, "tfds", tfds_data_dir=str(data_dir))
    assert raw.x_train.shape == (20, 28, 28, 1) and raw.x_test.shape == (20, 28, 28, 1)
    assert raw.y_train.dtype == np.int64 and set(raw.y_train) <= set(range(10))
    assert list(data_dir.rglob("*.array_record*")) and not list(data_dir.rglob("*.tfrecord*"))


def test_a_copy_prepared_by_tfds_load_is_read(tmp_path):
    # TFRecord (what tfds.load prepares) has no random access: it is read through TensorFlow.
    name = Mim4ddTinyTfds.name
    tfds.builder(name, data_dir=str(tmp_path / "tfrecord")).download_and_prepare()
    assert list((tmp_path / "tfrecord").rglob("*.tfrecord*"))
    from_tfrecord = tfds_download.load_splits(name, str(tmp_path / "tfrecord"))
    from_array_record = tfds_download.load_splits(name, str(tmp_path / "array_record"))
    for a, b in zip(from_tfrecord, from_array_record, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.sort(a, axis=0), np.sort(b, axis=0))


def test_local_data_never_imports_tfds_or_tensorflow(tmp_path):
    path = tmp_path / "tiny.npz"
    x, y = np.zeros((4, 8, 8, 1), np.uint8), np.arange(4) % 2
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    code = (
        "import sys\n"
        "from mim4dd_jax import data\n"
        f"data.load_dataset('tiny', path={str(path)!r})\n"
        "loaded = sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
