"""Whole-split image-classification data in memory: loading, normalisation, ZCA, class index.

Three sources:

* ``tfds``: any tensorflow-datasets image-classification dataset with ``image``/``label`` features
  (mnist, fashion_mnist, cifar10, cifar100, svhn_cropped, ...), read by ``tfds_download``; TensorFlow
  is imported lazily, only there.
* ``mnist_folder``: a folder of MNIST-format IDX files (``.gz`` or raw), e.g. Debian's
  ``dataset-fashion-mnist`` package at ``/usr/share/datasets/fashion-mnist``.
* ``npz``: a local ``.npz`` with ``x_train, y_train, x_test, y_test``.

``auto`` picks a local folder when one is given or known (the Debian folder for Fashion-MNIST), and
tfds otherwise. Images are returned NHWC float32, normalised per channel with train-split statistics,
or, with ZCA, whitened by a ZCA fitted on the [0, 1] pixels of the train split instead (the MTT
reference's space: its ZCA replaces the per-channel normalisation).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mim4dd_jax.errors import ConfigError, check_choice

SOURCES = ("auto", "tfds", "mnist_folder", "npz")

# Folders that distribution packages install; `auto` uses them without a flag.
KNOWN_FOLDERS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}

_HOW_TO_GET = {
    "fashion_mnist": (
        "install Debian's package (sudo apt-get install dataset-fashion-mnist) or set "
        "--config.data.source=tfds to download it with tensorflow-datasets"
    ),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4")}


class RawSplits(NamedTuple):
    """Raw arrays as stored: images [N, H, W, C] uint8 (or float), labels [N] int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class Dataset(NamedTuple):
    """Normalised splits in memory plus what is needed to undo the normalisation.

    train_images: [N, H, W, C] float32, train_labels: [N] int32 (same for test).
    mean, std: [C] float32 per-channel statistics of the train split in [0, 1] pixel units.
    zca: the whitening fitted on [0, 1] pixels (or None). When it is set the images are
      ``zca_apply(zca, pixels)``, without the per-channel normalisation (mean/std are then only
      recorded); otherwise they are ``(pixels - mean) / std``.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    zca: ZCA | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def to_pixels(self, images: np.ndarray) -> np.ndarray:
        """Maps model-space images [N, H, W, C] back to [0, 1] pixel space (ZCA inverted)."""
        x = np.asarray(images, np.float32)
        if self.zca is not None:
            return np.asarray(zca_inverse(self.zca, jnp.asarray(x)), np.float32)
        return x * self.std + self.mean

    def from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_pixels`: [N, H, W, C] pixel space -> model space (float32)."""
        x = np.asarray(pixels, np.float32)
        if self.zca is not None:
            return np.asarray(zca_apply(self.zca, jnp.asarray(x)), np.float32)
        return ((x - self.mean) / self.std).astype(np.float32)


# ----------------------------------------------------------------------------- a set's pixel range

# What the numbers of a synthetic set's images are (``eval.pixel_range``,
# ``distill.init_from_range``): "0_255" pixels, "0_1" pixels, or "normalised" = the dataset's
# model space (per-channel normalised, or ZCA-whitened with data.zca), as the network sees them.
PIXEL_RANGES = ("0_255", "0_1", "normalised")


