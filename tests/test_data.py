"""Data loading from every source, normalisation, ZCA and the class index."""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim4dd_jax import data
from mim4dd_jax.errors import ConfigError

FMNIST = data.KNOWN_FOLDERS["fashion_mnist"]
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST) and not os.environ.get("CI"),
    reason="Debian's dataset-fashion-mnist is not installed (make data installs it; CI requires it)",
)


def _write_idx(path, array, magic_type=0x08, opener=open):
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist_folder(folder, n_train=30, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    opener, suffix = (gzip.open, ".gz") if gz else (open, "")
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            os.path.join(folder, f"{prefix}-images-idx3-ubyte{suffix}"),
            rng.integers(0, 256, (n, 28, 28)),
            opener=opener,
        )
        _write_idx(
            os.path.join(folder, f"{prefix}-labels-idx1-ubyte{suffix}"),
            np.arange(n) % 10,
            opener=opener,
        )


@needs_fmnist
def test_real_fashion_mnist_from_debian_folder():
    ds = data.load_dataset("fashion_mnist")  # auto finds the Debian folder without a flag
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    assert ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
    # Normalised with train statistics (the reference's 0.2861 / 0.3530).
    np.testing.assert_allclose(ds.mean, [0.2861], atol=1e-3)
    np.testing.assert_allclose(ds.std, [0.3530], atol=1e-3)
    assert abs(float(ds.train_images.mean())) < 1e-3
    assert abs(float(ds.train_images.std()) - 1.0) < 1e-3
    pixels = ds.to_pixels(ds.train_images[:5])
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_folder_gz_and_raw(tmp_path, gz):
    _fake_mnist_folder(tmp_path, gz=gz)
    raw = data.load_raw("anything", "mnist_folder", str(tmp_path))
    assert raw.x_train.shape == (30, 28, 28, 1) and raw.x_test.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(raw.y_train, np.arange(30) % 10)


def test_idx_truncated_and_bad_magic(tmp_path):
    _fake_mnist_folder(tmp_path, gz=True)
    path = os.path.join(tmp_path, "train-images-idx3-ubyte.gz")
    with gzip.open(path, "rb") as f:
        content = f.read()
    with gzip.open(path, "wb") as f:
        f.write(content[:-100])
    with pytest.raises(ConfigError, match="corrupt IDX.*needs"):
        data.load_raw("x", "mnist_folder", str(tmp_path))
    with gzip.open(path, "wb") as f:
        f.write(b"\x12\x34" + content[2:])
    with pytest.raises(ConfigError, match="bad magic"):
        data.load_raw("x", "mnist_folder", str(tmp_path))
    with open(path, "wb") as f:  # a truncated gzip stream
        f.write(gzip.compress(content)[:50])
    with pytest.raises(ConfigError, match="corrupt IDX"):
        data.load_raw("x", "mnist_folder", str(tmp_path))


def test_missing_folder_says_how_to_get_the_data():
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        data.load_raw("fashion_mnist", "mnist_folder", "/nonexistent/fmnist")


def test_npz_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    good = os.path.join(tmp_path, "d.npz")
    np.savez(
        good,
        x_train=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
        y_train=np.arange(12) % 3,
        x_test=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
        y_test=np.arange(6) % 3,
    )
    ds = data.load_dataset("mine", path=good)  # auto: a .npz path
    assert ds.train_images.shape == (12, 8, 8, 3) and ds.num_classes == 3
    assert ds.mean.shape == (3,)

    missing = os.path.join(tmp_path, "m.npz")
    np.savez(missing, x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2, int))
    with pytest.raises(ConfigError, match="lacks"):
        data.load_npz(missing)

    corrupt = os.path.join(tmp_path, "c.npz")
    with open(good, "rb") as f:
        content = f.read()
    with open(corrupt, "wb") as f:
        f.write(content[: len(content) // 2])
    with pytest.raises(ConfigError, match="corrupt npz"):
        data.load_npz(corrupt)

    mis_shaped = os.path.join(tmp_path, "s.npz")
    np.savez(
        mis_shaped,
        x_train=np.zeros((5, 4, 4)),
        y_train=np.zeros(4, int),
        x_test=np.zeros((2, 4, 4)),
        y_test=np.zeros(2, int),
    )
    with pytest.raises(ConfigError, match="x_train"):
        data.load_npz(mis_shaped)


def test_tfds_path_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        ds = data.load_dataset("fashion_mnist", source="tfds")
        assert ds.train_images.shape == (20, 28, 28, 1)
        assert ds.test_images.shape == (20, 28, 28, 1)
        assert ds.train_labels.dtype == np.int32
        assert np.isfinite(ds.train_images).all()
        cifar = data.load_dataset("cifar10", source="tfds")
        assert cifar.train_images.shape == (20, 32, 32, 3) and cifar.mean.shape == (3,)


def test_subset_per_class_keeps_first_examples(tmp_path):
    _fake_mnist_folder(tmp_path, n_train=40, n_test=20)
    ds = data.load_dataset("x", path=str(tmp_path), train_per_class=2, test_per_class=1)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 2))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1))


