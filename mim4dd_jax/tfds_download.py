"""The ``tfds`` data source: a tensorflow-datasets image-classification dataset read into
memory, downloaded and prepared first (array_record, for random access) when the data folder
has no prepared copy. Offline, a download fails in one line within seconds instead of tfds'
minutes of retries. TensorFlow and tfds are imported lazily, inside the functions: ``data``
imports this module only when the source is tfds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mim4dd_jax.errors import ConfigError

# Offline, tfds' downloader retries a request 10 times with exponential back-off (about 3.5
# minutes) before it fails. So before a download starts, the hosts of the dataset's registered
# URLs must answer within CONNECT_TIMEOUT_S (DNS and TCP connect together), and a request
# that fails once the download has started is retried at most MAX_RETRIES times.
CONNECT_TIMEOUT_S = 10.0
MAX_RETRIES = 2
_OFFLINE = (
    "without network, use --config.data.source=npz or mnist_folder with --config.data.path=<a "
    "local copy>, or --config.data.tfds_data_dir=<a folder holding a prepared copy>"
)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


class _Unreachable(ConnectionError):
    """A host that a tfds download needs did not answer."""


def _connect(host: str, port: int, timeout: float, errors: list[OSError]) -> None:
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        errors.append(e)


def check_reachable(urls: list[str], timeout: float | None = None) -> None:
    """Raises ``ConnectionError`` unless a TCP connection opens to the host of every URL (or to the
    proxy that ``requests`` would use for it) within ``timeout`` seconds in all, DNS included
    (default ``CONNECT_TIMEOUT_S``)."""
    import threading
    import time
    import urllib.parse
    import urllib.request

    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    proxies = urllib.request.getproxies()
    targets: list[tuple[str, int]] = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname or parts.scheme not in _DEFAULT_PORTS:
            continue  # e.g. gs:// or a local path: no socket of ours to check
        target = (parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme])
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            target = (p.hostname or "", p.port or _DEFAULT_PORTS.get(p.scheme, 80))
        if target not in targets:
            targets.append(target)
    deadline = time.monotonic() + timeout
    for host, port in targets:
        errors: list[OSError] = []
        left = max(0.0, deadline - time.monotonic())
        # getaddrinfo has no timeout of its own: wait for the thread, not for the resolver.
        thread = threading.Thread(target=_connect, args=(host, port, left, errors), daemon=True)
        thread.start()
        thread.join(left)
        if thread.is_alive():
            raise _Unreachable(f"{host}:{port} did not answer within {timeout:g} s")
        if errors:
            raise _Unreachable(f"{host}:{port} is unreachable ({errors[0].strerror or errors[0]})")


def _network_errors(tfds: Any) -> tuple[type[BaseException], ...]:
    """What a failed download raises: ours, the socket's, requests' (http), urllib's (ftp), tfds'."""
    import socket
    import urllib.error

    errors = [ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError]
    errors.append(tfds.download.DownloadError)
    try:
        import requests
    except ImportError:
        pass
    else:
        errors.append(requests.exceptions.RequestException)
    return tuple(errors)


def _network_cause(error: BaseException) -> str:
    """The innermost reason of a download error on one line (requests wraps urllib3's error, which
    holds the socket's)."""
    import re

    e, seen = error, set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "reason", None)  # urllib3's MaxRetryError, urllib's URLError
        if not isinstance(inner, BaseException) and e.args and isinstance(e.args[0], BaseException):
            inner = e.args[0]  # requests' ConnectionError(MaxRetryError(...))
        if not isinstance(inner, BaseException):
            break
        e = inner
    text = " ".join(str(e).split()) or type(e).__name__
    # urllib3 starts with the connection: "HTTPSConnection(host='...', port=443): Failed to ...".
    return re.sub(r"^\w*Connection\w*\(.*?\): ", "", text)


def _not_unprepared_warning(record: Any) -> bool:
    """A logging filter: tfds warns "Variant folder ... has no dataset_info.json" for every dataset
    not yet downloaded, noise before a download and a second line before a one-line error."""
    return "has no dataset_info.json" not in record.getMessage()


def _download_tfds(tfds: Any, name: str, data_dir: str | None) -> Any:
    """Downloads and prepares ``name`` (array_record: random access) and returns its builder.

    A download that cannot start or fails raises ConfigError with the cause and the offline
    alternatives, within about ``CONNECT_TIMEOUT_S`` seconds when the network is down.
    """
    from tensorflow_datasets.core.download import downloader

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    urls = sorted(builder.url_infos or ())  # the dataset's registered URLs (checksums.tsv)
    announce = getattr(builder, "_log_download_bytes", None)
    if announce is not None:
        # Checked where tfds is about to announce the download: after its "already prepared"
        # checks, before it prints or writes anything (and never under tfds.testing.mock_data,
        # which replaces download_and_prepare).
        def check_then_announce() -> None:
            check_reachable(urls)
            announce()

        builder._log_download_bytes = check_then_announce
    retries = getattr(downloader, "MAX_RETRIES", None)
    try:
        if retries is not None:
            downloader.MAX_RETRIES = min(retries, MAX_RETRIES)
        builder.download_and_prepare()
    except _network_errors(tfds) as e:
        raise ConfigError(
            f"cannot download tfds dataset {name!r}: {_network_cause(e)}; {_OFFLINE}"
        ) from None
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise  # a module our install should bring: a packaging bug, not a user mistake
        raise ConfigError(
            f"preparing tfds dataset {name!r} needs TensorFlow: pip install tensorflow-cpu (or "
            "pip install -e '.[tfds]' in this repository)"
        ) from None
    finally:
        if retries is not None:
            downloader.MAX_RETRIES = retries
    return builder


def _tfds_split(tfds: Any, builder: Any, split: str) -> tuple[np.ndarray, ...]:
    if builder.info.file_format in tfds.core.file_adapters.FileFormat.with_random_access():
        source = builder.as_data_source(split=split)
        examples = [source[i] for i in range(len(source))]
        x = np.stack([np.asarray(ex["image"]) for ex in examples])
        y = np.asarray([int(ex["label"]) for ex in examples], np.int64)
    else:  # a copy prepared by tfds.load (TFRecord): read through TensorFlow
        batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        x, y = np.asarray(batch["image"]), np.asarray(batch["label"], np.int64)
    return (x if x.ndim == 4 else x[..., None]), y


def load_splits(name: str, data_dir: str | None = None) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) of a tfds image-classification dataset, in memory,
    downloading and preparing it first when ``data_dir`` (default ``~/tensorflow_datasets``) has
    no prepared copy. A download that fails raises ConfigError within seconds."""
    import logging

    import tensorflow_datasets as tfds  # lazy: local-data runs must not need TensorFlow

    absl_logger = logging.getLogger("absl")  # tfds logs through absl
    absl_logger.addFilter(_not_unprepared_warning)
    try:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # tfds raises DatasetNotFoundError and friends
            raise ConfigError(f"unknown tfds dataset {name!r}: {str(e).splitlines()[0]}") from None
        features = builder.info.features
        if "image" not in features or "label" not in features:
            raise ConfigError(
                f"tfds dataset {name!r} has features {list(features)}; need 'image' and 'label'"
            )
        if not builder.is_prepared():
            builder = _download_tfds(tfds, name, data_dir)
    finally:
        absl_logger.removeFilter(_not_unprepared_warning)
    return (*_tfds_split(tfds, builder, "train"), *_tfds_split(tfds, builder, "test"))
