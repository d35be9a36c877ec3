"""distill.init_from decides its pixel range as evaluate mode does (issue 28): uint8 is 0..255
pixels, a float set says what it is or lies in [0, 1]; the same images in any declared form
start the same synthetic set."""

import jax
import numpy as np
import pytest
from helpers import fake_dataset, pixel_range_forms, tiny_config

from mim4dd_jax import data, state
from mim4dd_jax.errors import ConfigError

C, HW, IPC = 3, 8, 2


def _dataset():
    ds = fake_dataset(C, 12, HW)
    # Pixel statistics of a real dataset, so that the normalisation is not the identity.
    return ds._replace(mean=np.float32([0.3]), std=np.float32([0.2]))


def _write(path, images, **extra):
    np.savez(path, images=images, labels=np.repeat(np.arange(C), IPC), **extra)
    return str(path)


def _init_images(ds, path, declared=""):
    config = tiny_config(
        f"dm,ipc{IPC}", **{"distill.init_from": path, "distill.init_from_range": declared}
    )
    return np.asarray(state.init_state(jax.random.key(0), ds, config)["images"])


def test_the_same_images_in_every_declared_form_start_the_same_set(tmp_path):
    ds = _dataset()
    raw = np.random.default_rng(0).integers(0, 256, (C * IPC, HW, HW, 1)).astype(np.uint8)
    forms = pixel_range_forms(raw, ds)
    got = {
        name: _init_images(ds, _write(tmp_path / f"{i}.npz", images), declared)
        for i, (name, (images, declared)) in enumerate(forms.items())
    }
    expected = ds.from_pixels(raw.astype(np.float32) / np.float32(255))
    for name, images in got.items():
        np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6, err_msg=name)
    # Before issue 28 a uint8 file was taken as [0, 1] pixels: 255 times too bright.
    assert np.abs(got["uint8"] - ds.from_pixels(raw.astype(np.float32))).max() > 100


@pytest.mark.parametrize(
    "images, declared, message",
    [
        (np.full((6, HW, HW, 1), 200.0, np.float32), "", "outside \\[0, 1\\], and does not say"),
        (np.full((6, HW, HW, 1), -0.5, np.float32), "", "init_from_range=0_255\\|0_1\\|normalised"),
        (np.zeros((6, HW, HW, 1), np.uint8), "normalised", "uint8 images, which are 0..255"),
    ],
)
def test_undeclared_or_contradictory_ranges_are_refused(tmp_path, images, declared, message):
    ds = _dataset()
    path = _write(tmp_path / "s.npz", images)
    config = tiny_config(
        f"dm,ipc{IPC}", **{"distill.init_from": path, "distill.init_from_range": declared}
    )
    with pytest.raises(ConfigError, match=f"distill.init_from .*{message}"):
        state.read_init(path, ds, config)


def test_decide_pixel_range_rules():
    floats = np.zeros((2, 4, 4, 1), np.float32)
    decide = data.decide_pixel_range
    assert decide(floats.astype(np.uint8), "", None, "s", "f") == "0_255"
    assert decide(floats, "", None, "s", "f") == "0_1"
    assert decide(floats + 3, "", "0_1", "s", "f") == "0_1"  # the file says so
    assert decide(floats - 3, "normalised", None, "s", "f") == "normalised"
    with pytest.raises(
        ConfigError, match="declares its pixel range as '0_1', but --config.f=0_255"
    ):
        decide(floats, "0_255", "0_1", "s", "f")
    with pytest.raises(ConfigError, match="holds int32 images; expected uint8 or float"):
        decide(floats.astype(np.int32), "", None, "s", "f")
    assert data.pixels_of(np.uint8([[255, 51]]), "0_255").tolist() == [[1.0, np.float32(0.2)]]


@pytest.mark.parametrize("kind", ["folder", "text", "npy"])
def test_init_from_names_what_the_file_is(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("not an archive\n")
    else:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    message = {"folder": "is a folder", "text": "is a text file", "npy": "single .npy array"}
    with pytest.raises(ConfigError, match=message[kind]):
        state.read_init(str(path), _dataset(), tiny_config(f"dm,ipc{IPC}"))


def test_a_run_made_before_the_field_existed_still_resumes(tmp_path):
    from mim4dd_jax import artifacts, distill

    config = tiny_config(f"dm,ipc{IPC}")
    old = distill._config_fingerprint(config)
    del old["distill.init_from_range"]
    artifacts.write_json(str(tmp_path / "config.json"), old)
    distill.check_same_run(str(tmp_path), config)  # the same run
    config.distill.init_from_range = "0_255"
    with pytest.raises(ConfigError, match="distill.init_from_range=None, not '0_255'"):
        distill.check_same_run(str(tmp_path), config)