def test_zca_inverse_and_whitening(tmp_path):
    key = jax.random.key(0)
    mixing = jax.random.normal(key, (12, 12))
    x = np.asarray(jax.random.normal(jax.random.key(1), (20000, 12)) @ mixing + 3.0)
    images = x.reshape(-1, 2, 2, 3).astype(np.float32)
    zca = data.fit_zca(images, reg=1e-6)
    white = np.asarray(data.zca_apply(zca, jnp.asarray(images))).reshape(len(x), -1)
    cov = np.cov(white, rowvar=False)
    np.testing.assert_allclose(cov, np.eye(12), atol=2e-3)
    back = np.asarray(data.zca_inverse(zca, data.zca_apply(zca, jnp.asarray(images))))
    np.testing.assert_allclose(back, images, atol=1e-3)
    # ZCA (unlike PCA whitening) is the symmetric whitening: the closest to the identity map.
    np.testing.assert_allclose(zca.whiten, zca.whiten.T, atol=1e-5)

    # A strong regulariser damps the small directions: variance stays below 1 there.
    damped = data.fit_zca(images, reg=10.0)
    white = np.asarray(data.zca_apply(damped, jnp.asarray(images))).reshape(len(x), -1)
    assert np.linalg.eigvalsh(np.cov(white, rowvar=False)).max() < 1.0

    cached = data.fit_zca_cached(images, 0.1, str(tmp_path))
    files = [f for f in os.listdir(tmp_path) if f.startswith("zca_")]
    assert len(files) == 1
    again = data.fit_zca_cached(images, 0.1, str(tmp_path))
    np.testing.assert_array_equal(cached.whiten, again.whiten)


def test_load_dataset_with_zca_maps_back_to_pixels(tmp_path):
    _fake_mnist_folder(tmp_path, n_train=200)
    plain = data.load_dataset("x", path=str(tmp_path))
    assert data.smallest_class(plain) == 20
    ds = data.load_dataset("x", path=str(tmp_path), zca=True, zca_reg=0.1)
    later = data.whiten(plain, 0.1)  # the deferred form that the run functions use
    np.testing.assert_allclose(later.train_images, ds.train_images, atol=1e-5)
    with pytest.raises(ConfigError, match="already ZCA-whitened"):
        data.whiten(ds)
    raw = data.load_raw("x", path=str(tmp_path))
    np.testing.assert_allclose(ds.to_pixels(ds.train_images), raw.x_train / 255.0, atol=1e-3)


def test_class_index_sampling_is_balanced_distinct_and_deterministic():
    labels = np.array([0, 1, 2, 0, 1, 0, 0, 2, 1, 0])  # class sizes 5, 3, 2
    index = data.class_index(labels, 3)
    np.testing.assert_array_equal(np.asarray(index.counts), [5, 3, 2])
    picks = np.asarray(data.sample_per_class(jax.random.key(0), index, 2))
    assert picks.shape == (3, 2)
    for c in range(3):
        assert (labels[picks[c]] == c).all()
        assert len(set(picks[c].tolist())) == 2
    again = np.asarray(data.sample_per_class(jax.random.key(0), index, 2))
    np.testing.assert_array_equal(picks, again)
    # Uniform over the class: over many keys every member of class 0 is drawn.
    draws = jax.vmap(lambda k: data.sample_per_class(k, index, 1))(
        jax.random.split(jax.random.key(1), 200)
    )
    assert set(np.asarray(draws)[:, 0, 0].tolist()) == set(np.flatnonzero(labels == 0).tolist())


def test_unknown_source():
    with pytest.raises(ConfigError, match="unknown data.source 'ftp'.*'tfds'"):
        data.load_raw("x", source="ftp")