def stored_pixel_range(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The range a set's own file declares: its ``pixel_range`` array (``artifacts.save_distilled``
    writes "0_1"); our files from before it was recorded hold a ``model_images`` copy with its
    ``mean``/``std``, and [0, 1] pixels. None when the file says nothing."""
    if "pixel_range" in arrays:
        return str(np.asarray(arrays["pixel_range"]))
    if "model_images" in arrays and "mean" in arrays and "std" in arrays:
        return "0_1"
    return None


def decide_pixel_range(
    images: np.ndarray, declared: str, stored: str | None, what: str, flag: str
) -> str:
    """The range of ``images`` [N, H, W, C], decided, never guessed: uint8 is 0..255 pixels; a
    float set is what ``--config.<flag>`` (``declared``) or its own file (``stored``) says, and
    an undeclared one must lie in [0, 1]. ConfigError (one line naming the flag) otherwise.

    A float set outside [0, 1] may be 0..255 pixels or already normalised: the two give
    different accuracies, so the caller must say which."""
    choices = "|".join(PIXEL_RANGES)
    for name, value in ((f"--config.{flag}", declared), (f"{what}'s pixel_range", stored)):
        if value and value not in PIXEL_RANGES:
            raise ConfigError(f"{name} is {value!r}; valid: {', '.join(PIXEL_RANGES)}")
    if declared and stored and declared != stored:
        raise ConfigError(
            f"{what} declares its pixel range as {stored!r}, but --config.{flag}={declared}; "
            "drop the flag (the file's own range is used) or fix the file"
        )
    if images.dtype == np.uint8:
        if (declared or stored or "0_255") != "0_255":
            raise ConfigError(
                f"{what} holds uint8 images, which are 0..255 pixels, but is declared "
                f"{declared or stored!r}; drop --config.{flag} or set it to 0_255"
            )
        return "0_255"
    if not np.issubdtype(images.dtype, np.floating):
        raise ConfigError(f"{what} holds {images.dtype} images; expected uint8 or float")
    if not np.all(np.isfinite(images)):
        bad = int(np.sum(~np.all(np.isfinite(images.reshape(len(images), -1)), axis=1)))
        raise ConfigError(f"{what} has NaN or infinite pixels in {bad} of its images")
    if declared or stored:
        return declared or stored  # type: ignore[return-value]
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ConfigError(
            f"{what} holds float images in [{low:.4g}, {high:.4g}], outside [0, 1], and does "
            f"not say what they are; declare it: --config.{flag}={choices}"
        )
    return "0_1"


def pixels_of(images: np.ndarray, pixel_range: str) -> np.ndarray:
    """[0, 1] float32 pixels of images in ``pixel_range`` "0_255" or "0_1" (for "normalised"
    use ``Dataset.to_pixels``)."""
    check_choice("pixel range", pixel_range, ("0_255", "0_1"))
    x = np.asarray(images).astype(np.float32)
    return x / np.float32(255.0) if pixel_range == "0_255" else x


# ----------------------------------------------------------------------------- IDX / MNIST folder


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (``.gz`` or raw); raises ConfigError if it is truncated or malformed."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"corrupt IDX file {path!r}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ConfigError(f"corrupt IDX file {path!r}: bad magic number {data[:4].hex()!r}")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"corrupt IDX file {path!r}: truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ConfigError(
            f"corrupt IDX file {path!r}: shape {shape} needs {expected} bytes, found {len(data)}"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _find_idx(folder: str, stem: str) -> str:
    for suffix in (".gz", ""):
        for name in (stem, stem.replace("-idx", ".idx")):
            p = os.path.join(folder, name + suffix)
            if os.path.isfile(p):
                return p
    raise ConfigError(f"MNIST-format folder {folder!r} has no file {stem}[.gz]")


def load_mnist_folder(folder: str) -> RawSplits:
    """Loads the four MNIST-format files of ``folder`` as NHWC uint8 images and int labels."""
    arrays = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(
                f"MNIST-format folder {folder!r}: {prefix} images {images.shape} do not match "
                f"labels {labels.shape}"
            )
        arrays += [images[..., None], labels.astype(np.int64)]
    return RawSplits(*arrays)


# ----------------------------------------------------------------------------- npz


def load_npz(path: str) -> RawSplits:
    """Loads ``x_train, y_train, x_test, y_test`` from an ``.npz``; images [N,H,W] or [N,H,W,C]."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise ConfigError(f"npz file {path!r} lacks {missing}; it needs keys {list(keys)}")
            arrays = {k: f[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"corrupt npz file {path!r}: {e}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            arrays[f"x_{split}"] = x = x[..., None]
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(
                f"npz file {path!r}: x_{split} {x.shape} / y_{split} {y.shape} {y.dtype} are not "
                "[N,H,W(,C)] images with [N] integer labels"
            )
    return RawSplits(*(arrays[k] for k in keys))


# ----------------------------------------------------------------------------- dispatch


def load_raw(name: str, source: str = "auto", path: str = "", tfds_data_dir: str = "") -> RawSplits:
    """Loads raw splits by source; ``auto`` prefers ``path``, then a known folder, then tfds."""
    check_choice("data.source", source, SOURCES)
    if source == "auto":
        if path:
            source = "npz" if path.endswith(".npz") else "mnist_folder"
        elif os.path.isdir(KNOWN_FOLDERS.get(name, "")):
            source, path = "mnist_folder", KNOWN_FOLDERS[name]
        else:
            source = "tfds"
    if source == "tfds":
        from mim4dd_jax import tfds_download  # lazy: local-data runs must not need TensorFlow

        return RawSplits(*tfds_download.load_splits(name, tfds_data_dir or None))
    path = path or KNOWN_FOLDERS.get(name, "")
    if not path or not os.path.exists(path):
        how = _HOW_TO_GET.get(name, "download it with --config.data.source=tfds")
        raise ConfigError(f"data.path {path!r} for dataset {name!r} does not exist; {how}")
    if source == "npz":
        return load_npz(path)
    if not os.path.isdir(path):
        raise ConfigError(f"data.path {path!r} is not a folder of MNIST-format files")
    return load_mnist_folder(path)


def _subset_per_class(x: np.ndarray, y: np.ndarray, per_class: int) -> tuple[np.ndarray, ...]:
    """The first ``per_class`` examples of every class, in original order (deterministic)."""
    if per_class <= 0:
        return x, y
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    keep.sort()
    return x[keep], y[keep]


def load_dataset(
    name: str,
    *,
    source: str = "auto",
    path: str = "",
    tfds_data_dir: str = "",
    train_per_class: int = 0,
    test_per_class: int = 0,
    zca: bool = False,
    zca_reg: float = 0.1,
    cache_dir: str | None = None,
) -> Dataset:
    """Loads, optionally subsets, normalises and (optionally) ZCA-whitens a dataset.

    ``train_per_class``/``test_per_class`` > 0 keep only the first that many examples per class
    (for quick runs and tests). ZCA (see :func:`whiten`) is fitted on the train split's [0, 1]
    pixels and cached in ``cache_dir`` when given.
    """
    raw = load_raw(name, source, path, tfds_data_dir)
    x_train, y_train = _subset_per_class(raw.x_train, raw.y_train, train_per_class)
    x_test, y_test = _subset_per_class(raw.x_test, raw.y_test, test_per_class)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ConfigError(f"train images {x_train.shape[1:]} differ from test {x_test.shape[1:]}")
    scale = 255.0 if x_train.dtype == np.uint8 else 1.0
    x_train = x_train.astype(np.float32) / scale
    x_test = x_test.astype(np.float32) / scale
    mean = x_train.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = x_train.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    dataset = Dataset(
        name=name,
        train_images=x_train,
        train_labels=y_train.astype(np.int32),
        test_images=x_test,
        test_labels=y_test.astype(np.int32),
        num_classes=num_classes,
        mean=mean,
        std=std,
        zca=None,
    )
    return whiten(dataset, zca_reg, cache_dir) if zca else dataset


def whiten(dataset: Dataset, reg: float = 0.1, cache_dir: str | None = None) -> Dataset:
    """ZCA-whitens both splits of a normalised dataset, cached in cache_dir.

    As the MTT reference (kornia ``ZCAWhitening(eps=reg)`` on ``ToTensor()`` images, with no
    per-channel normalisation) the fit and the transform act on [0, 1] pixels, so ``reg`` is in
    pixel-variance units whatever the dataset's std.
    """
    if dataset.zca is not None:
        raise ConfigError(f"dataset {dataset.name!r} is already ZCA-whitened")
    train_pixels = dataset.to_pixels(dataset.train_images)
    fitted = fit_zca_cached(train_pixels, reg, cache_dir)
    test_pixels = dataset.to_pixels(dataset.test_images)
    return dataset._replace(
        train_images=np.asarray(zca_apply(fitted, jnp.asarray(train_pixels)), np.float32),
        test_images=np.asarray(zca_apply(fitted, jnp.asarray(test_pixels)), np.float32),
        zca=fitted,
    )


def smallest_class(dataset: Dataset) -> int:
    """The number of train examples in the smallest class."""
    return int(np.bincount(dataset.train_labels, minlength=dataset.num_classes).min())


def load_from_config(
    data_cfg: Mapping[str, Any], cache_dir: str | None = None, *, whitened: bool = True
) -> Dataset:
    """``load_dataset`` driven by a ``config.data`` block; ``whitened=False`` defers the ZCA of
    ``data.zca`` (apply it with :func:`whiten_from_config` once a cache folder exists)."""
    dataset = load_dataset(
        data_cfg["name"],
        source=data_cfg.get("source", "auto"),
        path=data_cfg.get("path", ""),
        tfds_data_dir=data_cfg.get("tfds_data_dir", ""),
        train_per_class=data_cfg.get("train_per_class", 0),
        test_per_class=data_cfg.get("test_per_class", 0),
    )
    return whiten_from_config(dataset, data_cfg, cache_dir) if whitened else dataset


def whiten_from_config(
    dataset: Dataset, data_cfg: Mapping[str, Any], cache_dir: str | None = None
) -> Dataset:
    """Applies ``data.zca`` (with ``data.zca_reg``) to a loaded dataset; a no-op when it is off."""
    if not data_cfg.get("zca", False):
        return dataset
    return whiten(dataset, data_cfg.get("zca_reg", 0.1), cache_dir)


# ----------------------------------------------------------------------------- ZCA

# The space Dataset fits its ZCA in; part of the cache key, so a fit in another space (older
# versions fitted on normalised images) is never read back. Record it wherever a ZCA input space
# must match (e.g. expert trajectories).
ZCA_SPACE = "pixels"


class ZCA(NamedTuple):
    """A fitted ZCA whitening on flattened images: D = H*W*C (for a Dataset, [0, 1] pixels).

    mean: [D], whiten: [D, D], unwhiten: [D, D] (its inverse), reg: the eigenvalue regulariser.
    """

    mean: np.ndarray
    whiten: np.ndarray
    unwhiten: np.ndarray
    reg: float


def fit_zca(images: np.ndarray, reg: float = 0.1) -> ZCA:
    """Fits ZCA on [N, H, W, C] images: W = U diag((s + reg)^-1/2) U^T with (U, s) of the
    unbiased (N - 1) covariance; kornia's ``ZCAWhitening(eps=reg)``, which adds eps to the
    eigenvalues the same way. The whitened covariance has eigenvalues s / (s + reg)."""
    if reg < 0:
        raise ConfigError(f"data.zca_reg must be >= 0, got {reg}")
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(1, len(x) - 1)
    s, u = np.linalg.eigh(cov)
    s = np.clip(s, 0.0, None)
    whiten = (u * (1.0 / np.sqrt(s + reg))) @ u.T
    unwhiten = (u * np.sqrt(s + reg)) @ u.T
    return ZCA(mean.astype(np.float32), whiten.astype(np.float32), unwhiten.astype(np.float32), reg)


def fit_zca_cached(images: np.ndarray, reg: float, cache_dir: str | None) -> ZCA:
    """``fit_zca``, cached in ``cache_dir`` under a hash of ``ZCA_SPACE``, the data and ``reg``
    (atomic write); the file is ``zca_<ZCA_SPACE>_<hash>.npz``."""
    if not cache_dir:
        return fit_zca(images, reg)
    digest = hashlib.sha1(ZCA_SPACE.encode())
    digest.update(np.ascontiguousarray(images, np.float32).tobytes())
    digest.update(repr(float(reg)).encode())
    path = os.path.join(cache_dir, f"zca_{ZCA_SPACE}_{digest.hexdigest()[:16]}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return ZCA(f["mean"], f["whiten"], f["unwhiten"], float(f["reg"]))
    fitted = fit_zca(images, reg)
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, mean=fitted.mean, whiten=fitted.whiten, unwhiten=fitted.unwhiten, reg=reg)
    os.replace(tmp, path)
    return fitted


def zca_apply(zca: ZCA, images: jax.Array) -> jax.Array:
    """Whitens [N, H, W, C] images."""
    flat = images.reshape(images.shape[0], -1)
    chex.assert_shape(flat, (None, zca.mean.shape[0]))
    return ((flat - zca.mean) @ zca.whiten).reshape(images.shape)


def zca_inverse(zca: ZCA, images: jax.Array) -> jax.Array:
    """Inverse of :func:`zca_apply` (for visualisation)."""
    flat = images.reshape(images.shape[0], -1)
    chex.assert_shape(flat, (None, zca.mean.shape[0]))
    return (flat @ zca.unwhiten + zca.mean).reshape(images.shape)


# ----------------------------------------------------------------------------- class index


class ClassIndex(NamedTuple):
    """Per-class example indices for balanced sampling on device.

    indices: [C, M] int32, row c holds the indices of class c padded with 0 beyond counts[c];
    counts: [C] int32.
    """

    indices: jax.Array
    counts: jax.Array


def class_index(labels: np.ndarray, num_classes: int) -> ClassIndex:
    """Builds the :class:`ClassIndex` of [N] integer labels."""
    labels = np.asarray(labels)
    rows = [np.flatnonzero(labels == c) for c in range(num_classes)]
    width = max(1, max(len(r) for r in rows))
    table = np.zeros((num_classes, width), np.int32)
    for c, r in enumerate(rows):
        table[c, : len(r)] = r
    return ClassIndex(jnp.asarray(table), jnp.asarray([len(r) for r in rows], jnp.int32))


def sample_per_class(key: jax.Array, index: ClassIndex, n: int) -> jax.Array:
    """Draws ``n`` distinct example indices per class, uniformly: returns [C, n] int32.

    Every class must hold at least ``n`` examples (checked by the caller, since counts are traced).
    """
    num_classes, width = index.indices.shape

    def one(k: jax.Array, row: jax.Array, count: jax.Array) -> jax.Array:
        # Random priorities, invalid slots pushed last: the first n of the sort are a uniform
        # sample without replacement among the valid ones.
        prio = jax.random.uniform(k, (width,))
        prio = jnp.where(jnp.arange(width) < count, prio, 2.0)
        return row[jnp.argsort(prio)[:n]]

    keys = jax.random.split(key, num_classes)
    return jax.vmap(one)(keys, index.indices, index.counts)
